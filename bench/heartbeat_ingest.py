"""Heartbeat ingest: the monitor as its own process, pinned to one core, on a
real nats-server, while the fleet simulator (another process, on the other
core) plays N hosts heartbeating once a second.

It passes when the monitor keeps up: no host suspected, no overload alert, its
CPU under one core. Figures: the offered rate, the monitor's CPU, and what that
makes its capacity on one core (offered rate / CPU share, valid because it kept
up). Nothing scrapes the monitor while measured: rendering 50,000 per-host
series takes long enough to show as lag (timed separately).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import nats
from nats.aio.client import Client as NatsClient

from bench.report import Table
from hafence.config import load_config
from hafence.contracts import Decoders
from hafence.lab.fleet import fleet_config, provision
from hafence.lab.natsserver import NatsServer, free_port
from hafence.lab.procs import Service

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pinned(core: int) -> list[str]:
    """``taskset -c CORE`` when the machine has that core and taskset; else nothing."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > core:
        return ["taskset", "-c", str(core)]
    return []


def scrape_seconds(metrics_port: int) -> float:
    """One Prometheus scrape of the monitor: its per-host series are rendered in the monitor's process."""
    t = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        r.read()
    return time.monotonic() - t


@dataclass
class Watch:
    """Suspicions and alerts on the bus, as ``nats sub`` would show them."""

    suspects: list[str] = field(default_factory=list)
    alerts: list[tuple[float, str]] = field(default_factory=list)  # (when received, reason)
    nc: NatsClient | None = None

    async def start(self, url: str) -> None:
        self.nc = await nats.connect(url)

        async def on_suspect(msg: object) -> None:
            self.suspects.append(msg.subject)  # type: ignore[attr-defined]

        async def on_alert(msg: object) -> None:
            alert = Decoders.alert.decode(msg.data)  # type: ignore[attr-defined]
            self.alerts.append((time.monotonic(), f"{alert.kind}: {alert.reason}"))

        await self.nc.subscribe("hafence.host.*.suspect", cb=on_suspect)
        await self.nc.subscribe("hafence.alert.*", cb=on_alert)

    async def wait_heartbeat(self, subject: str, timeout: float = 60) -> None:
        assert self.nc is not None
        sub = await self.nc.subscribe(subject, max_msgs=1)
        await sub.next_msg(timeout=timeout)

    async def leader(self, role: str, timeout: float = 60) -> None:
        assert self.nc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                kv = await self.nc.jetstream().key_value("HAFENCE_leases")
                if role in set(await kv.keys()):
                    return
            except Exception:
                pass
            await asyncio.sleep(0.2)
        raise RuntimeError(f"no {role} leader in {timeout}s")

    async def stop(self) -> None:
        if self.nc is not None:
            await self.nc.close()


@asynccontextmanager
async def fleet_lab(hosts: int, interval_s: float = 1.0,
                    **config: object) -> AsyncIterator[tuple[Path, NatsServer, Path]]:
    with tempfile.TemporaryDirectory(prefix="hafence-bench-") as tmp:
        d = Path(tmp)
        (d / "logs").mkdir()
        server = NatsServer(d / "nats").start()
        if pinned(0) and server.proc is not None:
            # nats-server with the fleet on core 0: core 1 is the monitor's.
            await asyncio.to_thread(subprocess.run, ["taskset", "-a", "-p", "-c", "0", str(server.proc.pid)],
                                    capture_output=True, check=False)
        try:
            path = d / "cluster.toml"
            path.write_text(fleet_config(server.url, d, hosts, heartbeat_interval_s=interval_s, **config))  # type: ignore[arg-type]
            await provision(load_config(str(path)))
            yield d, server, path
        finally:
            server.stop()


@dataclass
class IngestRun:
    offered: float
    cpu_share: float  # of one core, while measured
    scrape_s: float
    suspects: int
    alerts: list[str]  # while measured
    startup_alerts: list[str]  # before: a starting monitor publishes every host's "alive" at once
    stop_s: float


