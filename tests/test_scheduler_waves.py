"""The scheduler shell at scale (issue 12), in process on a real NATS server:
the starts of a wave are on disk before any of its commands leaves (one
transaction, not one per VM), and an inventory sent again unchanged does not
run the HA reservation check (it ran after every inventory: 33 checks a second
at 1,000 hosts, and fence results were read seconds late)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

import hafence.scheduler.service as scheduler_service
from hafence.contracts import AgentReply, Decoders, FenceResult, Inventory, VmInfo, VmSpec, encode
from hafence.scheduler.service import run as scheduler
from tests.conftest import eventually, running

pytestmark = pytest.mark.timeout(60)

VMS = 40


def inventory(host: str, vms: list[str]) -> bytes:
    return encode(Inventory(host=host, boot_id=f"{host}-boot", memory_mb=16384, vcpus=8, sent_at=time.time(),
                            vms=[VmInfo(spec=VmSpec(name=n, memory_mb=256, ha=True), state="running") for n in vms]))


async def test_every_start_of_a_wave_is_recorded_before_the_first_command_is_sent(
    nc: NatsClient, make_config
) -> None:  # type: ignore[no-untyped-def]
    """Before: each start wrote (and fsynced) its own record just before its own
    command, so the first command left while the other VMs of the wave had none."""
    config = make_config(hosts=3)
    db_path = Path(config.store.dir) / "scheduler.db"
    names = [f"vm-{i}" for i in range(VMS)]
    seen: list[tuple[str, set[str]]] = []

    async def agent(msg: Msg) -> None:
        cmd = Decoders.agent_command.decode(msg.data)
        host = msg.subject.split(".")[2]
        # What a scheduler restarted at this instant would find (a reader of its own).
        with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as db:
            recorded = {vm for (vm,) in db.execute("SELECT vm FROM starts WHERE incident = 'h1-boot-1'")}
        seen.append((cmd.vm.name, recorded))
        await msg.respond(encode(AgentReply(host=host, vm=cmd.vm.name, ok=True, state="running")))

    await nc.subscribe("hafence.agent.*.cmd", cb=agent)
    js = nc.jetstream()
    async with running("scheduler", config, scheduler):
        for host, vms in (("h1", names), ("h2", []), ("h3", [])):
            await js.publish(f"hafence.inventory.{host}", inventory(host, vms))
        now = time.time()
        await js.publish("hafence.fence.result.h1", encode(FenceResult(
            request_id="fence-h1-boot-1", incident="h1-boot-1", host="h1", term=1, outcome="confirmed_off",
            started_at=now, finished_at=now, boot_id="h1-boot")))
        await eventually(lambda: len(seen) >= VMS, timeout=20)
    assert sorted(vm for vm, _ in seen) == sorted(names)  # one wave, each VM asked once
    for vm, recorded in seen:
        assert recorded == set(names), f"{vm} was sent while only {sorted(recorded)} were recorded"


async def test_an_inventory_sent_again_unchanged_does_not_run_the_ha_reservation_check(
    nc: NatsClient, make_config, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    real = scheduler_service.largest_host_loss_absorbed
    calls: list[float] = []

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(time.monotonic())
        return real(*args, **kwargs)

    monkeypatch.setattr(scheduler_service, "largest_host_loss_absorbed", counting)
    config = make_config(hosts=3)
    js = nc.jetstream()
    reports = {"h1": ["vm-a"], "h2": ["vm-b"], "h3": []}
    async with running("scheduler", config, scheduler):
        for host, vms in reports.items():
            await js.publish(f"hafence.inventory.{host}", inventory(host, vms))
        await eventually(lambda: len(calls) >= 1, timeout=20)  # the first verdict
        # Three agents re-sending the same report four times a second for 2.5 s
        # (only sent_at differs): before, every one of them ran the check.
        for _ in range(10):
            for host, vms in reports.items():
                await js.publish(f"hafence.inventory.{host}", inventory(host, vms))
            await asyncio.sleep(0.25)
        # A real change (a VM started on h3) is checked; the stream is read in
        # order, so by then every repeated report above has been folded.
        await js.publish("hafence.inventory.h3", inventory("h3", ["vm-c"]))
        await eventually(lambda: len(calls) >= 2, timeout=20)
        assert len(calls) == 2, f"{len(calls)} reservation checks for one change"
