"""What a core listens to, declared once; the driver opens these for it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class Consume:
    """A durable pull consumer on a work-queue stream: ``Delivered`` with a token
    the core settles. ``accepts``: the message types (a type, a union, or a
    ``Decoders`` decoder); what decodes is chosen by each message's subject (S5)."""

    name: str
    stream: str
    durable: str
    filters: list[str]
    accepts: Any
    ack_wait: float = 30.0
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class ReplayInput:
    """An ordered replay of a stream from its beginning, then following:
    ``Delivered`` (token 0) for each message, ``CaughtUp`` once."""

    name: str
    filters: list[str]
    accepts: Any


@dataclass(frozen=True, slots=True)
class Subscribe:
    """A core NATS subscription (``queue``: a queue group): ``Delivered`` (token 0)."""

    name: str
    subject: str
    accepts: Any
    queue: str = ""


@dataclass(frozen=True, slots=True)
class Serve:
    """Answer requests on a subject: ``Asked``, answered with ``Reply``."""

    name: str
    subject: str
    accepts: Any


@dataclass(frozen=True, slots=True)
class Lease:
    """Hold a role lease (``hafence.lease``): ``LeaseChanged`` events. ``after``: the
    replay input that must have caught up before the lease is taken (its term must
    be above every term the replay shows; the core reports terms it saw with
    ``Call("lease", "learn", (term,))`` and asks for a higher one with
    ``Call("lease", "raise_term", (), tag)``)."""

    role: str
    ttl: float
    after: str = ""


@dataclass(frozen=True, slots=True)
class Inputs:
    consumers: list[Consume] = field(default_factory=list)
    replays: list[ReplayInput] = field(default_factory=list)
    subscriptions: list[Subscribe] = field(default_factory=list)
    serves: list[Serve] = field(default_factory=list)
    lease: Lease | None = None
