"""The heartbeat service: feeds heartbeats and the clock into the liveness core.

Every replica watches every heartbeat (warm standby); only the lease holder
publishes. On taking over, the new leader re-publishes the current suspects:
the ids are deterministic, so JetStream de-duplicates what was already sent.

Ingest is the hot path (tens of thousands of heartbeats a second on one core).
Heartbeats arrive on a connection of their own that parses NATS frames in bulk
(``wire.py``; nats-py where the deployment authenticates with a credentials
file), and a heartbeat costs one decode, one strict subject check, one call
into the core and a few counters: no span, no header parsing, no labelled
metric, no await on the network. Whatever must be published (host events, alerts, dead
letters) goes through queues to tasks of its own. The load guard (``load.py``)
watches the monitor's own lag; while it lags, nobody is declared suspect (L4).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import ssl
import time
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from hafence import metrics
from hafence.bus import Bus
from hafence.config import read_secret
from hafence.contracts import Alert, Decoders, HostEvent
from hafence.heartbeat.liveness import Alive, Liveness, Suspect, Transition, UnknownHost
from hafence.heartbeat.load import Change, LoadGuard, Overloaded, Recovered, Sample
from hafence.heartbeat.view import publish_views
from hafence.heartbeat.wire import FirehoseSubscription
from hafence.lease import LeaderLease
from hafence.logs import fields
from hafence.service import Runtime
from hafence.telemetry import tracer

log = logging.getLogger("hafence.heartbeat")

# With nats-py (credentials-file deployments): how many heartbeats are processed
# before the ingest yields to the other tasks (the ticker, the signal handler):
# nats-py hands a queued backlog over without ever suspending.
YIELD_EVERY = 256
# Rejected messages waiting to be dead-lettered; beyond that they are counted, not kept.
DEAD_LETTER_BACKLOG = 1000
# A subscription may hold this much unprocessed; the load guard trips long before.
PENDING_MSGS_LIMIT = 2_000_000
PENDING_BYTES_LIMIT = 512 * 1024 * 1024
METRICS_EVERY_S = 5.0
# A heartbeat is about 150 bytes; anything much larger is refused before decoding.
MAX_HEARTBEAT_BYTES = 4096
# A host unheard for this many intervals is "late": reported with a suspect as
# probably lost with it (the arbiter's storm guard counts it at once). A live host
# is silent about one interval; one that died with the suspect, at least
# missed - 1.25 intervals (last heard up to an interval earlier, noticed up to a
# tick later): so the list is sent only when missed_heartbeats >= 3.
LATE_AFTER_INTERVALS = 1.5
# Beyond this many late hosts the list is not sent (None): a message stays small,
# and the arbiter falls back to its settle wait, which sees the storm too.
MAX_LATE_REPORTED = 1000
PUBLISH_BATCH = 256


@dataclass(frozen=True, slots=True)
class Rejected:
    subject: str
    data: bytes
    error: str


class Ingest:
    """Every heartbeat goes through ``take``: decode, check, feed the core, count."""

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
        # incident -> the hosts late when it was declared (see LATE_AFTER_INTERVALS)
        self.late_of: dict[str, list[str] | None] = {}
        self.report_late = True
        self.others: set[str] = set()  # configured hosts other shards watch
        self.metric_children: dict[str, Any] = {}  # host -> its labelled counter, looked up once
        self.wake = asyncio.Event()  # something to publish
        self._decode = Decoders.heartbeat.decode

    def take(self, subject: str, data: bytes) -> None:
        if len(data) > MAX_HEARTBEAT_BYTES:
            self.reject(subject, data[:MAX_HEARTBEAT_BYTES],
                        f"rejected: a heartbeat of {len(data)} bytes (at most {MAX_HEARTBEAT_BYTES})")
            return
        try:
            hb = self._decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as err:
            self.reject(subject, data, f"undecodable message: {err}")
            return
        host = hb.host
        # S5: the host a heartbeat speaks for is the one its subject names.
        if subject != self.hb_prefix + host:
            self.reject(subject, data, f"rejected: heartbeat of host {host!r} on subject {subject}")
            return
        try:
            out = self.core.heartbeat(host, hb.boot_id, hb.seq, time.monotonic())
        except UnknownHost:
            if host in self.others:
                return  # another shard's (nats-py path: it subscribes to every heartbeat)
            if host not in self.unknown_warned:
                self.unknown_warned.add(host)
                self.reject(subject, data, f"rejected: host {host!r} is not in the cluster configuration")
            return
        if out:
            self.transitions.extend(out)
            self.wake.set()
        self.processed += 1
        if time.time() - hb.sent_at > self.age_limit_s:
            self.late += 1
        per_host = self.per_host
        per_host[host] = per_host.get(host, 0) + 1

    async def on_message(self, msg: Msg) -> None:
        """The nats-py subscription's handler (deployments with a credentials file)."""
        self.take(msg.subject, msg.data)
        if self.processed % YIELD_EVERY == 0:
            await asyncio.sleep(0)

    def reject(self, subject: str, data: bytes, error: str) -> None:
        if len(self.rejected) >= DEAD_LETTER_BACKLOG:
            self.rejected_dropped += 1
            return
        self.rejected.append(Rejected(subject, data, error))
        self.wake.set()

    def take_counts(self) -> tuple[int, int]:
        processed, late = self.processed, self.late
        self.processed = self.late = 0
        return processed, late


