"""Sans-I/O service cores: ``handle(event, now) -> [effects]``.

Every decision of every hafence service lives in a *core*: an object that takes
one event and the node's clocks and returns what to do. It never awaits, never
reads a clock, never touches NATS, a file or a device. A *driver* turns
transport deliveries, replies, timers and port results into events, and effects
into I/O. There are two drivers and they are generic: ``hafence.core.driver``
(asyncio over nats-py, production) and ``hafence.sim.driver`` (the simulation,
over the in-memory NATS and the simulated world). docs/cores.md is the contract.
"""

from hafence.core.effects import (
    Ack,
    Call,
    CancelTimer,
    Effect,
    InProgress,
    Log,
    Nak,
    Publish,
    Reply,
    Request,
    SetTimer,
    Span,
    Term,
)
from hafence.core.events import (
    Asked,
    CaughtUp,
    Delivered,
    Event,
    LeaseChanged,
    Now,
    Returned,
    Started,
    TimerFired,
)
from hafence.core.inputs import Consume, Inputs, Lease, ReplayInput, Serve, Subscribe
from hafence.core.machine import Core

__all__ = [
    "Ack", "Asked", "Call", "CancelTimer", "CaughtUp", "Consume", "Core", "Delivered", "Effect", "Event",
    "InProgress", "Inputs", "Lease", "LeaseChanged", "Log", "Nak", "Now", "Publish", "ReplayInput", "Reply",
    "Request", "Returned", "Serve", "SetTimer", "Span", "Started", "Subscribe", "Term", "TimerFired",
]
