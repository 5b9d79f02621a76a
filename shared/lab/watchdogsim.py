"""A simulated hardware watchdog for the lab's hosts.

The agent's side (``SimWatchdog``, the lab's ``WatchdogDevice``) keeps one JSON file
per host in a directory: ``{"armed", "timeout_s", "fed_at"}``. The simulator
process plays the watchdog chips of every host: a host whose watchdog is armed
and was not fed within its timeout is reset, i.e. power-cycled through the lab's
simulated power switch (its agent then sees the power go and come back: VMs gone,
new boot). A reset disarms the watchdog, as a real reset does; a host whose
power is off has no running watchdog. Every reset is appended to
``resets.jsonl`` in the directory.

    python -m hafence.lab.watchdogsim --dir DIR --power-dir DIR

It is a process of its own on purpose: a frozen or killed agent must still be
reset, as with a real watchdog.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

from hafence.lab.power import SimPowerSwitch
from hafence.subjects import check_name

# How long the simulated host stays off during a reset.
RESET_OFF_S = 0.3


class SimWatchdog:
    """The lab's watchdog device for one host: a file the simulator watches."""

    def __init__(self, directory: str | os.PathLike[str], host: str) -> None:
        self.path = Path(directory) / f"{check_name('host', host)}.json"
        self.timeout_s = 0.0

    def _write(self, armed: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"armed": armed, "timeout_s": self.timeout_s, "fed_at": time.time()}))
        os.replace(tmp, self.path)

    def arm(self, timeout_s: float) -> float:
        self.timeout_s = timeout_s
        self._write(True)
        return timeout_s

    def feed(self) -> None:
        self._write(True)

    def disarm(self) -> None:
        self._write(False)


def sweep(directory: Path, switch: SimPowerSwitch, now: float) -> list[str]:
    """One pass over every host's watchdog; returns the hosts reset (switched off)."""
    reset = []
    for path in sorted(directory.glob("*.json")):
        host = path.stem
        try:
            state = json.loads(path.read_text())
            armed, timeout, fed_at = bool(state["armed"]), float(state["timeout_s"]), float(state["fed_at"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # being replaced, or not ours
        if not armed:
            continue
        if switch.read(host, now) == "off":
            armed = False  # the host is off: so is its watchdog
        elif now - fed_at > timeout:
            switch.switch(host, "off", 0.0, now)
            reset.append(host)
            with open(directory / "resets.jsonl", "a") as log:
                log.write(json.dumps({"host": host, "at": now, "fed_at": fed_at, "timeout_s": timeout}) + "\n")
            armed = False
        if not armed:
            tmp = path.with_name(f".{path.name}.sim.tmp")
            tmp.write_text(json.dumps({"armed": False, "timeout_s": timeout, "fed_at": fed_at}))
            os.replace(tmp, path)
    return reset


def resets(directory: str | os.PathLike[str]) -> list[dict[str, object]]:
    """The resets so far (tests)."""
    try:
        text = (Path(directory) / "resets.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hafence.lab.watchdogsim", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", required=True, help="the watchdog files of the lab's hosts")
    parser.add_argument("--power-dir", required=True, help="the lab's simulated power switch")
    parser.add_argument("--period", type=float, default=0.05)
    args = parser.parse_args(argv)
    directory, switch = Path(args.dir), SimPowerSwitch(args.power_dir)
    directory.mkdir(parents=True, exist_ok=True)
    running = True

    def stop(*_: object) -> None:
        nonlocal running
        running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pending_on: dict[str, float] = {}
    print("watchdog simulator serving", flush=True)
    while running:
        now = time.time()
        for host in sweep(directory, switch, now):
            print(f"watchdog reset {host}", flush=True)
            pending_on[host] = now + RESET_OFF_S
        for host, at in list(pending_on.items()):
            if now >= at:
                switch.switch(host, "on", 0.0)
                del pending_on[host]
        time.sleep(args.period)
    return 0


if __name__ == "__main__":
    sys.exit(main())
