"""Watchdog self-fencing in the simulation (docs/watchdog.md): the slots, the agent's
guard and the fencer's watchdog level, on the world and virtual time.

Production's code runs here wherever it decides anything:

* the agent's ``hafence.agent.watchdog.WatchdogGuard`` itself (its slot checks, what
  a check proves, pill and clear transitions, arming, ``feed_decision``, the start
  refusal, the views' terms), built anew for every agent process as production
  does, with its storage bound to the world's slot directory (``WorldSlots``), its
  device to the host's hardware watchdog (``World.arm_watchdog``/``feed_watchdog``),
  its clocks to the host node's and its slot operations to virtual time (``io``).
  Only its loop (``WatchdogGuard.run``: a check every ``slot_interval_s``, a feed
  every ``min(slot_interval_s, timeout / 4)``) is written again here on the
  scheduler, step for step;
* the fencer's ``hafence.fencer.drivers.watchdog.WatchdogDriver`` itself (the pill,
  the baseline counter, ``PillWatch``, ``msgwait_s``, ``ViewTracker``), with a new
  ``WatchdogContext`` per fencer process (its views followed on its own connection,
  its reconnections counted as blindness), driven by the world's power port as
  ``Executor._operate`` drives it.

The hardware watchdog is the world's (``Host.watchdog``): armed by the agent, it
resets the host (a new boot, VMs lost) when not fed within its timeout, counted in
simulated time whatever the host's clock says. A host that hangs, whose agent
crashes or is paused, that loses its storage with no view, or that saw its pill
stops feeding it. A watchdog that does not fire is not modelled (assumption 1).
"""

from __future__ import annotations

import logging
from asyncio import CancelledError
from collections.abc import Callable
from typing import Any

from hafence.agent.core import WatchdogStatus
from hafence.agent.watchdog import WatchdogGuard
from hafence.config import ClusterConfig, WatchdogDevice
from hafence.contracts import Decoders, MonitorView
from hafence.fencer.drivers.watchdog import ViewTracker, WatchdogContext, WatchdogDriver
from hafence.sim.clock import NodeClock, SimFuture, Task
from hafence.sim.world import PowerDevice, World
from hafence.slots import Pill, SlotRecord, Slots, SlotUnreachable, view_subject, views_subject
from hafence.subjects import Subjects

# The guard logs through ``logging``, whose records read the real clock: in a simulated
# run what it decides is seen in the world's log and the core's effects instead.
logging.getLogger("hafence.agent.watchdog").setLevel(logging.CRITICAL + 1)


class WorldSlots(Slots):
    """The slot directory as one side sees it: a host's agent (``host``: it reaches the
    storage only while its path does) or the fencer (``host`` empty: always). A pill's
    and a record's wall-clock stamp is the writer's own clock."""

    def __init__(self, world: World, host: str, clock: NodeClock) -> None:
        super().__init__("/sim/slots")
        self.world, self.host, self.clock = world, host, clock

    def check_dir(self) -> None:
        h = self.world.hosts.get(self.host) if self.host else None
        if h is not None and not h.storage_ok:
            raise SlotUnreachable(f"{self.host} cannot reach the shared storage")

    def pill(self, host: str) -> Pill | None:
        self.check_dir()
        pill: Pill | None = self.world.pills.get(host)
        return pill

    def write_pill(self, host: str, by: str, reason: str) -> Pill:
        self.check_dir()
        w = self.world
        pill = Pill(host=host, written_at=self.clock.wall(), by=by, reason=reason)
        w.pills[host] = pill
        h = w.hosts[host]
        w.pill_boot[host] = h.boots
        w.pill_boot_id[host] = h.boot_id
        w.log(f"pill written for {host} by {by} (boot #{h.boots}, {'powered' if h.powered else 'off'})")
        return pill

    def clear_pill(self, host: str) -> bool:
        self.check_dir()
        self.world.pill_boot.pop(host, None)
        self.world.pill_boot_id.pop(host, None)
        return self.world.pills.pop(host, None) is not None

    def record(self, host: str) -> SlotRecord | None:
        self.check_dir()
        record: SlotRecord | None = self.world.slot_records.get(host)
        return record

    def write_record(self, record: SlotRecord) -> None:
        self.check_dir()
        self.world.slot_records[record.host] = record


class HostWatchdog:
    """The host's hardware watchdog as ``hafence.agent.watchdog.WatchdogDevice``."""

    def __init__(self, world: World, host: str) -> None:
        self.world, self.host = world, host

    def arm(self, timeout_s: float) -> float:
        return self.world.arm_watchdog(self.host, timeout_s)

    def feed(self) -> None:
        self.world.feed_watchdog(self.host)

    def disarm(self) -> None:
        self.world.disarm_watchdog(self.host)


