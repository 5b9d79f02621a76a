"""Publishing a decision through a NATS hiccup: bounded retries with back-off.

A JetStream publish waits for the stream's ack. While a stream elects a new
leader (a NATS node restarting, the cluster profile), or while the client
reconnects, that ack does not come: the publish times out, or finds no
responders. Such a failure is transient, and a service that lets it escape its
loop restarts (with a delay) for nothing. So the services that publish decisions
(the arbiter, the scheduler) publish through ``publish_retrying``.

Retrying is safe only when a repeat cannot store the fact twice: the message
should carry a deterministic message id (``Nats-Msg-Id``), so that a first try
whose ack was lost and its retry are one message in the stream. The callers say
which id identifies each of their messages.

Anything else (a payload too large, a bad subject, a stream refusing the
message for good) is not retried: the error goes to the caller at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import msgspec
import nats.errors
import nats.js.errors

from hafence.logs import fields

log = logging.getLogger("hafence.retry")

# What a stream leader election or a reconnect looks like to a publisher.
TRANSIENT: tuple[type[BaseException], ...] = (
    TimeoutError,  # includes nats.errors.TimeoutError: no ack in time
    nats.errors.NoRespondersError,
    nats.js.errors.NoStreamResponseError,  # no stream leader answered
    nats.js.errors.ServiceUnavailableError,  # 503: JetStream not ready
    nats.js.errors.ServerError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
)
ATTEMPTS = 5
FIRST_DELAY_S = 0.25
MAX_DELAY_S = 2.0


class Publisher(Protocol):
    async def publish(self, subject: str, msg: msgspec.Struct, msg_id: str = "",
                      expect_last_subject_seq: int | None = None, expect_last_of: str = "") -> int | None: ...


class NotPublished(Exception):
    """Every try failed: the caller must leave its decision to be taken again."""


async def publish_retrying(
    bus: Publisher, subject: str, msg: msgspec.Struct, msg_id: str = "", *,
    attempts: int = ATTEMPTS, first_delay_s: float = FIRST_DELAY_S, max_delay_s: float = MAX_DELAY_S,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    expect_last_subject_seq: int | None = None,
    expect_last_of: str = "",
) -> int | None:
    """Publish, retrying transient failures ``attempts`` times in all, the delay
    doubling from ``first_delay_s`` up to ``max_delay_s``; raises ``NotPublished``
    (naming the subject and the last error) when all of them failed. Returns the
    stream sequence the message is stored at (a duplicate's: the first copy's), or
    None from a publisher that does not say."""
    delay = first_delay_s
    for attempt in range(1, attempts + 1):
        try:
            if expect_last_subject_seq is None:
                return await bus.publish(subject, msg, msg_id=msg_id)
            if not expect_last_of:
                return await bus.publish(subject, msg, msg_id=msg_id, expect_last_subject_seq=expect_last_subject_seq)
            return await bus.publish(subject, msg, msg_id=msg_id, expect_last_subject_seq=expect_last_subject_seq,
                                     expect_last_of=expect_last_of)
        except TRANSIENT as err:
            what = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
            if attempt == attempts:
                raise NotPublished(f"publish to {subject} (msg id {msg_id or 'none'}) failed {attempts} times; "
                                   f"last: {what}") from err
            log.warning("publish failed; retrying", extra=fields(subject=subject, attempt=attempt, error=what,
                                                                  retry_in_s=delay))
        await sleep(delay)
        delay = min(max_delay_s, delay * 2)
