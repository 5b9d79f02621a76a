"""The one wrapper over nats-py every service uses, one concern per file.

* ``connection``: connect with reconnect forever (a service outlives a NATS restart, L2);
* ``provision``: the streams, KV bucket and consumers, idempotently;
* ``publish``: trace context in the headers and ``Nats-Msg-Id`` for idempotency;
* ``consume``: a durable pull-consumer loop that acks only after the handler
  finished, naks on failure;
* ``replay``: the events stream folded from its beginning, then followed;
* ``serve``: request-reply and plain subscriptions;
* ``dead_letters``: what cannot be processed goes to the dead-letter subject.
"""

from hafence.bus.base import Handler
from hafence.bus.client import Bus
from hafence.bus.consume import MAX_HANDLER_ATTEMPTS
from hafence.bus.errors import Reject, Retry
from hafence.bus.names import StreamNames
from hafence.bus.serve import encode_error

__all__ = ["MAX_HANDLER_ATTEMPTS", "Bus", "Handler", "Reject", "Retry", "StreamNames", "encode_error"]
