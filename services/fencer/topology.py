"""Fencing topology: what a fence operation must achieve to count as confirmed.

Pacemaker's vocabulary: the *target* is the host, a *level* is a set of
devices that must all succeed (two PDUs feeding two power supplies), and the
*topology* is the ordered list of levels, tried until one succeeds.

S2 lives here: a level is confirmed only when every one of its devices had a
status read that returned ``off``. Pure functions; no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hafence.contracts import DeviceEvidence, FenceOutcome


def level_confirmed(evidence: Sequence[DeviceEvidence]) -> bool:
    return bool(evidence) and all(e.confirmed and e.power_read == "off" for e in evidence)


@dataclass(frozen=True, slots=True)
class Verdict:
    outcome: FenceOutcome
    level: int | None
    reason: str


def verdict(levels: Sequence[Sequence[DeviceEvidence]], level_count: int) -> Verdict:
    """The outcome of a fence operation from the evidence of the levels tried, in order."""
    if level_count == 0:
        return Verdict("failed", None, "host has no fence levels configured: it is not protected")
    for number, evidence in enumerate(levels, start=1):
        if level_confirmed(evidence):
            devices = ", ".join(e.device for e in evidence)
            return Verdict("confirmed_off", number, f"level {number} confirmed off ({devices})")
    problems = [
        f"level {n}: {e.device}: {e.error or 'power read ' + e.power_read}"
        for n, evidence in enumerate(levels, start=1)
        for e in evidence
        if not (e.confirmed and e.power_read == "off")
    ]
    return Verdict("failed", None, "no level confirmed off; " + "; ".join(problems))


class StatusPollSchedule:
    """Delays between status reads: quick at first (most devices are off in well
    under a second), then backing off to ``ceiling`` so a slow BMC is not hammered."""

    def __init__(self, first: float = 0.05, factor: float = 1.6, ceiling: float = 1.0) -> None:
        self.next_delay = first
        self.factor = factor
        self.ceiling = ceiling

    def __next__(self) -> float:
        delay = self.next_delay
        self.next_delay = min(self.ceiling, self.next_delay * self.factor)
        return delay

    def __iter__(self) -> StatusPollSchedule:
        return self
