"""The heartbeat service: the monitor's core (``core.py``) on the generic driver,
with its own heartbeat ingest.

Every decision (suspect, alive, re-announce on taking the lease, the load guard,
views) is ``HeartbeatCore``'s; the generic driver (``hafence.core.driver``) runs
its timers and lease and carries out what it decides.

Ingest is the hot path (tens of thousands of heartbeats a second on one core),
so heartbeats do not go through the driver's subscription and queue: they arrive
on a connection of their own that parses NATS frames in bulk (``wire.py``;
nats-py where the deployment authenticates with a credentials file), and a
heartbeat costs one decode, one strict subject check (S5), one call of the
core's ``heard`` (the function its ``handle(Delivered(...))`` calls) and a few
counters: no event object, no span, no header parsing, no labelled metric, no
await on the network. The rare heartbeat that decides something (a host back)
leaves its effects in the core's outbox and feeds the driver one ``FLUSH``, so
they are carried out in order with everything else. What fails decoding or the
subject check is dead-lettered here, by a task of its own.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import msgspec
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from hafence.bus import Bus
from hafence.config import read_secret
from hafence.contracts import Decoders
from hafence.core.driver import Driver
from hafence.core.events import TimerFired
from hafence.heartbeat.core import (
    FLUSH,
    HeartbeatCore,
    parse_shard,
    settings_of,
    shard_of,  # noqa: F401 - tests and tools read it here
    suspect_event,
    suspect_msg_id,
)
from hafence.heartbeat.liveness import Liveness, Suspect, UnknownHost
from hafence.heartbeat.wire import FirehoseSubscription
from hafence.logs import fields
from hafence.service import Runtime

log = logging.getLogger("hafence.heartbeat")

# With nats-py (credentials-file deployments): how many heartbeats are processed
# before the ingest yields to the other tasks (the driver, the signal handler):
# nats-py hands a queued backlog over without ever suspending.
YIELD_EVERY = 256
# Rejected messages waiting to be dead-lettered; beyond that they are counted, not kept.
DEAD_LETTER_BACKLOG = 1000
# A subscription may hold this much unprocessed; the load guard trips long before.
PENDING_MSGS_LIMIT = 2_000_000
PENDING_BYTES_LIMIT = 512 * 1024 * 1024
# A heartbeat is about 150 bytes; anything much larger is refused before decoding.
MAX_HEARTBEAT_BYTES = 4096


@dataclass(frozen=True, slots=True)
class Rejected:
    subject: str
    data: bytes
    error: str


class Ingest:
    """Every heartbeat goes through ``take``: decode, check, hand to the core."""

    def __init__(self, core: HeartbeatCore, hb_prefix: str, feed_flush: Callable[[], None]) -> None:
        self.core = core
        self.hb_prefix = hb_prefix  # "<prefix>.hb."
        self.feed_flush = feed_flush  # the driver runs what the core kept in its outbox
        self.rejected: deque[Rejected] = deque()
        self.rejected_dropped = 0
        self.unknown_warned: set[str] = set()
        self.taken = 0
        self.wake = asyncio.Event()  # something to dead-letter
        self._decode = Decoders.heartbeat.decode
        self._heard = core.heard
        self._mono, self._wall = time.monotonic, time.time

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
        self.taken += 1
        try:
            out = self._heard(host, hb.boot_id, hb.seq, hb.sent_at, self._mono(), self._wall())
        except UnknownHost:
            if host in self.core.settings.others:
                return  # another shard's (nats-py path: it subscribes to every heartbeat)
            if host not in self.unknown_warned:
                self.unknown_warned.add(host)
                self.reject(subject, data, f"rejected: host {host!r} is not in the cluster configuration")
            return
        if out and self.core.defer(out):
            self.feed_flush()

    async def on_message(self, msg: Msg) -> None:
        """The nats-py subscription's handler (deployments with a credentials file)."""
        self.take(msg.subject, msg.data)
        if self.taken % YIELD_EVERY == 0:
            await asyncio.sleep(0)

    def reject(self, subject: str, data: bytes, error: str) -> None:
        if len(self.rejected) >= DEAD_LETTER_BACKLOG:
            self.rejected_dropped += 1
            return
        self.rejected.append(Rejected(subject, data, error))
        self.wake.set()


@dataclass
class FirehoseFeed:
    sub: FirehoseSubscription
    disconnects: int = 0  # the subscription's count at the last look

    def connected(self) -> bool:
        """False also when the connection was lost and restored since the last look
        (L4: nats-server closes a slow consumer and drops what it held; the
        monitor is back within a tick, and would not have looked deaf)."""
        lost, self.disconnects = self.sub.disconnects != self.disconnects, self.sub.disconnects
        return self.sub.connected and not lost

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


async def run(rt: Runtime) -> None:
    try:
        shard, shards = parse_shard(getattr(rt.args, "shard", "") or "")
    except ValueError as err:
        raise SystemExit(f"hafence heartbeat: {err}") from None
    bus = rt.bus
    settings = settings_of(rt.config, rt.instance, shard, shards, subscribe=False)
    # A nonce per lifetime keeps the incidents of never-seen hosts unique (S4).
    core = HeartbeatCore(settings, nonce=secrets.token_hex(8))
    driver = Driver(core, rt)
    ingest = Ingest(core, bus.subjects.hb_all()[:-1], lambda: driver.feed(TimerFired(FLUSH)))
    subjects = [bus.subjects.hb_all()] if shards == 1 else [bus.subjects.hb(h) for h in settings.hosts]
    fast = firehose(rt, subjects, ingest)
    sub: Subscription | None = None
    try:
        async with asyncio.TaskGroup() as tg:
            if fast is not None:
                core.feed = FirehoseFeed(fast)
                tg.create_task(fast.run())
            else:
                sub = await bus.nc.subscribe(bus.subjects.hb_all(), cb=ingest.on_message,
                                             pending_msgs_limit=PENDING_MSGS_LIMIT,
                                             pending_bytes_limit=PENDING_BYTES_LIMIT)
                core.feed = NatsPyFeed(bus.nc, sub)
            tg.create_task(driver.run())
            tg.create_task(_dead_letters(bus, ingest))
    finally:
        # Drop the backlog at once: a stopping monitor has nothing to learn from it,
        # and working through it would hold SIGTERM up.
        if sub is not None and not bus.nc.is_closed:
            try:
                await sub.unsubscribe()
            except Exception:  # the connection is going away anyway
                pass


async def _dead_letters(bus: Bus, ingest: Ingest) -> None:
    """What the ingest refused, dead-lettered off the hot path."""
    while True:
        await ingest.wake.wait()
        ingest.wake.clear()
        while ingest.rejected:
            r = ingest.rejected.popleft()
            await bus.dead_letter(r.subject, r.data, r.error, None)
        if ingest.rejected_dropped:
            log.warning("rejected heartbeats not dead-lettered (too many)", extra=fields(n=ingest.rejected_dropped))
            ingest.rejected_dropped = 0


async def _emit(bus: Bus, core: Liveness, lease: object, t: Suspect, wall_offset: float,
                late: list[str] | None = None) -> None:
    """A suspect as the core publishes it (kept for tests/test_reannounce.py)."""
    event = suspect_event(t, core.window, getattr(lease, "term", 0), wall_offset, late)
    await bus.publish(bus.subjects.host_event(t.host, "suspect"), event, msg_id=suspect_msg_id(t.incident))
