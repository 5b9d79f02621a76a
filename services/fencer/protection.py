"""Is a host protected? From device checks (log in, read status), decide whether
the host has at least one complete working level: the only way it can fail
over. Pure; no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hafence.contracts import DeviceEvidence


@dataclass(frozen=True, slots=True)
class Protection:
    host: str
    protected: bool
    working_levels: list[int]
    power: str
    reason: str
    checks: list[DeviceEvidence]


def protection(host: str, checks: Sequence[DeviceEvidence], level_count: int) -> Protection:
    if level_count == 0:
        return Protection(host, False, [], "unknown", "not protected: no fence levels configured", list(checks))
    working = []
    for level in range(1, level_count + 1):
        devices = [c for c in checks if c.level == level]
        if devices and all(c.confirmed and not c.error for c in devices):
            working.append(level)
    reads = {c.power_read for c in checks if c.confirmed}
    # A host fed by several outlets is on while any of them is on.
    power = "on" if "on" in reads else ("off" if reads == {"off"} else "unknown")
    if working:
        reason = f"protected: level{'s' if len(working) > 1 else ''} {', '.join(map(str, working))} working"
    else:
        broken = "; ".join(f"level {c.level}: {c.device}: {c.error}" for c in checks if c.error) or "no level answered"
        reason = f"not protected: {broken}"
    return Protection(host, bool(working), working, power, reason, list(checks))
