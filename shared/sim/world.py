"""The simulated world: hosts, their power devices, their VMs and the shared storage.

This is the ground truth the checkers judge by (which VMs really run where, which
hosts are really powered) and what the services' ports are bound to in the
simulation:

* ``world.power`` (the fencer's ``power`` port): ``fence(request)`` runs the host's
  topology on the simulated devices, the way ``hafence.fencer.executor.Executor``
  does (send the command, read status back on ``StatusPollSchedule`` until it says
  the wanted state or the device's timeout passes, a retry unless the password was
  refused, levels in order, a reboot powers the confirmed level on again), and
  returns a ``SimFuture`` of ``hafence.fencer.ports.FenceReport``; the verdict is the
  production ``topology.verdict``. Every command it sends is recorded
  (``world.ops``: request id, term, host, level, device, action, time: S3/S4), and
  every run with what was really true when its levels were read back
  (``world.runs``: S2). ``check(host)`` reads every device's status and returns the
  production ``Protection``.
* ``world.hypervisor(host)`` (the agent's ``hypervisor`` port): the
  ``hafence.agent.hypervisor.Hypervisor`` operations as plain methods returning a
  value or a ``SimFuture``. A host that is powered off or hung does not answer: the
  future never completes (its agent is dead or frozen with it; the simulation's
  cluster stops or pauses the agent through ``World.listeners``).
* ``world.storage`` (``storage`` port of the agent and the arbiter):
  ``renew(host, boot_id) -> bool`` (did it reach the storage) and
  ``live(hosts, window_s) -> {host: renewed within the window}``.

Power. A host is powered when its mains are up, its chassis is on (its BMC's
switch, if it has a BMC) and, if PDU outlets feed it, at least one outlet is on
(two PSUs: one outlet is enough). A BMC lives on the host's standby power: it is
reachable only while mains and an outlet feed the host, so a host that loses its
power supply loses its BMC with it. When a host stops being powered it loses every
running VM; when it is powered again it boots with a new boot id (drawn from the
PRNG) and runs only what is marked autostart (nothing, once the agent disabled it;
hosts are created with autostart off).

Device behaviours (``PowerDevice.behaviour``): ``ok``; ``slow`` (every command and
status read takes seconds); ``stuck_on`` (takes the command, never turns off, and
honestly reads on); ``unreachable`` (no answer until the device's timeout);
``bad_credentials`` (refuses the login at once). A device that lies (reads off while
power stays on) is not modelled: no fencer can detect it, and S2 is judged against
the truth.

Everything random comes from the ``rng`` given; time is the scheduler's. Every
change is one line in the log (``log(who, what)``, e.g. the ``SimNats`` event log).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Literal

from hafence.agent.core import HostState
from hafence.contracts import DeviceEvidence, FenceRequest, PowerState, VmInfo, VmSpec
from hafence.fencer.drivers.base import DeviceAuthError
from hafence.fencer.executor import describe
from hafence.fencer.ports import FenceReport
from hafence.fencer.protection import Protection, protection
from hafence.fencer.topology import StatusPollSchedule, level_confirmed, verdict
from hafence.sim.clock import Scheduler, SimFuture

DeviceKind = Literal["bmc", "pdu", "watchdog"]
Behaviour = Literal["ok", "slow", "stuck_on", "unreachable", "bad_credentials"]
BEHAVIOURS: tuple[Behaviour, ...] = ("ok", "slow", "stuck_on", "unreachable", "bad_credentials")

Log = Callable[[str, str], None]
# (what happened, host): "off", "boot", "hang", "unhang".
Listener = Callable[[str, str], None]


class HypervisorError(Exception):
    """The simulated hypervisor refused (not enough memory, an unknown VM)."""


@dataclass
class PowerDevice:
    """One switch of a host's power: its BMC (the chassis) or one PDU outlet."""

    name: str
    host: str
    level: int
    kind: DeviceKind
    behaviour: Behaviour = "ok"
    on: bool = True  # the chassis switch (BMC) or the outlet (PDU)
    timeout_s: float = 5.0  # how long an unreachable device keeps the fencer waiting per command
    power_timeout_s: float = 20.0  # from a command to giving up on reading the wanted state
    retries: int = 1

    @property
    def driver(self) -> str:
        return {"bmc": "ipmi", "pdu": "apc_snmp"}.get(self.kind, self.kind)


