"""Core-NATS subscriptions and request/reply serving, with the same dead-letter rule."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg

from hafence.bus.base import BusBase
from hafence.bus.errors import Reject
from hafence.contracts import Message, encode
from hafence.routes import accepted_types

log = logging.getLogger("hafence.bus")


class Serving(BusBase):
    async def serve(
        self,
        subject: str,
        decoder: msgspec.json.Decoder[Any] | Any,
        handler: Callable[[Any, Msg], Awaitable[msgspec.Struct | None]],
        queue: str = "",
        answer: bool = True,
    ) -> None:
        """Handle core-NATS messages until cancelled; reply when the handler returns a message.

        ``decoder`` states the types accepted; each message is decoded by its subject
        (S5). A message that breaks the seam, or whose handler raises anything, is
        answered with an error (if it asked) and dead-lettered in the background; the
        loop goes on (L3). With ``answer=False`` (a subscription, not a service) nothing
        is ever sent back: a message published to JetStream on a subject this also
        hears carries the publisher's ack inbox as its reply, and an error sent there
        would reach the publisher as a bogus stream ack."""
        accepts = accepted_types(decoder)
        sub = await self.nc.subscribe(subject, queue=queue)
        try:
            async for msg in sub.messages:
                await self._handle_core(msg, accepts, handler, answer)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def _handle_core(
        self,
        msg: Msg,
        accepts: tuple[type[Message], ...],
        handler: Callable[[Any, Msg], Awaitable[msgspec.Struct | None]],
        answer: bool = True,
    ) -> None:
        event, error = self._decode(msg, accepts)
        reply: msgspec.Struct | None = None
        if not error:
            try:
                reply = await handler(event, msg)
            except asyncio.CancelledError:
                raise
            except Reject as err:
                error = f"rejected: {err}"
            except Exception as err:
                log.exception("handling %s failed", msg.subject)
                error = f"handler failed: {err!r}"
        if error:
            self.dead_letter_soon(msg.subject, msg.data, error, msg.headers)
        if not answer or not msg.reply or (reply is None and not error):
            return
        try:
            await msg.respond(encode_error(error) if error else encode(reply))  # type: ignore[arg-type]
        except Exception as err:  # the asker went away, or NATS did: nothing to keep
            log.warning("could not answer %s: %r", msg.subject, err)


def encode_error(error: str) -> bytes:
    return msgspec.json.encode({"type": "error", "v": 1, "error": error})
