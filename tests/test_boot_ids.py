"""Boot ids ride through the incident (S6): the monitor's suspect names the boot
it last heard from, the arbiter's request and its fence_requested/fenced events
carry it, the fencer's result carries it, and the scheduler folds the result
against that boot's inventory, whatever the host reported since."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from hafence.agent.hypervisor import SimHypervisor
from hafence.agent.service import run as agent
from hafence.arbiter.service import run as arbiter
from hafence.config import parse_config
from hafence.contracts import Decoders, FenceRequest, FenceResult, HostEvent, Inventory, VmInfo, VmSpec
from hafence.fencer.service import run as fencer
from hafence.heartbeat.liveness import Liveness
from hafence.heartbeat.service import run as heartbeat
from hafence.lab.natsserver import NatsServer
from hafence.scheduler.service import run as scheduler
from hafence.scheduler.state import SchedulerState
from tests.conftest import cluster_toml, eventually, running
from tests.helpers import read_stream

pytestmark = pytest.mark.timeout(120)


def inv(host: str, boot: str, *vms: str) -> Inventory:
    return Inventory(host=host, boot_id=boot, memory_mb=10000, vcpus=8, sent_at=0.0,
                     vms=[VmInfo(spec=VmSpec(name=n, memory_mb=1000, ha=True), state="running") for n in vms])


def confirmed(boot: str = "") -> FenceResult:
    return FenceResult(request_id="fence-i1", incident="i1", host="a", term=1, outcome="confirmed_off",
                       started_at=0.0, finished_at=1.0, boot_id=boot)


# An incident of b1 open before b2 reports: b1's VMs wait for a fence (a new boot
# reported with no incident of the old one open releases them by itself).
B1_SUSPECT = HostEvent(host="a", kind="suspect", at=0.0, incident="i0", boot_id="b1")


def test_the_results_boot_id_wins_over_the_boot_guessed_at_suspect_time() -> None:
    """The suspect came without a boot id, after the host's next boot had reported
    (the fallback then guesses that boot, which runs nothing). The result names the
    boot that was fenced: its VMs are the ones released."""
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", "vm1"))
    s.on_inventory(inv("b", "b5"))
    s.on_host_event(B1_SUSPECT)  # else b2's report alone releases b1's VMs (a new boot proves b1 gone)
    s.on_inventory(inv("a", "b2"))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1"))
    assert s.on_fence_result(confirmed(boot="b1"))
    assert set(s.lost) == {"vm1"} and s.fenced_boots["a"] == {"b1"}
    # Without it, the fallback (the boot last reported before the suspect) is used.
    guess = SchedulerState()
    for i in (inv("a", "b1", "vm1"), inv("b", "b5"), B1_SUSPECT, inv("a", "b2")):
        if isinstance(i, Inventory):
            guess.on_inventory(i)
        else:
            guess.on_host_event(i)
    guess.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1"))
    assert guess.on_fence_result(confirmed())
    assert guess.lost == {} and guess.fenced_boots["a"] == {"b2"}


def test_the_suspects_boot_id_wins_over_the_last_inventory() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", "vm1"))
    s.on_inventory(inv("b", "b5"))
    s.on_host_event(B1_SUSPECT)
    s.on_inventory(inv("a", "b2", "vm2"))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1", boot_id="b1"))
    assert s.on_fence_result(confirmed())
    assert set(s.lost) == {"vm1"}


def test_the_monitor_core_names_the_boot_it_last_heard() -> None:
    core = Liveness(["a", "b"], interval=1.0, missed=3, now=0.0, nonce="n1")
    core.heartbeat("a", "boot-7", 4, now=1.0)
    suspects = {s.host: s for s in core.tick(now=5.0)}
    assert suspects["a"].boot_id == "boot-7" and suspects["b"].boot_id == ""  # b: never heard from
    assert {s.host: s.boot_id for s in core.suspects()} == {"a": "boot-7", "b": ""}


async def events(nc: NatsClient, subject: str, decoder: msgspec.json.Decoder) -> list:  # type: ignore[type-arg]
    try:
        return await read_stream(nc, "HAFENCE_EVENTS", subject, decoder)
    except Exception:
        return []


async def test_the_boot_id_rides_through_the_whole_incident(
    nc: NatsClient, nats_server: NatsServer, tmp_path: Path
) -> None:
    """Agent -> monitor -> arbiter -> fencer -> scheduler, in process on a real NATS
    server. Before, the monitor's suspect carried no boot id, and nothing after it did."""
    extra = '[[vms]]\nname = "vm-a"\nhost = "h1"\nmemory_mb = 1024\nha = true\n'
    config = parse_config(cluster_toml(nats_server.url, tmp_path, 3, extra), "test.toml")
    power = str(tmp_path / "power")
    requests: list[FenceRequest] = []

    async def record(msg: Msg) -> None:
        requests.append(Decoders.fence_request.decode(msg.data))

    await nc.subscribe("hafence.fence.request.h1", cb=record)
    h1 = SimHypervisor([VmSpec(name="vm-a", memory_mb=1024, ha=True)])
    async with (
        running("fencer", config, fencer),
        running("heartbeat", config, heartbeat),
        running("arbiter", config, arbiter),
        running("scheduler", config, scheduler),
        running("agent", config, agent, host="h2", instance="agent-h2", sim_power=power, boot_vms=False),
        running("agent", config, agent, host="h3", instance="agent-h3", sim_power=power, boot_vms=False),
    ):
        async with running("agent", config, agent, host="h1", instance="agent-h1", sim_power=power, hypervisor=h1):
            async def h1_reports_vm_a() -> bool:
                found = await events(nc, "hafence.inventory.h1", Decoders.inventory)
                return any(vm.spec.name == "vm-a" for i in found for vm in i.vms)

            await eventually(h1_reports_vm_a, timeout=20)
            boot = (await events(nc, "hafence.inventory.h1", Decoders.inventory))[-1].boot_id
            await eventually(lambda: _lease_held(nc), timeout=20)
        # h1's agent is gone: suspect, fenced, vm-a started elsewhere.
        async def started() -> bool:
            return bool(await events(nc, "hafence.vm.vm-a.started", Decoders.vm_event))

        await eventually(started, timeout=30)
        await eventually(lambda: _has(nc, "hafence.host.h1.fenced"), timeout=10)
    [suspect] = await events(nc, "hafence.host.h1.suspect", Decoders.host_event)
    [requested] = await events(nc, "hafence.host.h1.fence_requested", Decoders.host_event)
    [fenced] = await events(nc, "hafence.host.h1.fenced", Decoders.host_event)
    [result] = await events(nc, "hafence.fence.result.h1", Decoders.fence_result)
    assert boot and suspect.boot_id == boot
    assert requests and {r.boot_id for r in requests} == {boot}
    assert requested.boot_id == fenced.boot_id == result.boot_id == boot
    assert result.outcome == "confirmed_off" and result.incident == suspect.incident


async def _has(nc: NatsClient, subject: str) -> bool:
    return bool(await events(nc, subject, Decoders.host_event))


async def _lease_held(nc: NatsClient) -> bool:
    """Every leader elected (and so past the monitor's start-up window soon after)."""
    try:
        kv = await nc.jetstream().key_value("HAFENCE_leases")
        return {"heartbeat", "arbiter", "scheduler"} <= set(await kv.keys())
    except Exception:
        return False
