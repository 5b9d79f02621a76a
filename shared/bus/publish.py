"""Publishing: to JetStream with trace context and an idempotency id, core NATS, requests."""

from __future__ import annotations

import msgspec

from hafence.bus.base import BusBase
from hafence.contracts import encode
from hafence.telemetry import inject_headers


class Publishing(BusBase):
    async def publish(self, subject: str, msg: msgspec.Struct, msg_id: str = "",
                      expect_last_subject_seq: int | None = None) -> None:
        """Publish to JetStream and wait for the stream's ack (at-least-once). With
        ``expect_last_subject_seq`` the stream stores it only if the subject's last
        message has that sequence (a compare-and-set; nats-py raises APIError 10071)."""
        headers = inject_headers()
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        if expect_last_subject_seq is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expect_last_subject_seq)
        await self.js.publish(subject, encode(msg), headers=headers, timeout=5.0)

    async def publish_core(self, subject: str, msg: msgspec.Struct) -> None:
        """Fire-and-forget core NATS publish (heartbeats: high rate, never stored)."""
        await self.nc.publish(subject, encode(msg))

    async def request(self, subject: str, msg: msgspec.Struct, timeout: float) -> bytes:
        reply = await self.nc.request(subject, encode(msg), timeout=timeout, headers=inject_headers())
        return reply.data