@dataclass
class Host:
    name: str
    memory_mb: int
    vcpus: int
    mains: bool = True  # the host's power supply (lost: the host and its BMC are dead)
    powered: bool = False
    boot_id: str = ""
    boots: int = 0
    booted_at: float = 0.0
    hung: bool = False
    crashed: bool = False  # hung for good: only a reset (or a fence) ends it
    storage_ok: bool = True
    defined: dict[str, VmSpec] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)
    autostart: set[str] = field(default_factory=set)
    stop_reasons: dict[str, str] = field(default_factory=dict)
    # VMs being started (their memory is taken at the start, as with locked memory):
    # two starts at once must both fit, not each alone (sim seed 14).
    starting: dict[str, int] = field(default_factory=dict)
    devices: list[PowerDevice] = field(default_factory=list)
    # The hardware watchdog: present (its agent may arm it), armed this boot, the
    # timeout it runs with, when it was last fed (simulated time: the hardware counts
    # real time, whatever the host's clock says).
    watchdog: bool = False
    # A watchdog reset goes through the firmware: the host is off until this time.
    down_until: float = 0.0
    wd_armed: bool = False
    wd_timeout: float = 0.0
    wd_fed: float = 0.0

    @property
    def answers(self) -> bool:
        """Its software runs: powered and not hung."""
        return self.powered and not self.hung

    def levels(self) -> list[list[PowerDevice]]:
        count = max((d.level for d in self.devices), default=0)
        return [[d for d in self.devices if d.level == n] for n in range(1, count + 1)]

    def used_memory(self) -> int:
        return sum(self.defined[v].memory_mb for v in self.running)

    def committed_memory(self) -> int:
        """What a start must fit beside: the running VMs and the starts under way."""
        return self.used_memory() + sum(self.starting.values())


@dataclass(frozen=True, slots=True)
class VmDef:
    spec: VmSpec
    home: str


@dataclass(frozen=True, slots=True)
class PowerOp:
    """One command the fencer sent to a device (S3: terms; S4: per request id)."""

    request_id: str
    incident: str
    term: int
    host: str
    level: int
    device: str
    action: str
    at: float


@dataclass
class PowerRun:
    """One ``fence(request)`` call, and what was true when its levels were read back.

    ``truly_off[level]``: when the level's read-back ended, every device of the level
    was really off and the host really unpowered (S2 is judged against this)."""

    request_id: str
    incident: str
    term: int
    host: str
    action: str
    started: float
    finished: float | None = None
    outcome: str = ""
    level: int | None = None
    truly_off: dict[int, bool] = field(default_factory=dict)
    # The boot id the truth shows gone when a level read back truly off (the host's last
    # boot, or the one its pill was for): what a confirmed_off that names no boot proved.
    off_boot: str = ""


def _pending(scheduler: Scheduler, name: str) -> SimFuture[Any]:
    """An answer that never comes (a dead or frozen host)."""
    return scheduler.future(name)


def _done(scheduler: Scheduler, value: Any, name: str = "") -> SimFuture[Any]:
    fut: SimFuture[Any] = scheduler.future(name)
    fut.set_result(value)
    return fut


