"""What an operator asks about: hosts and their state, VMs and where they run,
open alerts. A fold over the events stream (the same history the services
replay); pure, no I/O. The CLI feeds it and prints it."""

from __future__ import annotations

from dataclasses import dataclass, field

from hafence.config import ClusterConfig
from hafence.contracts import FenceResult, HostEvent, Inventory, VmEvent


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
                row.vms = sum(1 for v in event.vms if v.state == "running")
                if row.state in ("unknown", "fenced") and row.state != "suspect":
                    row.state = "up"
                for info in event.vms:
                    vm = self.vms.setdefault(info.spec.name, VmRow(info.spec.name))
                    vm.host, vm.state, vm.ha, vm.memory_mb = event.host, info.state, info.spec.ha, info.spec.memory_mb
                    vm.note = ""
            case HostEvent():
                row = self.hosts.setdefault(event.host, HostRow(event.host))
                self._host_event(row, event)
            case FenceResult():
                row = self.hosts.setdefault(event.host, HostRow(event.host))
                if event.outcome == "confirmed_off":
                    row.state, row.since, row.alert = "fenced", event.finished_at, ""
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

    def _host_event(self, row: HostRow, event: HostEvent) -> None:
        match event.kind:
            case "suspect":
                row.state, row.since = "suspect", event.at
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
            case "fenced":
                row.state, row.alert = "fenced", ""
            case "fence_failed":
                row.state, row.alert = "fence_failed", f"fence failed: {event.reason}"
            case "confirmed_fenced":
                row.state, row.alert = "fenced", ""
            case "protected" | "not_protected":
                row.protected, row.protection = event.kind == "protected", event.reason
            case "maintenance_on" | "maintenance_off":
                row.maintenance = event.kind == "maintenance_on"

    def alerts(self) -> list[str]:
        out = [f"{h.name}: {h.alert}" for h in self.hosts.values() if h.alert]
        out += [f"{h.name}: {h.protection}" for h in self.hosts.values() if h.protected is False]
        out += [f"vm {v.name}: pending: {v.note}" for v in self.vms.values() if v.state == "pending"]
        return out
