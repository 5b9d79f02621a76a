"""The agent in process against a real NATS server, with the sim hypervisor and
libvirt's test:///default: agent truth, parallel starts, autostart off,
quarantine, definitions only from the shared storage."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient

from hafence.agent.hypervisor import SimHypervisor
from hafence.agent.service import run as agent
from hafence.contracts import AgentReply, Decoders, HostEvent, Inventory, VmSpec, VmStart, VmStop, encode
from hafence.lab.power import SimPowerSwitch
from tests.conftest import eventually, running
from tests.helpers import read_stream

pytestmark = pytest.mark.timeout(60)

CMD = "hafence.agent.h1.cmd"


async def ask(nc: NatsClient, cmd: VmStart | VmStop, timeout: float = 5.0) -> AgentReply:
    for _ in range(100):  # until the agent (just started in this loop) has subscribed
        try:
            reply = await nc.request(CMD, encode(cmd), timeout=timeout)
            return msgspec.json.decode(reply.data, type=AgentReply)
        except nats.errors.NoRespondersError:
            await asyncio.sleep(0.05)
    raise AssertionError("the agent never subscribed")


async def inventories(nc: NatsClient) -> list[Inventory]:
    return await read_stream(nc, "HAFENCE_EVENTS", "hafence.inventory.h1", Decoders.inventory)


async def test_a_defined_but_shut_off_vm_is_started_not_called_already_running(nc: NatsClient, make_config) -> None:
    sim = SimHypervisor()
    sim.define(VmSpec(name="vm-x", memory_mb=512))  # it ran here once; now it is shut off
    async with running("agent", make_config(), agent, host="h1", hypervisor=sim):
        reply = await ask(nc, VmStart(vm=VmSpec(name="vm-x", memory_mb=512)))
        assert reply.ok and not reply.already  # old agent: already=True, and the VM stayed down
        assert await sim.is_running("vm-x")
        again = await ask(nc, VmStart(vm=VmSpec(name="vm-x", memory_mb=512)))
        assert again.ok and again.already


async def test_starts_run_in_parallel_up_to_the_configured_bound(nc: NatsClient, make_config) -> None:
    sim = SimHypervisor()
    sim.gate = asyncio.Event()  # every start waits here: we count how many wait at once
    config = make_config(extra="[agent]\nmax_parallel_starts = 5\n")
    async with running("agent", config, agent, host="h1", hypervisor=sim):
        asks = [asyncio.create_task(ask(nc, VmStart(vm=VmSpec(name=f"vm-{i}", memory_mb=1)), timeout=20))
                for i in range(12)]
        await eventually(lambda: sim.starting == 5)  # old agent: one at a time, this never comes
        await asyncio.sleep(0.2)  # give a sixth start every chance to slip past the bound
        assert sim.starting == 5 and sim.max_starting == 5
        sim.gate.set()
        replies = await asyncio.gather(*asks)
        assert all(r.ok and not r.already for r in replies) and sim.starts == 12
        assert sim.max_starting == 5


async def test_a_start_asked_again_while_the_first_boots_waits_and_is_already_running(
    nc: NatsClient, make_config
) -> None:
    sim = SimHypervisor()
    sim.gate = asyncio.Event()
    async with running("agent", make_config(), agent, host="h1", hypervisor=sim):
        first = asyncio.create_task(ask(nc, VmStart(vm=VmSpec(name="vm-a", memory_mb=1))))
        await eventually(lambda: sim.starting == 1)
        second = asyncio.create_task(ask(nc, VmStart(vm=VmSpec(name="vm-a", memory_mb=1))))
        await asyncio.sleep(0.2)
        assert sim.starting == 1  # never two boots of one VM
        sim.gate.set()
        a, b = await asyncio.gather(first, second)
        assert a.ok and not a.already and b.ok and b.already and sim.starts == 1


async def test_autostart_is_off_and_a_power_cycled_host_runs_nothing_and_is_quarantined(
    nc: NatsClient, make_config, tmp_path: Path
) -> None:
    """A fence with action "reboot" (off, confirm, on) is over before the host's next
    power poll; the host must still see it was off, and boot running nothing."""
    extra = '[[vms]]\nname = "vm-a"\nhost = "h1"\nmemory_mb = 512\nha = true\n'
    config = make_config(extra=extra)
    sim = SimHypervisor([VmSpec(name="vm-a", memory_mb=512, ha=True)])  # running, autostart on
    power = SimPowerSwitch(tmp_path / "power")
    async with running("agent", config, agent, host="h1", hypervisor=sim, sim_power=str(tmp_path / "power")):
        await eventually(lambda: not sim.autostart)  # old agent: left on, vm-a runs again at boot
        await eventually(inventories_with(nc, lambda i: i.quarantined and len(i.vms) == 1))
        first = (await inventories(nc))[-1]
        power.switch("h1", "off")
        power.switch("h1", "on")  # off and on again between two polls
        await eventually(inventories_with(nc, lambda i: i.boot_id != first.boot_id))
        rebooted = (await inventories(nc))[-1]
        assert rebooted.quarantined
        assert [(vm.spec.name, vm.state) for vm in rebooted.vms] == [("vm-a", "stopped")]
        assert not await sim.is_running("vm-a")


async def test_a_cleared_event_for_this_boot_lifts_the_agents_quarantine(nc: NatsClient, make_config) -> None:
    async with running("agent", make_config(), agent, host="h1", hypervisor=SimHypervisor()):
        await eventually(inventories_with(nc, lambda i: i.quarantined))
        boot = (await inventories(nc))[-1].boot_id
        js = nc.jetstream()
        stale = HostEvent(host="h1", kind="cleared", at=0.0, by="alice", boot_id="an-older-boot")
        await js.publish("hafence.host.h1.cleared", encode(stale))
        await asyncio.sleep(0.3)
        assert (await inventories(nc))[-1].quarantined  # a clear for another boot does not count
        await js.publish("hafence.host.h1.cleared",
                         encode(HostEvent(host="h1", kind="cleared", at=0.0, by="alice", boot_id=boot)))
        await eventually(inventories_with(nc, lambda i: not i.quarantined and i.boot_id == boot))


async def test_a_definition_is_taken_only_from_the_shared_storage_directory(
    nc: NatsClient, make_config, tmp_path: Path
) -> None:
    defs = tmp_path / "defs"
    defs.mkdir()
    (defs / "vm-a.xml").write_text("<domain/>")
    (tmp_path / "elsewhere.xml").write_text("<domain/>")
    sim = SimHypervisor()
    config = make_config(extra=f'[storage]\ndefinitions_dir = "{defs}"\n')
    async with running("agent", config, agent, host="h1", hypervisor=sim):
        for definition in ("<domain><name>vm-a</name></domain>", str(tmp_path / "elsewhere.xml"),
                           f"{defs}/../elsewhere.xml"):
            reply = await ask(nc, VmStart(vm=VmSpec(name="vm-a", memory_mb=1, definition=definition)))
            assert not reply.ok and "definitions_dir" in reply.error, definition
        assert sim.starts == 0
        reply = await ask(nc, VmStart(vm=VmSpec(name="vm-a", memory_mb=1, definition=str(defs / "vm-a.xml"))))
        assert reply.ok


def inventories_with(nc: NatsClient, predicate):  # type: ignore[no-untyped-def]
    async def check() -> bool:
        try:
            found = await inventories(nc)
        except Exception:
            return False
        return bool(found) and predicate(found[-1])

    return check
