"""Replay: fold the events stream from its beginning, then follow it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from hafence.bus.base import BusBase
from hafence.bus.errors import Reject


class Replaying(BusBase):
    async def replay(
        self,
        filters: list[str],
        decoder: msgspec.json.Decoder[Any],
        handler: Callable[[Any, Msg], Awaitable[None]],
        caught_up: asyncio.Event,
        dead_letters: bool = True,
    ) -> None:
        """Fold the events stream into a service's state, from the beginning, then follow it.

        An ordered consumer: nothing to ack, the stream itself is the journal.
        ``caught_up`` is set once the history has been read, so a service acts on
        what it knows only after it knows everything that happened before it started."""
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
                # A reader (the CLI) skips what does not decode; a consumer dead-letters
                # it, with an id that keeps a replay after a restart from doing it twice.
                msg_id = f"{self.service}:{self.streams.events}:{msg.metadata.sequence.stream}"
                event, error = await self._decode(msg, decoder, msg_id, dead_letters)
                if not error:
                    try:
                        await handler(event, msg)
                    except Reject as err:
                        await self.dead_letter(
                            msg.subject, msg.data, f"rejected: {err}", dict(msg.headers or {}), msg_id=msg_id
                        )
                if msg.metadata.num_pending == 0:
                    caught_up.set()
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass
