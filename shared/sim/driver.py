"""The simulation's generic driver: any service core, on the in-memory NATS and virtual time.

``SimService`` is to the simulation what ``hafence.core.driver.drive`` is to
production: it opens the core's ``Inputs`` on a ``SimNats`` connection, turns
deliveries, replies, timers, port outcomes and lease changes into events, hands
them to ``core.handle(event, Now(mono, wall))`` one at a time, and carries out the
effects in order. Decoding and the S5 subject check are production's own
(``hafence.routes.Routes.decode``, looked up at run time so a test can plant a bug
there): a message that fails is dead-lettered (and terminated, for a work queue)
and never reaches the core.

Events wait in the service's own queue and each is handled in its own scheduler
step, so checkers run between any two of them. ``pause`` freezes the queue and the
driver's loops (a GC pause, SIGSTOP): events pile up, timers fire late. ``crash``
loses everything in memory (the core, its timers, unsettled deliveries, pending
requests and calls, the lease object, the connection); ports that model stores
are the caller's and survive. ``restart`` builds a new core, reconnects, reopens
the inputs and sends ``Started``.

Every event and effect goes to the ``Observer`` first: the checkers' view.
"""

from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from hafence import routes
from hafence.bus.consume import DEAD_LETTER_RETRY_S, MAX_HANDLER_ATTEMPTS
from hafence.bus.dead_letters import kept_headers
from hafence.bus.serve import encode_error
from hafence.contracts import DeadLetter, Message, encode
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
from hafence.retry import ATTEMPTS, FIRST_DELAY_S, MAX_DELAY_S
from hafence.sim.clock import NodeClock, SimFuture, Task, Timer
from hafence.sim.lease import SimLease
from hafence.sim.streams import EXPECTED_LAST_OF, NoStream, WrongLastSequence
from hafence.sim.subjects import subject_matches
from hafence.sim.transport import (
    AlreadyAcked,
    Connection,
    CoreMsg,
    NoResponders,
    NotConnected,
    SimDelivery,
    SimNats,
)
from hafence.subjects import Subjects

FETCH_TIMEOUT_S = 5.0
PUBLISH_TIMEOUT_S = 5.0
_LEVELS = {"debug": 0, "info": 1, "warning": 2, "error": 3}


class Observer(Protocol):
    """What the checkers see: every event before the core handles it, every effect
    before the driver carries it out."""

    def on_event(self, service: SimService, event: Event) -> None: ...

    def on_effect(self, service: SimService, effect: Effect) -> None: ...


class CoreFailed(Exception):
    """A core raised from ``handle``: a bug, never a reaction to bad input."""


