"""Placement of 10,000 VMs from 100 failed hosts onto 1,000 surviving hosts:
the pure core, as the scheduler runs it, with priorities, labels and
anti-affinity groups in the mix. Time and VMs/s, best of 3; the HA
reservation check best of 20."""

from __future__ import annotations

import random
import statistics
import time

from bench.report import Table
from hafence.contracts import VmSpec
from hafence.scheduler.placement import Candidate, largest_host_loss_absorbed, place


def workload(seed: int = 7) -> tuple[list[VmSpec], list[Candidate]]:
    rnd = random.Random(seed)
    vms = [
        VmSpec(name=f"vm-{i:05d}", memory_mb=rnd.choice((1024, 2048, 4096, 8192)), vcpus=rnd.choice((1, 2, 4)),
               ha=True, priority=rnd.choice(("high", "medium", "low")),
               anti_affinity=[f"grp-{rnd.randrange(500)}"] if rnd.random() < 0.2 else [],
               labels=["ssd"] if rnd.random() < 0.1 else [])
        for i in range(10_000)
    ]
    hosts = [
        Candidate(f"host-{i:04d}", 262_144, 64, rnd.randrange(0, 131_072), rnd.randrange(0, 64),
                  frozenset({"ssd"}) if i % 3 == 0 else frozenset())
        for i in range(1_000)
    ]
    return vms, hosts


async def placement(table: Table, quick: bool = False) -> None:
    vms, hosts = workload()
    runs = []
    for strategy in ("spread", "best_fit"):
        best = float("inf")
        for _ in range(1 if quick else 3):
            t = time.perf_counter()
            placed, pending = place(vms, hosts, strategy)  # type: ignore[arg-type]
            best = min(best, time.perf_counter() - t)
        runs.append((strategy, best, len(placed), len(pending)))
    for strategy, seconds, placed_n, pending_n in runs:
        table.add(f"placement 10,000 VMs onto 1,000 hosts ({strategy})", f"{seconds * 1000:.0f}", "ms",
                  f"{placed_n / seconds:,.0f} VMs/s; {placed_n} placed, {pending_n} pending; target 500 ms")
    ha = {h.name: vms[i * 10:(i + 1) * 10] for i, h in enumerate(hosts)}
    checks = []
    for _ in range(3 if quick else 20):
        t = time.perf_counter()
        largest_host_loss_absorbed(hosts, ha)
        checks.append((time.perf_counter() - t) * 1000)
    table.add("HA reservation check (1,000 hosts, 10,000 HA VMs)", f"{min(checks):.1f}", "ms",
              f"best of {len(checks)}, median {statistics.median(checks):.1f}; target 5 ms")
