"""S6 and "a VM definition is never taken from an agent's word", through the real
services in process on a real NATS server: a host fenced with action "reboot"
comes back running a VM that was restarted elsewhere; the scheduler sees it
twice, alerts, stops the copy on the fenced host, and keeps the host out of
placement until it is clean and an operator clears it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from hafence.agent.hypervisor import SimHypervisor
from hafence.agent.service import run as agent
from hafence.arbiter.service import run as arbiter
from hafence.config import parse_config
from hafence.contracts import Alert, Decoders, HostEvent, Inventory, VmEvent, VmSpec, VmStart
from hafence.fencer.service import run as fencer
from hafence.heartbeat.service import run as heartbeat
from hafence.lab.natsserver import NatsServer
from hafence.scheduler.service import run as scheduler
from tests.conftest import cluster_toml, eventually, running
from tests.helpers import read_stream

pytestmark = pytest.mark.timeout(120)

EVIL = "<domain type='kvm'><name>vm-b</name><devices><disk><source dev='/dev/sda'/></disk></devices></domain>"


async def events(nc: NatsClient, subject: str, decoder: msgspec.json.Decoder) -> list:  # type: ignore[type-arg]
    try:
        return await read_stream(nc, "HAFENCE_EVENTS", subject, decoder)
    except Exception:
        return []


async def test_a_fenced_host_back_with_a_restarted_vm_is_stopped_there_and_quarantined_until_cleared(
    nc: NatsClient, nats_server: NatsServer, tmp_path: Path
) -> None:
    defs = tmp_path / "defs"
    extra = f"""
[arbiter]
action = "reboot"

[storage]
definitions_dir = "{defs}"

[[vms]]
name = "vm-a"
host = "h1"
memory_mb = 1024
ha = true
definition = "{defs}/vm-a-prod.xml"
"""
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml(nats_server.url, tmp_path, 3, extra))
    config = parse_config(path.read_text(), str(path))
    power = str(tmp_path / "power")
    # h1 reports vm-a (the config knows it) and vm-b (only h1 says it exists, HA,
    # with its own domain XML attaching the host's disk): neither XML may travel.
    h1 = SimHypervisor([VmSpec(name="vm-a", memory_mb=1, ha=True, definition=EVIL),
                        VmSpec(name="vm-b", memory_mb=64, ha=True, definition=EVIL)])
    starts: list[VmStart] = []

    async def record(msg: Msg) -> None:
        cmd = Decoders.agent_command.decode(msg.data)
        if isinstance(cmd, VmStart):
            starts.append(cmd)

    await nc.subscribe("hafence.agent.*.cmd", cb=record)
    agents = {h: dict(host=h, instance=f"agent-{h}", sim_power=power, boot_vms=True) for h in ("h2", "h3")}
    async with (
        running("fencer", config, fencer),
        running("heartbeat", config, heartbeat),
        running("arbiter", config, arbiter),
        running("scheduler", config, scheduler),
        running("agent", config, agent, **agents["h2"]),
        running("agent", config, agent, **agents["h3"]),
    ):
        async with running("agent", config, agent, host="h1", instance="agent-h1", sim_power=power, hypervisor=h1):
            await eventually(lambda: _all_reported(nc), timeout=20)
            first_boot = [i for i in await events(nc, "hafence.inventory.h1", Decoders.inventory)][-1].boot_id
            await _sleep(config.timings.detection_window_s * 2)  # the arbiter's start-up grace
        # h1's agent is gone: h1 is suspect, fenced (off, confirmed, on again) and its HA VMs restart.
        await eventually(lambda: _started(nc, {"vm-a", "vm-b"}), timeout=30)
        assert {s.vm.name: s.vm.definition for s in starts} == {
            "vm-a": f"{defs}/vm-a-prod.xml",  # the config's own definition
            "vm-b": f"{defs}/vm-b.xml",  # the shared storage's, never h1's XML
        }

        # h1 boots again and something (autostart, a person) runs vm-a there: a second copy.
        back = SimHypervisor([VmSpec(name="vm-a", memory_mb=1024, ha=True)])
        async with running("agent", config, agent, host="h1", instance="agent-h1b", sim_power=power,
                           hypervisor=back):
            duplicates = await _wait_events(nc, "hafence.vm.vm-a.duplicate", Decoders.vm_event)
            assert "h1" in duplicates[0].reason and duplicates[0].target == "h1"
            [alert] = await _wait_events(nc, "hafence.alert.vm_duplicate", Decoders.alert)
            assert isinstance(alert, Alert) and (alert.vm, alert.host) == ("vm-a", "h1")
            [stopped] = await _wait_events(nc, "hafence.vm.vm-a.stopped", Decoders.vm_event)
            assert isinstance(stopped, VmEvent) and stopped.target == "h1"
            assert not await back.is_running("vm-a")  # the copy on the fenced host, not the restarted one

            # Quarantined: reported by the agent and shown by `hafence status`, until cleared.
            def latest_h1(check):  # type: ignore[no-untyped-def]
                async def probe() -> bool:
                    found = await events(nc, "hafence.inventory.h1", Decoders.inventory)
                    return bool(found) and found[-1].boot_id != first_boot and check(found[-1])
                return probe

            await eventually(latest_h1(lambda i: i.quarantined and not _running(i)), timeout=10)
            status = _hafence("status", "--json", "--config", str(path))
            [row] = [h for h in msgspec.json.decode(status.stdout)["hosts"] if h["name"] == "h1"]
            assert row["state"] == "quarantined" and row["quarantined"], row
            cleared = _hafence("host", "clear", "h1", "--reason", "checked: vm-a runs on h2/h3 only",
                               "--by", "alice", "--config", str(path))
            assert cleared.returncode == 0, cleared.stderr
            await eventually(latest_h1(lambda i: not i.quarantined), timeout=10)
            [event] = [e for e in await events(nc, "hafence.host.h1.cleared", Decoders.host_event)
                       if isinstance(e, HostEvent) and e.by == "alice"]
            assert event.reason == "checked: vm-a runs on h2/h3 only"
            status = _hafence("status", "--json", "--config", str(path))
            [row] = [h for h in msgspec.json.decode(status.stdout)["hosts"] if h["name"] == "h1"]
            assert row["state"] == "up" and not row["quarantined"], row


def _running(inv: Inventory) -> list[str]:
    return [vm.spec.name for vm in inv.vms if vm.state == "running"]


async def _all_reported(nc: NatsClient) -> bool:
    reports = await events(nc, "hafence.inventory.*", Decoders.inventory)
    return {"h1", "h2", "h3"} <= {r.host for r in reports}


async def _started(nc: NatsClient, vms: set[str]) -> bool:
    found = await events(nc, "hafence.vm.*.started", Decoders.vm_event)
    return vms <= {e.vm for e in found}


async def _wait_events(nc: NatsClient, subject: str, decoder: msgspec.json.Decoder) -> list:  # type: ignore[type-arg]
    async def some() -> bool:
        return bool(await events(nc, subject, decoder))

    await eventually(some, timeout=15)
    return await events(nc, subject, decoder)


async def _sleep(seconds: float) -> None:
    import asyncio

    await asyncio.sleep(seconds)


def _hafence(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hafence.cli", *args], capture_output=True, text=True, timeout=60)
