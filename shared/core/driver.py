"""The production driver: runs any service core over nats-py, asyncio and real ports.

One worker task takes events from one queue, in the order they arrived, hands
each to ``core.handle`` and carries out the effects it returns, in order. So a
core sees a total order of events, exactly as in the simulation. What waits
(a ``Call`` to a device, a ``Request`` to an agent) runs as its own task in the
driver's TaskGroup and comes back as ``Returned``; a work-queue delivery waits
in its consumer handler until the core settles its token.

The bus keeps what is the transport's: decoding and the S5 subject check, dead
letters, consumer spans (``hafence.bus``). A core that raises is a bug: it is
logged with the event, a delivery it was handling is retried (and dead-lettered
after the consumer's attempts), and the service goes on (L3).

Trace context follows causality: the context of the event that led to an effect
is current while the effect is carried out (a publish injects it), and a
``Call``/``Request`` task inherits it, so its ``Returned`` carries it on.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from typing import Any

import nats.errors
from nats.aio.msg import Msg
from opentelemetry import context as otel_context

from hafence.bus import Reject, Retry
from hafence.contracts import encode
from hafence.core.effects import (
    Ack,
    Call,
    CancelTimer,
    Effect,
    InProgress,
    Log,
    Nak,
    Publish,
    Reply,
    Request,
    SetTimer,
    Span,
    Term,
)
from hafence.core.events import (
    Asked,
    CaughtUp,
    Delivered,
    Event,
    LeaseChanged,
    Now,
    Returned,
    Started,
    TimerFired,
)
from hafence.core.inputs import Consume, Inputs, ReplayInput, Serve, Subscribe
from hafence.core.machine import Core
from hafence.lease import LeaderLease
from hafence.logs import fields
from hafence.retry import NotPublished, publish_retrying
from hafence.service import Runtime, stop_if_cancelled
from hafence.telemetry import extract_context, tracer

log = logging.getLogger("hafence.core")

# The worker lets the loop run at least this often (seconds) while events wait in its
# queue, so what the effects sent goes on the wire during a burst, not after it.
IO_YIELD_S = 0.0005

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def request_error(err: BaseException) -> str:
    """A request's failure as the cores read it: ``timeout: ...`` (nobody answered in
    time: the asker cannot know whether it was done), ``no_responders: ...`` (nobody
    listens: it was not done), else ``error: ...``."""
    text = str(err) or type(err).__name__
    if isinstance(err, nats.errors.NoRespondersError):
        return f"no_responders: {text}"
    if isinstance(err, (TimeoutError, nats.errors.TimeoutError)):
        return f"timeout: {text}"
    return f"error: {type(err).__name__}: {text}"


def _metadata(msg: Msg) -> tuple[float | None, int, int, int]:
    """(stored at, pending, delivery count, stream sequence) of a JetStream message;
    a core message has none."""
    try:
        meta = msg.metadata
        return (meta.timestamp.timestamp(), int(meta.num_pending or 0), int(meta.num_delivered or 1),
                int(meta.sequence.stream))
    except Exception:
        return None, 0, 1, 0


def is_conflict(err: BaseException) -> bool:
    """A compare-and-set publish lost: the subject's last sequence was not the expected one."""
    return getattr(err, "err_code", None) == 10071 or "wrong last sequence" in str(err).lower()


class _Settled:
    """How the core settled a work-queue delivery."""

    __slots__ = ("delay", "kind", "reason")

    def __init__(self, kind: str, delay: float = 0.0, reason: str = "") -> None:
        self.kind, self.delay, self.reason = kind, delay, reason


