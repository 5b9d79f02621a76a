"""VM-level HA through the real agent and scheduler, in process, on a real NATS
server: an HA VM that fails on a live host is restarted on that host, then
elsewhere (only after its host confirmed the stop), then no more (restart limit,
alert), with the events, the trace and ``hafence status`` to show for it; with
the sim driver and with libvirt's test:///default (a destroy is a kill)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from hafence.agent.hypervisor import SimHypervisor
from hafence.agent.service import run as agent
from hafence.config import parse_config
from hafence.contracts import Alert, Decoders, VmEvent, VmSpec, VmStart, VmStop
from hafence.lab.natsserver import NatsServer
from hafence.scheduler.service import run as scheduler
from tests.conftest import cluster_toml, eventually, running
from tests.helpers import read_stream

pytestmark = pytest.mark.timeout(120)

POLICY = """
[scheduler]
vm_max_restarts = 2
vm_restart_backoff_s = 0.3

[[vms]]
name = "vm-a"
host = "h1"
memory_mb = 1024
ha = true
"""


async def events(nc: NatsClient, subject: str) -> list[VmEvent]:
    try:
        return await read_stream(nc, "HAFENCE_EVENTS", subject, Decoders.vm_event)
    except Exception:
        return []


async def wait_event(nc: NatsClient, subject: str, count: int = 1) -> list[VmEvent]:
    async def enough() -> bool:
        return len(await events(nc, subject)) >= count

    await eventually(enough, timeout=20)
    return await events(nc, subject)


async def reported(nc: NatsClient, hosts: set[str]) -> bool:
    try:
        found = await read_stream(nc, "HAFENCE_EVENTS", "hafence.inventory.*", Decoders.inventory)
    except Exception:
        return False
    return hosts <= {i.host for i in found}


async def headers_of(nc: NatsClient, subject: str) -> list[dict[str, str]]:
    js = nc.jetstream()
    info = await js.stream_info("HAFENCE_EVENTS")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("HAFENCE_EVENTS", seq)
        if msg.subject == subject:
            out.append(dict(msg.headers or {}))
    return out


def trace_id(headers: dict[str, str]) -> str:
    return headers.get("traceparent", "").split("-")[1] if headers.get("traceparent") else ""


async def test_a_crash_looping_vm_restarts_on_its_host_then_elsewhere_then_raises_its_limit(
    nc: NatsClient, nats_server: NatsServer, tmp_path: Path
) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(cluster_toml(nats_server.url, tmp_path, 2, POLICY))
    config = parse_config(path.read_text(), str(path))
    h1 = SimHypervisor([VmSpec(name="vm-a", memory_mb=1024, ha=True)])
    h2 = SimHypervisor()
    commands: list[tuple[str, VmStart | VmStop]] = []

    async def record(msg: Msg) -> None:
        commands.append((msg.subject.split(".")[2], Decoders.agent_command.decode(msg.data)))

    await nc.subscribe("hafence.agent.*.cmd", cb=record)
    async with (
        running("scheduler", config, scheduler),
        running("agent", config, agent, host="h1", instance="agent-h1", hypervisor=h1),
        running("agent", config, agent, host="h2", instance="agent-h2", hypervisor=h2),
    ):
        await eventually(lambda: reported(nc, {"h1", "h2"}), timeout=20)

        # 1. It crashes on h1 (a live host): announced, restarted on h1.
        h1.crash("vm-a", "crashed")
        [crashed] = await wait_event(nc, "hafence.vm.vm-a.crashed")
        assert crashed.from_host == "h1" and crashed.reason.startswith("crashed on h1")
        [restarted] = await wait_event(nc, "hafence.vm.vm-a.restarted")
        assert (restarted.target, restarted.from_host) == ("h1", "h1")
        assert await h1.is_running("vm-a") and not await h2.is_running("vm-a")
        # The restart is in the trace the agent's failure report began.
        [failure_report] = [h for h in await headers_of(nc, "hafence.inventory.h1") if trace_id(h)][-1:]
        [restart_headers] = await headers_of(nc, "hafence.vm.vm-a.restarted")
        assert trace_id(restart_headers) == trace_id(failure_report) != ""

        # 2. Killed again: the one same-host restart is used, so it moves to h2, and only
        # after h1 answered a stop of it (S0).
        h1.crash("vm-a", "killed")
        second = (await wait_event(nc, "hafence.vm.vm-a.restarted", 2))[-1]
        assert second.target == "h2"
        assert await h2.is_running("vm-a") and not await h1.is_running("vm-a")
        ordered = [(host, type(cmd).__name__) for host, cmd in commands]
        assert ordered[-2:] == [("h1", "VmStop"), ("h2", "VmStart")], ordered

        # 3. It panics on h2: two restarts in the window, the limit: no third, an alert.
        await eventually(lambda: reported(nc, {"h2"}), timeout=10)
        await asyncio.sleep(0.5)  # h2's report of vm-a running reaches the scheduler
        h2.crash("vm-a", "panicked")
        [limit] = await wait_event(nc, "hafence.vm.vm-a.restart_limit")
        assert "2 restarts" in limit.reason
        [alert] = await read_stream(nc, "HAFENCE_EVENTS", "hafence.alert.vm_restart_limit", Decoders.alert)
        assert isinstance(alert, Alert) and (alert.vm, alert.host) == ("vm-a", "h2")
        await asyncio.sleep(1.0)
        assert not await h1.is_running("vm-a") and not await h2.is_running("vm-a")
        assert len(await events(nc, "hafence.vm.vm-a.restarted")) == 2

        # `hafence status` shows the VM down with why, and the alert.
        status = _hafence("status", "--json", "--config", str(path))
        payload = msgspec.json.decode(status.stdout)
        [row] = [v for v in payload["vms"] if v["name"] == "vm-a"]
        assert row["state"] == "failed" and "restart limit" in row["note"], row
        assert any(a.startswith("vm vm-a: not restarted any more") for a in payload["alerts"]), payload["alerts"]


async def test_a_guest_shutdown_stays_down_by_default(nc: NatsClient, make_config) -> None:  # type: ignore[no-untyped-def]
    config = make_config(2, POLICY)
    h1 = SimHypervisor([VmSpec(name="vm-a", memory_mb=1024, ha=True)])
    async with (
        running("scheduler", config, scheduler),
        running("agent", config, agent, host="h1", instance="agent-h1", hypervisor=h1),
        running("agent", config, agent, host="h2", instance="agent-h2", hypervisor=SimHypervisor()),
    ):
        await eventually(lambda: reported(nc, {"h1", "h2"}), timeout=20)
        h1.crash("vm-a", "guest_shutdown")

        async def reported_stopped() -> bool:
            found = await read_stream(nc, "HAFENCE_EVENTS", "hafence.inventory.h1", Decoders.inventory)
            return any(v.stop_reason == "guest_shutdown" for v in found[-1].vms)

        await eventually(reported_stopped, timeout=10)
        await asyncio.sleep(1.0)  # several scheduler rounds
        assert await events(nc, "hafence.vm.*.*") == [] and not await h1.is_running("vm-a")


try:
    import libvirt
except ImportError:
    libvirt = None

XML = """<domain type='test'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <metadata><hafence:vm xmlns:hafence="https://hafence.dev/xmlns/vm/1" ha="true"/></metadata>
  <os><type>hvm</type></os>
