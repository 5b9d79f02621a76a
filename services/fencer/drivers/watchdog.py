"""The ``watchdog`` driver: fencing through the host's slot on shared storage and
its hardware watchdog (SBD-style; docs/watchdog.md).

"off" writes the poison pill into the host's slot. The host's agent, seeing it,
powers its VMs off and stops feeding its watchdog, which resets the host. Nothing
reads the host's power, so "off" is read only once the host has **provably**
stopped (``PillWatch``, pure):

* its slot counter has not moved since the pill was written (one write already
  under way when the pill landed is allowed, and restarts the clock);
* it has been out of the heartbeat monitor's view (``ViewTracker``) as long;
* ``msgwait`` (at least twice the watchdog timeout the host reported in its slot,
  and the configured ``msgwait_s``) has passed on the fencer's own monotonic
  clock since the later of the two.

If the counter moves twice after the pill, the host is alive and ignoring it:
the level fails and stays failed for that pill (never confirmed) until the pill
is cleared. A host whose slot does not report an armed watchdog is not protected
by this level: its status read says so (the health check, ``protection``), and
"off" writes no pill.

The driver needs the fencer's view of the monitor (``WatchdogContext``); without
it (``hafence fence off`` from a shell) it refuses: it could not see the host
come back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import msgspec
from nats.aio.msg import Msg

from hafence.bus import Bus, Reject
from hafence.config import ClusterConfig, HostConfig, StorageSection, WatchdogDevice
from hafence.contracts import Decoders, MonitorView
from hafence.fencer.drivers.base import DeviceError, DeviceUnreachable, PowerRead
from hafence.slots import Pill, SlotRecord, Slots, SlotUnreachable, view_subject, views_subject

T = TypeVar("T")


class ViewTracker:
    """When the fencer last saw the monitor's view list each host (its own monotonic
    clock). Time it could not see views counts as "listed": before it started, and
    up to any reconnection of its NATS connection (views sent meanwhile were lost)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 reconnects: Callable[[], int] = lambda: 0) -> None:
        self.clock = clock
        self.reconnects = reconnects
        self.blind_until = clock()
        self._reconnects = reconnects()
        self.listed: dict[str, float] = {}

    def _blind(self) -> float:
        count = self.reconnects()
        if count != self._reconnects:
            self._reconnects, self.blind_until = count, self.clock()
        return self.blind_until

    def seen(self, view: MonitorView) -> None:
        self.listed[view.host] = self.clock()

    def last_listed(self, host: str) -> float:
        return max(self.listed.get(host, float("-inf")), self._blind())


@dataclass(frozen=True, slots=True)
class WatchdogContext:
    """What the fencer process gives every watchdog driver: the storage settings, its
    view of the monitor, and each host's pill watch, which outlives a driver that
    the executor drops and makes again (a failed health check): a host caught
    ignoring its pill stays failed until the pill is cleared."""

    storage: StorageSection
    views: ViewTracker
    watches: dict[str, PillWatch] = field(default_factory=dict)


def msgwait_s(device: WatchdogDevice, storage: StorageSection, record: SlotRecord) -> float:
    """At least twice the larger of the reported and configured watchdog timeouts,
    and long enough for the host's own check interval and view age to run out
    before its watchdog does."""
    timeout = max(record.timeout_s, storage.watchdog_timeout_s)
    slack = max(record.interval_s, record.view_max_age_s, storage.slot_interval_s, storage.view_max_age_s)
    return max(device.msgwait_s, 2 * timeout, timeout + slack)


@dataclass(slots=True)
class PillWatch:
    """One pill and what was seen since (pure: times are the fencer's monotonic clock)."""

    host: str
    pill_written_at: float  # the pill's own wall-clock stamp: identifies it in the slot
    pill_at: float
    last: tuple[str, int]  # (boot, counter) last read
    timeout_record: SlotRecord
    last_change_at: float = float("-inf")
    moves: int = 0
    failed: str = ""
    history: list[str] = field(default_factory=list)

    def observe(self, record: SlotRecord | None, now: float) -> None:
        if record is None:
            return  # unreadable: proves nothing either way; the next read will tell
        current = (record.boot_id, record.counter)
        if current == self.last:
            return
        moved = record.counter - self.last[1] if record.boot_id == self.last[0] and record.counter > self.last[1] else 2
        self.moves += moved
        self.last, self.last_change_at = current, now
        if record.timeout_s > self.timeout_record.timeout_s:
            self.timeout_record = record
        if self.moves >= 2 and not self.failed:
            self.failed = (f"host {self.host} renewed its slot {self.moves} times after the pill: it is alive "
                           "and ignoring it; this level never confirms it (clear the pill to try again)")

    def verdict(self, now: float, last_listed: float, msgwait: float) -> tuple[PowerRead, str]:
        """("off", why) once provably stopped; ("on", what it waits for) until then."""
        if self.failed:
            raise DeviceError(self.failed)
        since = max(self.pill_at, self.last_change_at, last_listed)
        waited = now - since
        if waited >= msgwait:
            return "off", (f"slot unchanged and out of the monitor's view for {waited:.1f}s "
                           f"(msgwait {msgwait:.1f}s)")
        return "on", f"{waited:.1f}s of msgwait {msgwait:.1f}s"


