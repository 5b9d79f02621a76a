"""A simulated power switch, shared through files between the fencer's ``sim``
driver (which switches it) and the lab's simulated hosts (which obey it).

One JSON file per port: ``{"state": "on"|"off", "effective_at": <epoch>,
"offs": <count>}``. A switch to off takes ``off_delay_s`` to take effect, like a
real PSU draining, so the fencer has to poll until it reads off. ``offs`` counts
the switches to off, so a host that polls its power now and then still learns
that it was power-cycled (a fence with action "reboot" is off, confirm, on: over
faster than a lab host's poll).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Literal

Power = Literal["on", "off"]


class SimPowerSwitch:
    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.dir = Path(state_dir)

    def _path(self, port: str) -> Path:
        if not port or "/" in port or port.startswith("."):
            raise ValueError(f"invalid sim power port {port!r}")
        return self.dir / f"{port}.json"

    def _read(self, port: str) -> dict[str, object]:
        try:
            data = json.loads(self._path(port).read_text())
        except FileNotFoundError:
            return {"state": "on", "previous": "on", "effective_at": 0.0}
        return data if isinstance(data, dict) else {}

    def read(self, port: str, now: float | None = None) -> Power:
        data = self._read(port)
        now = time.time() if now is None else now
        effective_at = float(data.get("effective_at", 0.0))  # type: ignore[arg-type]
        state = data.get("state") if now >= effective_at else data.get("previous", "on")
        return "off" if state == "off" else "on"

    def power_cycles(self, port: str, now: float | None = None) -> int:
        """How many times the port has been off (an off still draining does not count yet)."""
        data = self._read(port)
        now = time.time() if now is None else now
        offs = data.get("offs", 0)
        offs = offs if isinstance(offs, int) else 0
        draining = data.get("state") == "off" and now < float(data.get("effective_at", 0.0))  # type: ignore[arg-type]
        return offs - 1 if draining and data.get("previous") != "off" else offs

    def switch(self, port: str, state: Power, delay_s: float = 0.0, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.dir.mkdir(parents=True, exist_ok=True)
        current = self.read(port, now)
        offs = self._read(port).get("offs", 0)
        offs = offs if isinstance(offs, int) else 0
        if state == "off" and current == "on":
            offs += 1
        path = self._path(port)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"state": state, "previous": current, "effective_at": now + delay_s,
                                   "offs": offs}))
        os.replace(tmp, path)