class World:
    """Hosts, devices, VMs and storage, on the simulation's scheduler."""

    def __init__(self, scheduler: Scheduler, rng: random.Random, log: Log | None = None) -> None:
        self.scheduler = scheduler
        self.rng = rng
        self._log = log
        self.hosts: dict[str, Host] = {}
        self.devices: dict[str, PowerDevice] = {}
        self.vms: dict[str, VmDef] = {}
        self.listeners: list[Listener] = []
        self.ops: list[PowerOp] = []
        self.runs: list[PowerRun] = []
        # host -> (storage time of the last renewal that reached it, boot id)
        self.renewals: dict[str, tuple[float, str]] = {}
        # Where each VM was last started (its "host" for S1), and a counter of changes
        # to what runs where, so checkers look again only after a change.
        self.last_host: dict[str, str] = {}
        self.last_boot: dict[str, str] = {}  # the boot id of that host when it was started there
        self.version = 0
        # The slot directory on the shared storage (docs/watchdog.md): each host's record
        # (its agent writes it) and pill (the fencer writes it), and for S2 the boot count
        # of the host when its pill was written (the boot the pill is for).
        self.slot_records: dict[str, Any] = {}
        self.pills: dict[str, Any] = {}
        self.pill_boot: dict[str, int] = {}
        self.pill_boot_id: dict[str, str] = {}
        # host -> (min, max) seconds a slot operation of its agent takes (a fault: a slow
        # or hung NFS); absent: a few milliseconds, done in the same step.
        self.slot_delay: dict[str, tuple[float, float]] = {}
        self.watchdog_resets = 0
        # Every (host, boot id) a host really booted with: a boot id outside it was forged.
        self.real_boots: set[tuple[str, str]] = set()
        self.reset_boot_s = (30.0, 120.0)  # how long a host takes to boot after a watchdog reset
        self.power = WorldPower(self)
        self.storage = WorldStorage(self)
        self._hypervisors: dict[str, WorldHypervisor] = {}

    def log(self, what: str) -> None:
        if self._log is not None:
            self._log("world", what)

    # -- building ---------------------------------------------------------------------
    def add_host(
        self,
        name: str,
        memory_mb: int = 16384,
        vcpus: int = 16,
        levels: list[list[DeviceKind]] | None = None,
    ) -> Host:
        """A powered host; ``levels``: the kinds of device of each fence level, in order
        (default one BMC). Devices are named ``<host>-bmc`` / ``<host>-pdu<n>``."""
        host = Host(name, memory_mb, vcpus)
        self.hosts[name] = host
        pdus = 0
        for number, kinds in enumerate(levels if levels is not None else [["bmc"]], start=1):
            for kind in kinds:
                if kind == "bmc":
                    dev_name = f"{name}-bmc"
                elif kind == "watchdog":
                    dev_name = f"{name}-wd"
                    host.watchdog = True
                else:
                    pdus += 1
                    dev_name = f"{name}-pdu{pdus}"
                device = PowerDevice(dev_name, name, number, kind)
                self.devices[dev_name] = device
                host.devices.append(device)
        self._recompute(host, "created")
        return host

    def add_vm(self, name: str, home: str, ha: bool = True, memory_mb: int = 1024, running: bool = True) -> VmSpec:
        spec = VmSpec(name=name, memory_mb=memory_mb, ha=ha)
        self.vms[name] = VmDef(spec, home)
        host = self.hosts[home]
        host.defined[name] = spec
        self.last_host[name] = home
        self.last_boot[name] = host.boot_id
        if running and host.powered:
            host.running.add(name)
            self.version += 1
        return spec

    def hypervisor(self, host: str) -> WorldHypervisor:
        if host not in self._hypervisors:
            self._hypervisors[host] = WorldHypervisor(self, self.hosts[host])
        return self._hypervisors[host]

    def host_port(self, host: str) -> WorldHost:
        """The agent's ``host`` port: the machine under it."""
        return WorldHost(self, self.hosts[host])

    # -- truth ------------------------------------------------------------------------
    def powered(self, host: str) -> bool:
        return self.hosts[host].powered

    def running_on(self, vm: str) -> list[str]:
        """The powered hosts where ``vm`` really runs (hung ones too: it resumes when they do)."""
        return sorted(h.name for h in self.hosts.values() if h.powered and vm in h.running)

    def device_really_off(self, device: PowerDevice) -> bool:
        host = self.hosts[device.host]
        if device.kind == "pdu":
            return not device.on
        return not device.on or not host.powered

    def bmc_alive(self, host: Host) -> bool:
        outlets = [d for d in host.devices if d.kind == "pdu"]
        return host.mains and (not outlets or any(d.on for d in outlets))

    def reachable(self, device: PowerDevice) -> bool:
        if device.behaviour == "unreachable":
            return False
        return device.kind == "pdu" or self.bmc_alive(self.hosts[device.host])

    def read(self, device: PowerDevice) -> PowerState:
        """What a status read of a reachable device says: the truth."""
        if device.kind == "pdu":
            return "on" if device.on else "off"
        return "on" if self.hosts[device.host].powered else "off"

    # -- changes ----------------------------------------------------------------------
    def _recompute(self, host: Host, why: str) -> None:
        chassis = all(d.on for d in host.devices if d.kind == "bmc")
        outlets = [d for d in host.devices if d.kind == "pdu"]
        powered = (host.mains and chassis and (not outlets or any(d.on for d in outlets))
                   and self.scheduler.now >= host.down_until)
        if powered == host.powered:
            return
        host.powered = powered
        self.version += 1
        if not powered:
            lost = sorted(host.running)
            host.running.clear()
            host.starting.clear()
            host.stop_reasons.update((v, "other") for v in lost)
            host.hung = host.crashed = False
            host.wd_armed = False  # the watchdog restarts with the machine, unarmed
            self.log(f"{host.name} powered off ({why}); VMs lost: {','.join(lost) or '-'}")
            self._tell("off", host.name)
            return
        host.boots += 1
        host.booted_at = self.scheduler.now
        host.wd_armed = False  # a reset does not pass through "off" here: every boot starts unarmed
        host.boot_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
        self.real_boots.add((host.name, host.boot_id))
        host.running = set(host.autostart & set(host.defined))
        for vm in host.running:
            host.stop_reasons.pop(vm, None)
            self.last_host[vm] = host.name
            self.last_boot[vm] = host.boot_id
        self.log(f"{host.name} boots ({why}) boot={host.boot_id} autostarted: {','.join(sorted(host.running)) or '-'}")
        if host.boots > 1:
            self._tell("boot", host.name)

    def _tell(self, what: str, host: str) -> None:
        for listener in list(self.listeners):
            listener(what, host)

    def switch(self, device: PowerDevice, on: bool, why: str) -> None:
        """A device's switch moves (``stuck_on`` devices ignore an off)."""
        if not on and device.behaviour == "stuck_on":
            self.log(f"{device.name} ignores off (stuck on)")
            return
        if device.on != on:
            device.on = on
            self.log(f"{device.name} switched {'on' if on else 'off'} ({why})")
        self._recompute(self.hosts[device.host], why)

    def lose_power(self, host: str) -> None:
        """The host's power supply dies, its BMC with it (outlets stay as they are)."""
        h = self.hosts[host]
        h.mains = False
        self.log(f"{host} loses power with its BMC")
        self._recompute(h, "power lost")

    def restore_power(self, host: str) -> None:
        """Mains back; the host boots if its switches are on."""
        h = self.hosts[host]
        h.mains = True
        self._recompute(h, "power restored")

    def power_on(self, host: str, why: str = "comes back") -> None:
        """Someone turns the host on again (an operator, a power-restore policy)."""
        h = self.hosts[host]
        h.mains = True
        for device in h.devices:
            device.on = True
        self._recompute(h, why)

    def hang(self, host: str) -> None:
        h = self.hosts[host]
        if h.powered and not h.hung:
            h.hung = True
            self.log(f"{host} hangs (VMs frozen, still powered)")
            self._tell("hang", host)

    def unhang(self, host: str) -> None:
        h = self.hosts[host]
        if h.hung and not h.crashed:
            h.hung = False
            self.log(f"{host} resumes")
            self._tell("unhang", host)

    def crash(self, host: str, reboot_after: float | None = None) -> None:
        """A kernel crash: every VM dies, the host stays powered but answers nothing;
        with ``reboot_after`` it resets itself (a new boot) that much later."""
        h = self.hosts[host]
        if not h.powered:
            return
        lost = sorted(h.running)
        h.running.clear()
        self.version += 1
        h.stop_reasons.update((v, "crashed") for v in lost)
        self.log(f"{host} crashes; VMs lost: {','.join(lost) or '-'}")
        self.hang(host)
        h.crashed = True
        if reboot_after is not None:
            boot = h.boots
            self.scheduler.call_later(reboot_after, self._reset, host, boot)

    def reset(self, host: str) -> None:
        """A crashed host is reset (its watchdog, an operator): it boots again."""
        h = self.hosts[host]
        if h.crashed:
            self._reset(host, h.boots)

    def _reset(self, host: str, boot: int) -> None:
        h = self.hosts[host]
        if h.boots != boot or not h.powered:
            return  # fenced or rebooted meanwhile
        h.powered = False
        h.hung = h.crashed = h.wd_armed = False
        lost = sorted(h.running)
        h.running.clear()  # the VMs die with the reset, whenever the host boots again
        h.starting.clear()
        h.stop_reasons.update((v, "other") for v in lost)
        self.version += 1
        self.log(f"{host} resets itself")
        self._tell("off", host)
        self._recompute(h, "reset")

    # -- the hardware watchdog ----------------------------------------------------------
    def arm_watchdog(self, host: str, timeout_s: float) -> float:
        """The agent opens the device (``WatchdogDevice.arm``): it runs from now, with
        the timeout asked in whole seconds (the Linux API's); opening it again feeds it."""
        h = self.hosts[host]
        if not h.watchdog:
            raise OSError(f"{host} has no watchdog device")
        timeout = float(max(1, int(timeout_s)))
        if not h.wd_armed:
            h.wd_armed, h.wd_timeout = True, timeout
            self.log(f"{host} watchdog armed ({timeout:g}s)")
            self.scheduler.call_later(timeout, self._watchdog_due, host, h.boots)
        h.wd_timeout, h.wd_fed = timeout, self.scheduler.now
        return timeout

    def feed_watchdog(self, host: str) -> None:
        h = self.hosts[host]
        if h.wd_armed and h.answers:
            h.wd_fed = self.scheduler.now

    def disarm_watchdog(self, host: str) -> None:
        self.hosts[host].wd_armed = False

    def _watchdog_due(self, host: str, boot: int) -> None:
        """One timer per timeout, not one per feed: it looks at when it was last fed."""
        h = self.hosts[host]
        if h.boots != boot or not h.powered or not h.wd_armed:
            return
        due = h.wd_fed + h.wd_timeout
        if self.scheduler.now < due:
            self.scheduler.call_at(due, self._watchdog_due, host, boot)
            return
        self.watchdog_resets += 1
        # A hardware reset: firmware, POST, boot loader, kernel, the agent (half a minute
        # to minutes). A host back within msgwait would be heard again before its fence
        # could confirm (a view names no boot): docs/simulation.md.
        h.down_until = self.scheduler.now + self.rng.uniform(*self.reset_boot_s)
        self.log(f"{host} watchdog fires (not fed for {self.scheduler.now - h.wd_fed:.3f}s); "
                 f"boots again at t={h.down_until:.3f}")
        self._reset(host, boot)
        self.scheduler.call_at(h.down_until, self._recompute, h, "boots after its watchdog reset")

    def pill_gone(self, host: str) -> bool:
        """S2 for a watchdog level: the boot the host's pill was written for is gone (the
        host is off or has reset since), and whatever boot runs now runs no VM."""
        h, boot = self.hosts[host], self.pill_boot.get(host)
        if boot is None:
            return False
        return not h.powered or (h.boots != boot and not h.running)

    def cut_storage(self, host: str) -> None:
        self.hosts[host].storage_ok = False
        self.log(f"{host} cut off from storage")

    def heal_storage(self, host: str) -> None:
        self.hosts[host].storage_ok = True
        self.log(f"{host} reaches storage again")

    def set_behaviour(self, device: str, behaviour: Behaviour) -> None:
        self.devices[device].behaviour = behaviour
        self.log(f"{device} behaves {behaviour}")

    def crash_vm(self, vm: str, host: str, reason: str = "crashed") -> None:
        h = self.hosts[host]
        if vm in h.running:
            h.running.discard(vm)
            self.version += 1
            h.stop_reasons[vm] = reason
            self.log(f"{vm} {reason} on {host}")
            hv = self._hypervisors.get(host)
            if hv is not None and h.answers:
                hv.notify()