class Feed(Protocol):
    """Where heartbeats come from, as the load guard sees it."""

    def connected(self) -> bool: ...
    def pending(self) -> int: ...


@dataclass
class FirehoseFeed:
    sub: FirehoseSubscription

    def connected(self) -> bool:
        return self.sub.connected

    def pending(self) -> int:
        return 0  # unread heartbeats wait in the socket: their age at processing tells


@dataclass
class NatsPyFeed:
    nc: NatsClient
    sub: Subscription

    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    def pending(self) -> int:
        return self.sub.pending_msgs


def firehose(rt: Runtime, subjects: list[str], ingest: Ingest) -> FirehoseSubscription | None:
    """The fast subscription, with the bus's identity; None where it cannot authenticate (JWT/nkey)."""
    settings = rt.config.nats
    if settings.creds_file:
        return None
    user = os.environ.get("HAFENCE_NATS_USER", settings.user)
    password = (read_secret(os.environ.get("HAFENCE_NATS_PASSWORD_FILE", settings.password_file),
                            settings.password_env, "nats.password") if user else "")
    tls = None
    if settings.tls_ca_file or settings.tls_cert_file:
        tls = ssl.create_default_context(cafile=settings.tls_ca_file or None)
        if settings.tls_cert_file:
            tls.load_cert_chain(settings.tls_cert_file, settings.tls_key_file or None)
    return FirehoseSubscription([u for u in settings.url.split(",") if u.strip()], subjects, ingest.take,
                                user, password, tls, name=f"hafence-heartbeat-{rt.instance}-firehose")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--shard", default="", metavar="I/N",
        help="watch only shard I of N (0 <= I < N): the hosts whose name hashes (CRC-32) to I modulo N; "
             "run one monitor (and its standbys) per shard, each leads its own lease 'heartbeat-I-of-N'",
    )


