"""What an operator asks about: hosts and their state, VMs and where they run,
open alerts. A fold over the events stream (the same history the services
replay); pure, no I/O. The CLI feeds it and prints it.

S6 shows here: a host whose new boot reports after a fence is ``quarantined``
until a ``cleared`` event (the scheduler also waits for it to report clean); a
VM reported running on two hosts is a ``duplicate`` until the copy is stopped.
Alerts other services raise (``<prefix>.alert.<kind>``) are listed for an hour.

VM-level HA shows here too: a VM its agent saw fail says how (``crashed on h1``);
after the scheduler's ``crashed`` event it is ``failed`` until it runs again, and
it stays ``failed`` (``restart limit: ...``) when it is no longer restarted.

A host's phase moves only through ``hafence.host_phase`` (the one state machine,
a table); this fold turns stream facts into its events and keeps the boots. An
event illegal in the host's phase leaves the phase as it was and is counted
(``ClusterView.illegal``, in ``hafence status --json``) and listed among the
alerts with its reason."""

from __future__ import annotations

from dataclasses import dataclass, field

from hafence.config import ClusterConfig
from hafence.contracts import VM_FAILURES, Alert, FenceResult, HostEvent, Inventory, VmEvent
from hafence.host_phase import SUSPECT_PHASES, EventKind, Illegal, Phase, step, suspect_event

# How long a raised alert stays listed (alerts repeat while their cause lasts).
ALERT_WINDOW_S = 3600.0
# Illegal events kept with their host and reason (the counts are kept whole).
ILLEGAL_KEPT = 20

# Host events that move the phase; the others (protection, maintenance, skips) are flags.
_HOST_EVENTS = {"suspect": EventKind.SUSPECT, "alive": EventKind.HEARD,
                "fence_requested": EventKind.FENCE_REQUESTED, "fenced": EventKind.CONFIRMED_OFF,
                "confirmed_fenced": EventKind.OPERATOR_CONFIRMED, "fence_failed": EventKind.FENCE_FAILED,
                "cleared": EventKind.CLEARED}


@dataclass
class HostRow:
    name: str
    phase: Phase = Phase.UNKNOWN
    state: str = "unknown"  # the phase's name, for printing
    since: float = 0.0
    last_heartbeat: float | None = None
    protected: bool | None = None
    protection: str = ""
    maintenance: bool = False
    vms: int = 0
    alert: str = ""
    boot_id: str = ""
    suspect_boot: str = ""
    fenced_boot: str = ""
    # S6: fenced, back, not yet cleared; or the agent says it has not been cleared yet.
    quarantined: bool = False
    agent_quarantined: bool = False


@dataclass
class VmRow:
    name: str
    host: str = ""
    state: str = "unknown"
    ha: bool = False
    memory_mb: int = 0
    note: str = ""