class AgentWatchdog:
    """One host's ``watchdog`` port (``hafence.agent.ports.WatchdogPort``'s operations)
    over a ``WatchdogGuard`` made for each agent process, and that guard's loop."""

    def __init__(self, world: World, config: ClusterConfig, host: str, clock: NodeClock) -> None:
        self.world, self.config, self.host, self.clock = world, config, host, clock
        self.machine = world.hosts[host]
        self.scheduler = world.scheduler
        settings = config.storage
        self.interval = settings.slot_interval_s
        self.feed_every = min(settings.slot_interval_s, settings.watchdog_timeout_s / 4)
        self.device = HostWatchdog(world, host) if self.machine.watchdog else None
        self.service: Any = None
        self.incarnation = -1
        self.guard: WatchdogGuard | None = None
        self._version, self._seen = 1, 0
        self._waiting: list[SimFuture[WatchdogStatus]] = []
        self._task: Task[None] | None = None
        self._next_check = 0.0

    # -- the process ---------------------------------------------------------------------
    def process_started(self, service: Any) -> None:
        """A new agent process: a new guard (nothing of the old one's memory), its loop."""
        self.service, self.incarnation = service, service.incarnation
        if self._task is not None:
            self._task.cancel()
        self._task, self._next_check = None, 0.0
        self._version, self._seen, self._waiting = 1, 0, []

        async def on_pill() -> None:
            return None  # the core powers the VMs off when the port reports the pill

        m = self.machine
        self.guard = WatchdogGuard(self.config, self.host, self.device, lambda: m.answers, lambda: m.boot_id,
                                   on_pill, self.clock.monotonic, slots=WorldSlots(self.world, self.host, self.clock),
                                   io=self._io, wall=self.clock.wall)
        self.guard.changed = self._bump
        self._tick(self.incarnation)

    def _mine(self, incarnation: int) -> bool:
        svc = self.service
        return svc is not None and svc.alive and svc.incarnation == incarnation == self.incarnation

    def _tick(self, incarnation: int) -> None:
        """One turn of ``WatchdogGuard.run``: dead with its process, still while it is
        frozen (paused, or its host hung)."""
        if not self._mine(incarnation):
            if self._task is not None and incarnation == self.incarnation:
                self._task.cancel()
            return
        self.clock.call_later(self.feed_every, self._tick, incarnation)
        g = self.guard
        if g is None or self.service.paused or not self.machine.answers:
            return
        if g.boot != g.boot_id():
            g._new_boot()
        now = self.clock.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.interval
            if self._task is None or self._task.done():
                self._task = self.scheduler.spawn(g._check_once(), f"{self.host} slot check")
        feeding = g._feed_once()  # no await inside: one step of the coroutine runs it
        try:
            feeding.send(None)
        except StopIteration:
            pass
        else:  # pragma: no cover - the guard would have awaited I/O in its feed
            feeding.close()
            raise RuntimeError("WatchdogGuard._feed_once awaited something")

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A slot or device operation in the guard's own thread: it takes the storage's
        time (a fault may make it seconds), and a hung host's thread waits with it."""
        incarnation = self.incarnation
        delay = self.world.slot_delay.get(self.host)
        if delay is not None:
            await self.scheduler.sleep(self.world.rng.uniform(*delay))
        while not self.machine.answers and self._mine(incarnation):
            await self.scheduler.sleep(0.5)
        if not self._mine(incarnation):
            raise CancelledError("the agent process is gone")  # its thread died with it: nothing written
        return fn(*args)

    # -- the port ------------------------------------------------------------------------
    def _status(self) -> WatchdogStatus:
        g = self.guard
        return WatchdogStatus() if g is None else WatchdogStatus(pill=g.pill, armed=g.armed, timeout_s=g.timeout_s)

    def _bump(self) -> None:
        self._version += 1
        waiting, self._waiting = self._waiting, []
        for fut in waiting:
            if not fut.done():
                self._seen = self._version
                fut.set_result(self._status())

    def changed(self) -> SimFuture[WatchdogStatus]:
        fut: SimFuture[WatchdogStatus] = self.scheduler.future(f"{self.host} watchdog changed")
        if self._seen != self._version:
            self._seen = self._version
            fut.set_result(self._status())
        else:
            self._waiting.append(fut)
        return fut

    def start_refusal(self) -> str:
        return self.guard.start_refusal() if self.guard is not None else "no watchdog guard"

    async def recheck(self) -> WatchdogStatus:
        if self.guard is not None:
            await self.guard.recheck()
        return self._status()

    async def view(self, view: MonitorView) -> None:
        if self.guard is not None:
            await self.guard.on_view(view)


class FencerWatchdog:
    """The fencer process's watchdog context (``WatchdogContext``: its view of the
    monitor, each host's pill watch) and drivers, made anew at each fencer start."""

    def __init__(self, world: World, config: ClusterConfig, clock: NodeClock) -> None:
        self.world, self.config, self.clock = world, config, clock
        self.subjects = Subjects(config.cluster.subject_prefix)
        self.context: WatchdogContext | None = None
        self.drivers: dict[str, WatchdogDriver] = {}
        self.slots = WorldSlots(world, "", clock)

    def process_started(self, service: Any) -> None:
        conn = service.conn
        incarnation = service.incarnation
        views = ViewTracker(self.clock.monotonic, lambda: conn.generation)
        self.context = WatchdogContext(self.config.storage, views)
        self.drivers = {}

        def on_view(msg: Any) -> None:
            """``watch_views``: a view on its own host's subject only."""
            if service.incarnation != incarnation:
                return
            try:
                view = Decoders.monitor_view.decode(msg.data)
            except Exception:
                return
            if msg.subject != view_subject(self.subjects, view.host):
                return
            if service.paused:  # a frozen process reads it when it wakes: later, never earlier
                service._when_awake(lambda: views.seen(view) if service.incarnation == incarnation else None)
            else:
                views.seen(view)

        conn.subscribe(views_subject(self.subjects), on_view)

    def driver(self, device: PowerDevice) -> tuple[WatchdogDriver | None, WatchdogDevice | None]:
        settings = self.config.devices.get(device.name)
        if self.context is None or not isinstance(settings, WatchdogDevice):
            return None, None
        if device.host not in self.drivers:
            self.drivers[device.host] = WatchdogDriver(device.name, settings, device.host, self.context,
                                                       clock=self.clock.monotonic, slots=self.slots, io=self._io)
        return self.drivers[device.host], settings

    def drop(self, device: PowerDevice) -> None:
        self.drivers.pop(device.host, None)

    async def _io(self, fn: Callable[..., Any], *args: Any) -> Any:
        await self.world.scheduler.sleep(self.world.rng.uniform(0.001, 0.02))
        return fn(*args)
