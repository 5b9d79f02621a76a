"""The heartbeat service: feeds heartbeats and the clock into the liveness core.

Every replica watches every heartbeat (warm standby); only the lease holder
publishes. On taking over, the new leader re-publishes the current suspects:
the ids are deterministic, so JetStream de-duplicates what was already sent.

Ingest is the hot path (tens of thousands of heartbeats a second on one core),
so a heartbeat costs one decode, one strict subject check, one call into the
core and a few counters: no span, no header parsing, no labelled metric, no
await on the network. Whatever must be published (host events, alerts, dead
letters) goes through queues to tasks of its own. The load guard (``load.py``)
watches the monitor's own lag; while it lags, nobody is declared suspect (L4).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from hafence import metrics
from hafence.bus import Bus
from hafence.contracts import Alert, Decoders, HostEvent
from hafence.heartbeat.liveness import Alive, Liveness, Suspect, Transition, UnknownHost
from hafence.heartbeat.load import Change, LoadGuard, Overloaded, Recovered, Sample
from hafence.lease import LeaderLease
from hafence.logs import fields
from hafence.service import Runtime
from hafence.telemetry import tracer

log = logging.getLogger("hafence.heartbeat")

# How many heartbeats are processed before the ingest yields to the other tasks
# (the ticker, the signal handler): nats-py hands a queued backlog over without
# ever suspending, which would starve them under load.
YIELD_EVERY = 256
# Rejected messages waiting to be dead-lettered; beyond that they are counted, not kept.
DEAD_LETTER_BACKLOG = 1000
# A subscription may hold this much unprocessed; the load guard trips long before.
PENDING_MSGS_LIMIT = 2_000_000
PENDING_BYTES_LIMIT = 512 * 1024 * 1024
METRICS_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class Rejected:
    subject: str
    data: bytes
    error: str


class Ingest:
    """The nats-py callback of the heartbeat subscription, and its counters."""

    def __init__(self, core: Liveness, hb_prefix: str, age_limit_s: float) -> None:
        self.core = core
        self.hb_prefix = hb_prefix  # "<prefix>.hb."
        self.age_limit_s = age_limit_s
        self.transitions: list[Transition] = []
        self.rejected: deque[Rejected] = deque()
        self.rejected_dropped = 0
        self.unknown_warned: set[str] = set()
        self.processed = 0
        self.late = 0
        self.per_host: dict[str, int] = {}
        self.wake = asyncio.Event()  # something to publish
        self._decode = Decoders.heartbeat.decode

    async def on_message(self, msg: Msg) -> None:
        try:
            hb = self._decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as err:
            self.reject(msg, f"undecodable message: {err}")
            return
        host = hb.host
        # S5: the host a heartbeat speaks for is the one its subject names.
        if msg.subject != self.hb_prefix + host:
            self.reject(msg, f"rejected: heartbeat of host {host!r} on subject {msg.subject}")
            return
        try:
            out = self.core.heartbeat(host, hb.boot_id, hb.seq, time.monotonic())
        except UnknownHost:
            if host not in self.unknown_warned:
                self.unknown_warned.add(host)
                self.reject(msg, f"rejected: host {host!r} is not in the cluster configuration")
            return
        if out:
            self.transitions.extend(out)
            self.wake.set()
        self.processed += 1
        if time.time() - hb.sent_at > self.age_limit_s:
            self.late += 1
        per_host = self.per_host
        per_host[host] = per_host.get(host, 0) + 1
        if self.processed % YIELD_EVERY == 0:
            await asyncio.sleep(0)

    def reject(self, msg: Msg, error: str) -> None:
        if len(self.rejected) >= DEAD_LETTER_BACKLOG:
            self.rejected_dropped += 1
            return
        self.rejected.append(Rejected(msg.subject, msg.data, error))
        self.wake.set()

    def take_counts(self) -> tuple[int, int]:
        processed, late = self.processed, self.late
        self.processed = self.late = 0
        return processed, late


async def run(rt: Runtime) -> None:
    bus, timings = rt.bus, rt.config.timings
    interval = timings.heartbeat_interval_s
    kv = await bus.js.key_value(bus.streams.leases)
    lease = LeaderLease(kv, "heartbeat", rt.instance, timings.lease_ttl_s)
    hosts = [h.name for h in rt.config.hosts]
    # A fresh nonce per lifetime: a host silent since start gets a new incident every time (S4).
    core = Liveness(hosts, interval, timings.missed_heartbeats, time.monotonic(), nonce=secrets.token_hex(8))
    guard = LoadGuard(interval, core.window, time.monotonic(), alert_repeat_s=rt.config.arbiter.alert_repeat_s)
    ingest = Ingest(core, bus.subjects.hb_all()[:-1], guard.lag_limit_s)
    changes: list[Change] = []
    sub: Subscription | None = None
    try:
        sub = await bus.nc.subscribe(bus.subjects.hb_all(), cb=ingest.on_message, pending_msgs_limit=PENDING_MSGS_LIMIT,
                                     pending_bytes_limit=PENDING_BYTES_LIMIT)
        async with asyncio.TaskGroup() as tg:
            tg.create_task(lease.run())
            tg.create_task(_ticker(rt, core, guard, ingest, sub, lease, changes))
            tg.create_task(_publisher(rt, bus, core, ingest, lease, changes))
    finally:
        # Drop the backlog at once: a stopping monitor has nothing to learn from it,
        # and working through it would hold SIGTERM up.
        if sub is not None and not bus.nc.is_closed:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is going away anyway
                pass


async def _ticker(rt: Runtime, core: Liveness, guard: LoadGuard, ingest: Ingest, sub: Subscription,
                  lease: LeaderLease, changes: list[Change]) -> None:
    period = rt.config.timings.heartbeat_interval_s / 4
    published_as_leader = False
    next_metrics = time.monotonic() + METRICS_EVERY_S
    due = time.monotonic() + period
    while True:
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        now = time.monotonic()
        # The ticker is its own lag probe: it runs first thing after a stall
        # (a stopped process, a blocked loop), before anyone could be suspected.
        processed, late = ingest.take_counts()
        lag = max(0.0, now - due)
        metrics.MONITOR_LAG.set(lag)
        for change in guard.observe(Sample(now, lag, processed, late, sub.pending_msgs)):
            changes.append(change)
            ingest.wake.set()
            metrics.MONITOR_OVERLOADED.set(1 if guard.overloaded else 0)
        due = now + period
        transitions = core.tick(now) if guard.may_suspect(now) else []
        if lease.held() and not published_as_leader:
            published_as_leader = True
            # Announce what is already suspect: the old leader may have died before it could.
            transitions = [*core.suspects(), *transitions]
            transitions = list({t.host: t for t in transitions}.values())
        elif not lease.held():
            published_as_leader = False
        if transitions:
            ingest.transitions.extend(transitions)
            ingest.wake.set()
        if now >= next_metrics:
            next_metrics = now + METRICS_EVERY_S
            _flush_metrics(core, [h.name for h in rt.config.hosts], ingest)


def _flush_metrics(core: Liveness, hosts: list[str], ingest: Ingest) -> None:
    """Labelled metrics cost microseconds each: once every few seconds, not per heartbeat."""
    counts, ingest.per_host = ingest.per_host, {}
    for host, n in counts.items():
        metrics.HEARTBEATS.labels(host).inc(n)
    states = {"alive": 0, "suspect": 0, "unknown": 0}
    for host in hosts:
        states[core.state(host)] += 1
    for state, n in states.items():
        metrics.HOSTS.labels(state).set(n)


async def _publisher(rt: Runtime, bus: Bus, core: Liveness, ingest: Ingest, lease: LeaderLease,
                     changes: list[Change]) -> None:
    """Publishes, in order, what the ingest and the ticker decided; the hot path never waits on NATS."""
    wall_offset = time.time() - time.monotonic()
    while True:
        await ingest.wake.wait()
        ingest.wake.clear()
        while changes:
            await _alert(rt, bus, lease, changes.pop(0))
        while ingest.rejected:
            r = ingest.rejected.popleft()
            await bus.dead_letter(r.subject, r.data, r.error, None)
        if ingest.rejected_dropped:
            log.warning("rejected heartbeats not dead-lettered (too many)", extra=fields(n=ingest.rejected_dropped))
            ingest.rejected_dropped = 0
        transitions, ingest.transitions = ingest.transitions, []
        if lease.held():
            for t in transitions:
                await _emit(bus, core, lease, t, wall_offset)


async def _emit(bus: Bus, core: Liveness, lease: LeaderLease, t: Transition, wall_offset: float) -> None:
    if isinstance(t, Suspect):
        # The root span of the incident: everything downstream is its child.
        with tracer().start_as_current_span(
            f"host suspect {t.host}",
            context=Context(),
            kind=SpanKind.PRODUCER,
            attributes={"hafence.host": t.host, "hafence.incident": t.incident,
                        "hafence.silent_for_s": round(t.silent_for, 3), "hafence.term": lease.term},
        ):
            log.warning("host is suspect", extra=fields(host=t.host, incident=t.incident))
            event = HostEvent(
                host=t.host, kind="suspect", at=time.time(), incident=t.incident,
                reason=f"no heartbeat for {t.silent_for:.1f}s (window {core.window:.1f}s)",
                term=lease.term, last_seen=t.last_seen + wall_offset,
            )
            await bus.publish(bus.subjects.host_event(t.host, "suspect"), event, msg_id=f"suspect:{t.incident}")
    elif isinstance(t, Alive):
        log.info("host is alive", extra=fields(host=t.host, was_suspect=t.was_suspect))
        event = HostEvent(host=t.host, kind="alive", at=time.time(), term=lease.term,
                          reason="heartbeat received" + (" after suspicion" if t.was_suspect else ""))
        await bus.publish(bus.subjects.host_event(t.host, "alive"), event)


async def _alert(rt: Runtime, bus: Bus, lease: LeaderLease, change: Change) -> None:
    """L4: the monitor's own lag is an alert, never a fence. Every replica raises
    its own (a standby that lags would be a lagging leader after a take-over)."""
    if isinstance(change, Overloaded):
        kind = "monitor_overloaded"
        reason = (f"heartbeat monitor {rt.instance} lags: {change.reason}; nobody is declared suspect "
                  "until it has kept up for a full detection window")
        log.error("monitor overloaded: suspecting nobody", extra=fields(reason=change.reason, repeat=change.repeat))
    elif isinstance(change, Recovered):
        kind = "monitor_recovered"
        reason = (f"heartbeat monitor {rt.instance} keeps up again after {change.lasted_s:.1f}s; "
                  f"suspicion resumes in {max(0.0, change.resume_at - time.monotonic()):.1f}s")
        log.warning("monitor recovered", extra=fields(lasted_s=round(change.lasted_s, 2)))
    try:
        await bus.publish(bus.subjects.alert(kind),
                          Alert(kind=kind, at=time.time(), service="heartbeat", reason=reason, term=lease.term))
    except Exception as err:  # an alert that cannot be sent must not stop the monitor
        log.error("could not publish alert", extra=fields(kind=kind, error=str(err) or type(err).__name__))