@dataclass
class ClusterView:
    hosts: dict[str, HostRow] = field(default_factory=dict)
    vms: dict[str, VmRow] = field(default_factory=dict)
    raised: dict[tuple[str, str, str], Alert] = field(default_factory=dict)
    # Events illegal in their host's phase: counts by "<event> in <phase>", and the last few.
    illegal: dict[str, int] = field(default_factory=dict)
    illegal_recent: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, config: ClusterConfig) -> ClusterView:
        view = cls()
        for h in config.hosts:
            view.hosts[h.name] = HostRow(h.name, maintenance=h.maintenance)
        for vm in config.vms:
            view.vms[vm.name] = VmRow(vm.name, vm.host, "unknown", vm.ha, vm.memory_mb)
        return view

    def apply(self, event: object) -> None:
        match event:
            case Inventory():
                row = self.hosts.setdefault(event.host, HostRow(event.host))
                if row.fenced_boot and event.boot_id == row.fenced_boot:
                    return  # a late report from the boot that was fenced
                # After a fence, any boot but the fenced one is a new boot (an unknown fenced
                # boot included: quarantine is the safe side, S6).
                off = row.phase in (Phase.FENCED, Phase.FENCED_CLEARED)
                new = off or (bool(row.boot_id) and event.boot_id != row.boot_id)
                self._step(row, EventKind.NEW_BOOT if new else EventKind.REPORTED, event.sent_at)
                row.boot_id, row.agent_quarantined = event.boot_id, event.quarantined
                row.vms = sum(1 for v in event.vms if v.state == "running")
                for info in event.vms:
                    vm = self.vms.setdefault(info.spec.name, VmRow(info.spec.name))
                    if info.state != "running" and vm.host not in ("", event.host) and vm.state == "running":
                        continue  # a stopped copy here says nothing about the one running there
                    if info.state != "running" and vm.state == "failed":
                        vm.ha, vm.memory_mb = info.spec.ha, info.spec.memory_mb
                        continue  # the scheduler's word on a failure (restarting, or given up) stays
                    vm.host, vm.state, vm.ha, vm.memory_mb = event.host, info.state, info.spec.ha, info.spec.memory_mb
                    if not vm.note.startswith("duplicate"):
                        vm.note = _stop_note(info.stop_reason, event.host) if info.state != "running" else ""
            case HostEvent():
                row = self.hosts.setdefault(event.host, HostRow(event.host))
                self._host_event(row, event)
            case FenceResult():
                row = self.hosts.setdefault(event.host, HostRow(event.host))
                if event.outcome == "refused":
                    self._step(row, EventKind.REFUSED, event.finished_at)
                # A failure reaches the phase as the arbiter's fence_failed event (it retries first).
                if event.outcome == "confirmed_off" and _earlier_fence(row, event.boot_id):
                    return
                if event.outcome == "confirmed_off" and self._step(row, EventKind.CONFIRMED_OFF, event.finished_at):
                    row.alert = ""
                    if row.phase == Phase.FENCED:
                        row.fenced_boot = event.boot_id or row.suspect_boot or row.boot_id
                    for vm in self.vms.values():
                        if vm.host == event.host and vm.state == "running":
                            vm.state, vm.note = ("down", "host fenced") if vm.ha else ("stopped", "host fenced")
            case VmEvent():
                vm = self.vms.setdefault(event.vm, VmRow(event.vm))
                if event.kind == "pending":
                    vm.state, vm.note = "pending", event.reason
                elif event.kind == "failed":
                    vm.note = f"start on {event.target} failed: {event.reason}"
                elif event.kind == "started":
                    vm.host, vm.state, vm.note = event.target, "running", f"restarted from {event.from_host}"
                elif event.kind == "duplicate":
                    vm.state, vm.note = "duplicate", f"duplicate: {event.reason}"
                elif event.kind == "crashed":
                    vm.state, vm.note = "failed", event.reason
                    vm.host = event.from_host or vm.host
                elif event.kind == "restarted":
                    vm.host, vm.state = event.target, "running"
                    vm.note = f"restarted after it failed on {event.from_host} ({event.reason})"
                elif event.kind == "restart_limit":
                    vm.state, vm.note = "failed", f"restart limit: {event.reason}"
                elif event.kind == "stopped":
                    vm.state, vm.note = "running", f"duplicate copy stopped on {event.target}"
                    if vm.host == event.target:
                        vm.host = ""  # the copy that runs is on the other host; its next report says which
            case Alert():
                self.raised[(event.kind, event.host, event.vm)] = event

    def _step(self, row: HostRow, kind: EventKind, at: float) -> bool:
        """Move ``row``'s phase by the table. False if the event is illegal there: the
        phase stays, the event is counted and kept with its reason."""
        was = row.phase
        nxt = step(was, kind)
        if isinstance(nxt, Illegal):
            key = f"{kind} in {was}"
            self.illegal[key] = self.illegal.get(key, 0) + 1
            self.illegal_recent = [*self.illegal_recent, f"{row.name}: {nxt}"][-ILLEGAL_KEPT:]
            return False
        if nxt != was:
            row.phase, row.state, row.since = nxt, nxt.value, at
        row.quarantined = nxt in (Phase.QUARANTINED, Phase.QUARANTINED_SUSPECT)
        if was in (Phase.QUARANTINED, Phase.FENCED_CLEARED, Phase.QUARANTINED_SUSPECT) \
                and nxt in (Phase.UP, Phase.SUSPECT):
            row.fenced_boot = ""  # cleared: its next fence names its own boot
        return True

    def _host_event(self, row: HostRow, event: HostEvent) -> None:
        kind = _HOST_EVENTS.get(event.kind)
        if event.kind == "fenced" and _earlier_fence(row, event.boot_id):
            return
        if kind == EventKind.SUSPECT:
            # A fence covers one boot: a later boot's silence is a new incident (host_phase).
            covered = (row.suspect_boot if row.phase in (Phase.FENCING, Phase.FENCE_FAILED)
                       else row.fenced_boot if row.phase not in (Phase.UNKNOWN, Phase.UP, Phase.SUSPECT) else "")
            kind = suspect_event(event.boot_id, covered)
        if kind is not None and not self._step(row, kind, event.at):
            return
        match event.kind:
            case "suspect":
                if row.phase in SUSPECT_PHASES:
                    row.suspect_boot = event.boot_id or row.boot_id
            case "alive":
                if row.alert.startswith("not fenced"):
                    row.alert = ""
            case "fence_skipped":
                if event.alert:
                    row.alert = f"not fenced ({event.rule}): {event.reason}"
            case "fenced" | "confirmed_fenced":
                row.alert = ""
                if row.phase == Phase.FENCED:
                    row.fenced_boot = event.boot_id or row.suspect_boot or row.boot_id
            case "fence_failed":
                row.alert = f"fence failed: {event.reason}"
            case "protected" | "not_protected":
                row.protected, row.protection = event.kind == "protected", event.reason
            case "maintenance_on" | "maintenance_off":
                row.maintenance = event.kind == "maintenance_on"

    def failed(self) -> list[VmRow]:
        """HA VMs that failed on a live host and are not running again (yet, or at all)."""
        return [v for v in self.vms.values() if v.state == "failed"]

    def alerts(self, now: float | None = None) -> list[str]:
        out = [f"{h.name}: {h.alert}" for h in self.hosts.values() if h.alert]
        out += [f"{h.name}: {h.protection}" for h in self.hosts.values() if h.protected is False]
        out += [f"{h.name}: quarantined after its fence: it takes no VM until it reports clean and is cleared "
                f"(hafence host clear {h.name} --reason ...)" for h in self.hosts.values() if h.quarantined]
        if self.illegal:
            out.append(f"{sum(self.illegal.values())} host events illegal in their host's phase, "
                       f"last: {self.illegal_recent[-1]}")
        out += [f"vm {v.name}: pending: {v.note}" for v in self.vms.values() if v.state == "pending"]
        out += [f"vm {v.name}: {v.note}" for v in self.vms.values() if v.state == "duplicate"]
        out += [f"vm {v.name}: not restarted any more ({v.note}); start it by hand once its cause is fixed"
                for v in self.failed() if v.note.startswith("restart limit")]
        for (kind, host, vm), alert in sorted(self.raised.items()):
            if kind in ("vm_duplicate", "vm_restart_limit") or (now is not None and now - alert.at > ALERT_WINDOW_S):
                continue  # duplicates and VMs past their restart limit show on their VM while it lasts
            where = " ".join(x for x in (host, f"vm {vm}" if vm else "") if x)
            out.append(f"{kind}{' ' + where if where else ''}: {alert.reason}")
        return out


def _earlier_fence(row: HostRow, boot_id: str) -> bool:
    """A confirmation of the boot fenced before, read while a later boot's incident is
    open (quarantined_suspect): old news, not that later boot's fence."""
    return row.phase == Phase.QUARANTINED_SUSPECT and bool(boot_id) and boot_id == row.fenced_boot


def _stop_note(reason: str, host: str) -> str:
    """Why a VM is stopped, as its agent saw it (VM-level HA)."""
    if reason == "guest_shutdown":
        return f"shut down by its guest on {host}"
    if reason in VM_FAILURES:
        return f"{reason} on {host}"
    return {"command": "stopped by hafence", "migrated": f"migrated away from {host}"}.get(reason, "")
