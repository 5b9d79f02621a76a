"""Which fence requests the fencer may run: the fencing token of S3 and the
at-most-once rule of S4. Pure: the journal reads the facts, this decides, the
journal writes the outcome in the same transaction."""

from __future__ import annotations

from dataclasses import dataclass

from hafence.contracts import FenceResult


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


@dataclass(frozen=True, slots=True)
class Seen:
    """What the journal holds for a request id."""

    incident: str
    host: str
    attempts: int
    result: FenceResult | None


@dataclass(frozen=True, slots=True)
class Run:
    """Run the topology; ``attempts`` > 1: a fencer died mid-request before it recorded."""

    attempts: int
    highest: int


@dataclass(frozen=True, slots=True)
class Answer:
    """The request ran: its recorded result is the answer, never a second fence."""

    result: FenceResult
    highest: int


@dataclass(frozen=True, slots=True)
class Refuse:
    reason: str
    highest: int


Verdict = Run | Answer | Refuse


def admit_request(request_id: str, incident: str, host: str, term: int, highest: int,
                  seen: Seen | None) -> Verdict:
    """S3 before S4: a stale leader is told so, even for a request id that ran.
    A journal entry answers only the request it was written for: the same id,
    incident and host. A request id seen with another incident or host is never
    answered and never run (at most once per request id): it is refused, and the
    arbiter issues a new id."""
    admission = admit(term, highest)
    if not admission.admitted:
        return Refuse(admission.reason, admission.highest)
    if seen is not None:
        if (seen.incident, seen.host) != (incident, host):
            return Refuse(
                f"request id {request_id!r} was used for incident {seen.incident!r} of host {seen.host!r}, "
                f"not incident {incident!r} of host {host!r}: its record can never answer another incident",
                admission.highest,
            )
        if seen.result is not None:
            return Answer(seen.result, admission.highest)
        return Run(seen.attempts + 1, admission.highest)
    return Run(1, admission.highest)