async def run_ingest(hosts: int, measure_s: float, interval_s: float = 1.0) -> IngestRun:
    async with fleet_lab(hosts, interval_s) as (d, server, path):
        watch = Watch()
        await watch.start(server.url)
        fleet = Service("fleet", ["-m", "hafence.lab.fleet", "--config", str(path), "--heartbeats-only"],
                        d / "logs", {}, prefix=pinned(0)).start()
        monitor: Service | None = None
        try:
            # The fleet first: a monitor that starts before anyone heartbeats suspects everyone after its grace.
            await watch.wait_heartbeat(f"hafence.hb.fleet-{hosts:05d}")
            port = free_port()
            env = {"HAFENCE_METRICS_PORT": str(port), "HAFENCE_METRICS_ADDRESS": "127.0.0.1"}
            monitor = Service("heartbeat", ["-m", "hafence.heartbeat", "--config", str(path), "--instance", "hb"],
                              d / "logs", env, prefix=pinned(1)).start()
            try:
                await watch.leader("heartbeat")
            except RuntimeError as err:
                raise RuntimeError(f"{err}\n{monitor.tail(30)}\n{fleet.tail(10)}") from None
            await asyncio.sleep(3 * interval_s + 3.0)  # past the start-up window; every host heard
            # Nothing else touches the monitor while measured (a scrape would: see scrape_s).
            cpu0, t0 = cpu_seconds(monitor.pid), time.monotonic()
            await asyncio.sleep(measure_s)
            cpu1, t1 = cpu_seconds(monitor.pid), time.monotonic()
            scrape_s = scrape_seconds(port)
            # SIGTERM under full load: how long until the process is gone.
            t = time.monotonic()
            monitor.terminate(timeout=30)
            stop_s = time.monotonic() - t
            return IngestRun(hosts / interval_s, (cpu1 - cpu0) / (t1 - t0), scrape_s,
                             len(watch.suspects), [a for t, a in watch.alerts if t0 <= t <= t1],
                             [a for t, a in watch.alerts if t < t0], stop_s)
        finally:
            if monitor is not None:
                monitor.terminate()
            fleet.terminate()
            await watch.stop()


async def heartbeat_ingest(table: Table, quick: bool = False) -> None:
    hosts = 10_000 if quick else 50_000
    runs = [await run_ingest(hosts, 10.0 if quick else 20.0) for _ in range(1 if quick else 3)]
    note = "monitor pinned to one core, fleet simulator and nats-server on the other"
    cpu = [r.cpu_share for r in runs]
    # Kept up (no suspect, no overload while measured): it processed what was offered.
    cap = [r.offered / r.cpu_share for r in runs]
    table.add(f"heartbeat ingest, {hosts:,} hosts at 1/s: offered", f"{runs[0].offered:,.0f}", "hb/s", note)
    table.add("  monitor CPU while keeping up (of one core)", f"{min(cpu):.0%}-{max(cpu):.0%}", "",
              f"{len(runs)} runs")
    table.add("  capacity (offered / CPU share: heartbeats per CPU-second)", f"{min(cap):,.0f}-{max(cap):,.0f}",
              "hb/s", f"{len(runs)} runs")
    table.add("  false suspects (whole run) / overload alerts (while measured)",
              f"{sum(r.suspects for r in runs)} / {sum(len(r.alerts) for r in runs)}", "",
              f"{len(runs)} runs; at start-up: {sum(len(r.startup_alerts) for r in runs)} alerts "
              "(overloaded + recovered)")
    table.add("  SIGTERM to exit under that load", f"{max(r.stop_s for r in runs) * 1000:.0f}", "ms", "worst run")
    table.add(f"  one /metrics scrape of the monitor ({hosts:,} per-host series)",
              f"{max(r.scrape_s for r in runs) * 1000:.0f}", "ms", "worst run; CPU the monitor's loop shares")
