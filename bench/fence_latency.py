"""Fence latency against the same simulated BMC: hafence's IPMI driver (off,
then status reads until off) against ClusterLabs' fence_ipmilan given its
best settings (lanplus, cipher suite 3 named, --power-wait=0).

The simulated host takes OFF_DELAY to read off after the command, like a PSU
draining; both tools face the same delay. Median of N fences each."""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.report import Table
from hafence.config import IpmiDevice
from hafence.fencer.executor import Executor, Target
from hafence.lab.peers import bmc_sim, free_udp_port
from hafence.lab.power import SimPowerSwitch

OFF_DELAY = 0.2


async def fence_latency(table: Table, quick: bool = False) -> None:
    n = 5 if quick else 25
    with tempfile.TemporaryDirectory(prefix="hafence-bench-") as tmp:
        d = Path(tmp)
        password = d / "pw"
        password.write_text("bench-s3cret")
        port = free_udp_port()
        power = SimPowerSwitch(d / "power")
        peer = bmc_sim(d, d / "power", password, {"h1": port}, off_delay=OFF_DELAY).start()
        try:
            ours = await _ours(n, port, password, power)
            theirs = _fence_ipmilan(n, port, power)
        finally:
            peer.stop()
    note = f"simulated BMC, off takes {OFF_DELAY * 1000:.0f} ms"
    table.add("fence latency, hafence ipmi driver (off + confirmed) median", f"{statistics.median(ours):.1f}", "ms",
              f"n={n}, {note}")
    if theirs:
        table.add("fence latency, fence_ipmilan --power-wait=0 -C 3 median", f"{statistics.median(theirs):.1f}",
                  "ms", f"n={n}, same BMC")
        table.add("  ratio fence_ipmilan / hafence", f"{statistics.median(theirs) / statistics.median(ours):.1f}",
                  "x", "")
    else:
        table.add("fence latency, fence_ipmilan", "n/a", "", "fence_ipmilan not installed")


async def _ours(n: int, port: int, password: Path, power: SimPowerSwitch) -> list[float]:
    from hafence.config import parse_config

    config = parse_config("")
    executor = Executor(config)
    device = IpmiDevice(address="127.0.0.1", port=port, username="admin", password_file=str(password),
                        power_timeout_s=10.0, retries=0)
    target = Target("bmc", device, "h1")
    await executor.check(target, 1)  # warm: the health check has logged in already in a running fencer
    out = []
    try:
        for _ in range(n):
            power.switch("h1", "on")
            t = time.perf_counter()
            evidence = await executor.operate(target, 1, "off")
            out.append((time.perf_counter() - t) * 1000)
            assert evidence.confirmed and evidence.power_read == "off", evidence
    finally:
        await executor.close()
    return out


def _fence_ipmilan(n: int, port: int, power: SimPowerSwitch) -> list[float]:
    agent = shutil.which("fence_ipmilan") or "/usr/sbin/fence_ipmilan"
    if not os.path.exists(agent):
        return []
    out = []
    for _ in range(n):
        power.switch("h1", "on")
        t = time.perf_counter()
        result = subprocess.run(
            [agent, "--ip", "127.0.0.1", "--ipport", str(port), "--username", "admin", "--password", "bench-s3cret",
             "--lanplus", "--cipher", "3", "--power-wait=0", "--action", "off"],
            capture_output=True, text=True, timeout=60,
        )
        out.append((time.perf_counter() - t) * 1000)
        assert result.returncode == 0 and power.read("h1") == "off", result.stdout + result.stderr
    return out


if __name__ == "__main__":
    t = Table()
    asyncio.run(fence_latency(t))
    print(t.render())
