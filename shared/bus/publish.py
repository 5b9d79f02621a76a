"""Publishing: to JetStream with trace context and an idempotency id, core NATS, requests."""

from __future__ import annotations

import msgspec

from hafence.bus.base import BusBase
from hafence.contracts import encode
from hafence.telemetry import inject_headers

# The filter of ``Nats-Expected-Last-Subject-Sequence`` (nats-server 2.11).
EXPECTED_LAST_OF = "Nats-Expected-Last-Subject-Sequence-Subject"


class Publishing(BusBase):
    async def publish(self, subject: str, msg: msgspec.Struct, msg_id: str = "",
                      expect_last_subject_seq: int | None = None, expect_last_of: str = "") -> int:
        """Publish to JetStream and wait for the stream's ack (at-least-once); returns
        the stream sequence it is stored at (a duplicate's: the first copy's). With
        ``expect_last_subject_seq`` the stream stores it only if the subject's last
        message has that sequence (a compare-and-set; nats-py raises APIError 10071);
        with ``expect_last_of`` too, the last message of the subjects that filter matches
        (nats-server 2.11 or later: an older one ignores the header, hafence.bus.connection
        refuses to run on one)."""
        headers = inject_headers()
        if msg_id:
            headers["Nats-Msg-Id"] = msg_id
        if expect_last_subject_seq is not None:
            headers["Nats-Expected-Last-Subject-Sequence"] = str(expect_last_subject_seq)
            if expect_last_of:
                headers[EXPECTED_LAST_OF] = expect_last_of
        ack = await self.js.publish(subject, encode(msg), headers=headers, timeout=5.0)
        return ack.seq

    async def publish_core(self, subject: str, msg: msgspec.Struct) -> None:
        """Fire-and-forget core NATS publish (heartbeats: high rate, never stored)."""
        await self.nc.publish(subject, encode(msg))

    async def request(self, subject: str, msg: msgspec.Struct, timeout: float) -> bytes:
        reply = await self.nc.request(subject, encode(msg), timeout=timeout, headers=inject_headers())
        return reply.data