def shard_of(host: str, shards: int) -> int:
    """Stable across processes and versions (not Python's salted hash())."""
    return zlib.crc32(host.encode()) % shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); ``""`` -> (0, 1), the whole cluster."""
    if not text:
        return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


async def run(rt: Runtime) -> None:
    bus, timings = rt.bus, rt.config.timings
    interval = timings.heartbeat_interval_s
    kv = await bus.js.key_value(bus.streams.leases)
    try:
        shard, shards = parse_shard(getattr(rt.args, "shard", "") or "")
    except ValueError as err:
        raise SystemExit(f"hafence heartbeat: {err}") from None
    role = "heartbeat" if shards == 1 else f"heartbeat-{shard}-of-{shards}"
    lease = LeaderLease(kv, role, rt.instance, timings.lease_ttl_s)
    hosts = [h.name for h in rt.config.hosts if shards == 1 or shard_of(h.name, shards) == shard]
    # A nonce per lifetime keeps the incidents of never-seen hosts unique (S4).
    core = Liveness(hosts, interval, timings.missed_heartbeats, time.monotonic(), nonce=secrets.token_hex(8))
    guard = LoadGuard(interval, core.window, time.monotonic(), alert_repeat_s=rt.config.arbiter.alert_repeat_s)
    ingest = Ingest(core, bus.subjects.hb_all()[:-1], guard.lag_limit_s)
    ingest.others = {h.name for h in rt.config.hosts} - set(hosts)
    # A shard sees only its own hosts late: its list would hide a storm across shards,
    # so a sharded monitor sends none and the arbiter settles instead (policy rule 2).
    ingest.report_late = shards == 1
    changes: list[Change] = []
    subjects = [bus.subjects.hb_all()] if shards == 1 else [bus.subjects.hb(h) for h in hosts]
    fast = firehose(rt, subjects, ingest)
    sub: Subscription | None = None
    feed: Feed
    try:
        async with asyncio.TaskGroup() as tg:
            if fast is not None:
                tg.create_task(fast.run())
                feed = FirehoseFeed(fast)
            else:
                sub = await bus.nc.subscribe(bus.subjects.hb_all(), cb=ingest.on_message,
                                             pending_msgs_limit=PENDING_MSGS_LIMIT,
                                             pending_bytes_limit=PENDING_BYTES_LIMIT)
                feed = NatsPyFeed(bus.nc, sub)
            tg.create_task(lease.run())
            tg.create_task(_ticker(rt, core, guard, ingest, feed, lease, changes))
            tg.create_task(_publisher(rt, bus, core, ingest, lease, changes))
            tg.create_task(publish_views(rt.config, bus, core, lease, hosts))  # watchdog hosts (view.py)
    finally:
        # Drop the backlog at once: a stopping monitor has nothing to learn from it,
        # and working through it would hold SIGTERM up.
        if sub is not None and not bus.nc.is_closed:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is going away anyway
                pass


async def _ticker(rt: Runtime, core: Liveness, guard: LoadGuard, ingest: Ingest, feed: Feed,
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
        for change in guard.observe(Sample(now, lag, processed, late, feed.pending(), feed.connected())):
            changes.append(change)
            ingest.wake.set()
            metrics.MONITOR_OVERLOADED.set(1 if guard.overloaded else 0)
        due = now + period
        transitions = core.tick(now) if guard.may_suspect(now) else []
        suspects = [t for t in transitions if isinstance(t, Suspect)]
        if suspects and ingest.report_late:
            ingest.late_of.update(_late_hosts(core, suspects, now, rt.config.timings.heartbeat_interval_s,
                                              rt.config.timings.missed_heartbeats))
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


def _late_hosts(core: Liveness, suspects: list[Suspect], now: float, interval: float, missed: int
                ) -> dict[str, list[str] | None]:
    """For each new suspect, the other hosts it was probably lost with: late now, or suspect in the same tick."""
    if missed < 3:
        return {}
    late = core.late(now, LATE_AFTER_INTERVALS * interval) + [s.host for s in suspects]
    if len(late) > MAX_LATE_REPORTED:
        return {s.incident: None for s in suspects}
    return {s.incident: sorted(h for h in late if h != s.host) for s in suspects}


def _flush_metrics(core: Liveness, hosts: list[str], ingest: Ingest) -> None:
    """Labelled metrics cost microseconds each: once every few seconds, not per heartbeat."""
    counts, ingest.per_host = ingest.per_host, {}
    children = ingest.metric_children
    for host, n in counts.items():
        child = children.get(host)
        if child is None:
            child = children[host] = metrics.HEARTBEATS.labels(host)
        child.inc(n)
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
        if not lease.held():
            ingest.late_of.clear()
            continue
        # Concurrently, a batch at a time (a starting monitor hears every host come
        # alive at once); a host appears at most once per batch, so its events keep their order.
        batch: dict[str, Transition] = {}
        for t in [*transitions, None]:
            if t is None or t.host in batch or len(batch) >= PUBLISH_BATCH:
                await asyncio.gather(*(_emit(bus, core, lease, b, wall_offset, ingest.late_of.pop(b.incident, None)
                                             if isinstance(b, Suspect) else None) for b in batch.values()))
                batch = {}
            if t is not None:
                batch[t.host] = t


async def _emit(bus: Bus, core: Liveness, lease: LeaderLease, t: Transition, wall_offset: float,
                late: list[str] | None = None) -> None:
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
            # As declared, also when a new leader re-announces it (same message id): the
            # silence it was declared after, and the time it was declared (its own time).
            event = HostEvent(
                host=t.host, kind="suspect", at=t.last_seen + t.silent_for + wall_offset, incident=t.incident,
                reason=f"no heartbeat for {t.silent_for:.1f}s (window {core.window:.1f}s)",
                term=lease.term, last_seen=t.last_seen + wall_offset, late_hosts=late,
                boot_id=t.boot_id,  # the boot last heard from: the incident is about it (S6)
            )
            await bus.publish(bus.subjects.host_event(t.host, "suspect"), event, msg_id=f"suspect:{t.incident}")
    elif isinstance(t, Alive):
        # Every host comes alive when a monitor starts: only a return from suspicion is news.
        (log.info if t.was_suspect else log.debug)("host is alive",
                                                   extra=fields(host=t.host, was_suspect=t.was_suspect))
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