def error_text(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def call_error(exc: BaseException) -> str:
    """A port's failure, worded as production's driver words it."""
    return f"{type(exc).__name__}: {exc}"


def request_error(exc: BaseException) -> str:
    """A request's failure with production's prefixes (``hafence.core.driver.request_error``):
    ``timeout:`` (nobody answered in time), ``no_responders:`` (nobody listens), ``error:``."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, NoResponders):
        return f"no_responders: {text}"
    if isinstance(exc, TimeoutError):
        return f"timeout: {text}"
    return f"error: {type(exc).__name__}: {text}"


class SimService:
    """One replica of one service on one node, driving its core on the simulated world."""

    def __init__(
        self,
        name: str,
        node: str,
        core_factory: Callable[[], Core],
        ports: dict[str, object],
        conn: Connection | None,
        clock: NodeClock,
        net: SimNats,
        *,
        prefix: str = "hafence",
        bucket: str = "",
        observer: Observer | None = None,
        dlq_name: str = "",
        log_level: str = "info",
        failures: list[tuple[float, str]] | None = None,
    ) -> None:
        self.name = name
        self.node = node
        self.core_factory = core_factory
        self.ports = dict(ports)
        self.conn = conn
        self.clock = clock
        self.net = net
        self.scheduler = net.scheduler
        self.subjects = Subjects(prefix)
        self.prefix = prefix
        self.bucket = bucket or f"{prefix.upper().replace('-', '_')}_leases"
        self.observer = observer
        self.dlq_name = dlq_name or name
        self.min_level = _LEVELS[log_level]
        self.who = f"{name}@{node}"
        # Every incarnation of the process has its own number: whatever an older one
        # left scheduled (a timer, a reply, a port outcome) finds a different number and is dropped.
        self.incarnation = 0
        self.core: Core | None = None
        self.lease: SimLease | None = None
        # The lease class of the next start (production's ``lease_factory``): a fault or a
        # test binds the lab's StaleLease to make a leader that never notices its loss.
        self.lease_factory: type[LeaderLease] = LeaderLease
        self.inputs = Inputs()
        self.paused_until = -1.0
        self.crashes = 0
        # (time, what the core raised); a cluster may hand all its services one list.
        self.failures: list[tuple[float, str]] = failures if failures is not None else []
        self.handled = 0
        self._queue: deque[tuple[Event, int]] = deque()
        self._draining = False
        self._timers: dict[str, tuple[int, Timer]] = {}
        self._timer_ids = 0
        self._tokens: dict[int, tuple[str, SimDelivery]] = {}
        self._token_ids = 0
        self._in_flight: dict[str, int] = {}
        self._slot_waiters: dict[str, SimFuture[None]] = {}
        self._asks: dict[int, CoreMsg] = {}
        self._tasks: list[Task[Any]] = []
        # Per replay input: done once its history was handed over (the lease waits on it).
        self._caught_up: dict[str, SimFuture[None]] = {}
        self._lease_reported: tuple[bool, int, float] = (False, 0, 0.0)
        self._resume: SimFuture[None] | None = None
        # Untagged stored publishes being awaited: the rest of that handle's effects, and
        # every later event, wait (as production's worker does).
        self._busy = False
        self._on_resume: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<SimService {self.who} {'up' if self.core is not None else 'down'}>"

    @property
    def alive(self) -> bool:
        return self.core is not None

    @property
    def paused(self) -> bool:
        return self.scheduler.now < self.paused_until

    # -- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start the process: a new core, its inputs opened, ``Started`` first in its queue."""
        if self.core is not None:
            raise RuntimeError(f"{self.who} is already running")
        self.incarnation += 1
        if self.conn is None or self.conn.closed:
            self.conn = self.net.connect(self.node, self.clock)
        self.core = self.core_factory()
        self.inputs = self.core.inputs()
        self._caught_up = {}
        self._lease_reported = (False, 0, 0.0)
        self.net.log(self.who, f"start #{self.incarnation}")
        # Started is handled once the inputs are open (the lease port exists).
        self._draining = True
        self._post(Started())
        self._open_inputs()
        self._draining = False
        self._kick()

    def restart(self) -> None:
        """Crash if running, then start again."""
        self.crash()
        self.start()

    def crash(self) -> None:
        """The process dies: its memory and connection are gone, its ports (stores) are not."""
        if self.core is None:
            return
        self.net.log(self.who, f"crash #{self.incarnation}")
        self.crashes += 1
        self.incarnation += 1
        self.core = None
        self.lease = None
        for _, timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        self._queue.clear()
        self._tokens.clear()  # unsettled deliveries come back after their ack wait
        self._in_flight.clear()
        self._slot_waiters.clear()
        self._asks.clear()
        self.paused_until = -1.0
        self._resume = None
        self._busy = False
        self._draining = False
        self._on_resume.clear()
        if self.conn is not None:
            self.conn.close()

    def close(self) -> None:
        """The run is over: close the coroutines of the driver's tasks (one that never ran
        would warn "never awaited" when collected)."""
        for task in self._tasks:
            if not task.done():
                task._coro.close()
        self._tasks.clear()

    def pause(self, seconds: float) -> None:
        """Freeze the process for ``seconds`` of simulated time (GC, SIGSTOP): nothing is
        handled and none of the driver's loops moves; events and timer firings queue."""
        if self.core is None:
            return
        until = self.scheduler.now + seconds
        if until <= self.paused_until:
            return
        self.paused_until = until
        self.net.log(self.who, f"paused for {seconds:g}s")
        if self._resume is None or self._resume.done():
            self._resume = self.scheduler.future(f"{self.who} resumes")
        self.scheduler.call_at(until, self._wake, self.incarnation, until)

    def freeze(self) -> None:
        """Paused until ``thaw`` (its host hangs)."""
        if self.core is None or self.paused_until == float("inf"):
            return
        self.paused_until = float("inf")
        self.net.log(self.who, "frozen")
        if self._resume is None or self._resume.done():
            self._resume = self.scheduler.future(f"{self.who} resumes")

    def thaw(self) -> None:
        if self.core is not None and self.paused:
            self.paused_until = self.scheduler.now
            self._resumed()

    def _wake(self, incarnation: int, until: float) -> None:
        if incarnation == self.incarnation and until == self.paused_until:
            self._resumed()

    def _resumed(self) -> None:
        self.net.log(self.who, "resumed")
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None
        waiting, self._on_resume = self._on_resume, []
        for callback in waiting:
            callback()
        self._kick()

    def _awake(self) -> SimFuture[None] | None:
        """A future to wait for while paused; None while the process runs."""
        return self._resume if self.paused else None

    def _spawn(self, coro: Coroutine[Any, Any, Any], what: str) -> None:
        task = self.scheduler.spawn(coro, f"{self.who} {what}")
        self._tasks.append(task)
        if len(self._tasks) > 64:
            self._tasks = [t for t in self._tasks if not t.done()]

    # -- the queue of events ---------------------------------------------------------------
    def _post(self, event: Event, timer_id: int = 0) -> None:
        self._queue.append((event, timer_id))
        self._kick()

    def _kick(self) -> None:
        """Handle what waits, now. Every caller is a scheduler callback (a timer, a message,
        an outcome), never a handle in progress: one handling at a time, in queue order."""
        if not self._draining and not self._busy and self._queue and not self.paused and self.core is not None:
            self._draining = True
            self._drain(self.incarnation)

    def _drain(self, incarnation: int) -> None:
        """Handle what waits, in order, until the queue is empty, the process pauses or
        waits for a stored publish, or dies. One scheduler step for a burst of events at
        one instant: nothing else can happen in between, at the same simulated time."""
        if incarnation != self.incarnation:
            return
        queue = self._queue
        while queue and not self._busy and self.core is not None and incarnation == self.incarnation \
                and not self.paused:
            event, timer_id = queue.popleft()
            if timer_id:
                # A timer cancelled or set again after it fired, while its event waited here.
                key = event.key  # type: ignore[union-attr]
                current = self._timers.get(key)
                if current is None or current[0] != timer_id:
                    continue
                del self._timers[key]
            self._handle(event)
        if incarnation == self.incarnation:
            self._draining = False

    def _handle(self, event: Event) -> None:
        core = self.core
        assert core is not None
        if self.observer is not None:
            self.observer.on_event(self, event)
        now = Now(self.clock.monotonic(), self.clock.wall())
        try:
            effects = core.handle(event, now)
        except Exception as exc:
            # As production's driver: a bug, logged with the event; the delivery it was
            # handling comes back; the service goes on (L3). The run reports it.
            what = f"{error_text(exc)} handling {event!r}"[:1000]
            self.failures.append((self.scheduler.now, f"{self.who}: {what}"))
            self.net.log(self.who, f"CORE FAILED: {what}")
            if isinstance(event, Delivered) and event.token:
                self._settle(Nak(event.token, 1.0))
            return
        self.handled += 1
        self._carry_out(effects, 0, self.incarnation)

    def _carry_out(self, effects: list[Effect], i: int, incarnation: int) -> None:
        """Effects ``i`` on, in order. A run of untagged stored publishes is sent at once
        and awaited together: the effects after it (an ack) and the events after this
        one wait until the stream has them, as production's worker waits."""
        while i < len(effects):
            if incarnation != self.incarnation:
                return  # crashed (by an observer's fault plan) halfway
            effect = effects[i]
            if type(effect) is Publish and not effect.core and not effect.tag:
                j = i
                while j < len(effects) and _awaited_publish(effects[j]):
                    j += 1
                self._busy = True
                left = [j - i]

                def one_done(rest: int = j, left: list[int] = left) -> None:
                    left[0] -= 1
                    if left[0] == 0 and incarnation == self.incarnation:
                        self._when_awake(lambda: self._resume_effects(effects, rest, incarnation))

                for publish in effects[i:j]:
                    if self.observer is not None:
                        self.observer.on_effect(self, publish)
                    self._publish(publish, one_done)  # type: ignore[arg-type]
                return
            if self.observer is not None:
                self.observer.on_effect(self, effect)
            self._do(effect)
            i += 1

    def _resume_effects(self, effects: list[Effect], i: int, incarnation: int) -> None:
        if incarnation != self.incarnation:
            return
        self._busy = False
        self._draining = True  # the rest of this handle's effects first: nothing is handled meanwhile
        self._carry_out(effects, i, incarnation)
        if incarnation == self.incarnation:
            self._draining = False
            self._kick()

    def _when_awake(self, callback: Callable[[], None]) -> None:
        if self.paused:
            self._on_resume.append(callback)
        else:
            callback()

    # -- inputs ---------------------------------------------------------------------------
    def _open_inputs(self) -> None:
        inputs, incarnation = self.inputs, self.incarnation
        for spec in inputs.replays:
            self._open_replay(spec, incarnation)
        for consume in inputs.consumers:
            self._in_flight[consume.name] = 0
            self._spawn(self._consume(consume, incarnation), f"consume {consume.name}")
        for sub in inputs.subscriptions:
            self._open_subscription(sub, incarnation)
        for serve in inputs.serves:
            self._open_serve(serve, incarnation)
        if inputs.lease is not None:
            spec = inputs.lease
            lease = SimLease(self.conn.key_value(self.bucket), spec.role,  # type: ignore[union-attr]
                             f"{self.who}#{incarnation}", spec.ttl, self.clock, self.lease_factory)
            self.lease = lease
            after = spec.after
            self._spawn(
                lease.run(self._caught_up.get(after) if after else None, self._awake, self._report_lease),
                f"lease {spec.role}",
            )

    def _decode(self, subject: str, data: bytes, accepts: Any) -> tuple[Message | None, str]:
        """Production's decoding and S5 check (``hafence.routes``), looked up at call time."""
        try:
            table = routes.Routes.for_prefix(self.prefix)
            return table.decode(subject, data, routes.accepted_types(accepts)), ""
        except routes.Violation as err:
            return None, str(err)
        except Exception as err:  # whatever a decoder raises, the message is the problem
            return None, f"undecodable message: {error_text(err)}"

    def _stream_for(self, filters: list[str]) -> str:
        for name, stream in self.net.streams.items():
            if all(any(subject_matches(p, f) or p == f for p in stream.config.subjects) for f in filters):
                return name
        raise ValueError(f"{self.who}: no stream holds {filters}")

    def _open_replay(self, spec: ReplayInput, incarnation: int) -> None:
        assert self.conn is not None
        stream = self._stream_for(spec.filters)

        def on_message(d: SimDelivery) -> None:
            if incarnation != self.incarnation:
                return
            message, error = self._decode(d.subject, d.data, spec.accepts)
            if message is None:
                self._dead_letter(d.subject, d.data, error, d.headers,
                                  f"{self.dlq_name}:{d.metadata.stream}:{d.metadata.sequence.stream}")
                return
            meta = d.metadata
            self._post(Delivered(spec.name, d.subject, message, 0, meta.timestamp.timestamp(),
                                 meta.num_pending, 1, dict(d.headers or {}), meta.sequence.stream))

        replay = self.conn.replay(stream, spec.filters, on_message)
        ready = self._caught_up[spec.name] = self.scheduler.future(f"{self.who} {spec.name} caught up")

        def caught_up(_: SimFuture[None]) -> None:
            if incarnation == self.incarnation:
                # As production's driver: the lease may be taken from now on, while the
                # replayed messages may still wait in the queue (a busy or paused core).
                ready.set_result(None)
                self._post(CaughtUp(spec.name))

        replay.caught_up.add_done_callback(caught_up)

    def _open_subscription(self, spec: Subscribe, incarnation: int) -> None:
        assert self.conn is not None

        def on_message(msg: CoreMsg) -> None:
            if incarnation != self.incarnation:
                return
            message, error = self._decode(msg.subject, msg.data, spec.accepts)
            if message is None:
                self._dead_letter(msg.subject, msg.data, error, msg.headers)
                return
            self._post(Delivered(spec.name, msg.subject, message, 0, None, 0, 1, dict(msg.headers or {})))

        self.conn.subscribe(spec.subject, on_message, queue=spec.queue)

    def _open_serve(self, spec: Serve, incarnation: int) -> None:
        assert self.conn is not None

        def on_request(msg: CoreMsg) -> None:
            if incarnation != self.incarnation:
                return
            message, error = self._decode(msg.subject, msg.data, spec.accepts)
            if message is None:
                self._dead_letter(msg.subject, msg.data, error, msg.headers)
                if msg.reply and self.conn is not None:
                    self.conn.publish(msg.reply, encode_error(error))
                return
            self._token_ids += 1
            self._asks[self._token_ids] = msg
            self._post(Asked(spec.name, msg.subject, message, self._token_ids, dict(msg.headers or {})))

        self.conn.subscribe(spec.subject, on_request)

    async def _consume(self, spec: Consume, incarnation: int) -> None:
        conn = self.conn
        assert conn is not None
        pull = conn.pull_subscribe(spec.stream, spec.durable)
        while incarnation == self.incarnation:
            while (paused := self._awake()) is not None:
                await paused
            if self._in_flight[spec.name] >= spec.concurrency:
                waiter = self._slot_waiters[spec.name] = self.scheduler.future(f"{self.who} slot")
                await waiter
                continue
            try:
                batch = await pull.fetch(1, timeout=FETCH_TIMEOUT_S)
            except TimeoutError:
                continue
            except NotConnected:
                return
            for d in batch:
                self._take_delivery(spec, d)

    def _take_delivery(self, spec: Consume, d: SimDelivery) -> None:
        meta = d.metadata
        attempt = meta.num_delivered or 1
        msg_id = f"{self.dlq_name}:{meta.stream}:{meta.sequence.stream}"
        if attempt > MAX_HANDLER_ATTEMPTS:
            self._give_up(d, f"handler failed {attempt - 1} times", msg_id)
            return
        message, error = self._decode(d.subject, d.data, spec.accepts)
        if message is None:
            self._give_up(d, error, msg_id)
            return
        self._token_ids += 1
        token = self._token_ids
        self._tokens[token] = (spec.name, d)
        self._in_flight[spec.name] += 1
        self._post(Delivered(spec.name, d.subject, message, token, meta.timestamp.timestamp(),
                             meta.num_pending, attempt, dict(d.headers or {}), meta.sequence.stream))

    def _give_up(self, d: SimDelivery, error: str, msg_id: str) -> None:
        """Dead-letter and terminate; nak if the letter could not be stored (as the bus does)."""
        incarnation = self.incarnation

        def stored(ok: bool) -> None:
            if incarnation == self.incarnation:
                _settle_now(d.term() if ok else d.nak(DEAD_LETTER_RETRY_S), self)

        self._dead_letter(d.subject, d.data, error, d.headers, msg_id, stored)

    def _dead_letter(
        self, subject: str, raw: bytes, error: str, headers: dict[str, str] | None, msg_id: str = "",
        then: Callable[[bool], None] | None = None,
    ) -> None:
        self.net.log(self.who, f"dead letter {subject}: {error[:200]}")
        letter = DeadLetter(service=self.dlq_name, subject=subject[:256], error=error[: routes.MAX_DEAD_LETTER_ERROR],
                            raw=raw[: routes.MAX_DEAD_LETTER_RAW], at=self.clock.wall(), size=len(raw),
                            truncated=len(raw) > routes.MAX_DEAD_LETTER_RAW)
        hdrs = kept_headers(headers)
        hdrs["Hafence-Error"] = error[:256]
        conn = self.conn
        if conn is None or conn.closed:
            return
        fut = conn.js_publish(self.subjects.dlq(self.dlq_name), encode(letter), hdrs, msg_id=msg_id,
                              timeout=PUBLISH_TIMEOUT_S)
        if then is not None:
            fut.add_done_callback(lambda f: then(not f.cancelled() and f.exception() is None))

    # -- the lease ---------------------------------------------------------------------------
    def _report_lease(self) -> None:
        if self.lease is None:
            return
        state = self.lease.state()
        if state != self._lease_reported:
            self._lease_reported = state
            self._post(LeaseChanged(*state))

    # -- effects -------------------------------------------------------------------------------
    def _do(self, effect: Effect) -> None:
        do = _EFFECTS.get(type(effect))
        if do is None:
            raise TypeError(f"{self.who}: unknown effect {effect!r}")
        do(self, effect)

    def _cancel_timer(self, effect: CancelTimer) -> None:
        entry = self._timers.pop(effect.key, None)
        if entry is not None:
            entry[1].cancel()

    def _reply(self, effect: Reply) -> None:
        msg = self._asks.pop(effect.token, None)
        if msg is not None and effect.message is not None and msg.reply and self.conn is not None:
            self.conn.publish(msg.reply, encode(effect.message))

    def _log(self, effect: Log) -> None:
        if _LEVELS.get(effect.level, 3) >= self.min_level:
            tail = " ".join(f"{k}={v}" for k, v in effect.fields.items())
            self.net.log(self.who, f"{effect.level}: {effect.message}" + (f" {tail}" if tail else ""))

    def _returned(self, incarnation: int, tag: str, value: Any = None, error: str = "") -> None:
        if incarnation != self.incarnation:
            return  # the process that asked is gone
        if tag:
            self._post(Returned(tag, value, error))
        elif error:
            self.net.log(self.who, f"untagged operation failed: {error}")

    def _publish(self, effect: Publish, done: Callable[[], None] | None = None) -> None:
        conn = self.conn
        assert conn is not None
        data = encode(effect.message)
        if effect.core:
            conn.publish(effect.subject, data)
            if effect.tag:
                self._returned(self.incarnation, effect.tag)
            return
        self._spawn(self._publish_retrying(effect, data, self.incarnation, done), f"publish {effect.subject}")

    async def _publish_retrying(
        self, effect: Publish, data: bytes, incarnation: int, done: Callable[[], None] | None
    ) -> None:
        """hafence.retry's policy: transient failures retried with doubling delays, same msg-id;
        errors worded as production's driver words them."""
        delay, error = FIRST_DELAY_S, ""
        try:
            for attempt in range(1, ATTEMPTS + 1):
                conn = self.conn
                if conn is None or incarnation != self.incarnation:
                    return
                try:
                    ack = await conn.js_publish(effect.subject, data, msg_id=effect.msg_id,
                                                timeout=PUBLISH_TIMEOUT_S, headers=(
                                                    {EXPECTED_LAST_OF: effect.expect_last_of}
                                                    if effect.expect_last_of else None),
                                                expected_last_subject_seq=effect.expect_last_subject_seq)
                except (TimeoutError, NoStream, NotConnected) as err:
                    error = (f"error: publish to {effect.subject} (msg id {effect.msg_id or 'none'}) failed "
                             f"{attempt} times; last: {error_text(err)}")
                    if attempt < ATTEMPTS:
                        await self.clock.sleep(delay)
                        delay = min(MAX_DELAY_S, delay * 2)
                    continue
                except WrongLastSequence as err:
                    error = f"conflict: {err}"
                    break
                except Exception as err:
                    error = f"error: {err}"
                    break
                self._returned(incarnation, effect.tag, ack.seq)
                return
            self._returned(incarnation, effect.tag, error=error or "error: not published")
        finally:
            if done is not None:
                done()

    def _settle(self, effect: Ack | Nak | Term | InProgress) -> None:
        if isinstance(effect, InProgress):
            entry = self._tokens.get(effect.token)
            if entry is not None:
                _settle_now(entry[1].in_progress(), self)
            return
        entry = self._tokens.pop(effect.token, None)
        if entry is None:
            self.net.log(self.who, f"settles unknown token {effect.token} ({type(effect).__name__})")
            return
        source, d = entry
        self._in_flight[source] -= 1
        waiter = self._slot_waiters.pop(source, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        if isinstance(effect, Ack):
            _settle_now(d.ack(), self)
        elif isinstance(effect, Nak):
            _settle_now(d.nak(effect.delay), self)
        else:
            meta = d.metadata
            self._give_up(d, effect.reason, f"{self.dlq_name}:{meta.stream}:{meta.sequence.stream}")

    def _set_timer(self, effect: SetTimer) -> None:
        old = self._timers.pop(effect.key, None)
        if old is not None:
            old[1].cancel()
        self._timer_ids += 1
        timer_id, incarnation = self._timer_ids, self.incarnation

        def fire() -> None:
            if incarnation == self.incarnation:
                self._post(TimerFired(effect.key), timer_id)

        self._timers[effect.key] = (timer_id, self.clock.call_later(effect.delay, fire))

    def _call(self, effect: Call) -> None:
        incarnation = self.incarnation
        port: object | None = self.lease if effect.port == "lease" else self.ports.get(effect.port)
        if port is None:
            self._returned(incarnation, effect.tag,
                           error=f"LookupError: no port {effect.port!r} is bound for the {self.name} service")
            return
        try:
            result = getattr(port, effect.op)(*effect.args)
        except Exception as exc:
            self._returned(incarnation, effect.tag, error=call_error(exc))
            return
        if inspect.iscoroutine(result):
            # A port's coroutine goes on after a crash (a device finishes what it was told):
            # only its outcome is lost. So it is not among the tasks a crash cancels.
            result = self.scheduler.spawn(result, f"{self.who} {effect.port}.{effect.op}")
        if isinstance(result, SimFuture):
            def finished(f: SimFuture[Any]) -> None:
                if effect.port == "lease" and incarnation == self.incarnation:
                    self._report_lease()
                if f.cancelled():
                    self._returned(incarnation, effect.tag, error="cancelled")
                elif (exc := f.exception()) is not None:
                    self._returned(incarnation, effect.tag, error=call_error(exc))
                else:
                    self._returned(incarnation, effect.tag, f.result())

            result.add_done_callback(finished)
        else:
            self._returned(incarnation, effect.tag, result)

    def _request(self, effect: Request) -> None:
        conn, incarnation = self.conn, self.incarnation
        assert conn is not None
        fut = conn.request(effect.subject, encode(effect.message), timeout=effect.timeout)

        def answered(f: SimFuture[CoreMsg]) -> None:
            if (exc := f.exception()) is not None:
                self._returned(incarnation, effect.tag, error=request_error(exc))
            else:
                self._returned(incarnation, effect.tag, f.result().data)

        fut.add_done_callback(answered)


# How each effect is carried out, by its type (one dict hit instead of a chain of isinstance).
_EFFECTS: dict[type, Callable[[SimService, Any], None]] = {
    Publish: SimService._publish,
    Ack: SimService._settle,
    Nak: SimService._settle,
    Term: SimService._settle,
    InProgress: SimService._settle,
    SetTimer: SimService._set_timer,
    CancelTimer: SimService._cancel_timer,
    Call: SimService._call,
    Request: SimService._request,
    Reply: SimService._reply,
    Span: lambda service, effect: None,  # tracing is production's; the simulation's trace is its event log
    Log: SimService._log,
}


def _awaited_publish(effect: Effect) -> bool:
    return isinstance(effect, Publish) and not effect.core and not effect.tag


def _settle_now(coro: Coroutine[Any, Any, None], service: SimService) -> None:
    """Run a simulated acknowledgement (a coroutine that never waits) to its end."""
    try:
        coro.send(None)
    except StopIteration:
        return
    except AlreadyAcked as err:
        service.net.log(service.who, f"{err}")
        return
    coro.close()
    raise RuntimeError(f"{service.who}: a simulated acknowledgement waited")
