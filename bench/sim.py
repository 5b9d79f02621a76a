"""The deterministic simulation's speed: simulated cluster-minutes per real second.

One seed's run as ``python -m hafence.sim`` does it (fault plan drawn from the
seed, checkers after every step, the event log not kept), for a 20-host cluster
and for the 5-host cluster ``make test`` runs 300 of. CPU seconds are reported
beside wall seconds: on a shared machine the wall clock also counts other work.
"""

from __future__ import annotations

import time

from bench.report import Table
from hafence.sim.run import run_seed


def _one(seed: int, minutes: float, hosts: int) -> tuple[float, float, int, int, str]:
    wall, cpu = time.perf_counter(), time.process_time()
    result = run_seed(seed, minutes, hosts, keep_log=False)
    return (time.perf_counter() - wall, time.process_time() - cpu, result.steps, result.faults,
            "ok" if result.ok else f"violated {result.rule}")


async def sim(table: Table, quick: bool = False) -> None:
    minutes = 2.0 if quick else 10.0
    for hosts, seeds in ((20, (1,) if quick else (1, 2, 3)), (5, (1,) if quick else (1, 2, 3, 4, 5))):
        runs = [_one(seed, minutes, hosts) for seed in seeds]
        wall = sum(r[0] for r in runs)
        cpu = sum(r[1] for r in runs)
        steps = sum(r[2] for r in runs)
        faults = sum(r[3] for r in runs)
        verdicts = ", ".join(sorted({r[4] for r in runs}))
        cluster_minutes = minutes * len(runs)
        table.add(f"simulation, {hosts}-host cluster", f"{cluster_minutes / wall:.1f}", "cluster-min/s",
                  f"{cluster_minutes / cpu:.1f} per CPU-s; {wall / len(runs):.2f} s ({cpu / len(runs):.2f} CPU-s) "
                  f"per {minutes:g}-min seed; {steps / wall:,.0f} steps/s; seeds {seeds[0]}-{seeds[-1]}, "
                  f"{faults} faults, {verdicts}")