</domain>"""


@pytest.mark.skipif(libvirt is None and os.environ.get("HAFENCE_REQUIRE_PEERS") != "1",
                    reason="libvirt-python not installed")
async def test_libvirt_a_domain_destroyed_behind_the_agents_back_is_reported_killed_and_restarted(
    nc: NatsClient, make_config
) -> None:
    from hafence.agent.libvirt_driver import LibvirtHypervisor

    name = "ha-kill-1"
    hv = LibvirtHypervisor("test:///default")
    other = libvirt.open("test:///default")  # someone else on the host (virsh destroy)
    dom = other.defineXML(XML.format(name=name))
    dom.create()
    config = make_config(1, "[scheduler]\nvm_restart_backoff_s = 0.1\n")
    try:
        async with (
            running("scheduler", config, scheduler),
            running("agent", config, agent, host="h1", instance="agent-h1", hypervisor=hv),
        ):
            await eventually(lambda: reported(nc, {"h1"}), timeout=20)
            await asyncio.sleep(0.5)  # the scheduler has seen it running on h1
            dom.destroy()
            [crashed] = await wait_event(nc, f"hafence.vm.{name}.crashed")
            assert crashed.reason.startswith("killed on h1")
            [restarted] = await wait_event(nc, f"hafence.vm.{name}.restarted")
            assert restarted.target == "h1" and dom.isActive()
    finally:
        hv.close()
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        other.close()


@pytest.mark.skipif(libvirt is None and os.environ.get("HAFENCE_REQUIRE_PEERS") != "1",
                    reason="libvirt-python not installed")
async def test_libvirt_lifecycle_events_wake_the_agent_and_state_reasons_say_why() -> None:
    from hafence.agent.libvirt_driver import LibvirtHypervisor

    name = "ha-events-1"
    hv = LibvirtHypervisor("test:///default")
    woken = asyncio.Event()
    hv.on_change(woken.set)
    other = libvirt.open("test:///default")
    dom = other.defineXML(XML.format(name=name))
    try:
        dom.create()
        await asyncio.wait_for(woken.wait(), 5)  # the start is an event
        woken.clear()
        dom.destroy()
        await asyncio.wait_for(woken.wait(), 5)  # so is the kill: no poll needed
        vms = {v.spec.name: v for v in await hv.list_vms()}
        assert (vms[name].state, vms[name].stop_reason) == ("stopped", "killed")
        dom.create()
        dom.shutdown()  # the test driver's shutdown is the guest's own
        vms = {v.spec.name: v for v in await hv.list_vms()}
        assert vms[name].stop_reason == "guest_shutdown"
    finally:
        hv.close()
        if dom.isActive():
            dom.destroy()
        dom.undefine()
        other.close()


def _hafence(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hafence.cli", *args], capture_output=True, text=True, timeout=60)
