"""Which fence requests the fencer may run: the fencing token of S3. Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    highest: int
    reason: str = ""


def admit(term: int, highest: int) -> Admission:
    """A request runs only if its leader term is at least the newest term the
    fencer has seen; running it raises the newest term to its own."""
    if term < highest:
        return Admission(False, highest, f"stale leader term {term}: a newer arbiter (term {highest}) has acted")
    return Admission(True, max(term, highest))
