"""Replay: fold the events stream from its beginning, then follow it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from hafence.bus.base import BusBase
from hafence.bus.errors import Reject, Retry
from hafence.contracts import Message
from hafence.routes import accepted_types

log = logging.getLogger("hafence.bus")

# A handler that asks for a retry (Retry) is given this many tries per stored message.
MAX_REPLAY_RETRIES = 3


class Replaying(BusBase):
    async def replay(
        self,
        filters: list[str],
        decoder: msgspec.json.Decoder[Any] | Any,
        handler: Callable[[Any, Msg], Awaitable[None]],
        caught_up: asyncio.Event,
        dead_letters: bool = True,
    ) -> None:
        """Fold the events stream into a service's state, from the beginning, then follow it.

        An ordered consumer: nothing to ack, the stream itself is the journal.
        ``caught_up`` is set once the history has been read, so a service acts on
        what it knows only after it knows everything that happened before it started.
        ``decoder`` states the types the caller accepts; each message is decoded by
        its subject (S5). A message that breaks the seam, or whose handler raises
        anything, is dead-lettered (unless ``dead_letters`` is False: a reader such as
        the CLI skips it) and skipped: a stored message can never make a replay, and
        so its service, crash-loop (L3)."""
        accepts = accepted_types(decoder)
        config = ConsumerConfig(filter_subjects=filters, deliver_policy=DeliverPolicy.ALL)
        sub = await self.js.subscribe(filters[0], stream=self.streams.events, config=config, ordered_consumer=True)
        try:
            info = await sub.consumer_info()
            # Delivery starts at once, so num_pending may already read 0 while the
            # history sits unread in our buffer: only "nothing pending and nothing
            # delivered" means there is no history. Otherwise the message that
            # carries num_pending == 0 is the last of it.
            if info.num_pending == 0 and not (info.delivered and info.delivered.consumer_seq):
                caught_up.set()
            async for msg in sub.messages:
                try:
                    await self._replay_one(msg, accepts, handler, dead_letters)
                finally:
                    if msg.metadata.num_pending == 0:
                        caught_up.set()
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def _replay_one(
        self, msg: Msg, accepts: tuple[type[Message], ...], handler: Callable[[Any, Msg], Awaitable[None]],
        dead_letters: bool,
    ) -> None:
        # The id makes a replay after a restart dead-letter the same message only once.
        msg_id = f"{self.service}:{self.streams.events}:{msg.metadata.sequence.stream}"
        event, error = self._decode(msg, accepts)
        if not error:
            for attempt in range(1, MAX_REPLAY_RETRIES + 1):
                try:
                    await handler(event, msg)
                    return
                except Reject as err:
                    error = f"rejected: {err}"
                except Retry as err:
                    error = f"still failing after {attempt} attempts: {err}"
                    if attempt < MAX_REPLAY_RETRIES:
                        await asyncio.sleep(err.delay)
                        continue
                except Exception as err:
                    log.exception("handling stored message %s failed; skipping it", msg.subject)
                    error = f"handler failed: {err!r}"
                break
        if dead_letters:
            await self.dead_letter(msg.subject, msg.data, error, dict(msg.headers or {}), msg_id=msg_id)
