"""The one wrapper over nats-py every service uses.

* connect with reconnect forever (a service outlives a NATS restart, L2);
* provision the streams, KV bucket and consumers idempotently;
* publish with trace context in the headers and ``Nats-Msg-Id`` for idempotency;
* a durable pull-consumer loop that acks only after the handler finished, naks
  on failure, and sends what does not decode to the dead-letter subject;
* request-reply and plain subscriptions with the same dead-letter rule.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)
from opentelemetry.trace import SpanKind, Status, StatusCode

from hafence import metrics
from hafence.config import ClusterConfig, read_secret
from hafence.contracts import DeadLetter, encode
from hafence.logs import fields
from hafence.subjects import Subjects
from hafence.telemetry import extract_context, inject_headers, tracer

log = logging.getLogger("hafence.bus")

MAX_HANDLER_ATTEMPTS = 20


class Reject(Exception):
    """The message decoded but can never be processed: dead-letter it with this reason."""


class Retry(Exception):
    """Processing failed for a reason that may pass: redeliver after ``delay``."""

    def __init__(self, reason: str, delay: float = 1.0) -> None:
        super().__init__(reason)
        self.delay = delay


@dataclass(frozen=True, slots=True)
class StreamNames:
    events: str
    fence_requests: str
    dlq: str
    leases: str

    @classmethod
    def for_prefix(cls, prefix: str) -> StreamNames:
        base = prefix.upper().replace("-", "_")
        return cls(
            events=f"{base}_EVENTS",
            fence_requests=f"{base}_FENCE_REQUESTS",
            dlq=f"{base}_DLQ",
            leases=f"{base}_leases",
        )


Handler = Callable[[Any, Msg], Awaitable[None]]


class Bus:
    def __init__(self, nc: NatsClient, config: ClusterConfig, service: str) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.config = config
        self.service = service
        self.subjects = Subjects(config.cluster.subject_prefix)
        self.streams = StreamNames.for_prefix(config.cluster.subject_prefix)
        self.dead_letters = 0

    @classmethod
    async def connect(cls, config: ClusterConfig, service: str, connect_timeout: float = 5.0) -> Bus:
        settings = config.nats
        # One cluster file serves every service; each has its own NATS identity.
        user = os.environ.get("HAFENCE_NATS_USER", settings.user)
        password_file = os.environ.get("HAFENCE_NATS_PASSWORD_FILE", settings.password_file)
        options: dict[str, Any] = {
            "servers": [u.strip() for u in settings.url.split(",")],
            "name": f"hafence-{service}",
            "connect_timeout": connect_timeout,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "allow_reconnect": True,
        }
        if user:
            options["user"] = user
            options["password"] = read_secret(password_file, settings.password_env, "nats.password")
        if settings.creds_file:
            options["user_credentials"] = settings.creds_file
        if settings.tls_ca_file or settings.tls_cert_file:
            ctx = ssl.create_default_context(cafile=settings.tls_ca_file or None)
            if settings.tls_cert_file:
                ctx.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
            options["tls"] = ctx

        holder: list[NatsClient] = []

        async def on_disconnect() -> None:
            if holder and not (holder[0].is_closed or holder[0].is_draining):
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            log.info("reconnected to NATS")

        errors: list[str] = []

        async def on_error(err: Exception) -> None:
            errors.append(str(err) or type(err).__name__)
            if holder:  # before the first connection, the caller reports it
                log.warning("NATS error: %s", err)

        options.update(disconnected_cb=on_disconnect, reconnected_cb=on_reconnect, error_cb=on_error)
        try:
            # nats-py retries the first connection forever when reconnecting is on;
            # bound it, so a CLI or a starting service can say what is wrong.
            nc = await asyncio.wait_for(nats.connect(**options), timeout=connect_timeout * 2)
            holder.append(nc)
        except (OSError, nats.errors.Error, TimeoutError) as err:
            reason = errors[-1] if errors else (str(err) or type(err).__name__)
            raise ConnectionError(f"cannot connect to NATS at {settings.url}: {reason}") from None
        return cls(nc, config, service)

    # --- provisioning -------------------------------------------------------

    def event_subjects(self) -> list[str]:
        """Every subject of the events stream."""
        p = self.subjects.prefix
        return [f"{p}.host.>", f"{p}.vm.>", f"{p}.fence.result.>", f"{p}.inventory.*"]

    async def provision(self) -> None:
        """Create or update the streams and the lease bucket; safe to run from every service."""
        s, n = self.subjects, self.streams
        replicas = self.config.nats.stream_replicas
        day = 24 * 3600.0
        wanted = [
            StreamConfig(
                name=n.events,
                # One stream, so that a service replaying it sees inventories,
                # host events and fence results in the order they happened.
                subjects=self.event_subjects(),
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * day,
                # Replays need the recent past of each host and VM, not all of it.
                max_msgs_per_subject=64,
                duplicate_window=600.0,
                num_replicas=replicas,
            ),
            StreamConfig(
                name=n.fence_requests,
                subjects=[f"{s.prefix}.fence.request.*"],
                retention=RetentionPolicy.WORK_QUEUE,
                storage=StorageType.FILE,
                duplicate_window=3600.0,
                num_replicas=replicas,
            ),
            StreamConfig(
                name=n.dlq,
                subjects=[f"{s.prefix}.dlq.*"],
                retention=RetentionPolicy.LIMITS,
                storage=StorageType.FILE,
                max_age=30 * day,
                num_replicas=replicas,
            ),
        ]
        for config in wanted:
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:
                await self.js.update_stream(config)
        try:
            await self.js.key_value(n.leases)
        except nats.js.errors.BucketNotFoundError:
            await self.js.create_key_value(
                KeyValueConfig(
                    bucket=n.leases, ttl=self.config.timings.lease_ttl_s, history=1, replicas=replicas
                )
            )

    async def ensure_consumer(
        self, stream: str, durable: str, filters: list[str], ack_wait: float = 30.0
    ) -> None:
        config = ConsumerConfig(
            durable_name=durable,
            filter_subjects=filters,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=ack_wait,
            max_ack_pending=1000,
        )
        await self.js.add_consumer(stream, config)

    # --- publishing ---------------------------------------------------------

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

    async def dead_letter(
        self, subject: str, raw: bytes, error: str, headers: dict[str, str] | None, msg_id: str = ""
    ) -> None:
        self.dead_letters += 1
        metrics.DEAD_LETTERS.labels(self.service).inc()
        log.warning(
            "dead-lettered a message", extra=fields(subject=subject, error=error, dlq=self.subjects.dlq(self.service))
        )
        letter = DeadLetter(service=self.service, subject=subject, error=error, raw=raw, at=time.time())
        hdrs = dict(headers or {})
        hdrs.pop("Nats-Msg-Id", None)
        if msg_id:
            hdrs["Nats-Msg-Id"] = msg_id
        hdrs["Hafence-Error"] = error[:512].replace("\r", " ").replace("\n", " ")
        try:
            await self.js.publish(self.subjects.dlq(self.service), encode(letter), headers=hdrs, timeout=5.0)
        except Exception:
            log.exception("could not publish to the dead-letter subject")
            raise

    # --- consuming ----------------------------------------------------------

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

    async def _decode(
        self, msg: Msg, decoder: msgspec.json.Decoder[Any], msg_id: str = "", dead_letters: bool = True
    ) -> tuple[Any, str]:
        """(event, "") or (None, the error), the message dead-lettered unless told otherwise."""
        try:
            return decoder.decode(msg.data), ""
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            error = f"undecodable message: {err}"
            if dead_letters:
                await self.dead_letter(msg.subject, msg.data, error, dict(msg.headers or {}), msg_id=msg_id)
            return None, error

    async def _handle_jetstream(self, msg: Msg, decoder: msgspec.json.Decoder[Any], handler: Handler) -> None:
        headers = dict(msg.headers or {})
        event, error = await self._decode(msg, decoder)
        if error:
            await msg.ack()  # kept in the dead-letter stream; redelivering it cannot help
            return
        with tracer().start_as_current_span(
            f"{self.service} process {_subject_kind(msg.subject)}",
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

    async def close(self) -> None:
        if self.nc.is_closed:
            return
        try:
            await asyncio.wait_for(self.nc.drain(), timeout=5.0)
        except Exception:
            await self.nc.close()


def encode_error(error: str) -> bytes:
    return msgspec.json.encode({"type": "error", "v": 1, "error": error})


def _subject_kind(subject: str) -> str:
    """'hafence.fence.request.lab-2' -> 'fence.request' (span names stay low-cardinality)."""
    parts = subject.split(".")
    if len(parts) >= 3 and parts[1] in ("fence",):
        return ".".join(parts[1:3])
    if len(parts) >= 4 and parts[1] in ("host", "vm"):
        return f"{parts[1]}.{parts[3]}"
    return parts[1] if len(parts) > 1 else subject

