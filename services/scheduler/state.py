"""What the scheduler knows: inventories, host phases, and the HA VMs lost with
a fenced host. A fold over the events stream; pure, no I/O, time is an argument.

S1 lives here, in one function: ``host_released`` (every fact about a host's
fate is put to it; a VM enters ``lost``, the only set the scheduler restarts
from, only when it says yes): a fence result ``confirmed_off`` (of the boot it
names, or of the open incident), or an operator's confirmation by hand that the
host is off. What a later boot of the host runs is never released.
The simulation plants "start a VM before confirmed off" by replacing it.
"Of the current term" is enforced where it can be enforced atomically, by the
fencer, which runs no request older than the newest term it has seen: a
``confirmed_off`` is a power reading, true whatever arbiter asked for it, so the
scheduler does not second-guess the term (doing so would strand the VMs of a
host fenced just before a leader change).

S6 lives here too. A fence is folded against the inventory of the boot that was
fenced (the boot id the incident names, else the one the host reported before it
became suspect), never a later boot's. A fenced host that reports again is
``quarantined``: it takes no VM until it reports clean (no HA VM that runs on
another host) *and* is cleared (an operator's ``cleared`` event, or the
scheduler's own under ``[scheduler] auto_clear``). A VM reported running on two
hosts is a duplicate: announced, and the copy on a quarantined host is stopped.

A host's phase is ``hafence.host_phase``'s, moved only by its table (``_step``),
as in the arbiter and the CLI; an event illegal in the phase is counted
(``illegal``) and kept for the log (``take_illegal``). Pending fences are not
phases here: they are kept per incident (``fencing``), since an old incident's
fence must hold a host whose phase already follows its new boot (docs/cores.md).

A VM's definition and placement attributes are never taken from an agent's
word when the cluster config knows the VM; a definition is never an agent's at
all (``resolve``).

VM-level HA (an HA VM that fails on a live host) is ``restarts.py``'s, fed from
here: the same inventories, the scheduler's own VM events, and the same effects.
"""

from __future__ import annotations

import posixpath
from bisect import insort
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import msgspec

from hafence import host_phase
from hafence.contracts import FENCE_STOPS, FenceResult, HostEvent, Inventory, VmEvent, VmInfo, VmSpec
from hafence.host_phase import EventKind, Illegal, Phase
from hafence.scheduler.placement import Candidate
from hafence.scheduler.restarts import RestartEffect, RestartPolicy, VmRestarts
from hafence.subjects import check_name

if TYPE_CHECKING:
    from hafence.config import ClusterConfig

# A host's phase is a ``hafence.host_phase.Phase``, moved only by ``host_phase.step``
# (the one state machine, shared with the arbiter and the CLI). The scheduler's rules
# read it in these groups:
# off and not back: what it ran runs nowhere (its report leaves ``copies()``);
FENCED_PHASES = (Phase.FENCED, Phase.FENCED_CLEARED)
# back on a new boot after a fence, not yet cleared and clean (S6): takes no VM, and a
# copy there of a VM that runs elsewhere is stopped;
QUARANTINED_PHASES = (Phase.QUARANTINED, Phase.QUARANTINED_SUSPECT)
# its fate undecided: a VM asked to start there may be running, wait for it.
UNDECIDED_PHASES = (Phase.SUSPECT, Phase.QUARANTINED_SUSPECT, Phase.FENCING, Phase.FENCE_FAILED)
# Illegal events kept for the log until taken (the counts are kept whole).
ILLEGAL_KEPT = 100

# Boots remembered per host (their last inventory each): enough for a fence result
# that arrives after the host's next boot has reported, bounded against an agent
# that invents a boot id per message.
BOOTS_KEPT = 4
# A stop of a duplicate copy, or a "cleared" for an agent that still reports itself
# quarantined, is sent again after this long if nothing changed.
RESEND_S = 5.0


def host_released(fact: FenceResult | HostEvent, incident: str, boot: str) -> bool:
    """S1: may the VMs of ``fact``'s host (of the boot it names) be restarted
    elsewhere because of it? ``incident``, ``boot``: the host's open incident and
    the boot it is about ("" if none is open; the boot a fact naming none releases).

    Yes for a fence result ``confirmed_off`` (a power reading: every boot up to it
    is off, so it releases the boot it names; what a later boot runs is not
    released, see ``_fenced``) and for an operator's ``confirmed_fenced`` (a person
    confirms by hand that the host is off). A result that names no boot is about
    its own incident's boot: if that is not the open incident, which boot it saw
    off is not known, and it releases nothing. Every host event and fence result
    is asked, so a rule that said yes too early would show at once."""
    if isinstance(fact, HostEvent):
        return fact.kind == "confirmed_fenced"
    if fact.outcome != "confirmed_off":
        return False
    return bool(fact.boot_id) or not incident or fact.incident == incident