class WatchdogDriver:
    driver = "watchdog"

    def __init__(self, name: str, config: WatchdogDevice, port: str, context: WatchdogContext | None,
                 clock: Callable[[], float] = time.monotonic, slots: Slots | None = None,
                 io: Callable[..., Awaitable[object]] | None = None) -> None:
        # ``slots`` and ``io`` (how a slot operation is run: a thread here) are the
        # storage's binding; the deterministic simulation binds its world's slots and
        # virtual time, and runs this driver itself.
        if context is None or not context.storage.slot_dir:
            raise DeviceError(f"device {name!r} (watchdog) works only inside the fencer service, with [storage] "
                              "slot_dir: it must watch the monitor's view to see the host come back")
        self.name, self.config, self.host = name, config, port
        self.context = context
        self.slots = slots if slots is not None else Slots(context.storage.slot_dir)
        self.clock = clock
        self.run_io = io if io is not None else asyncio.to_thread
        self.lock_key = f"watchdog:{context.storage.slot_dir}:{port}"

    @property
    def watch(self) -> PillWatch | None:
        return self.context.watches.get(self.host)

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        try:
            return await self.run_io(fn, *args)  # type: ignore[return-value]
        except SlotUnreachable as err:
            raise DeviceUnreachable(f"shared storage: {err}") from None

    async def _armed_record(self) -> SlotRecord:
        record = await self._io(self.slots.record, self.host)
        if record is None or not record.armed or record.timeout_s <= 0:
            raise DeviceError(f"host {self.host} has not reported an armed watchdog in its slot: "
                              "not protected by this level")
        return record

    async def power_off(self) -> None:
        current: Pill | None = await self._io(self.slots.pill, self.host)
        watch = self.watch
        if watch is not None and current is not None and current.written_at == watch.pill_written_at:
            return  # our pill is still there: its clock (and a failure) go on
        record = await self._armed_record()
        if current is None:
            current = await self._io(self.slots.write_pill, self.host, "fencer", "fence (watchdog level)")
        # A pill already there that we did not watch (a restarted fencer, another
        # replica's): its clock starts now. The counter is read after the pill: the
        # baseline is what the host wrote before it could have seen it.
        after = await self._io(self.slots.record, self.host) or record
        self.context.watches[self.host] = PillWatch(
            self.host, current.written_at, self.clock(), (after.boot_id, after.counter),
            after if after.timeout_s >= record.timeout_s else record)

    async def power_on(self) -> None:
        """Nothing to switch (action "reboot"): the host resets by itself and boots with
        the pill in its slot, quarantined until `hafence host clear`. Failing at once
        keeps the executor from polling for an "on" that never comes."""
        raise DeviceError(f"host {self.host} resets by itself through its watchdog: nothing to power on "
                          "(it boots quarantined until `hafence host clear` removes its pill)")

    async def status(self) -> PowerRead:
        watch = self.watch
        if watch is not None and await self._io(self.slots.pill, self.host) is None:
            del self.context.watches[self.host]  # the pill was cleared: that fence is over
            watch = None
        if watch is None:
            await self._armed_record()  # health check: protected only with an armed watchdog
            return "on"
        record = await self._io(self.slots.record, self.host)
        now = self.clock()
        watch.observe(record, now)
        state, _ = watch.verdict(now, self.context.views.last_listed(self.host),
                                 msgwait_s(self.config, self.context.storage, watch.timeout_record))
        return state

    async def close(self) -> None:
        pass


# --- for the fencer service ----------------------------------------------------------


def uses_watchdog(config: ClusterConfig) -> bool:
    return any(isinstance(d, WatchdogDevice) for d in config.devices.values())


def fencer_context(config: ClusterConfig, reconnects: Callable[[], int]) -> WatchdogContext:
    return WatchdogContext(config.storage, ViewTracker(reconnects=reconnects))


async def watch_views(bus: Bus, views: ViewTracker) -> None:
    """Follow the monitor's views (core NATS, every heartbeat interval per host heard)."""

    async def seen(view: MonitorView, msg: Msg) -> None:
        if msg.subject != view_subject(bus.subjects, view.host):
            raise Reject(f"a view of {view.host} on {msg.subject}")
        views.seen(view)

    await bus.serve(views_subject(bus.subjects), Decoders.monitor_view, seen)


def levels_for(config: ClusterConfig, host: HostConfig, method: str) -> HostConfig:
    """The host with the levels a request may use: all of them, or for ``method =
    "watchdog"`` (the isolation response "pill") only its watchdog levels (none: the
    fence fails, "no fence levels", and is escalated)."""
    if method != "watchdog":
        return host
    levels = [level for level in host.levels
              if all(isinstance(config.devices.get(ref.device), WatchdogDevice) for ref in level.devices)]
    return msgspec.structs.replace(host, levels=levels)
