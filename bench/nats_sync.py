"""The cost of JetStream's ``sync_interval: always`` (fsync before every ack),
which the generated nats.conf sets so that an acknowledged fence request or
result survives a power loss of the NATS host.

The same nats-server, a file-backed stream of 256-byte messages (a fence
request's size), acked publishes: one at a time (the latency a service sees on
each publish) and 16 in flight (the rate the server sustains). With the
server's default (flush every 2 minutes, i.e. whatever the page cache holds) and
with ``always``."""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

import nats

from bench.report import Table, percentile
from hafence.lab.natsserver import NatsServer, free_port

PAYLOAD = b"x" * 256
IN_FLIGHT = 16


async def nats_sync(table: Table, quick: bool = False) -> None:
    n = 200 if quick else 2000
    for label, sync in (("default (2m)", ""), ("always", "always")):
        latencies, sequential_rate, parallel_rate = await _measure(n, sync)
        note = f"n={n}, 256 B, file storage, sync_interval {label}"
        table.add(f"JetStream acked publish, sync {label}, p50", f"{percentile(latencies, 50):.2f}", "ms", note)
        table.add(f"JetStream acked publish, sync {label}, p99", f"{percentile(latencies, 99):.2f}", "ms", "")
        table.add(f"JetStream acked publish, sync {label}, 1 in flight", f"{sequential_rate:.0f}", "msg/s", "")
        table.add(f"JetStream acked publish, sync {label}, {IN_FLIGHT} in flight", f"{parallel_rate:.0f}", "msg/s",
                  "")


def synced_server(nats_dir: Path, store_dir: Path, sync: str, http_port: int | None = None) -> NatsServer:
    """A nats-server (not started) whose config file sets JetStream's ``sync_interval``
    (empty: the server's default)."""
    conf = nats_dir.parent / "nats.conf"
    server = NatsServer(nats_dir, config_file=str(conf))
    conf.write_text("\n".join([
        f"port: {server.port}", *([f"http_port: {http_port}"] if http_port else []),
        "jetstream {", f'  store_dir: "{store_dir}"', *([f"  sync_interval: {sync}"] if sync else []), "}", "",
    ]))
    return server


async def _measure(n: int, sync: str) -> tuple[list[float], float, float]:
    with tempfile.TemporaryDirectory(prefix="hafence-bench-sync-") as tmp:
        d = Path(tmp)
        server = synced_server(d / "nats", d / "js", sync, http_port=free_port())
        server.start()
        try:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await js.add_stream(name="BENCH", subjects=["bench.>"])
                for _ in range(50):  # warm up: file creation, first blocks
                    await js.publish("bench.warm", PAYLOAD)
                latencies = []
                t0 = time.perf_counter()
                for i in range(n):
                    t = time.perf_counter()
                    await js.publish(f"bench.seq.{i % 64}", PAYLOAD)
                    latencies.append((time.perf_counter() - t) * 1000)
                sequential_rate = n / (time.perf_counter() - t0)
                slots = asyncio.Semaphore(IN_FLIGHT)

                async def one(i: int) -> None:
                    async with slots:
                        await js.publish(f"bench.par.{i % 64}", PAYLOAD)

                t0 = time.perf_counter()
                async with asyncio.TaskGroup() as tg:
                    for i in range(n):
                        tg.create_task(one(i))
                parallel_rate = n / (time.perf_counter() - t0)
            finally:
                await nc.close()
        finally:
            server.stop()
    return latencies, sequential_rate, parallel_rate
