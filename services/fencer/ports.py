"""The fencer core's ports: what it asks the outside world for, and the types that
come back. Each port is a Protocol of its ops; the core names them in ``Call(port,
op, args, tag)`` and reads ``Returned(tag).value``.

* ``journal`` (store): ``load() -> JournalState``; ``admit(request, verdict, at)``
  writes an admission (a refusal, or the raised term and the request's attempt)
  before anything is done about it; ``record(request, result)``.
* ``power``: ``fence(request) -> FenceReport``; ``check(host) -> Protection``.
* ``replicas`` (what other fencer replicas decided): ``admit(request) -> Verdict``;
  ``claim(request, highest) -> Claimed | Answer``; ``raise_term(term)``;
  ``record(request, result)``; ``release(request_id)``.

Production binds them over SQLite, the ``Executor`` and the KV buckets
(``hafence.fencer.live_ports``); this module holds the in-memory bindings that unit
tests and the simulation use: ``MemoryJournal`` (survives a crash of the core, as
the SQLite file does) and ``SoloReplicas`` (one replica: always Run). Their
methods are plain and return values, as a simulation port may.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from hafence.contracts import DeviceEvidence, FenceRequest, FenceResult
from hafence.fencer.admission import Answer, Refuse, Run, Seen, Verdict
from hafence.fencer.protection import Protection
from hafence.fencer.topology import Verdict as PowerVerdict

__all__ = [
    "Claimed", "FenceReport", "JournalPort", "JournalState", "MemoryJournal", "PowerPort", "Protection",
    "ReplicasPort", "SoloReplicas",
]


@dataclass(frozen=True, slots=True)
class FenceReport:
    """What a fence did: the topology's verdict (outcome ``confirmed_off`` only when
    every device of one level read back off: S2) and every device's evidence."""

    verdict: PowerVerdict
    evidence: list[DeviceEvidence]


@dataclass(frozen=True, slots=True)
class JournalState:
    """What the journal holds, as the core keeps it in memory: the highest term ever
    admitted (S3) and every request seen, with its result once recorded (S4)."""

    highest_term: int = 0
    requests: dict[str, Seen] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Claimed:
    """The request is this replica's to run; ``fence`` is the claim's fencing token
    (0 when there is no claim to hold: one replica)."""

    fence: int = 0


class JournalPort(Protocol):
    def load(self) -> JournalState: ...

    def admit(self, request: FenceRequest, verdict: Verdict, at: float) -> None:
        """Refuse: keep the refusal. Run: raise the highest term to ``verdict.highest``
        and record the attempt (``verdict.attempts``). Answer: raise the term only."""
        ...

    def record(self, request: FenceRequest, result: FenceResult) -> None: ...


class PowerPort(Protocol):
    def fence(self, request: FenceRequest) -> FenceReport:
        """Run the host's topology for ``request.action`` with the levels its
        ``method`` allows. Raises (the ``Returned`` carries an error) when it was
        stopped, e.g. its claim across replicas was lost: nothing may be published."""
        ...

    def check(self, host: str) -> Protection: ...


class ReplicasPort(Protocol):
    def admit(self, request: FenceRequest) -> Verdict: ...

    def claim(self, request: FenceRequest, highest: int) -> Claimed | Answer:
        """Wait until this replica holds the request, or another replica recorded its result."""
        ...

    def raise_term(self, term: int) -> None: ...

    def record(self, request: FenceRequest, result: FenceResult) -> None: ...

    def release(self, request_id: str) -> None: ...


@dataclass
class _Row:
    incident: str
    host: str
    term: int
    action: str
    received_at: float
    attempts: int
    result: FenceResult | None = None


@dataclass(frozen=True, slots=True)
class Refusal:
    request_id: str
    host: str
    term: int
    reason: str
    at: float


class MemoryJournal:
    """The journal in memory, with the SQLite journal's rules: the term never goes
    back, an attempt is counted, a result is written only for the request it answers."""

    def __init__(self) -> None:
        self.highest_term = 0
        self.rows: dict[str, _Row] = {}
        self.refusals: list[Refusal] = []
        self.writes = 0  # how many writes were made: a test counts them

    def load(self) -> JournalState:
        return JournalState(self.highest_term, {
            request_id: Seen(row.incident, row.host, row.attempts, row.result) for request_id, row in self.rows.items()
        })

    def admit(self, request: FenceRequest, verdict: Verdict, at: float) -> None:
        self.writes += 1
        if isinstance(verdict, Refuse):
            self.refusals.append(Refusal(request.request_id, request.host, request.term, verdict.reason, at))
            return
        self.highest_term = max(self.highest_term, verdict.highest)
        if isinstance(verdict, Run):
            row = self.rows.get(request.request_id)
            if row is None:
                self.rows[request.request_id] = _Row(request.incident, request.host, request.term, request.action,
                                                     at, verdict.attempts)
            elif row.result is None:
                row.attempts = verdict.attempts

    def record(self, request: FenceRequest, result: FenceResult) -> None:
        self.writes += 1
        row = self.rows.get(request.request_id)
        if row is not None and (row.incident, row.host) == (request.incident, request.host):
            row.result = result


class SoloReplicas:
    """One fencer replica: nothing is shared, so every request is this replica's to
    decide, against its own journal alone."""

    def admit(self, request: FenceRequest) -> Verdict:
        return Run(attempts=0, highest=0)

    def claim(self, request: FenceRequest, highest: int) -> Claimed | Answer:
        return Claimed()

    def raise_term(self, term: int) -> None:
        return None

    def record(self, request: FenceRequest, result: FenceResult) -> None:
        return None

    def release(self, request_id: str) -> None:
        return None
