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
from hafence.contracts import Message
from hafence.routes import accepted_types
from hafence.telemetry import extract_context, tracer

log = logging.getLogger("hafence.bus")

MAX_HANDLER_ATTEMPTS = 20
# When a dead letter cannot be stored, the message is nak'd and comes back after this.
DEAD_LETTER_RETRY_S = 5.0


class Consuming(BusBase):
    async def consume(
        self,
        stream: str,
        durable: str,
        decoder: msgspec.json.Decoder[Any] | Any,
        handler: Handler,
        concurrency: int = 1,
        max_attempts: int = MAX_HANDLER_ATTEMPTS,
    ) -> None:
        """Run a durable pull consumer until cancelled.

        ``decoder`` states the message types this consumer accepts (a decoder, a type
        or a union); what decodes is chosen by each message's subject (S5). With
        ``concurrency`` > 1, up to that many messages are handled at once (the fencer
        fences several hosts in parallel). A message that cannot be decoded, is
        rejected, or fails ``max_attempts`` deliveries is dead-lettered and terminated;
        no message, whatever it holds, ends this loop (L3)."""
        accepts = accepted_types(decoder)
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
                        tg.create_task(self._handle_released(msg, accepts, handler, slots, max_attempts))
        finally:
            try:
                await sub.unsubscribe()
            except Exception:
                pass

    async def _handle_released(
        self, msg: Msg, accepts: tuple[type[Message], ...], handler: Handler, slots: asyncio.Semaphore,
        max_attempts: int,
    ) -> None:
        try:
            await self._handle_jetstream(msg, accepts, handler, max_attempts)
        except asyncio.CancelledError:
            raise
        except Exception:
            # An ack, nak or term that could not be sent (NATS went away): the message
            # comes back after its ack wait. Never let it end the consumer's task group.
            log.exception("settling %s failed; it will be redelivered", msg.subject)
        finally:
            slots.release()

    async def _give_up(self, msg: Msg, error: str, headers: dict[str, str], msg_id: str) -> None:
        """Dead-letter and terminate; if the dead letter could not be stored, nak instead:
        the next delivery tries again, so the message is never silently lost."""
        if await self.dead_letter(msg.subject, msg.data, error, headers, msg_id=msg_id):
            self._unsent_letters.pop(msg_id, None)
            await msg.term()
        else:
            if len(self._unsent_letters) >= 1000:
                self._unsent_letters.pop(next(iter(self._unsent_letters)))
            self._unsent_letters[msg_id] = error
            await msg.nak(delay=DEAD_LETTER_RETRY_S)

    async def _handle_jetstream(
        self, msg: Msg, accepts: tuple[type[Message], ...], handler: Handler, max_attempts: int = MAX_HANDLER_ATTEMPTS,
    ) -> None:
        headers = dict(msg.headers or {})
        meta = msg.metadata
        delivered = meta.num_delivered or 1
        # Deterministic: a redelivered message dead-lettered twice is stored once.
        msg_id = f"{self.service}:{meta.stream}:{meta.sequence.stream}"
        if delivered > max_attempts:
            # An earlier delivery gave up but could not store its dead letter.
            error = self._unsent_letters.get(msg_id) or f"handler failed {delivered - 1} times"
            await self._give_up(msg, error, headers, msg_id)
            return
        event, error = self._decode(msg, accepts)
        if error:
            await self._give_up(msg, error, headers, msg_id)  # redelivering it cannot help
            return
        with tracer().start_as_current_span(
            f"{self.service} process {subject_kind(msg.subject)}",
            context=extract_context(headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "messaging.operation.type": "process",
                "messaging.consumer.group.name": meta.consumer or "",
                "messaging.message.delivery_count": delivered,
            },
        ) as span:
            try:
                await handler(event, msg)
            except Reject as err:
                span.set_status(Status(StatusCode.ERROR, str(err)))
                await self._give_up(msg, f"rejected: {err}", headers, msg_id)
            except Retry as err:
                # The handler's own call: it may pass (a lock, a device that reboots).
                span.set_status(Status(StatusCode.ERROR, str(err)))
                log.warning("will retry %s: %s", msg.subject, err)
                await msg.nak(delay=err.delay)
            except Exception as err:
                span.record_exception(err)
                span.set_status(Status(StatusCode.ERROR, str(err)))
                if delivered >= max_attempts:
                    log.exception("giving up on %s after %d attempts", msg.subject, delivered)
                    await self._give_up(msg, f"handler failed {delivered} times: {err!r}", headers, msg_id)
                else:
                    # Bounded retry: transient errors (NATS, a database busy) pass.
                    log.exception("handling %s failed (attempt %d); will retry", msg.subject, delivered)
                    await msg.nak(delay=min(30.0, 0.5 * delivered))
            else:
                await msg.ack()
