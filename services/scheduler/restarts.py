"""VM-level HA: restarting an HA VM that failed on a live host. Pure: reports and
``now`` in, effects out (docs/vm-ha.md).

A failure comes from the inventory of the host the VM ran on: the agent saw the
VM stop without an order (``VmInfo.stop_reason`` crashed, killed, panicked, or
guest_shutdown where the VM's policy restarts after one). It is believed only if
it makes sense. The VM is HA (the config's word wins), and the last report of it
running came from that same host and boot. So a host cannot get a VM that runs
elsewhere restarted by claiming it crashed there. Each failure (host, VM, stop
time) is acted on once.

The policy, per failure:

* the first restarts in the window go to the same host (``vm_same_host_restarts``),
  the later ones elsewhere, and so does a restart whose start failed there;
* the n-th restart in ``vm_restart_window_s`` waits ``backoff(n)`` after the last
  one (0 for the first, then ``vm_restart_backoff_s``, doubling, capped);
* after ``max_restarts`` restarts in the window, or when the start failed on
  ``start_attempts`` hosts, the VM is no longer restarted: ``restart_limit`` and an
  alert ``vm_restart_limit``. It runs again when someone starts it.

S0. The VM is started on another host only (a) after its host's agent has
answered, just before, a stop of the VM (``confirm_stop``: libvirt destroyed it,
or it was not running), on top of the inventory that reported it stopped, or
(b) when the boot that reported the failure has been fenced. While the host is
suspect, nothing moves: its fate decides. A restart on the same host needs no
such proof, because the agent serialises commands per VM and answers "already
running". A ``placed`` event is published before each start is sent, and a
scheduler that takes over asks that host again rather than another (as for a
host's failover). The count of restarts is a fold of the scheduler's own
``restarted`` and ``failed`` VM events (only the scheduler may publish them), so it
survives a restart of the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from hafence.contracts import VM_FAILURES, Inventory, VmEvent, VmSpec
from hafence.host_phase import SUSPECT_PHASES, Phase
from hafence.scheduler.placement import place

if TYPE_CHECKING:
    from hafence.config import ClusterConfig
    from hafence.scheduler.state import SchedulerState

# Failure ids are the incident of their VM events: this prefix tells them from fences'.
PREFIX = "vmfail-"
# An unconfirmed stop (the agent did not answer) is asked again after this long.
RETRY_S = 5.0
# Restart records kept per VM (besides the window): bounded against a flood.
HISTORY_KEPT = 64
KNOWN_KEPT = 16
# A stop time beyond this (year 33658) is no clock's: refused, not turned into an id.
MAX_TIME = 1e12

Outcome = Literal["started", "failed", "unanswered", "unconfirmed"]


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    enabled: bool = True
    max_restarts: int = 3
    window_s: float = 3600.0
    same_host: int = 1
    backoff_s: float = 10.0
    backoff_max_s: float = 300.0
    on_guest_shutdown: bool = False
    attempts: int = 3
    strategy: Literal["spread", "best_fit"] = "spread"
    memory_overcommit: float = 1.0
    cpu_overcommit: float = 4.0
    # Per-VM overrides (the config's [[vms]] entries).
    vm_max_restarts: dict[str, int] = field(default_factory=dict)
    vm_on_guest_shutdown: dict[str, bool] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: ClusterConfig) -> RestartPolicy:
        s = config.scheduler
        return cls(
            enabled=s.vm_restart, max_restarts=s.vm_max_restarts, window_s=s.vm_restart_window_s,
            same_host=s.vm_same_host_restarts, backoff_s=s.vm_restart_backoff_s,
            backoff_max_s=s.vm_restart_backoff_max_s, on_guest_shutdown=s.restart_on_guest_shutdown,
            attempts=s.start_attempts, strategy=s.strategy, memory_overcommit=s.memory_overcommit,
            cpu_overcommit=s.cpu_overcommit,
            vm_max_restarts={vm.name: vm.max_restarts for vm in config.vms if vm.max_restarts is not None},
            vm_on_guest_shutdown={vm.name: vm.restart_on_guest_shutdown for vm in config.vms
                                  if vm.restart_on_guest_shutdown is not None},
        )

    def limit(self, vm: str) -> int:
        return self.vm_max_restarts.get(vm, self.max_restarts)

    def is_failure(self, vm: str, reason: str) -> bool:
        if reason == "guest_shutdown":
            return self.vm_on_guest_shutdown.get(vm, self.on_guest_shutdown)
        return reason in VM_FAILURES

    def backoff(self, restarts: int) -> float:
        """The wait before a restart when ``restarts`` were made in the window already."""
        if restarts <= 0:
            return 0.0
        return min(self.backoff_s * 2 ** (restarts - 1), self.backoff_max_s)


@dataclass
class VmFailure:
    id: str
    vm: str
    host: str
    boot_id: str
    reason: str
    at: float  # the agent's clock: with host and VM, the failure's identity
    spec: VmSpec
    status: Literal["waiting", "restarting", "limit"] = "waiting"
    announced: bool = False
    tried: list[tuple[str, str]] = field(default_factory=list)  # (target, outcome)
    resend: str = ""  # unanswered: ask this host again
    retry_at: float = 0.0
    pending: str = ""  # the reason last announced for waiting


# -- effects ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AnnounceFailure:
    """Publish ``crashed``: the HA VM failed on its (live) host."""

    failure_id: str
    vm: str
    host: str
    reason: str
    action: str


@dataclass(frozen=True, slots=True)
class RestartVm:
    """Start the VM on ``target``; with ``confirm_stop``, first have ``from_host`` stop it
    and go on only if it answers that it did (S0)."""

    failure_id: str
    spec: VmSpec
    from_host: str
    target: str
    reason: str
    same_host: bool
    confirm_stop: bool
    attempt: int
    failure: str = "crashed"  # what the agent reported (VM_FAILURES)


@dataclass(frozen=True, slots=True)
class RestartLimit:
    """Publish ``restart_limit`` and an alert ``vm_restart_limit``: it is no longer restarted."""

    failure_id: str
    vm: str
    host: str
    reason: str


@dataclass(frozen=True, slots=True)
class RestartPending:
    """Publish ``pending``: no host can take it now (it waits for capacity)."""

    failure_id: str
    vm: str
    host: str
    reason: str


RestartEffect = AnnounceFailure | RestartVm | RestartLimit | RestartPending


# -- the core --------------------------------------------------------------------------


@dataclass
class VmRestarts:
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    # The host and boot whose report last had the VM running.
    where_ran: dict[str, tuple[str, str]] = field(default_factory=dict)
    open: dict[str, VmFailure] = field(default_factory=dict)
    known: dict[str, list[str]] = field(default_factory=dict)  # failure ids seen, per VM
    # Restarts made, per VM: failure id -> (first attempt's time, target).
    history: dict[str, dict[str, tuple[float, str]]] = field(default_factory=dict)
    in_flight: set[str] = field(default_factory=set)

    @staticmethod
    def failure_id(host: str, vm: str, at: float) -> str:
        return f"{PREFIX}{host}-{vm}-{int(at * 1000)}"

    def on_inventory(self, inv: Inventory, state: SchedulerState) -> list[str]:
        """Fold a (not fenced) report; returns the ids of new failures it carries."""
        new: list[str] = []
        for info in inv.vms:
            name = info.spec.name
            if info.state == "running":
                self.where_ran[name] = (inv.host, inv.boot_id)
                self.open.pop(name, None)  # it runs again (restarted, or started by someone)
                continue
            if not info.stop_reason or not 0 < info.stopped_at < MAX_TIME:
                continue  # not seen failing (or a time no clock gives: it would not make an id)
            if self.where_ran.get(name) != (inv.host, inv.boot_id):
                continue  # not where it last ran: nothing to believe
            fid = self.failure_id(inv.host, name, info.stopped_at)
            known = self.known.setdefault(name, [])
            if fid in known:
                continue
            spec = state.resolve(info.spec)
            if not spec.ha or not self.policy.enabled or not self.policy.is_failure(name, info.stop_reason):
                continue  # a stop it is not our business to undo (a guest's own shutdown, by default)
            known.append(fid)
            del known[:-KNOWN_KEPT]
            self.open[name] = VmFailure(fid, name, inv.host, inv.boot_id, info.stop_reason, info.stopped_at, spec)
            new.append(fid)
        return new

    def on_vm_event(self, event: VmEvent) -> None:
        """Fold the scheduler's own events about failures (its history after a restart)."""
        if not event.incident.startswith(PREFIX):
            return
        f = self.open.get(event.vm)
        mine = f is not None and f.id == event.incident
        if event.kind in ("restarted", "failed") and event.target:
            self._record(event.vm, event.incident, event.at, event.target)
            if mine and event.kind == "restarted":
                del self.open[event.vm]
            elif mine and f is not None and (event.target, "failed") not in f.tried:
                f.tried.append((event.target, "failed"))
        elif event.kind == "placed" and mine and f is not None and event.target:
            # A start was sent there (perhaps by a scheduler that died before its answer):
            # it may be booting the VM, so that host is asked again, never another (S0).
            if f.status != "restarting" and (event.target, "failed") not in f.tried:
                f.resend = event.target
        elif event.kind == "crashed" and mine and f is not None:
            f.announced = True
        elif event.kind == "restart_limit" and mine and f is not None:
            f.status, f.announced = "limit", True

    def _record(self, vm: str, fid: str, at: float, target: str) -> None:
        records = self.history.setdefault(vm, {})
        records.setdefault(fid, (at, target))
        if len(records) > HISTORY_KEPT:
            for old in sorted(records, key=lambda k: records[k][0])[: len(records) - HISTORY_KEPT]:
                del records[old]

    def restarts(self, vm: str, now: float, but: str = "") -> list[tuple[float, str]]:
        """Restarts of ``vm`` in the window (time, target), oldest first."""
        return sorted(at_target for fid, at_target in self.history.get(vm, {}).items()
                      if fid != but and now - at_target[0] < self.policy.window_s)

    def on_result(self, effect: RestartVm, outcome: Outcome, now: float, state: SchedulerState) -> None:
        self.in_flight.discard(effect.spec.name)
        if outcome != "started":
            state.reserved.pop((effect.spec.name, effect.target), None)
        if outcome in ("started", "failed", "unanswered"):
            self._record(effect.spec.name, effect.failure_id, now, effect.target)
        if outcome == "started" and effect.target in state.inventories:
            # It runs there now, whether or not that host reports it before it fails again.
            self.where_ran[effect.spec.name] = (effect.target, state.inventories[effect.target].boot_id)
        f = self.open.get(effect.spec.name)
        if f is None or f.id != effect.failure_id:
            return  # it runs again already, or failed anew meanwhile
        f.status = "waiting"
        f.resend = ""
        if outcome == "started":
            del self.open[f.vm]
        elif outcome == "failed":
            f.tried.append((effect.target, "failed"))
        elif outcome == "unanswered":
            f.resend, f.retry_at = effect.target, now + RETRY_S  # it may be booting it: ask it again
        else:
            f.retry_at = now + RETRY_S  # its host did not confirm the stop: nothing moves yet

    def effects(self, now: float, state: SchedulerState) -> list[RestartEffect]:
        out: list[RestartEffect] = []
        if not self.open:
            return out  # the usual case: no walk over every VM of the cluster
        copies = state.copies()
        held = state.held_by_suspects()
        for name, f in sorted(self.open.items()):
            if name in copies:
                del self.open[name]  # running somewhere: its inventory will say where
                continue
            if not f.announced:
                f.announced = True
                out.append(AnnounceFailure(f.id, name, f.host, f.reason, self._plan(f, now, state)))
            if (f.status != "waiting" or name in self.in_flight or name in state.lost or now < f.retry_at
                    or name in held):
                continue  # (held: a suspect host reported it running; S1, its fence decides)
            effect = self._next(f, now, state)
            if effect is not None:
                out.append(effect)
        return out

    def _plan(self, f: VmFailure, now: float, state: SchedulerState) -> str:
        done = len(self.restarts(f.vm, now, but=f.id))
        limit = self.policy.limit(f.vm)
        if done >= limit:
            return f"not restarted: {done} restarts in the last {self.policy.window_s:.0f} s (limit {limit})"
        wait = max(0.0, self._due(f, now) - now)
        return (f"restart {done + 1} of {limit} in the window"
                + (f", in {wait:.0f} s" if wait else ""))

    def _due(self, f: VmFailure, now: float) -> float:
        made = self.restarts(f.vm, now, but=f.id)
        return made[-1][0] + self.policy.backoff(len(made)) if made else 0.0

    def _next(self, f: VmFailure, now: float, state: SchedulerState) -> RestartEffect | None:
        phase = state.phases.get(f.host)
        if phase in SUSPECT_PHASES:
            return None  # the host may be failing: its fence (or return) decides first
        fenced = f.boot_id in state.fenced_boots.get(f.host, ())
        failed = {t for t, o in f.tried if o == "failed"}
        if f.resend:
            if state.voided(f.resend):
                failed.add(f.resend)  # fenced since: whatever it started is off
                f.tried.append((f.resend, "failed"))
                f.resend = ""
            else:
                return self._restart(f, f.resend, now, state, confirm=f.resend != f.host and not fenced)
        made = self.restarts(f.vm, now, but=f.id)
        if not f.tried:
            limit = self.policy.limit(f.vm)
            if len(made) >= limit:
                f.status = "limit"
                return RestartLimit(f.id, f.vm, f.host,
                                    f"{f.vm} failed ({f.reason}) on {f.host} after {len(made)} restarts in the "
                                    f"last {self.policy.window_s:.0f} s (limit {limit}): not restarted; "
                                    "start it by hand once its cause is fixed")
            if now < self._due(f, now):
                return None
        if len(failed) >= self.policy.attempts:
            f.status = "limit"
            return RestartLimit(f.id, f.vm, f.host, f"{f.vm} failed ({f.reason}) on {f.host}; its start failed on "
                                                    f"{', '.join(sorted(failed))}: not restarted")
        same_used = sum(1 for _, target in made if target == f.host)
        if (phase == Phase.UP and not fenced and f.host not in state.maintenance and f.host not in failed
                and same_used < self.policy.same_host):
            return self._restart(f, f.host, now, state, confirm=False)
        candidates = [c for c in state.candidates() if c.name != f.host and c.name not in failed]
        placements, pending = place([f.spec], candidates, self.policy.strategy, self.policy.memory_overcommit,
                                    {f.vm: failed | {f.host}}, cpu_overcommit=self.policy.cpu_overcommit)
        if not placements:
            reason = pending[0].reason if pending else "no other host"
            if f.pending != reason:
                f.pending = reason
                return RestartPending(f.id, f.vm, f.host, reason)
            return None
        return self._restart(f, placements[0].host, now, state, confirm=not fenced)

    def _restart(self, f: VmFailure, target: str, now: float, state: SchedulerState, confirm: bool) -> RestartVm:
        f.status = "restarting"
        f.pending = ""
        self.in_flight.add(f.vm)
        state.reserved[(f.vm, target)] = f.spec
        same = target == f.host
        where = "on the same host" if same else f"elsewhere (it failed on {f.host})"
        return RestartVm(f.id, f.spec, f.host, target, f"{f.reason}; restart {where}", same, confirm,
                         len(f.tried) + 1, f.reason)
