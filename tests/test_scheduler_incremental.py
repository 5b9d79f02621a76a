"""The scheduler core's incremental views (issue 12): an inventory sent again
unchanged moves nothing the HA reservation check reads, and the views kept up to
date host by host (copies, candidates, HA VMs) equal a walk over every report."""

from __future__ import annotations

import random
import time

from hafence.contracts import FenceResult, HostEvent, Inventory, VmInfo, VmSpec
from hafence.scheduler.placement import Candidate
from hafence.scheduler.state import ReservationGate, SchedulerState


def inv(host: str, vms: list[tuple[str, bool, str]], boot: str = "b1", memory: int = 65536,
        labels: tuple[str, ...] = ()) -> Inventory:
    return Inventory(host=host, boot_id=boot, memory_mb=memory, vcpus=16, labels=list(labels), sent_at=time.time(),
                     vms=[VmInfo(spec=VmSpec(name=n, memory_mb=1024, ha=ha, anti_affinity=["g"] if n.endswith("7")
                                             else []), state=st)  # type: ignore[arg-type]
                          for n, ha, st in vms])


def test_an_inventory_sent_again_unchanged_moves_nothing_the_reservation_reads() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", [("vm1", True, "running")]))
    s.on_inventory(inv("b", []))
    version = s.capacity_version
    for _ in range(5):
        s.on_inventory(inv("a", [("vm1", True, "running")]))  # only sent_at differs
        s.on_inventory(inv("b", []))
    assert s.capacity_version == version
    s.on_inventory(inv("b", [("vm2", True, "running")]))  # a VM started
    assert s.capacity_version > version
    for change in (inv("b", [("vm2", True, "running")], memory=32768),
                   inv("b", [("vm2", True, "running")], memory=32768, labels=("ssd",)),
                   inv("b", [("vm2", True, "stopped")], memory=32768, labels=("ssd",))):
        before = s.capacity_version
        s.on_inventory(change)
        assert s.capacity_version > before, change
    before = s.capacity_version
    s.on_host_event(HostEvent(host="a", kind="suspect", at=1.0))
    assert s.capacity_version > before
    before = s.capacity_version
    s.on_host_event(HostEvent(host="a", kind="maintenance_on", at=1.0))
    assert s.capacity_version > before


def test_the_reservation_gate_runs_on_change_at_most_once_a_second_and_never_during_a_failover() -> None:
    gate = ReservationGate(every_s=1.0)
    assert gate.due(0, 100.0, failover_busy=False)  # no verdict yet
    gate.done(0, 100.0)
    assert not gate.due(0, 200.0, failover_busy=False)  # nothing changed, however long
    assert not gate.due(1, 100.5, failover_busy=False)  # changed, but checked half a second ago
    assert not gate.due(1, 101.5, failover_busy=True)  # failover work first
    assert gate.due(1, 101.5, failover_busy=False)


def reference_copies(s: SchedulerState) -> dict[str, list[str]]:
    where: dict[str, list[str]] = {}
    for host, report in sorted(s.inventories.items()):
        if s.phases.get(host) == "fenced":
            continue
        for vm in report.vms:
            if vm.state == "running" and host not in where.setdefault(vm.spec.name, []):
                where[vm.spec.name].append(host)
    return {vm: hosts for vm, hosts in where.items() if hosts}


def reference_candidates(s: SchedulerState) -> list[Candidate]:
    out = []
    for host, report in sorted(s.inventories.items()):
        if s.phases.get(host) != "up" or host in s.maintenance:
            continue
        specs = [s.attributes(vm.spec) for vm in report.vms if vm.state == "running"]
        specs += [spec for (_vm, target), spec in s.reserved.items() if target == host]
        out.append(Candidate(host, report.memory_mb, report.vcpus, sum(x.memory_mb for x in specs),
                             sum(x.vcpus for x in specs), frozenset(report.labels),
                             frozenset(g for x in specs for g in x.affinity),
                             frozenset(g for x in specs for g in x.anti_affinity)))
    return out


def test_the_incremental_views_equal_a_walk_over_every_report() -> None:
    rnd = random.Random(12)
    hosts = [f"h{i}" for i in range(6)]
    vms = [f"vm{i}" for i in range(12)]
    for _ in range(30):
        s = SchedulerState()
        boots = {h: 1 for h in hosts}
        incident = 0
        for _ in range(60):
            h = rnd.choice(hosts)
            roll = rnd.random()
            if roll < 0.6:
                report = [(v, rnd.random() < 0.7, rnd.choice(("running", "running", "stopped")))
                          for v in rnd.sample(vms, rnd.randrange(0, 5))]
                if rnd.random() < 0.1:
                    boots[h] += 1
                s.on_inventory(inv(h, report, boot=f"{h}-{boots[h]}", memory=rnd.choice((32768, 65536)),
                                   labels=("ssd",) if rnd.random() < 0.3 else ()))
            elif roll < 0.7:
                s.on_host_event(HostEvent(host=h, kind=rnd.choice(("suspect", "alive", "maintenance_on",
                                                                   "maintenance_off")), at=1.0))
            elif roll < 0.8:
                incident += 1
                s.on_fence_result(FenceResult(request_id=f"r{incident}", incident=f"i{incident}", host=h, term=1,
                                              outcome="confirmed_off", started_at=1.0, finished_at=1.0))
            elif roll < 0.9:
                s.on_host_event(HostEvent(host=h, kind="cleared", at=1.0, by="op"))
            else:
                s.reserved[(rnd.choice(vms), h)] = VmSpec(name="r", memory_mb=512, affinity=["x"])
            assert s.copies() == reference_copies(s)
            assert s.candidates() == reference_candidates(s)
            assert s.ha_vms_by_host() == {
                c.name: [spec for vm in s.inventories[c.name].vms
                         if vm.state == "running" and (spec := s.attributes(vm.spec)).ha]
                for c in reference_candidates(s)}