def ran_until_fenced(vm: VmInfo) -> bool:
    """Did the VM run on its host until the host's fence (or its boot's end)? Running,
    or stopped by the agent obeying a poison pill: nobody chose that stop, the fence
    did (simulation, watchdog model: such VMs were never restarted)."""
    return vm.state == "running" or vm.stop_reason in FENCE_STOPS


@dataclass(frozen=True, slots=True)
class LostVm:
    spec: VmSpec
    from_host: str
    incident: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Effect: a VM is reported running on several hosts (S0 is broken): announce it."""

    vm: str
    hosts: tuple[str, ...]
    stop_on: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class StopCopy:
    """Effect: stop the VM on a quarantined (once fenced) host; it runs on ``keep``."""

    vm: str
    host: str
    keep: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClearHost:
    """Effect: publish a ``cleared`` host event for this boot (``rule`` says why)."""

    host: str
    boot_id: str
    rule: str
    reason: str


Effect = Duplicate | StopCopy | ClearHost | RestartEffect
StartOutcome = Literal["started", "failed", "unanswered"]
Step = Literal["place", "resend", "wait"]


@dataclass
class Quarantine:
    fenced_boot: str
    cleared_by: str = ""


@dataclass
class SchedulerState:
    maintenance: set[str] = field(default_factory=set)
    # The cluster config's VMs (the word that counts for placement) and the shared
    # storage directory holding <vm>.xml definitions.
    config_vms: dict[str, VmSpec] = field(default_factory=dict)
    definitions_dir: str = ""
    # Clear a quarantined host by itself once it reports clean (documented rule, off by default).
    auto_clear: bool = False
    start_attempts: int = 3
    inventories: dict[str, Inventory] = field(default_factory=dict)
    boots: dict[str, OrderedDict[str, Inventory]] = field(default_factory=dict)
    # Hosts that have reported or been named by an event (absent: never heard of).
    phases: dict[str, Phase] = field(default_factory=dict)
    # Events illegal in their host's phase, by "<event> in <phase>" (the phase stayed),
    # and those not yet taken for the log (``take_illegal``).
    illegal: dict[str, int] = field(default_factory=dict)
    illegal_pending: list[tuple[str, Illegal]] = field(default_factory=list)
    # The boot an open incident is about (from the suspect event, else the last report before it).
    suspect_boot: dict[str, str] = field(default_factory=dict)
    suspect_incident: dict[str, str] = field(default_factory=dict)
    # The boot the host had last reported when its incident opened: what a fence of a
    # boot it never reported (a forged boot id the monitor heard) powered off.
    suspect_reported: dict[str, str] = field(default_factory=dict)
    fenced_boots: dict[str, set[str]] = field(default_factory=dict)
    quarantine: dict[str, Quarantine] = field(default_factory=dict)
    lost: dict[str, LostVm] = field(default_factory=dict)
    # VMs started but not yet in their new host's inventory: (vm, host) -> spec.
    reserved: dict[tuple[str, str], VmSpec] = field(default_factory=dict)
    # Hosts a VM's start failed on (or that were fenced since we asked them).
    failed_on: dict[str, set[str]] = field(default_factory=dict)
    # Host -> VMs put in ``failed_on`` only because a fence of that host was under way
    # when they were released (``_rebooted``): not a failure, a hold that ends with the
    # fence (seed 3 with fence action "reboot": three such holds and the VM waited for
    # capacity for ever).
    fence_holds: dict[str, set[str]] = field(default_factory=dict)
    # Effects already emitted: duplicates announced, stops and clears sent (with when).
    announced: dict[str, frozenset[str]] = field(default_factory=dict)
    stops_sent: dict[tuple[str, str], float] = field(default_factory=dict)
    clears_sent: dict[str, tuple[str, float]] = field(default_factory=dict)
    # VM-level HA: HA VMs that failed on a live host, and their restarts (restarts.py).
    restarts: VmRestarts = field(default_factory=VmRestarts)
    # Moves whenever what placement and the HA reservation see may have changed: an
    # inventory that differs from that host's previous one (beyond its send time), a
    # phase, maintenance. The shell re-runs the HA reservation check only when it
    # moved. A thousand agents re-sending the same inventory every 30 s are then a
    # comparison each, not a walk over every VM.
    capacity_version: int = 0
    # Per host: the revision of its inventory's content, and what placement reads
    # from it (its candidate without reservations, its HA VMs) for that revision.
    _revisions: dict[str, int] = field(default_factory=dict, repr=False)
    _loads: dict[str, tuple[int, Candidate, list[VmSpec]]] = field(default_factory=dict, repr=False)
    _hosts: list[str] = field(default_factory=list, repr=False)
    # ``copies()``, kept up to date host by host (a fleet's worth of VMs is not walked
    # again for each inventory or fence): VM -> hosts (sorted), what each host adds
    # to it, and the VMs with more than one host.
    _where: dict[str, list[str]] = field(default_factory=dict, repr=False)
    _indexed: dict[str, frozenset[str]] = field(default_factory=dict, repr=False)
    _twice: set[str] = field(default_factory=set, repr=False)
    # Host -> incidents whose fence was requested (or failed) and not yet confirmed
    # off. Such a host is no placement target, whatever boot it runs now: the fence
    # of an old boot's incident finishes once begun and would power off a new boot,
    # and what was just started there with it (the result names the old boot).
    fencing: dict[str, set[str]] = field(default_factory=dict)
    # Host -> incidents confirmed off: a fence_requested read after its result (the
    # request goes out before its event is stored) opens nothing.
    fence_confirmed: dict[str, set[str]] = field(default_factory=dict)
    # Hosts whose previous boot's HA VMs were released because a new boot reported
    # (host, incident): the core takes them (its log, its failover bookkeeping).
    reboots: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_config(cls, config: ClusterConfig) -> SchedulerState:
        return cls(
            maintenance={h.name for h in config.hosts if h.maintenance},
            config_vms={vm.name: vm.spec() for vm in config.vms},
            definitions_dir=config.storage.definitions_dir,
            auto_clear=config.scheduler.auto_clear,
            start_attempts=config.scheduler.start_attempts,
            restarts=VmRestarts(RestartPolicy.from_config(config)),
        )

    # -- what a VM is -----------------------------------------------------------------

    def resolve(self, reported: VmSpec) -> VmSpec:
        """The spec to start a VM from. The config's entry wins where there is one
        (memory, HA flag, groups: an agent must not talk its way onto a host); the
        definition comes from the config or ``<definitions_dir>/<vm>.xml`` on shared
        storage, never from the agent that reported the VM (it could hand another
        host any domain XML it likes)."""
        configured = self.config_vms.get(reported.name)
        spec = configured if configured is not None else reported
        definition = configured.definition if configured is not None else ""
        if not definition and self.definitions_dir:
            # The name is a validated token (no '/', no '..'), so this stays inside the directory.
            definition = posixpath.join(self.definitions_dir, f"{check_name('VM', reported.name)}.xml")
        return msgspec.structs.replace(spec, definition=definition)

    def attributes(self, reported: VmSpec) -> VmSpec:
        """What placement reads (memory, HA flag, groups): the config's entry where
        there is one. Cheaper than ``resolve`` (no copy), for the hot paths."""
        return self.config_vms.get(reported.name, reported)

    # -- the fold ---------------------------------------------------------------------

    def running_on(self) -> dict[str, str]:
        """One host per running VM (the last seen); see ``copies`` for all of them."""
        return {vm: hosts[-1] for vm, hosts in self.copies().items()}

    def copies(self) -> dict[str, list[str]]:
        """Every host (not fenced) whose latest report has the VM running, sorted by
        name. Kept up to date as reports and phases change: callers must not change it."""
        return self._where

    def _reindex(self, host: str) -> None:
        """Bring ``copies()`` up to date for one host: its latest report's running VMs,
        none while it is fenced, and none from a boot that was fenced: that boot is off.
        A later boot that went silent before it reported makes the host suspect again
        (phase ``quarantined_suspect``), and its latest report is still the fenced boot's
        (simulation seed 869 with fences that reboot: vm2-2, restarted elsewhere after
        that fence, counted as running there too, so the next fence of its new host
        released it nowhere: L1)."""
        inv = self.inventories.get(host)
        counts = (inv is not None and self.phases.get(host) not in FENCED_PHASES
                  and inv.boot_id not in self.fenced_boots.get(host, ()))
        now = frozenset(vm.spec.name for vm in inv.vms if vm.state == "running") if counts and inv else frozenset()
        before = self._indexed.get(host, frozenset())
        if now == before:
            return
        for vm in before - now:
            hosts = self._where[vm]
            hosts.remove(host)
            if len(hosts) < 2:
                self._twice.discard(vm)
            if not hosts:
                del self._where[vm]
        for vm in now - before:
            hosts = self._where.setdefault(vm, [])
            insort(hosts, host)
            if len(hosts) > 1:
                self._twice.add(vm)
        self._indexed[host] = now

    def hosts(self) -> list[str]:
        """Every host that has reported, sorted (hosts are never forgotten: a cache by count)."""
        if len(self._hosts) != len(self.inventories):
            self._hosts = sorted(self.inventories)
        return self._hosts

    def _step(self, host: str, kind: EventKind) -> bool:
        """Move ``host``'s phase by the table (through the module: one state machine).
        False when ``kind`` is illegal in its phase: the phase stays, the event is
        counted and kept for the log."""
        was = self.phases.get(host, Phase.UNKNOWN)
        nxt = host_phase.step(was, kind)
        if isinstance(nxt, Illegal):
            key = f"{nxt.event} in {nxt.phase}"
            self.illegal[key] = self.illegal.get(key, 0) + 1
            self.illegal_pending = [*self.illegal_pending, (host, nxt)][-ILLEGAL_KEPT:]
            return False
        if host not in self.phases or nxt != was:
            self.phases[host] = nxt
            self.capacity_version += 1
            self._reindex(host)
        return True

    def take_illegal(self) -> list[tuple[str, Illegal]]:
        """The illegal events since the last call (for the shell to log)."""
        out, self.illegal_pending = self.illegal_pending, []
        return out

    def on_inventory(self, inv: Inventory) -> list[str]:
        """Fold a report; returns the ids of the VM failures it reports first (restarts.py)."""
        host = inv.host
        if inv.boot_id in self.fenced_boots.get(host, ()):
            return []  # a late report from a boot that was fenced: that boot is off
        held = self.boots.get(host, {}).get(inv.boot_id)
        if held is not None and 0 < inv.listed_at < held.listed_at:
            # Listed before the report of this boot already held, delivered after it (a
            # client flushing what it buffered while cut off): taken as the boot's word, it
            # hid the VMs started there since, and the boot's fence released none of them
            # (simulation seeds 151, 187 with fences that reboot: L1). The host's own
            # monotonic clock orders them; the wall clock could not (a stepped clock).
            return []
        boots = self.boots.setdefault(host, OrderedDict())
        boots[inv.boot_id] = inv
        boots.move_to_end(inv.boot_id)
        while len(boots) > BOOTS_KEPT:
            boots.popitem(last=False)
        previous = self.inventories.get(host)
        rebooted = previous is not None and previous.boot_id != inv.boot_id
        # After a fence any boot but the fenced one (whose late reports stop above) is a
        # new boot: it booted again, quarantined (S6).
        new = rebooted or self.phases.get(host) in FENCED_PHASES
        self._step(host, EventKind.NEW_BOOT if new else EventKind.REPORTED)
        # The same report sent again (only its send time differs) changes nothing
        # placement, the reservation or the duplicates check read.
        if previous is None or msgspec.structs.replace(inv, sent_at=previous.sent_at) != previous:
            self._revisions[host] = self._revisions.get(host, 0) + 1
            self.capacity_version += 1
            self.inventories[host] = inv
            self._reindex(host)
        self.inventories[host] = inv
        for vm in inv.vms:
            if vm.state == "running":
                # Running is a fact wherever it is reported: restarting it elsewhere now
                # would run it twice. A copy on a quarantined host is dealt with as a
                # duplicate if another copy appears.
                self.lost.pop(vm.spec.name, None)
                self.reserved.pop((vm.spec.name, host), None)
        if rebooted and previous is not None:
            # A start that failed on the old boot says nothing about the new one (seed 180:
            # a VM that had failed on every host, each since rebooted, was never tried again).
            for hosts in self.failed_on.values():
                hosts.discard(host)
            self._rebooted(host, previous)
        self._maybe_rejoin(host)
        return self.restarts.on_inventory(inv, self)

    def _rebooted(self, host: str, old: Inventory, fence_may_come: bool = False) -> None:
        """A new boot of ``host`` reported: its previous boot is gone, and so is every VM
        it ran (a reset, a crash and reboot, power back before anyone suspected it).
        If no incident of that boot is open, nothing else will ever release its HA VMs:
        they are released here, under an incident named after the boot (the same in
        every replica, so the message ids of their events are). An open incident of
        that boot keeps them for its fence (S1: a suspect boot's fate is the fencer's
        to say). The boot counts as fenced from now on: its late reports, and a late
        fence result of it, release nothing twice."""
        if self.suspect_incident.get(host) and self.suspect_boot.get(host, "") in ("", old.boot_id):
            return  # its incident is open: its confirmed_off (or return) decides
        if old.boot_id in self.fenced_boots.get(host, ()):
            return
        incident = f"{host}-{old.boot_id}-rebooted"
        fenced = self.fenced_boots.setdefault(host, set())
        fenced.add(old.boot_id)
        if len(fenced) > 4 * BOOTS_KEPT:
            fenced.discard(next(iter(fenced - {old.boot_id})))
        # Starts sent to the old boot are void (it is gone); the new boot may be asked again.
        for key in [k for k in self.reserved if k[1] == host]:
            del self.reserved[key]
        copies = self.copies()
        released = False
        for vm in old.vms:
            name = vm.spec.name
            if not ran_until_fenced(vm) or copies.get(name) or name in self.lost:
                continue
            spec = self.resolve(vm.spec)
            if spec.ha:
                self.lost[name] = LostVm(spec, host, incident)
                if fence_may_come and self.fence_pending(host):
                    # Not on the host's new boot while the fence of the old boot's incident
                    # (closed by the return) is under way: it may power it off (seed 293).
                    # A fence never requested (held by the storm guard) keeps nothing off
                    # it (seed 262: the VMs waited for room that was there).
                    failed = self.failed_on.setdefault(name, set())
                    if host not in failed:
                        failed.add(host)
                        self.fence_holds.setdefault(host, set()).add(name)
                released = True
        if released:
            self.reboots.append((host, incident))

    def on_vm_event(self, event: VmEvent) -> None:
        """The scheduler's own VM events: what it did about failures (their count survives a restart)."""
        self.restarts.on_vm_event(event)

    def open_incident(self, host: str) -> tuple[str, str]:
        """(incident, boot) of the host's open incident, from its suspect event (the
        boot it named, else the last one the host reported); ("", "") when none is open."""
        if host not in self.suspect_incident:
            return "", ""
        return self.suspect_incident[host], self.suspect_boot.get(host, "")

    def held_by_suspects(self) -> dict[str, str]:
        """VM -> a host with an open, unconfirmed incident whose boot of that incident,
        or whose current boot, last reported the VM running. No such VM may be started
        anywhere (S1 is about the VM's real host): when two hosts claim a VM (a
        compromised agent's lie, or a late report), the scheduler cannot tell which
        claim is true, so the suspect host's fence decides. Few hosts are suspect at
        once: a walk over their VMs only."""
        held: dict[str, str] = {}
        for host, incident in self.suspect_incident.items():
            if not incident:
                continue
            boots = self.boots.get(host, {})
            reports = [self.inventories.get(host), boots.get(self.suspect_boot.get(host, ""))]
            for inv in reports:
                if inv is None:
                    continue
                for vm in inv.vms:
                    if vm.state == "running":
                        held.setdefault(vm.spec.name, host)
        return held

    def on_host_event(self, event: HostEvent) -> bool:
        """Fold a host event; True when it releases the host's VMs for restart (S1)."""
        host = event.host
        phase = self.phases.get(host, Phase.UNKNOWN)
        if event.kind == "suspect":
            # A fence covers one boot: a later boot of a fenced or quarantined host that
            # goes silent is a new incident (the arbiter fences it; host_phase).
            q = self.quarantine.get(host)
            covered = q.fenced_boot if q is not None and phase in (*FENCED_PHASES, *QUARANTINED_PHASES) else ""
            # Fenced or quarantined (still so): its incident is not tracked here.
            if self._step(host, host_phase.suspect_event(event.boot_id, covered)) \
                    and self.phases[host] == Phase.SUSPECT:
                inv = self.inventories.get(host)
                self.suspect_boot[host] = event.boot_id or (inv.boot_id if inv else "")
                self.suspect_incident[host] = event.incident
                self.suspect_reported[host] = inv.boot_id if inv else ""
        elif event.kind == "alive":
            # Heard after its fence: still fenced or quarantined (host_phase); from suspect: up.
            if self._step(host, EventKind.HEARD) and phase == Phase.SUSPECT and self.phases[host] == Phase.UP:
                boot = self.suspect_boot.get(host, "")
                self._close_incident(host)
                latest = self.inventories.get(host)
                old = self.boots.get(host, {}).get(boot) if boot else None
                if latest is not None and old is not None and latest.boot_id != boot:
                    # Alive as a new boot: the incident's boot is gone without a fence.
                    self._rebooted(host, old, fence_may_come=True)
        elif event.kind == "maintenance_on":
            self.maintenance.add(host)
            self.capacity_version += 1
        elif event.kind == "maintenance_off":
            self.maintenance.discard(host)
            self.capacity_version += 1
        elif event.kind in ("fence_requested", "fence_failed") and event.incident:
            self._fence_open(host, event.incident)
        elif event.kind == "fence_skipped" and event.rule == "escalated" and event.incident:
            # The arbiter gave up on this fence (its attempts are spent): nothing of it
            # is in flight or retried any more, until a person confirms the host off.
            self._fence_stopped(host, event.incident)
        elif event.kind == "confirmed_fenced":
            self._fence_done(host, event.incident)
        elif event.kind == "cleared":
            q = self.quarantine.get(host)
            if q is not None and (not event.boot_id or event.boot_id not in self.fenced_boots.get(host, ())):
                q.cleared_by = event.by or "unknown"
                self._maybe_rejoin(host)
        # Looked up at each call (not bound at import): the simulation replaces it.
        if host_released(event, *self.open_incident(host)):
            return self._fenced(host, event.incident, event.boot_id, EventKind.OPERATOR_CONFIRMED)
        return False

    def _close_incident(self, host: str) -> None:
        self.suspect_reported.pop(host, None)
        self.suspect_boot.pop(host, None)
        self.suspect_incident.pop(host, None)

    def _fence_open(self, host: str, incident: str) -> None:
        if incident in self.fence_confirmed.get(host, ()):
            return
        fencing = self.fencing.setdefault(host, set())
        if incident not in fencing:
            fencing.add(incident)
            self.capacity_version += 1

    def _fence_stopped(self, host: str, incident: str) -> None:
        fencing = self.fencing.get(host)
        if fencing is not None and incident in fencing:
            fencing.discard(incident)
            if not fencing:
                del self.fencing[host]
                self._release_holds(host)
            self.capacity_version += 1

    def _fence_done(self, host: str, incident: str) -> None:
        """The fence of ``incident`` is confirmed (an operator's ``confirmed_fenced``
        naming no incident confirms every fence of the host)."""
        fencing = self.fencing.get(host, set())
        if incident:
            done = self.fence_confirmed.setdefault(host, set())
            done.add(incident)
            if len(done) > 4 * BOOTS_KEPT:
                done.discard(next(iter(done - {incident})))
            fencing.discard(incident)
        else:
            fencing.clear()
        if not fencing and self.fencing.pop(host, None) is not None:
            self._release_holds(host)
            self.capacity_version += 1

    def _release_holds(self, host: str) -> None:
        """No fence of ``host`` is under way any more: the VMs held off it may go there."""
        for vm in self.fence_holds.pop(host, ()):
            self.failed_on.get(vm, set()).discard(host)

    def fence_pending(self, host: str) -> bool:
        """A fence of this host (any incident, any boot) is in flight or failed, not
        yet confirmed off: it may power the host off at any moment."""
        return bool(self.fencing.get(host))

    def on_fence_result(self, result: FenceResult) -> bool:
        """True when this result releases the host's VMs for restart."""
        if result.outcome == "confirmed_off":
            self._fence_done(result.host, result.incident)
        elif result.incident:
            self._fence_open(result.host, result.incident)
        if not host_released(result, *self.open_incident(result.host)):
            return False
        if self.phases.get(result.host) in (*FENCED_PHASES, *QUARANTINED_PHASES) and any(
            lost.incident == result.incident for lost in self.lost.values()
        ):
            return False
        return self._fenced(result.host, result.incident, result.boot_id, EventKind.CONFIRMED_OFF)

    def _fenced(self, host: str, incident: str, boot_id: str = "",
                kind: EventKind = EventKind.CONFIRMED_OFF) -> bool:
        """``kind``: the fencer's ``confirmed_off`` or an operator's confirmation."""
        boot = boot_id or self.suspect_boot.get(host, "")
        if not boot and host in self.inventories:
            boot = self.inventories[host].boot_id
        reported = self.suspect_reported.get(host, "")
        if boot and boot not in self.boots.get(host, {}) and reported and reported != boot:
            # A boot this host never reported (a forged boot id its monitor heard, seed 27):
            # the power reading came after the incident opened, so the boot the host ran
            # then is off, and its VMs are what this fence released. A boot reported since
            # may be the host back after the fence: not released.
            boot = reported
        if boot and boot in self.fenced_boots.get(host, ()):
            return False  # that boot was fenced already and its VMs released
        self._close_incident(host)
        # Starts sent to this host are void: it is off, and so is anything it started.
        for key in [k for k in self.reserved if k[1] == host]:
            del self.reserved[key]
            self.failed_on.setdefault(key[0], set()).add(host)
        latest = self.inventories.get(host)
        inv = self.boots.get(host, {}).get(boot) if boot else latest
        if boot:
            fenced = self.fenced_boots.setdefault(host, set())
            fenced.add(boot)
            if len(fenced) > 4 * BOOTS_KEPT:
                fenced.discard(next(iter(fenced - {boot})))
        self.quarantine[host] = Quarantine(fenced_boot=boot)
        # The host may have reported a newer boot already (action "reboot"): it is back, quarantined.
        back = latest is not None and bool(boot) and latest.boot_id != boot
        if kind == EventKind.CONFIRMED_OFF and self.phases.get(host) not in (Phase.FENCING, Phase.FENCE_FAILED):
            # A result for a boot not released yet proves its request went out (the
            # arbiter's core folds a result that overtook its fence_requested the same
            # way); the table then reads it as this fence's, not an old one's read again.
            self._step(host, EventKind.FENCE_REQUESTED)
        self._step(host, kind)
        if back:
            self._step(host, EventKind.NEW_BOOT)
        if inv is None:
            return True
        copies = self.copies()
        for vm in inv.vms:
            # Running elsewhere already, or on this host's later boot (back, quarantined:
            # S6 deals with it there): not lost, whatever the fenced boot ran.
            if not ran_until_fenced(vm) or copies.get(vm.spec.name):
                continue
            spec = self.resolve(vm.spec)
            if spec.ha:
                self.lost[vm.spec.name] = LostVm(spec, host, incident)
        return True

    def clean(self, host: str) -> bool:
        """No HA VM runs on this host that also runs on another one."""
        inv = self.inventories.get(host)
        if inv is None:
            return True
        copies = self.copies()
        return not any(
            vm.state == "running" and self.attributes(vm.spec).ha and set(copies.get(vm.spec.name, ())) - {host}
            for vm in inv.vms
        )

    def _maybe_rejoin(self, host: str) -> None:
        # The table's ``cleared`` lifts a quarantine at once; the scheduler's S6 also
        # wants the host to report clean, so it steps ``cleared`` only then.
        q = self.quarantine.get(host)
        if self.phases.get(host) in QUARANTINED_PHASES and q is not None and q.cleared_by and self.clean(host):
            self._step(host, EventKind.CLEARED)
            del self.quarantine[host]
        # A stop on another host may have made this one clean: let every cleared one try.
        for other, oq in list(self.quarantine.items()):
            if other != host and oq.cleared_by and self.phases.get(other) in QUARANTINED_PHASES \
                    and self.clean(other):
                self._step(other, EventKind.CLEARED)
                del self.quarantine[other]

    # -- effects (what the shell must do; only the leader asks) -----------------------

    def effects(self, now: float) -> list[Effect]:
        out: list[Effect] = []
        copies = self.copies()
        for vm in sorted(self._twice):
            hosts = copies[vm]
            # Only a quarantined host's copy is known to be the wrong one, and only
            # while a copy runs on a host in good standing.
            quarantined = tuple(h for h in hosts if self.phases.get(h) in QUARANTINED_PHASES)
            stop_on = quarantined if len(quarantined) < len(hosts) else ()
            if self.announced.get(vm) != frozenset(hosts):
                self.announced[vm] = frozenset(hosts)
                out.append(Duplicate(vm, tuple(hosts), stop_on))
            for host in stop_on:
                sent = self.stops_sent.get((vm, host))
                if sent is None or now - sent >= RESEND_S:
                    self.stops_sent[(vm, host)] = now
                    out.append(StopCopy(vm, host, tuple(h for h in hosts if h not in stop_on)))
        for vm in [vm for vm in self.announced if len(copies.get(vm, ())) < 2]:
            del self.announced[vm]
        for key in [k for k in self.stops_sent if k[1] not in copies.get(k[0], ())]:
            del self.stops_sent[key]
        for host in self.hosts():
            inv = self.inventories[host]
            phase = self.phases.get(host)
            q = self.quarantine.get(host)
            if (phase in QUARANTINED_PHASES and q is not None and not q.cleared_by and self.auto_clear
                    and self.clean(host)):
                rule, reason = "auto_clear", f"reported clean after the fence of boot {q.fenced_boot or '?'}"
            elif phase in (Phase.UP, Phase.SUSPECT) and inv.quarantined:
                # The agent starts every boot quarantined; it is told when it need not be.
                rule, reason = "not_quarantined", "this host is not quarantined by the scheduler"
            else:
                continue
            sent = self.clears_sent.get(host)
            if sent is None or sent[0] != inv.boot_id or now - sent[1] >= RESEND_S:
                self.clears_sent[host] = (inv.boot_id, now)
                out.append(ClearHost(host, inv.boot_id, rule, reason))
        out += self.restarts.effects(now, self)
        return out

    # -- starts: retry on the same host, move, give up (the rules the shell asks) ------

    def voided(self, host: str) -> bool:
        """Fenced since a start was sent there: whatever it started is gone."""
        return self.phases.get(host) in (*FENCED_PHASES, *QUARANTINED_PHASES)

    def next_step(self, lost: LostVm, history: list[tuple[str, str]]) -> tuple[Step, str]:
        """From the recorded starts of this VM for this incident (target, state),
        oldest first: place it afresh, ask the same host again, or wait."""
        failed = self.failed_on.setdefault(lost.spec.name, set())
        for target, status in history:
            if status == "failed" or (status in ("sending", "started") and self.voided(target)):
                failed.add(target)
        asked = [t for t, s in history if s in ("sending", "started") and t not in failed]
        if not asked:
            return "place", ""
        if self.phases.get(asked[-1]) in UNDECIDED_PHASES:
            return "wait", asked[-1]  # it may be running there: wait for that host's fate
        # Chosen before (perhaps by a scheduler that died, or unanswered): ask the same host again.
        return "resend", asked[-1]

    def exhausted(self, vm: str) -> bool:
        """Its start failed on ``start_attempts`` hosts: it waits for capacity to change."""
        return len(self.failed_on.get(vm, ())) >= self.start_attempts

    def failures(self) -> int:
        return sum(len(hosts) for hosts in self.failed_on.values())

    def on_start_result(self, vm: str, target: str, outcome: StartOutcome) -> None:
        if outcome != "started":
            self.reserved.pop((vm, target), None)
        if outcome == "failed":
            self.failed_on.setdefault(vm, set()).add(target)

    # -- placement inputs -------------------------------------------------------------

    def _load(self, host: str) -> tuple[Candidate, list[VmSpec]]:
        """A host's candidate from its running VMs alone, and its HA VMs: computed
        once per revision of its inventory (most reports repeat the last one)."""
        revision = self._revisions.get(host, 0)
        cached = self._loads.get(host)
        if cached is not None and cached[0] == revision:
            return cached[1], cached[2]
        inv = self.inventories[host]
        specs = [self.attributes(vm.spec) for vm in inv.vms if vm.state == "running"]
        candidate = _candidate(host, inv.memory_mb, inv.vcpus, frozenset(inv.labels), specs)
        ha = [s for s in specs if s.ha]
        self._loads[host] = (revision, candidate, ha)
        return candidate, ha

    def candidates(self) -> list[Candidate]:
        # Reservations (starts not yet in an inventory) are few and change during a
        # failover: added on top of the cached candidate of their host.
        reserved: dict[str, list[VmSpec]] = {}
        for (_vm, target), spec in self.reserved.items():
            reserved.setdefault(target, []).append(spec)
        out = []
        for host in self.hosts():
            if self.phases.get(host) != Phase.UP or host in self.maintenance or self.fence_pending(host):
                continue
            if self.inventories[host].pill:
                # Fenced through its poison pill: its agent refuses every start until an
                # operator's `hafence host clear` (seed 127 with fences that reboot: VMs
                # tried there ran out of attempts while hosts with room waited).
                continue
            candidate, _ = self._load(host)
            if host in reserved:
                inv = self.inventories[host]
                specs = [self.attributes(vm.spec) for vm in inv.vms if vm.state == "running"] + reserved[host]
                candidate = _candidate(host, inv.memory_mb, inv.vcpus, candidate.labels, specs)
            out.append(candidate)
        return out

    def ha_vms_by_host(self) -> dict[str, list[VmSpec]]:
        """Callers must not change the lists (cached per inventory revision)."""
        return {
            host: self._load(host)[1]
            for host in self.hosts()
            if self.phases.get(host) == Phase.UP and host not in self.maintenance
        }


def _candidate(host: str, memory_mb: int, vcpus: int, labels: frozenset[str], specs: list[VmSpec]) -> Candidate:
    return Candidate(
        host, memory_mb, vcpus, sum(s.memory_mb for s in specs), sum(s.vcpus for s in specs), labels,
        frozenset(g for s in specs for g in s.affinity), frozenset(g for s in specs for g in s.anti_affinity),
    )


@dataclass
class ReservationGate:
    """When the shell runs the HA reservation check (``largest_host_loss_absorbed``,
    a walk over every host): only when ``capacity_version`` moved since the last
    verdict (an unchanged inventory moves nothing), at most once per ``every_s``, and
    never while a failover is being carried out: a failover's starts come first, the
    check is a warning about the next failure."""

    every_s: float = 1.0
    checked: int = -1
    last_at: float = float("-inf")

    def due(self, version: int, now: float, failover_busy: bool) -> bool:
        return not failover_busy and version != self.checked and now - self.last_at >= self.every_s

    def done(self, version: int, now: float) -> None:
        """A verdict was given for ``version`` (the version read before the check)."""
        self.checked, self.last_at = version, now
