"""What a handler receives from the bus, as a Protocol both transports satisfy.

nats-py's ``nats.aio.msg.Msg`` satisfies ``Delivery`` and ``Request`` as it is (its
``metadata`` is a ``Msg.Metadata`` with the same fields), so the production bus can
type its handlers against these Protocols without wrapping anything; the simulated
transport hands out ``SimDelivery`` / ``CoreMsg`` objects of the same shape.
tests/test_sim_ports.py checks both against a real nats-server.

Only what hafence's handlers use is here: subject, data, headers, the JetStream
metadata (stream sequence, delivery count, pending count, store time) and the four
acknowledgements; for core messages, the reply subject and ``respond``.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Protocol, runtime_checkable


class SequencePairLike(Protocol):
    @property
    def consumer(self) -> int: ...
    @property
    def stream(self) -> int: ...


class DeliveryMetadata(Protocol):
    @property
    def sequence(self) -> SequencePairLike: ...
    @property
    def num_pending(self) -> int: ...
    @property
    def num_delivered(self) -> int: ...
    @property
    def timestamp(self) -> datetime.datetime: ...
    @property
    def stream(self) -> str: ...
    @property
    def consumer(self) -> str: ...


@runtime_checkable
class Message(Protocol):
    """A message as any handler sees it."""

    subject: str
    data: bytes
    headers: dict[str, str] | None
    reply: str


@runtime_checkable
class Delivery(Message, Protocol):
    """A JetStream delivery: metadata, and what becomes of it. The acknowledgements
    apply to the stream sequence, whichever delivery of it they come from."""

    @property
    def metadata(self) -> DeliveryMetadata: ...

    async def ack(self) -> None: ...
    async def nak(self, delay: float | None = None) -> None: ...
    async def in_progress(self) -> None: ...
    async def term(self) -> None: ...


@runtime_checkable
class Request(Message, Protocol):
    """A core message that may be answered."""

    async def respond(self, data: bytes) -> None: ...


@dataclass(frozen=True, slots=True)
class SequencePair:
    consumer: int
    stream: int


@dataclass(frozen=True, slots=True)
class Metadata:
    """The simulated transport's metadata, field for field nats-py's ``Msg.Metadata``."""

    sequence: SequencePair
    num_pending: int
    num_delivered: int
    timestamp: datetime.datetime  # when the message was stored, server time (as nats-server sends it)
    stream: str
    consumer: str
    domain: str | None = None

    @staticmethod
    def stored_at(seconds: float) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(seconds, datetime.UTC)