def _evidence(device: PowerDevice, action: str, last: str, reads: int, elapsed: float,
              error: str = "") -> DeviceEvidence:
    """What ``Executor._operate`` reports for one device: confirmed when it read the
    wanted state (no error), else the last reading and why not."""
    return DeviceEvidence(device=device.name, driver=device.driver, level=device.level, action_sent=action,
                          power_read=last, confirmed=not error, status_reads=reads,  # type: ignore[arg-type]
                          elapsed_s=round(elapsed, 4), error=error)

class WorldPower:
    """The fencer's ``power`` port on the world's devices."""

    def __init__(self, world: World) -> None:
        self.world = world
        # The fencer process's watchdog drivers (``hafence.sim.watchdog.FencerWatchdog``):
        # production's ``WatchdogDriver`` on the world's slots; None: no watchdog level.
        self.watchdog: Any = None

    def fence(self, request: FenceRequest) -> SimFuture[FenceReport]:
        w = self.world
        run = PowerRun(request.request_id, request.incident, request.term, request.host, request.action,
                       w.scheduler.now)
        w.runs.append(run)
        w.log(f"fence run {request.request_id} host={request.host} term={request.term} action={request.action}")
        return w.scheduler.spawn(self._fence(request, run), f"fence {request.request_id}")

    async def _fence(self, request: FenceRequest, run: PowerRun) -> FenceReport:
        w = self.world
        host = w.hosts.get(request.host)
        levels = host.levels() if host is not None else []
        if request.method == "watchdog":  # production's ``levels_for``: its watchdog levels only
            levels = [devices for devices in levels if all(d.kind == "watchdog" for d in devices)]
        tried: list[list[DeviceEvidence]] = []
        powered_on: list[DeviceEvidence] = []
        for number, devices in enumerate(levels, start=1):
            evidence = await _all(w.scheduler, [self._operate_any(request, d, "off") for d in devices])
            tried.append(evidence)
            assert host is not None
            if all(d.kind == "watchdog" for d in devices):
                # Nothing reads the power of a watchdog level: its truth is that the boot the
                # pill was for is gone and nothing runs on the host (S2).
                run.truly_off[number] = w.pill_gone(host.name)
                if run.truly_off[number]:
                    run.off_boot = w.pill_boot_id.get(host.name, "")
            else:
                run.truly_off[number] = all(w.device_really_off(d) for d in devices) and not host.powered
                if run.truly_off[number]:
                    run.off_boot = host.boot_id
            if level_confirmed(evidence):
                if request.action == "reboot":
                    powered_on = await _all(w.scheduler, [self._operate_any(request, d, "on") for d in devices])
                break
        result = verdict(tried, len(levels))
        run.finished, run.outcome, run.level = w.scheduler.now, result.outcome, result.level
        w.log(f"fence run {request.request_id} ends {result.outcome} level={result.level}")
        return FenceReport(result, [e for level in tried for e in level] + powered_on)

    def _operate_any(self, request: FenceRequest, device: PowerDevice,
                     action: str) -> Coroutine[Any, Any, DeviceEvidence]:
        if device.kind == "watchdog":
            return self._operate_watchdog(request, device, action)
        return self._operate(request, device, action)

    async def _operate_watchdog(self, request: FenceRequest, device: PowerDevice, action: str) -> DeviceEvidence:
        """``Executor._operate`` with production's watchdog driver (``WatchdogDriver``: the
        pill, the counter, the views, msgwait) on the world's slots and virtual time."""
        w, s = self.world, self.world.scheduler
        started = s.now
        reads, last, error = 0, "unknown", ""
        binding = self.watchdog
        driver, settings = (None, None) if binding is None else binding.driver(device)
        if driver is None or settings is None:
            error = f"{device.name}: no watchdog binding in this fencer"
        attempts = 0 if driver is None or settings is None else 1 + settings.retries
        for _attempt in range(attempts):
            assert driver is not None and settings is not None
            attempt_started = s.now
            w.ops.append(PowerOp(request.request_id, request.incident, request.term, request.host,
                                 device.level, device.name, action, s.now))
            command = driver.power_off if action == "off" else driver.power_on
            try:
                await s.wait_for(s.spawn(command(), f"{device.name} {action}"), settings.power_timeout_s)
            except Exception as err:
                error = describe(err)
                if isinstance(err, DeviceAuthError):
                    break
                continue
            if settings.power_wait_s:
                await s.sleep(settings.power_wait_s)
            deadline = attempt_started + settings.power_timeout_s
            schedule = StatusPollSchedule()
            while (remaining := deadline - s.now) > 0:
                try:
                    last = await s.wait_for(s.spawn(driver.status(), f"{device.name} status"), remaining)
                    reads += 1
                except Exception as err:
                    last, error = "unknown", describe(err)
                if last == action:
                    return _evidence(device, action, last, reads, s.now - started)
                await s.sleep(min(next(schedule), max(0.0, deadline - s.now)))
            if last != "unknown":
                error = f"power still {last} after {settings.power_timeout_s:g}s"
        return _evidence(device, action, last, reads, s.now - started, error or "no answer")

    async def _check_watchdog(self, device: PowerDevice) -> tuple[str, str]:
        """``Executor.check`` with the watchdog driver (a failed check drops the driver)."""
        s, binding = self.world.scheduler, self.watchdog
        driver, settings = (None, None) if binding is None else binding.driver(device)
        if driver is None or settings is None:
            return "unknown", f"{device.name}: no watchdog binding in this fencer"
        try:
            return await s.wait_for(s.spawn(driver.status(), f"{device.name} check"), settings.power_timeout_s), ""
        except Exception as err:
            binding.drop(device)
            return "unknown", describe(err)

    async def _operate(self, request: FenceRequest, device: PowerDevice, action: str) -> DeviceEvidence:
        """``Executor._operate`` on a simulated device."""
        w, s = self.world, self.world.scheduler
        started = s.now
        reads, last, error = 0, "unknown", ""
        for _attempt in range(1 + device.retries):
            attempt_started = s.now
            w.ops.append(PowerOp(request.request_id, request.incident, request.term, request.host,
                                 device.level, device.name, action, s.now))
            if not w.reachable(device):
                await s.sleep(min(device.timeout_s, device.power_timeout_s))
                error = f"unreachable: {device.name} did not answer"
                continue
            if device.behaviour == "bad_credentials":
                await s.sleep(0.05)
                error = f"authentication failed: {device.name} refused the login"
                break
            await s.sleep(self._latency(device))
            if not w.reachable(device):  # its host's power went while it worked
                error = f"unreachable: {device.name} did not answer"
                continue
            # The switch moves a moment after the device acknowledges (relays, PSU capacitors).
            s.call_later(w.rng.uniform(0.05, 1.0), w.switch, device, action == "on",
                         f"{action} by {request.request_id}")
            deadline = attempt_started + device.power_timeout_s
            schedule = StatusPollSchedule()
            while deadline - s.now > 0:
                await s.sleep(self._latency(device))
                if w.reachable(device):
                    last = w.read(device)
                    reads += 1
                else:
                    last, error = "unknown", f"unreachable: {device.name} did not answer"
                if last == action:
                    return _evidence(device, action, last, reads, s.now - started)
                await s.sleep(min(next(schedule), max(0.0, deadline - s.now)))
            if last != "unknown":
                error = f"power still {last} after {device.power_timeout_s:g}s"
        return _evidence(device, action, last, reads, s.now - started, error or "no answer")

    def _latency(self, device: PowerDevice) -> float:
        if device.behaviour == "slow":
            return self.world.rng.uniform(2.0, 6.0)
        return self.world.rng.uniform(0.02, 0.2)

    def check(self, host: str) -> SimFuture[Protection]:
        w = self.world
        return w.scheduler.spawn(self._check(host), f"check {host}")

    async def _check(self, name: str) -> Protection:
        w, s = self.world, self.world.scheduler
        host = w.hosts.get(name)
        levels = host.levels() if host is not None else []
        checks: list[DeviceEvidence] = []
        for devices in levels:
            for device in devices:
                started = s.now
                if device.kind == "watchdog":
                    state, error = await self._check_watchdog(device)
                elif not w.reachable(device):
                    await s.sleep(device.timeout_s)
                    state, error = "unknown", f"unreachable: {device.name} did not answer"
                elif device.behaviour == "bad_credentials":
                    await s.sleep(0.05)
                    state, error = "unknown", f"authentication failed: {device.name} refused the login"
                else:
                    await s.sleep(self._latency(device))
                    state, error = w.read(device), ""
                checks.append(DeviceEvidence(
                    device=device.name, driver=device.driver, level=device.level, action_sent="status",
                    power_read=state, confirmed=not error, status_reads=0 if error else 1,  # type: ignore[arg-type]
                    elapsed_s=round(s.now - started, 4), error=error))
        return protection(name, checks, len(levels))


