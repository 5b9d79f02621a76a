"""Core-NATS subscriptions and request/reply serving, with the same dead-letter rule."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg

from hafence.bus.base import BusBase
from hafence.bus.errors import Reject
from hafence.contracts import encode


class Serving(BusBase):
    async def serve(
        self,
        subject: str,
        decoder: msgspec.json.Decoder[Any],
        handler: Callable[[Any, Msg], Awaitable[msgspec.Struct | None]],
        queue: str = "",
    ) -> None:
        """Handle core-NATS messages until cancelled; reply when the handler returns a message."""
        sub = await self.nc.subscribe(subject, queue=queue)
        try:
            async for msg in sub.messages:
                await self._handle_core(msg, decoder, handler)
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def _handle_core(
        self,
        msg: Msg,
        decoder: msgspec.json.Decoder[Any],
        handler: Callable[[Any, Msg], Awaitable[msgspec.Struct | None]],
    ) -> None:
        headers = dict(msg.headers or {})
        event, error = await self._decode(msg, decoder)
        if error:
            if msg.reply:
                await msg.respond(encode_error(error))
            return
        try:
            reply = await handler(event, msg)
        except Reject as err:
            await self.dead_letter(msg.subject, msg.data, f"rejected: {err}", headers)
            if msg.reply:
                await msg.respond(encode_error(f"rejected: {err}"))
            return
        if reply is not None and msg.reply:
            await msg.respond(encode(reply))


def encode_error(error: str) -> bytes:
    return msgspec.json.encode({"type": "error", "v": 1, "error": error})