class Driver:
    """Runs one core until cancelled. ``ports`` maps a port name to an object whose
    methods the core's ``Call`` effects name (sync or async)."""

    def __init__(
        self,
        core: Core,
        rt: Runtime,
        ports: Mapping[str, object] | None = None,
        mono: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.core = core
        self.rt = rt
        self.bus = rt.bus
        self.ports: dict[str, object] = dict(ports or {})
        self.mono, self.wall = mono, wall
        self.inputs: Inputs = core.inputs()
        self._queue: asyncio.Queue[tuple[Event, otel_context.Context]] = asyncio.Queue()
        self._tokens = itertools.count(1)
        self._settle: dict[int, asyncio.Future[_Settled]] = {}
        self._deliveries: dict[int, Msg] = {}
        self._asked: dict[int, Msg] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._caught_up: dict[str, asyncio.Event] = {r.name: asyncio.Event() for r in self.inputs.replays}
        self._tg: asyncio.TaskGroup | None = None
        self.lease: LeaderLease | None = None
        self._lease_seen: tuple[bool, int, float] = (False, 0, 0.0)
        self.handled = 0
        self.core_errors = 0
        # Looked up once: ``get_tracer`` costs ~10 us, one Span effect per started VM.
        self._tracer = tracer()

    # -- feeding ----------------------------------------------------------------
    def feed(self, event: Event, ctx: otel_context.Context | None = None) -> None:
        """Queue an event for the core (from any task), with the current trace context
        (or ``ctx``: the context a core message carried in its headers)."""
        self._queue.put_nowait((event, otel_context.get_current() if ctx is None else ctx))

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self.feed(Started())
            tg.create_task(self._work())
            if self.inputs.lease is not None:
                await self._open_lease(tg)
            for replay in self.inputs.replays:
                tg.create_task(self._replay(replay))
            for consumer in self.inputs.consumers:
                tg.create_task(self._consume(consumer))
            for sub in self.inputs.subscriptions:
                tg.create_task(self._subscribe(sub))
            for serve in self.inputs.serves:
                tg.create_task(self._serve(serve))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        yielded = loop.time()
        try:
            while True:
                if self._queue.empty():
                    event, ctx = await self._queue.get()
                    yielded = loop.time()
                else:
                    if loop.time() - yielded >= IO_YIELD_S:
                        # A burst (50 publish acks, 50 replies) is handled back to back: the
                        # tasks its effects made (requests, publishes) would wait for its end
                        # to write their first byte. Let them, and the flusher, run now.
                        await asyncio.sleep(0)
                        yielded = loop.time()
                    event, ctx = self._queue.get_nowait()
                stop_if_cancelled()
                token = otel_context.attach(ctx)
                try:
                    await self._step(event)
                finally:
                    otel_context.detach(token)
        finally:
            for timer in self._timers.values():
                timer.cancel()

    async def _step(self, event: Event) -> None:
        try:
            effects = self.core.handle(event, Now(self.mono(), self.wall()))
        except Exception:
            self.core_errors += 1
            log.exception("the %s core failed on an event; going on", self.core.name,
                          extra=fields(event=type(event).__name__))
            if isinstance(event, Delivered) and event.token:
                self._resolve(event.token, _Settled("nak", delay=1.0))
            return
        self.handled += 1
        await self._carry_out(effects)

    # -- effects ----------------------------------------------------------------
    async def _carry_out(self, effects: list[Effect]) -> None:
        spans = ExitStack()
        try:
            await self._carry_out_in(effects, spans)
        finally:
            spans.close()

    async def _carry_out_in(self, effects: list[Effect], spans: ExitStack) -> None:
        i = 0
        while i < len(effects):
            effect = effects[i]
            if isinstance(effect, Span):
                spans.close()  # spans of one handle are siblings
                parent = (otel_context.Context() if effect.root
                          else extract_context(effect.parent) if effect.parent else None)
                spans.enter_context(self._tracer.start_as_current_span(
                    effect.name, context=parent, attributes=effect.attributes))
                i += 1
                continue
            if isinstance(effect, Publish) and not effect.core and effect.tag:
                # Sent, not awaited: the task's first step writes the message into the
                # connection's buffer before any later effect's task runs, so wire order
                # is effect order without a round trip each (issue 12).
                assert self._tg is not None
                self._tg.create_task(self._publish(effect))
                i += 1
                continue
            if isinstance(effect, Publish) and not effect.core:
                # A run of untagged stored publishes goes out together (in order on one
                # connection) and is awaited once, before the next effect.
                j = i
                while (j < len(effects) and isinstance(effects[j], Publish)
                       and not effects[j].core and not effects[j].tag):  # type: ignore[union-attr]
                    j += 1
                await asyncio.gather(*(self._publish(e) for e in effects[i:j]))  # type: ignore[arg-type]
                i = j
                continue
            await self._one(effect)
            i += 1

    async def _one(self, effect: Effect) -> None:
        match effect:
            case Publish(subject=subject, message=message, tag=tag):
                try:
                    await self.bus.publish_core(subject, message)
                except Exception as err:
                    self._returned(tag, error=f"error: {err!r}", what=f"publish to {subject}")
                else:
                    if tag:
                        self.feed(Returned(tag))
            case Ack(token=token):
                self._resolve(token, _Settled("ack"))
            case Nak(token=token, delay=delay):
                self._resolve(token, _Settled("nak", delay=delay))
            case Term(token=token, reason=reason):
                self._resolve(token, _Settled("term", reason=reason))
            case InProgress(token=token):
                msg = self._deliveries.get(token)
                if msg is not None:
                    try:
                        await msg.in_progress()
                    except Exception as err:
                        log.warning("in-progress for %s failed: %r", msg.subject, err)
            case Reply(token=token, message=message):
                asked = self._asked.pop(token, None)
                if asked is not None and asked.reply and message is not None:
                    try:
                        await asked.respond(encode(message))
                    except Exception as err:  # the asker went away, or NATS did
                        log.warning("could not answer %s: %r", asked.subject, err)
            case SetTimer(key=key, delay=delay):
                old = self._timers.pop(key, None)
                if old is not None:
                    old.cancel()
                self._timers[key] = asyncio.get_running_loop().call_later(
                    max(0.0, delay), self._fire, key)
            case CancelTimer(key=key):
                old = self._timers.pop(key, None)
                if old is not None:
                    old.cancel()
            case Call():
                assert self._tg is not None
                self._tg.create_task(self._call(effect))
            case Request():
                assert self._tg is not None
                self._tg.create_task(self._request(effect))
            case Log(level=level, message=message, fields=extra):
                log.log(_LEVELS.get(level, logging.INFO), message, extra=fields(service=self.core.name, **extra))
            case _:
                log.error("unknown effect from the %s core: %r", self.core.name, effect)

    async def _publish(self, effect: Publish) -> None:
        try:
            seq = await publish_retrying(self.bus, effect.subject, effect.message, effect.msg_id,
                                         expect_last_subject_seq=effect.expect_last_subject_seq,
                                         expect_last_of=effect.expect_last_of)
        except (NotPublished, Exception) as err:
            kind = "conflict" if is_conflict(err) else "error"
            self._returned(effect.tag, error=f"{kind}: {err}", what=f"publish to {effect.subject}")
            return
        if effect.tag:
            self.feed(Returned(effect.tag, value=seq))  # where the stream stored it

    def _returned(self, tag: str, error: str, what: str) -> None:
        if tag:
            self.feed(Returned(tag, error=error))
        else:
            log.error("%s failed (nobody waits for it): %s", what, error)

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self._queue.put_nowait((TimerFired(key), otel_context.Context()))

    async def _call(self, effect: Call) -> None:
        port = self.ports.get(effect.port)
        try:
            if port is None:
                raise LookupError(f"no port {effect.port!r} is bound for the {self.core.name} service")
            value = getattr(port, effect.op)(*effect.args)
            if inspect.isawaitable(value):
                value = await value
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self._returned(effect.tag, error=f"{type(err).__name__}: {err}", what=f"{effect.port}.{effect.op}")
            return
        if effect.port == "lease":
            self._report_lease()
        if effect.tag:
            self.feed(Returned(effect.tag, value=value))

    async def _request(self, effect: Request) -> None:
        try:
            raw = await self.bus.request(effect.subject, effect.message, timeout=effect.timeout)
        except asyncio.CancelledError:
            raise
        except Exception as err:
            self.feed(Returned(effect.tag, error=request_error(err)))
            return
        self.feed(Returned(effect.tag, value=raw))

    def _resolve(self, token: int, settled: _Settled) -> None:
        future = self._settle.get(token)
        if future is not None and not future.done():
            future.set_result(settled)

    # -- inputs -----------------------------------------------------------------
    async def _consume(self, spec: Consume) -> None:
        await self.bus.ensure_consumer(spec.stream, spec.durable, spec.filters, ack_wait=spec.ack_wait)

        async def handler(message: Any, msg: Msg) -> None:
            token = next(self._tokens)
            future: asyncio.Future[_Settled] = asyncio.get_running_loop().create_future()
            self._settle[token], self._deliveries[token] = future, msg
            stored_at, pending, attempt, sequence = _metadata(msg)
            try:
                self.feed(Delivered(spec.name, msg.subject, message, token, stored_at, pending, attempt,
                                    dict(msg.headers or {}), sequence))
                settled = await future
            finally:
                self._settle.pop(token, None)
                self._deliveries.pop(token, None)
            if settled.kind == "nak":
                raise Retry(f"{self.core.name} asked for a redelivery", delay=settled.delay)
            if settled.kind == "term":
                raise Reject(settled.reason)

        await self.bus.consume(spec.stream, spec.durable, spec.accepts, handler, concurrency=spec.concurrency)

    async def _replay(self, spec: ReplayInput) -> None:
        caught_up = self._caught_up[spec.name]

        async def handler(message: Any, msg: Msg) -> None:
            stored_at, pending, attempt, sequence = _metadata(msg)
            self.feed(Delivered(spec.name, msg.subject, message, 0, stored_at, pending, attempt,
                                dict(msg.headers or {}), sequence))

        async def announce() -> None:
            await caught_up.wait()
            self.feed(CaughtUp(spec.name))

        assert self._tg is not None
        self._tg.create_task(announce())
        await self.bus.replay(spec.filters, spec.accepts, handler, caught_up)

    async def _subscribe(self, spec: Subscribe) -> None:
        async def handler(message: Any, msg: Msg) -> None:
            headers = dict(msg.headers or {})
            self.feed(Delivered(spec.name, msg.subject, message, headers=headers), extract_context(headers))

        await self.bus.serve(spec.subject, spec.accepts, handler, queue=spec.queue, answer=False)

    async def _serve(self, spec: Serve) -> None:
        async def handler(message: Any, msg: Msg) -> None:
            token = next(self._tokens)
            self._asked[token] = msg
            headers = dict(msg.headers or {})
            self.feed(Asked(spec.name, msg.subject, message, token, headers), extract_context(headers))
            # The core answers with Reply(token) when it is done; the bus sends nothing.

        await self.bus.serve(spec.subject, spec.accepts, handler)

    # -- the lease --------------------------------------------------------------
    async def _open_lease(self, tg: asyncio.TaskGroup) -> None:
        spec = self.inputs.lease
        assert spec is not None
        kv = await self.bus.js.key_value(self.bus.streams.leases)
        # A port: the S3 tests bind a lease that never notices its loss (the lab's stale arbiter).
        factory: type[LeaderLease] = getattr(self.rt.args, "lease_factory", LeaderLease)
        self.lease = factory(kv, spec.role, self.rt.instance, spec.ttl)
        self.ports.setdefault("lease", self.lease)
        tg.create_task(self.lease.run(self._caught_up.get(spec.after), on_step=self._report_lease))

    def _report_lease(self) -> None:
        lease = self.lease
        if lease is None:
            return
        seen = (lease.held(), lease.term, lease.valid_until)
        if seen != self._lease_seen:
            self._lease_seen = seen
            self.feed(LeaseChanged(held=seen[0], term=seen[1], valid_until=seen[2]))


async def drive(core: Core, rt: Runtime, ports: Mapping[str, object] | None = None) -> None:
    """Run ``core`` as the service ``rt`` describes until cancelled."""
    await Driver(core, rt, ports).run()
