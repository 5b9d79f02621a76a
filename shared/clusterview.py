"""What an operator asks about: hosts and their state, VMs and where they run,
open alerts. A fold over the events stream (the same history the services
replay); pure, no I/O. The CLI feeds it and prints it.

S6 shows here: a host whose new boot reports after a fence is ``quarantined``
until a ``cleared`` event (the scheduler also waits for it to report clean); a
VM reported running on two hosts is a ``duplicate`` until the copy is stopped.
Alerts other services raise (``<prefix>.alert.<kind>``) are listed for an hour.

VM-level HA shows here too: a VM its agent saw fail says how (``crashed on h1``);
after the scheduler's ``crashed`` event it is ``failed`` until it runs again, and
it stays ``failed`` (``restart limit: ...``) when it is no longer restarted."""

from __future__ import annotations

from dataclasses import dataclass, field

from hafence.config import ClusterConfig
from hafence.contracts import VM_FAILURES, Alert, FenceResult, HostEvent, Inventory, VmEvent

# How long a raised alert stays listed (alerts repeat while their cause lasts).
ALERT_WINDOW_S = 3600.0


@dataclass
class HostRow:
    name: str
    state: str = "unknown"
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
                row.boot_id, row.agent_quarantined = event.boot_id, event.quarantined
                row.vms = sum(1 for v in event.vms if v.state == "running")
                if row.fenced_boot and row.state in ("fenced", "quarantined"):
                    row.state, row.quarantined = "quarantined", True
                elif row.state in ("unknown", "fenced"):
                    row.state = "up"
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
                if event.outcome == "confirmed_off":
                    row.state, row.since, row.alert = "fenced", event.finished_at, ""
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

    def _host_event(self, row: HostRow, event: HostEvent) -> None:
        match event.kind:
            case "suspect":
                row.state, row.since = "suspect", event.at
                row.suspect_boot = event.boot_id or row.boot_id
            case "alive":
                if row.state in ("suspect", "unknown"):
                    row.state, row.since = "up", event.at
                if row.state == "suspect" or row.alert.startswith("not fenced"):
                    row.alert = ""
            case "fence_requested":
                row.state, row.since = "fencing", event.at
            case "fence_skipped":
                if event.alert:
                    row.alert = f"not fenced ({event.rule}): {event.reason}"
            case "fenced" | "confirmed_fenced":
                row.state, row.alert = "fenced", ""
                row.fenced_boot = event.boot_id or row.suspect_boot or row.boot_id
            case "fence_failed":
                row.state, row.alert = "fence_failed", f"fence failed: {event.reason}"
            case "cleared":
                if row.quarantined or row.state == "fenced":
                    row.state, row.since = ("up" if row.quarantined else row.state), event.at
                    row.quarantined, row.fenced_boot = False, ""
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


def _stop_note(reason: str, host: str) -> str:
    """Why a VM is stopped, as its agent saw it (VM-level HA)."""
    if reason == "guest_shutdown":
        return f"shut down by its guest on {host}"
    if reason in VM_FAILURES:
        return f"{reason} on {host}"
    return {"command": "stopped by hafence", "migrated": f"migrated away from {host}"}.get(reason, "")
