"""A durable pull consumer: ack after the work, nak to retry, dead-letter what never can succeed."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import msgspec
import nats.errors
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind, Status, StatusCode

from hafence.bus.base import BusBase, Handler
from hafence.bus.errors import Reject, Retry
from hafence.bus.subject_kind import subject_kind
from hafence.telemetry import extract_context, tracer

log = logging.getLogger("hafence.bus")

MAX_HANDLER_ATTEMPTS = 20

class Consuming(BusBase):
    async def consume(
        self,
        stream: str,
        durable: str,
        decoder: msgspec.json.Decoder[Any],
        handler: Handler,
        concurrency: int = 1,
    ) -> None:
        """Run a durable pull consumer until cancelled.

        With ``concurrency`` > 1, up to that many messages are handled at once
        (the fencer fences several hosts in parallel)."""
        sub = await self.js.pull_subscribe_bind(durable=durable, stream=stream)
        slots = asyncio.Semaphore(concurrency)
        try:
            async with asyncio.TaskGroup() as tg:
                while True:
                    await slots.acquire()
                    try:
                        msgs = await sub.fetch(1, timeout=5.0)
                    except (nats.errors.TimeoutError, TimeoutError):
                        slots.release()
                        continue
                    except nats.errors.ConnectionClosedError:
                        slots.release()
                        raise
                    except Exception as err:  # reconnecting, stream leader moving
                        slots.release()
                        log.warning("fetch from %s/%s failed: %s", stream, durable, err)
                        await asyncio.sleep(0.5)
                        continue
                    for msg in msgs:
                        tg.create_task(self._handle_released(msg, decoder, handler, slots))
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def _handle_released(
        self, msg: Msg, decoder: msgspec.json.Decoder[Any], handler: Handler, slots: asyncio.Semaphore
    ) -> None:
        try:
            await self._handle_jetstream(msg, decoder, handler)
        finally:
            slots.release()

    async def _handle_jetstream(self, msg: Msg, decoder: msgspec.json.Decoder[Any], handler: Handler) -> None:
        headers = dict(msg.headers or {})
        event, error = await self._decode(msg, decoder)
        if error:
            await msg.ack()  # kept in the dead-letter stream; redelivering it cannot help
            return
        with tracer().start_as_current_span(
            f"{self.service} process {subject_kind(msg.subject)}",
            context=extract_context(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.operation.type": "process",
                "messaging.consumer.group.name": msg.metadata.consumer or "",
                "messaging.message.delivery_count": msg.metadata.num_delivered or 1,
            },
        ) as span:
            try:
                await handler(event, msg)
            except Reject as err:
                span.set_status(Status(StatusCode.ERROR, str(err)))
                await self.dead_letter(msg.subject, msg.data, f"rejected: {err}", headers)
                await msg.ack()
            except Retry as err:
                span.set_status(Status(StatusCode.ERROR, str(err)))
                log.warning("will retry %s: %s", msg.subject, err)
                await msg.nak(delay=err.delay)
            except Exception as err:
                span.record_exception(err)
                span.set_status(Status(StatusCode.ERROR, str(err)))
                delivered = msg.metadata.num_delivered or 1
                if delivered >= MAX_HANDLER_ATTEMPTS:
                    log.exception("giving up on %s after %d attempts", msg.subject, delivered)
                    await self.dead_letter(
                        msg.subject, msg.data, f"handler failed {delivered} times: {err!r}", headers
                    )
                    await msg.ack()
                else:
                    log.exception("handling %s failed (attempt %d); will retry", msg.subject, delivered)
                    await msg.nak(delay=min(30.0, 0.5 * delivered))
            else:
                await msg.ack()
