"""Whole-cluster failover at scale: 1,000 hosts played by the fleet simulator,
10,000 HA VMs (10 per host), every hafence service as its own process on a
real nats-server. Ten hosts hang at once; the figure is the time from the
failure to the last of their 100 VMs acknowledged running elsewhere, over 5
incidents (ten different hosts each time), and each service's peak memory.

Heartbeat interval 1 s, 3 missed (detection 3-4 s); fences through the ``sim``
power switch (50 ms to read off); ``max_concurrent_fences = 10`` so the ten
are fenced together. Target: detection + slowest device + 1 s.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg

from bench.heartbeat_ingest import Watch, fleet_lab, pinned
from bench.report import Table, percentile
from hafence.contracts import Decoders
from hafence.lab.fleet import FleetProcess
from hafence.lab.procs import Service

HOSTS, VMS_PER_HOST, FAIL = 1000, 10, 10
SERVICES = ("heartbeat", "arbiter", "fencer", "scheduler")
WINDOW_S = 3.0


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def failover_scale(table: Table, quick: bool = False) -> None:
    runs = 2 if quick else 5
    extra = "[arbiter]\nmax_concurrent_fences = 10\n"
    async with fleet_lab(HOSTS, 1.0, vms_per_host=VMS_PER_HOST, vm_memory_mb=4096, extra=extra) as (d, server, path):
        watch = Watch()
        await watch.start(server.url)
        fleet = FleetProcess(path, d / "logs", "--sim-power", str(d / "power"), prefix=pinned(0))
        services: dict[str, Service] = {}
        started: dict[str, float] = {}
        suspected: dict[str, float] = {}
        fenced: dict[str, float] = {}
        verdict = asyncio.Event()
        nc = await nats.connect(server.url)

        async def on_started(msg: Msg) -> None:
            event = Decoders.vm_event.decode(msg.data)
            started.setdefault(event.vm, time.time())

        async def on_verdict(msg: Msg) -> None:
            verdict.set()

        async def on_suspect(msg: Msg) -> None:
            suspected.setdefault(msg.subject.split(".")[2], time.time())

        async def on_fence_result(msg: Msg) -> None:
            result = Decoders.fence_result.decode(msg.data)
            if result.outcome == "confirmed_off":
                fenced.setdefault(result.host, time.time())

        try:
            await nc.subscribe("hafence.vm.*.started", cb=on_started)
            await nc.subscribe("hafence.host.*.suspect", cb=on_suspect)
            await nc.subscribe("hafence.fence.result.*", cb=on_fence_result)
            # The scheduler's first HA reservation verdict: it has every host's inventory.
            await nc.subscribe("hafence.host.*.ha_reservation_ok", cb=on_verdict)
            await nc.subscribe("hafence.host.*.ha_reservation_lost", cb=on_verdict)
            await watch.wait_heartbeat(f"hafence.hb.fleet-{HOSTS:05d}")
            for name in SERVICES:
                services[name] = Service(name, ["-m", f"hafence.{name}", "--config", str(path), "--instance", name],
                                         d / "logs", {"HAFENCE_METRICS_PORT": "0"}).start()
            for role in ("heartbeat", "arbiter", "scheduler"):
                await watch.leader(role, timeout=120)
            await asyncio.wait_for(verdict.wait(), timeout=120)
            await asyncio.sleep(WINDOW_S + 2.0)  # the arbiter's start-up grace; the start-up events settle
            totals, detections, after, scheduling = [], [], [], []
            for run in range(runs):
                victims = [f"fleet-{run * FAIL + i + 1:05d}" for i in range(FAIL)]
                names = {f"vm-{run * FAIL + i + 1:05d}-{j:03d}" for i in range(FAIL) for j in range(VMS_PER_HOST)}
                mark = len(watch.suspects)
                t0 = time.time()
                fleet.fail(*victims)
                deadline = time.monotonic() + 90
                while not names <= started.keys():
                    if time.monotonic() > deadline:
                        missing = sorted(names - started.keys())
                        raise RuntimeError(f"failover incomplete: {len(missing)} VMs not started, e.g. {missing[:3]}"
                                           f"\n{services['scheduler'].tail(10)}")
                    await asyncio.sleep(0.05)
                last = max(started[n] for n in names)
                totals.append(last - t0)
                detected = max(suspected[v] for v in victims)
                detections.append(detected - t0)
                after.append(last - detected)
                scheduling.append(last - max(fenced[v] for v in victims))
                if len(watch.suspects) - mark != FAIL:
                    raise RuntimeError(f"{len(watch.suspects) - mark} hosts suspected, {FAIL} failed")
                await asyncio.sleep(2.0)
            memory = {name: peak_rss_mb(svc.pid) for name, svc in services.items()}
            # The fleet still heartbeating and reporting: every service is told to stop at once.
            stops = await sigterm_all(services)
        finally:
            await nc.close()
            for svc in services.values():
                svc.terminate()
            fleet.stop()
            await watch.stop()
    table.add_distribution(f"failover at scale: {FAIL} of {HOSTS:,} hosts fail -> their {FAIL * VMS_PER_HOST} VMs "
                           "running", [t * 1000 for t in totals], "ms",
                           f"{HOSTS * VMS_PER_HOST:,} VMs; runs: {', '.join(f'{t:.1f}s' for t in totals)}")
    table.add("  of which detection (failure -> last of the ten suspect)", f"{percentile(detections, 50) * 1000:.0f}",
              "ms", f"p50; heartbeats 1/s, {WINDOW_S:g}s window: the failure's phase in the interval varies it")
    table.add("  of which last suspect -> last VM running (fence 50 ms included)",
              f"{percentile(after, 50) * 1000:.0f}", "ms",
              f"p50; p99 {percentile(after, 99) * 1000:.0f}; target: device + 1,000 ms")
    table.add("  of which last fence confirmed -> last VM running (scheduler, agents)",
              f"{percentile(scheduling, 50) * 1000:.0f}", "ms", f"p50; p99 {percentile(scheduling, 99) * 1000:.0f}")
    for name, mb in memory.items():
        table.add(f"  peak memory, {name}", f"{mb:.0f}", "MiB", "VmHWM")
    for name, took in stops.items():
        table.add(f"  SIGTERM -> exit under the fleet, {name}", f"{took * 1000:.0f}" if took is not None else "> 10 s",
                  "ms", "all services at once, the fleet still running; the rule: 2,000 ms")


async def sigterm_all(services: dict[str, Service], limit_s: float = 10.0) -> dict[str, float | None]:
    """SIGTERM to every service at once; how long each took to exit (None: not within
    ``limit_s``, then it is killed by the caller's clean-up)."""
    t0 = time.monotonic()
    for svc in services.values():
        svc.signal(signal.SIGTERM)
    took: dict[str, float | None] = dict.fromkeys(services)
    while time.monotonic() - t0 < limit_s and any(v is None for v in took.values()):
        for name, svc in services.items():
            if took[name] is None and not svc.alive():
                took[name] = time.monotonic() - t0
        await asyncio.sleep(0.01)
    return took
