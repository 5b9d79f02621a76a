"""The agent's watchdog: self-fencing through a hardware watchdog and a slot on
shared storage (SBD-style; docs/watchdog.md).

The agent arms the host's watchdog device and feeds it only while the host is
healthy:

* its slot on shared storage (``[storage] slot_dir``) was read recently and holds
  no poison pill; or
* the storage cannot be read (or the last check is stale) **and** a recent
  monitor view (``<prefix>.view.<host>``, published by the heartbeat monitor's
  leader while it hears the host) lists it alive. So losing the storage
  everywhere resets nobody, while a host the monitor no longer hears (suspect)
  has neither channel and resets within its watchdog timeout.

A pill, once seen, ends feeding for the rest of the boot: the VMs are powered off
at once and the watchdog resets the host. A host that boots with a pill in its
slot arms nothing, starts nothing and reports ``pill`` (and ``quarantined``)
until an operator clears it (``hafence host clear``).

The device is a port (``WatchdogDevice``): ``LinuxWatchdog`` speaks the Linux
watchdog API; the lab binds ``watchdog:sim`` (``hafence.bindings``) to a file a
simulator process watches. Decisions are a pure function (``feed_decision``);
the storage is touched from one thread of its own, so a hung NFS read can never
block the event loop or stack up threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from nats.aio.msg import Msg

from hafence.bus import Reject
from hafence.config import ClusterConfig
from hafence.contracts import MonitorView
from hafence.logs import fields
from hafence.slots import SlotRecord, Slots, SlotUnreachable

log = logging.getLogger("hafence.agent.watchdog")

# Linux watchdog ioctls (include/uapi/linux/watchdog.h): _IOR/_IOWR('W', n, int).
WDIOC_KEEPALIVE = 0x80045705
WDIOC_SETTIMEOUT = 0xC0045706
WDIOC_GETTIMEOUT = 0x80045707


class WatchdogDevice(Protocol):
    """A watchdog: once armed, it resets the host unless fed within its timeout."""

    def arm(self, timeout_s: float) -> float:
        """Open and start it, asking for ``timeout_s``; returns the timeout the device
        really uses. Raises OSError when it cannot be armed or its timeout is unknown."""
        ...

    def feed(self) -> None: ...

    def disarm(self) -> None:
        """Magic close: stop it (a clean stop of the agent)."""
        ...


class LinuxWatchdog:
    """``/dev/watchdog`` (or any path): open, WDIOC_SETTIMEOUT where the driver
    supports it (else WDIOC_GETTIMEOUT), keep-alive writes, magic close ``V``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd: int | None = None

    def arm(self, timeout_s: float) -> float:
        fd = os.open(self.path, os.O_WRONLY | os.O_CLOEXEC)  # opening starts it
        try:
            asked = max(1, int(timeout_s))  # the API counts whole seconds
            try:
                got = fcntl.ioctl(fd, WDIOC_SETTIMEOUT, struct.pack("i", asked))
                timeout = struct.unpack("i", got)[0]
            except OSError as err:
                if err.errno not in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
                # The driver cannot set it: learn the one it has.
                got = fcntl.ioctl(fd, WDIOC_GETTIMEOUT, struct.pack("i", 0))
                timeout = struct.unpack("i", got)[0]
            if timeout <= 0:
                raise OSError(errno.EINVAL, f"watchdog {self.path} reports timeout {timeout}")
        except OSError:
            # Unknown timeout: the fencer could not compute msgwait. Stop it again.
            with contextlib.suppress(OSError):
                os.write(fd, b"V")
            os.close(fd)
            raise
        self.fd = fd
        return float(timeout)

    def feed(self) -> None:
        if self.fd is None:
            raise OSError(errno.EBADF, f"watchdog {self.path} is not armed")
        os.write(self.fd, b"\0")

    def disarm(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.write(fd, b"V")
        finally:
            os.close(fd)


# --- the pure rule -------------------------------------------------------------

Outcome = Literal["clear", "pill", "unreachable"]


@dataclass(frozen=True, slots=True)
class Check:
    """One look at the slot: when it *started* (a slow read proves only that moment)."""

    started_at: float
    outcome: Outcome
    detail: str = ""


@dataclass(frozen=True, slots=True)
class FeedDecision:
    feed: bool
    reason: str


def feed_decision(now: float, check: Check | None, pill_seen: bool, view_at: float | None,
                  timeout_s: float, view_max_age_s: float) -> FeedDecision:
    """Whether to feed the watchdog now. ``check``: the latest completed slot check;
    ``view_at``: when the latest monitor view listing this host arrived (None: never).

    A check counts for half the watchdog timeout after it started: whatever it
    proved, the host resets at most 1.5 timeouts after a pill it had not yet seen,
    inside msgwait (2 timeouts). A view counts for ``view_max_age_s`` (at most half
    the timeout, checked by the config)."""
    if pill_seen:
        return FeedDecision(False, "poison pill in the slot")
    fresh = check is not None and now - check.started_at <= timeout_s / 2
    if fresh and check is not None and check.outcome == "clear":
        return FeedDecision(True, "slot readable, no pill")
    if view_at is not None and now - view_at <= view_max_age_s:
        why = check.detail if check is not None and fresh else "slot check stale or missing"
        return FeedDecision(True, f"storage unreachable ({why}); the monitor's view lists this host")
    why = (check.detail or check.outcome) if check is not None and fresh else "no recent slot check"
    return FeedDecision(False, f"storage unreachable ({why}) and no recent monitor view lists this host")


# --- the shell -----------------------------------------------------------------


class WatchdogGuard:
    """Runs the slot checks and the feeding for one agent. ``is_up`` and ``boot_id``
    read the agent's state (a lab host that is powered off does nothing); ``on_pill``
    powers the VMs off."""

    def __init__(self, config: ClusterConfig, host: str, device: WatchdogDevice | None,
                 is_up: Callable[[], bool], boot_id: Callable[[], str],
                 on_pill: Callable[[], Awaitable[None]], clock: Callable[[], float] = time.monotonic,
                 *, slots: Slots | None = None, io: Callable[..., Awaitable[Any]] | None = None,
                 wall: Callable[[], float] = time.time) -> None:
        # ``slots``, ``io`` (how a slot or device operation runs: in the slot thread here)
        # and ``wall`` are the storage's and clock's binding; the deterministic simulation
        # binds its world's slots and virtual time and drives this guard's checks itself.
        self.settings = config.storage
        self.host = host
        self.device = device
        self.slots = slots if slots is not None else Slots(self.settings.slot_dir)
        self.is_up, self.boot_id, self.on_pill, self.clock, self.wall = is_up, boot_id, on_pill, clock, wall
        self.io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"slot-{host}")
        self.run_io = io if io is not None else self._in_slot_thread
        self.check: Check | None = None
        self.checking = False
        self.view_at: float | None = None
        self.view_term = 0
        self.boot = ""
        self.pill = False
        self.armed = False
        self.timeout_s = 0.0
        self.counter = 0
        self.feeding: bool | None = None
        self.seen_clear = False  # a clean slot check this boot
        self.task: asyncio.Task[None] | None = None
        self.changed: Callable[[], None] = lambda: None

    def _in_slot_thread(self, fn: Callable[..., Any], *args: Any) -> Awaitable[Any]:
        return asyncio.get_running_loop().run_in_executor(self.io, fn, *args)

    # Starts are refused until this boot's first clean check: the slot may hold a pill.
    def start_refusal(self) -> str:
        if self.pill:
            return (f"host {self.host} was fenced through its watchdog: a poison pill is in its slot "
                    "(hafence host clear)")
        if self.boot != self.boot_id() or not self.seen_clear:
            return f"host {self.host} has not read its slot on shared storage yet this boot: starting nothing"
        return ""

    async def on_view(self, view: MonitorView, msg: Msg | None = None) -> None:
        if view.host != self.host:
            raise Reject(f"a view of {view.host} for {self.host}")
        if view.term < self.view_term:
            return None  # an older leader's: it may not hear what the current one hears
        self.view_term = view.term
        self.view_at = self.clock()
        return None

    def _new_boot(self) -> None:
        self.boot, self.check, self.pill, self.armed, self.timeout_s, self.counter = (
            self.boot_id(), None, False, False, 0.0, 0)
        self.view_at, self.feeding, self.seen_clear = None, None, False

    def _look(self, boot: str) -> Check:
        """In the slot thread: pill? then this boot's record (armed, timeout, counter)."""
        started = self.clock()
        try:
            pill = self.slots.pill(self.host)
            if pill is not None:
                return Check(started, "pill", f"pill written by {pill.by or 'someone'}: {pill.reason}")
            if not self.pill:
                self.counter += 1
                self.slots.write_record(SlotRecord(
                    host=self.host, boot_id=boot, counter=self.counter, armed=self.armed, timeout_s=self.timeout_s,
                    interval_s=self.settings.slot_interval_s, view_max_age_s=self.settings.view_max_age_s,
                    written_at=self.wall()))
            return Check(started, "clear")
        except SlotUnreachable as err:
            return Check(started, "unreachable", str(err))

    async def _check_once(self) -> None:
        if self.checking:
            return  # the last one hangs in the storage: never stack threads
        self.checking = True
        boot = self.boot
        try:
            check = await self.run_io(self._look, boot)
        finally:
            self.checking = False
        if boot != self.boot:
            return  # the host rebooted meanwhile
        self.check = check
        if check.outcome == "pill" and not self.pill:
            self.pill = True
            log.error("poison pill in the slot: powering VMs off and no longer feeding the watchdog",
                      extra=fields(host=self.host, detail=check.detail, armed=self.armed))
            self.changed()
            await self.on_pill()
        elif check.outcome == "clear" and self.pill and not self.armed:
            # Booted with the pill (never armed this boot): an operator removed it.
            self.pill = False
            log.warning("poison pill cleared: arming the watchdog", extra=fields(host=self.host))
            self.changed()
            await self._check_once()  # arms on a clean look
        elif check.outcome == "clear" and not self.pill:
            if not self.seen_clear:
                self.seen_clear = True
                self.changed()
            if not self.armed and self.device is not None:
                await self._arm()

    async def recheck(self) -> None:
        """Look at the slot now (an operator's "cleared" arrived: is the pill gone?)."""
        if self.task is not None and not self.task.done():
            await asyncio.shield(self.task)
        await self._check_once()

    async def _arm(self) -> None:
        assert self.device is not None
        try:
            self.timeout_s = await self.run_io(self.device.arm, self.settings.watchdog_timeout_s)
        except OSError as err:
            log.error("watchdog not armed: this host is not protected by a watchdog level",
                      extra=fields(host=self.host, error=str(err)))
            return
        self.armed = True
        log.warning("watchdog armed", extra=fields(host=self.host, timeout_s=self.timeout_s))
        self.changed()

    async def _feed_once(self) -> None:
        decision = feed_decision(self.clock(), self.check, self.pill, self.view_at,
                                 self.timeout_s or self.settings.watchdog_timeout_s, self.settings.view_max_age_s)
        if decision.feed != self.feeding and (self.armed or self.pill):  # unarmed: nothing to say
            (log.info if decision.feed else log.error)(
                "watchdog " + ("fed" if decision.feed else "NOT fed: the host resets"),
                extra=fields(host=self.host, reason=decision.reason, armed=self.armed))
            self.feeding = decision.feed
        if decision.feed and self.armed and self.device is not None:
            try:
                self.device.feed()  # a write to a char device: never blocks on the storage
            except OSError as err:
                log.error("watchdog feed failed", extra=fields(host=self.host, error=str(err)))

    async def run(self) -> None:
        interval = self.settings.slot_interval_s
        feed_every = min(interval, self.settings.watchdog_timeout_s / 4)
        next_check = 0.0
        try:
            while True:
                if not self.is_up():
                    self.boot = ""  # powered off (lab): the watchdog went with the host
                    await asyncio.sleep(feed_every)
                    continue
                if self.boot != self.boot_id():
                    self._new_boot()
                now = self.clock()
                if now >= next_check:
                    next_check = now + interval
                    if self.task is None or self.task.done():
                        self.task = asyncio.get_running_loop().create_task(self._check_once())
                await self._feed_once()
                await asyncio.sleep(feed_every)
        finally:
            if self.task is not None:
                self.task.cancel()
            await asyncio.shield(self._stop())

    async def _stop(self) -> None:
        """A clean stop: say so in the slot, then magic-close (the host is no longer
        protected by this level, and the fencer's check says so)."""
        if self.armed and not self.pill and self.device is not None:
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(self.io, self._disarm)
        self.io.shutdown(wait=False, cancel_futures=True)

    def _disarm(self) -> None:
        self.armed = False
        with contextlib.suppress(SlotUnreachable):
            self.counter += 1
            self.slots.write_record(SlotRecord(host=self.host, boot_id=self.boot, counter=self.counter, armed=False,
                                               written_at=time.time()))
        assert self.device is not None
        self.device.disarm()
