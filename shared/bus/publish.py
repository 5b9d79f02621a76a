"""Publishing: to JetStream with trace context and an idempotency id, core NATS, requests."""

from __future__ import annotations

import msgspec

from hafence.bus.base import BusBase
from hafence.contracts import encode
from hafence.telemetry import inject_headers


class Publishing(BusBase):
    async def publish(self, subject: str, msg: msgspec.Struct, msg_id: str = "") -> None:
        """Publish to JetStream and wait for the stream's ack (at-least-once)."""
        headers = inject_headers()
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        await self.js.publish(subject, encode(msg), headers=headers, timeout=5.0)

    async def publish_core(self, subject: str, msg: msgspec.Struct) -> None:
        """Fire-and-forget core NATS publish (heartbeats: high rate, never stored)."""
        await self.nc.publish(subject, encode(msg))

    async def request(self, subject: str, msg: msgspec.Struct, timeout: float) -> bytes:
        reply = await self.nc.request(subject, encode(msg), timeout=timeout, headers=inject_headers())
        return reply.data
