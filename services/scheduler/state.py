"""What the scheduler knows: inventories, host phases, and the HA VMs lost with
a fenced host. A fold over the events stream; pure, no I/O.

S1 lives here: a VM enters ``lost`` (the only set the scheduler restarts from)
only when its host's fence is confirmed off, or when an operator confirms by
hand that the host is off. "Of the current term" is enforced where it can be
enforced atomically, by the fencer, which runs no request older than the newest
term it has seen: a ``confirmed_off`` is a power reading, true whatever arbiter
asked for it, so the scheduler does not second-guess it (doing so would strand
the VMs of a host fenced just before a leader change).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from hafence.contracts import FenceResult, HostEvent, Inventory, VmSpec
from hafence.scheduler.placement import Candidate

HostPhase = Literal["up", "suspect", "fenced"]


@dataclass(frozen=True, slots=True)
class LostVm:
    spec: VmSpec
    from_host: str
    incident: str


@dataclass
class SchedulerState:
    maintenance: set[str] = field(default_factory=set)
    inventories: dict[str, Inventory] = field(default_factory=dict)
    phases: dict[str, HostPhase] = field(default_factory=dict)
    fenced_boot: dict[str, str] = field(default_factory=dict)
    lost: dict[str, LostVm] = field(default_factory=dict)
    # VMs started but not yet in their new host's inventory: (vm, host) -> spec.
    reserved: dict[tuple[str, str], VmSpec] = field(default_factory=dict)

    def running_on(self) -> dict[str, str]:
        where: dict[str, str] = {}
        for host, inv in self.inventories.items():
            if self.phases.get(host) == "fenced":
                continue
            for vm in inv.vms:
                if vm.state == "running":
                    where[vm.spec.name] = host
        return where

    def on_inventory(self, inv: Inventory) -> None:
        if self.phases.get(inv.host) == "fenced" and self.fenced_boot.get(inv.host) == inv.boot_id:
            return  # a late report from before the fence: that host is off
        if self.phases.get(inv.host) == "fenced":
            self.phases[inv.host] = "up"  # it booted again
        self.phases.setdefault(inv.host, "up")
        self.inventories[inv.host] = inv
        for vm in inv.vms:
            if vm.state == "running":
                self.lost.pop(vm.spec.name, None)
                self.reserved.pop((vm.spec.name, inv.host), None)

    def on_host_event(self, event: HostEvent) -> None:
        if event.kind == "suspect" and self.phases.get(event.host) != "fenced":
            self.phases[event.host] = "suspect"
        elif event.kind == "alive" and self.phases.get(event.host) == "suspect":
            self.phases[event.host] = "up"
        elif event.kind == "confirmed_fenced":
            self._fenced(event.host, event.incident)
        elif event.kind == "maintenance_on":
            self.maintenance.add(event.host)
        elif event.kind == "maintenance_off":
            self.maintenance.discard(event.host)

    def on_fence_result(self, result: FenceResult) -> bool:
        """True when this result releases the host's VMs for restart."""
        if result.outcome != "confirmed_off":
            return False
        if self.phases.get(result.host) == "fenced" and any(
            lost.incident == result.incident for lost in self.lost.values()
        ):
            return False
        self._fenced(result.host, result.incident)
        return True

    def _fenced(self, host: str, incident: str) -> None:
        self.phases[host] = "fenced"
        # Starts sent to this host are void: it is off, and so is anything it started.
        for key in [k for k in self.reserved if k[1] == host]:
            del self.reserved[key]
        inv = self.inventories.get(host)
        if inv is None:
            return
        self.fenced_boot[host] = inv.boot_id
        elsewhere = {vm: h for vm, h in self.running_on().items() if h != host}
        for vm in inv.vms:
            if vm.state == "running" and vm.spec.ha and vm.spec.name not in elsewhere:
                self.lost[vm.spec.name] = LostVm(vm.spec, host, incident)

    def candidates(self) -> list[Candidate]:
        out = []
        for host, inv in sorted(self.inventories.items()):
            if self.phases.get(host) != "up" or host in self.maintenance:
                continue
            specs = [vm.spec for vm in inv.vms if vm.state == "running"]
            specs += [spec for (_vm, target), spec in self.reserved.items() if target == host]
            out.append(Candidate(
                host, inv.memory_mb, inv.vcpus, sum(s.memory_mb for s in specs), sum(s.vcpus for s in specs),
                frozenset(inv.labels), frozenset(g for s in specs for g in s.affinity),
                frozenset(g for s in specs for g in s.anti_affinity),
            ))
        return out

    def ha_vms_by_host(self) -> dict[str, list[VmSpec]]:
        return {
            host: [vm.spec for vm in inv.vms if vm.state == "running" and vm.spec.ha]
            for host, inv in self.inventories.items()
            if self.phases.get(host) == "up" and host not in self.maintenance
        }
