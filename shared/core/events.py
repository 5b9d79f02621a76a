"""What a driver hands a core: one event at a time, with the node's clocks."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hafence.contracts import Message


@dataclass(frozen=True, slots=True)
class Now:
    """The node's clocks at the event: ``mono`` to decide by (never goes back),
    ``wall`` to stamp messages with and to compare with other nodes' stamps."""

    mono: float
    wall: float


@dataclass(frozen=True, slots=True)
class Started:
    """The driver is connected and its inputs are open (or opening): the core sets
    its first timers and asks its ports for what it needs to restore."""


@dataclass(frozen=True, slots=True)
class Delivered:
    """A message from an input, already decoded and checked against its subject
    (S5, ``hafence.routes``): a message that fails is dead-lettered by the driver
    and never reaches the core.

    ``token`` names a work-queue delivery the core must settle with exactly one of
    ``Ack``/``Nak``/``Term`` (0: nothing to settle: a replay or a core subscription).
    ``stored_at`` is when the stream stored it (wall clock; None for core NATS);
    ``pending`` how many matching messages wait behind it in the stream;
    ``attempt`` the delivery count (1 for the first); ``sequence`` its stream
    sequence (0 for core NATS): a core that publishes with
    ``Publish(expect_last_subject_seq=...)`` learns the last one from here."""

    source: str
    subject: str
    message: Message
    token: int = 0
    stored_at: float | None = None
    pending: int = 0
    attempt: int = 1
    headers: dict[str, str] = field(default_factory=dict)
    sequence: int = 0


@dataclass(frozen=True, slots=True)
class CaughtUp:
    """A replay input has handed over everything the stream held when it opened."""

    source: str


@dataclass(frozen=True, slots=True)
class Asked:
    """A request on a served subject; answer it with ``Reply(token, message)``."""

    source: str
    subject: str
    message: Message
    token: int
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TimerFired:
    key: str


@dataclass(frozen=True, slots=True)
class Returned:
    """The outcome of a ``Call``, ``Request`` or tagged ``Publish``: ``value`` on
    success, ``error`` (non-empty, naming what went wrong) on failure."""

    tag: str
    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@dataclass(frozen=True, slots=True)
class LeaseChanged:
    """The role lease (``Inputs.lease``) was taken, renewed, raised or lost.
    ``valid_until`` is on the node's monotonic clock: past it, the core must act
    as if the lease were lost even before the driver says so (a paused process)."""

    held: bool
    term: int
    valid_until: float = 0.0


Event = Started | Delivered | CaughtUp | Asked | TimerFired | Returned | LeaseChanged