async def _all(scheduler: Scheduler, coros: list[Coroutine[Any, Any, DeviceEvidence]]) -> list[DeviceEvidence]:
    """The devices of one level in parallel, as the executor's TaskGroup runs them."""
    tasks = [scheduler.spawn(c, "device") for c in coros]
    return [await t for t in tasks]


class WorldHost:
    """The agent's ``host`` port (``hafence.agent.core.HostState``): the world's power
    and boot id of its machine. An agent dies with its host here, so it asks only
    while the host runs; the answer is the truth all the same."""

    def __init__(self, world: World, host: Host) -> None:
        self.world = world
        self.host = host

    def state(self) -> HostState:
        return HostState(on=self.host.powered, boot_id=self.host.boot_id)

    def up(self) -> bool:
        return self.host.answers


class WorldHypervisor:
    """One host's hypervisor as its agent sees it (``hafence.agent.hypervisor.Hypervisor``,
    and ``changed()``: the agent port's long poll, answered when a VM stops by itself)."""

    def __init__(self, world: World, host: Host) -> None:
        self.world = world
        self.host = host
        self.listener: Callable[[], None] | None = None
        self._changed: list[SimFuture[None]] = []
        self.start_delay = (0.2, 1.5)
        self.starts = 0
        self._boot = host.boots

    def _silent(self, what: str) -> SimFuture[Any] | None:
        if not self.host.answers:
            return _pending(self.world.scheduler, f"{self.host.name} {what} (no answer)")
        return None

    def on_change(self, callback: Callable[[], None]) -> None:
        self.listener = callback

    def changed(self) -> SimFuture[None]:
        fut: SimFuture[None] = self.world.scheduler.future(f"{self.host.name} hypervisor changed")
        self._changed.append(fut)
        return fut

    def notify(self) -> None:
        waiting, self._changed = self._changed, []
        for fut in waiting:
            if not fut.done():
                fut.set_result(None)
        if self.listener is not None:
            self.listener()

    def list_vms(self) -> SimFuture[list[VmInfo]]:
        h = self.host
        return self._silent("list_vms") or _done(self.world.scheduler, [
            VmInfo(spec=spec, state="running") if name in h.running
            else VmInfo(spec=spec, state="stopped", stop_reason=h.stop_reasons.get(name, "other"))
            for name, spec in sorted(h.defined.items())])

    def is_running(self, name: str) -> SimFuture[bool]:
        return self._silent("is_running") or _done(self.world.scheduler, name in self.host.running)

    def start(self, spec: VmSpec) -> SimFuture[None]:
        silent = self._silent(f"start {spec.name}")
        if silent is not None:
            return silent
        h, s = self.host, self.world.scheduler
        fut: SimFuture[None] = s.future(f"{h.name} start {spec.name}")
        if spec.name in h.running:
            fut.set_result(None)
            return fut
        if spec.name not in h.starting and h.committed_memory() + spec.memory_mb > h.memory_mb:
            fut.set_exception(HypervisorError(f"{h.name}: not enough memory for {spec.name}"))
            return fut
        boot = h.boots
        h.starting[spec.name] = spec.memory_mb

        def started() -> None:
            if h.boots != boot:
                return  # died while starting: no answer ever (the boot cleared ``starting``)
            h.starting.pop(spec.name, None)
            if not h.answers:
                return
            h.defined.setdefault(spec.name, spec)
            h.running.add(spec.name)
            h.stop_reasons.pop(spec.name, None)
            self.world.last_host[spec.name] = h.name
            self.world.last_boot[spec.name] = h.boot_id
            self.world.version += 1
            self.starts += 1
            self.world.log(f"{spec.name} started on {h.name}")
            fut.set_result(None)

        s.call_later(self.world.rng.uniform(*self.start_delay), started)
        return fut

    def stop(self, name: str) -> SimFuture[None]:
        silent = self._silent(f"stop {name}")
        if silent is not None:
            return silent
        if name in self.host.running:
            self.host.running.discard(name)
            self.world.version += 1
            self.host.stop_reasons[name] = "command"
            self.world.log(f"{name} stopped on {self.host.name}")
        return _done(self.world.scheduler, None)

    def stop_all(self) -> SimFuture[None]:
        silent = self._silent("stop_all")
        if silent is not None:
            return silent
        for name in sorted(self.host.running):
            self.stop(name)
        return _done(self.world.scheduler, None)

    def boot(self) -> SimFuture[None]:
        # The world starts autostart VMs when it powers the host on; nothing more here.
        return self._silent("boot") or _done(self.world.scheduler, None)

    def disable_autostart(self, names: set[str]) -> SimFuture[list[str]]:
        silent = self._silent("disable_autostart")
        if silent is not None:
            return silent
        changed = sorted(self.host.autostart & (set(names) | set(self.host.defined)))
        self.host.autostart.difference_update(changed)
        return _done(self.world.scheduler, changed)


class WorldStorage:
    """The shared storage's lease area: renewals that reach it, and who is live."""

    def __init__(self, world: World) -> None:
        self.world = world

    def renew(self, host: str, boot_id: str) -> bool:
        h = self.world.hosts.get(host)
        if h is None or not h.answers or not h.storage_ok:
            return False
        self.world.renewals[host] = (self.world.scheduler.now, boot_id)
        return True

    def live(self, hosts: list[str], window_s: float) -> dict[str, bool]:
        now = self.world.scheduler.now
        return {h: (h in self.world.renewals and now - self.world.renewals[h][0] <= window_s) for h in hosts}
