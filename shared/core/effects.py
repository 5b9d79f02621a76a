"""What a core asks its driver to do. Effects of one ``handle`` call are carried
out in order; an effect with a ``tag`` reports back with ``Returned(tag, ...)``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hafence.contracts import Message


@dataclass(frozen=True, slots=True)
class Publish:
    """Publish ``message`` on ``subject``: to JetStream (stored, ``msg_id`` for
    de-duplication; the driver retries through a NATS hiccup for a few seconds),
    or with ``core=True`` as a plain core NATS message (heartbeats).

    Without a ``tag`` a stored publish is awaited: the next effect is carried out
    only once the stream has it (publish a result, *then* ack the request); a
    failure is only logged. With a ``tag`` it is sent in order (it is on the wire
    before any later effect's message) but not awaited; ``Returned(tag)`` or
    ``Returned(tag, error=...)`` comes once it is stored or given up on."""

    subject: str
    message: Message
    msg_id: str = ""
    tag: str = ""
    core: bool = False
    # Compare-and-set on the stream: stored only if the last message on ``subject`` has
    # this sequence (0: none yet), else ``Returned(tag, error="conflict: ...")``. Two
    # replicas that both believe they lead cannot both claim the same thing.
    expect_last_subject_seq: int | None = None
    # The subjects (a filter, e.g. ``a.b.*``) whose last message that sequence must be,
    # when not ``subject`` alone: each placement record has a subject of its own (the
    # stream keeps a bounded number per subject), and one compare-and-set orders them all.
    expect_last_of: str = ""


@dataclass(frozen=True, slots=True)
class Request:
    """A core NATS request: ``Returned(tag, value=<reply bytes>)`` or
    ``Returned(tag, error=...)`` (no responders, timeout)."""

    subject: str
    message: Message
    timeout: float
    tag: str


@dataclass(frozen=True, slots=True)
class Reply:
    """Answer an ``Asked(token)``; ``message=None`` sends nothing (the asker times out)."""

    token: int
    message: Message | None


@dataclass(frozen=True, slots=True)
class Ack:
    token: int


@dataclass(frozen=True, slots=True)
class Nak:
    """Redeliver after ``delay`` seconds."""

    token: int
    delay: float = 1.0


@dataclass(frozen=True, slots=True)
class Term:
    """Never redeliver: the driver dead-letters the message with ``reason`` first."""

    token: int
    reason: str


@dataclass(frozen=True, slots=True)
class InProgress:
    """Still working on it: reset the ack wait of a delivery not yet settled."""

    token: int


@dataclass(frozen=True, slots=True)
class SetTimer:
    """``TimerFired(key)`` after ``delay`` seconds of the node's monotonic clock;
    setting a key again replaces its timer."""

    key: str
    delay: float


@dataclass(frozen=True, slots=True)
class CancelTimer:
    key: str


@dataclass(frozen=True, slots=True)
class Call:
    """Ask a port (a power device, the hypervisor, the store, the storage lease,
    the lease) to do ``op(*args)``; ``Returned(tag, value|error)`` when done.
    Calls run concurrently: a slow device does not hold up other events. An empty
    ``tag`` means nobody waits for the outcome (a failure is logged)."""

    port: str
    op: str
    args: tuple[Any, ...] = ()
    tag: str = ""


@dataclass(frozen=True, slots=True)
class Log:
    level: Literal["debug", "info", "warning", "error"]
    message: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Span:
    """Open a trace span that the following effects of the same ``handle`` run in
    (their publishes carry it, their calls and requests inherit it), until the
    next ``Span`` of that handle (spans of one handle are siblings). ``parent``:
    the W3C trace headers of the message the decision belongs to (a core keeps
    them from ``Delivered.headers``), so a decision taken at a timer still joins
    its incident's trace; empty: the span joins the event's own context."""

    name: str
    parent: dict[str, str] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    # A new trace (a suspicion is the root of its incident's trace), whatever the event's context.
    root: bool = False


Effect = Publish | Request | Reply | Ack | Nak | Term | InProgress | SetTimer | CancelTimer | Call | Log | Span
