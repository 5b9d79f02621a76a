"""The scheduler's VM events: a message id that says which fact each is, and a
retry through a NATS hiccup, so that a stream electing its leader neither loses
a ``started`` nor stores it twice (against a real NATS server)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import msgspec
import nats.errors
import pytest
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg

from hafence.bus.publish import Publishing
from hafence.contracts import (
    AgentReply,
    Decoders,
    FenceResult,
    Inventory,
    VmEvent,
    VmInfo,
    VmSpec,
    encode,
)
from hafence.scheduler.service import run as scheduler
from hafence.scheduler.service import vm_event_id
from tests.conftest import eventually, running


def test_a_vm_event_id_names_the_fact() -> None:
    def ev(kind: str, target: str = "h2", reason: str = "", incident: str = "h1-b-3") -> VmEvent:
        return VmEvent(vm="vm-a", kind=kind, at=time.time(), incident=incident, target=target,  # type: ignore[arg-type]
                       reason=reason)

    assert vm_event_id(ev("started")) == vm_event_id(ev("started", reason="already running")) == \
        "vm:vm-a:h1-b-3:started:h2"
    assert vm_event_id(ev("started")) != vm_event_id(ev("started", target="h3"))
    assert vm_event_id(ev("started")) != vm_event_id(ev("started", incident="h1-b-4"))
    assert vm_event_id(ev("placed")) != vm_event_id(ev("started"))
    # A restart's attempts are different facts; so are two reasons a start failed for.
    assert vm_event_id(ev("restarted"), 1) != vm_event_id(ev("restarted"), 2)
    assert vm_event_id(ev("failed", reason="no agent")) != vm_event_id(ev("failed", reason="refused"))
    assert vm_event_id(ev("failed", reason="no agent")) == vm_event_id(ev("failed", reason="no agent"))


@pytest.fixture
def started_ack_lost_once(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The first ``started`` event is stored, but its ack never comes back (the
    stream's leader changed after storing it): the publisher sees a timeout."""
    real = Publishing.publish
    calls: list[str] = []

    async def flaky(self: Publishing, subject: str, msg: msgspec.Struct, msg_id: str = "",
                    expect_last_subject_seq: int | None = None, expect_last_of: str = "") -> int:
        if subject.endswith(".started"):
            calls.append(msg_id)
            seq = await real(self, subject, msg, msg_id)
            if len(calls) == 1:
                raise nats.errors.TimeoutError
            return seq
        return await real(self, subject, msg, msg_id, expect_last_subject_seq, expect_last_of)

    monkeypatch.setattr(Publishing, "publish", flaky)
    yield calls


async def test_a_started_event_whose_ack_is_lost_is_stored_once_and_the_scheduler_goes_on(
    nc: NatsClient, make_config, started_ack_lost_once: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    """Before: no message id and no retry. The timeout crashed the scheduler's loop,
    its supervisor restarted it, it asked h2 again ("already running") and stored a
    second ``started``."""
    caplog.set_level(logging.WARNING)
    config = make_config(hosts=2)
    starts: list[str] = []

    async def agent_h2(msg: Msg) -> None:
        cmd = Decoders.agent_command.decode(msg.data)
        starts.append(cmd.vm.name)
        await msg.respond(encode(AgentReply(host="h2", vm=cmd.vm.name, ok=True, state="running",
                                            already=len(starts) > 1)))

    await nc.subscribe("hafence.agent.h2.cmd", cb=agent_h2)
    js = nc.jetstream()
    async with running("scheduler", config, scheduler):
        vm = VmInfo(spec=VmSpec(name="vm-a", memory_mb=1024, ha=True), state="running")
        for host, vms in (("h1", [vm]), ("h2", [])):
            await js.publish(f"hafence.inventory.{host}", encode(Inventory(
                host=host, boot_id=f"{host}-boot", memory_mb=16384, vcpus=8, vms=vms, sent_at=time.time())))
        now = time.time()
        await js.publish("hafence.fence.result.h1", encode(FenceResult(
            request_id="fence-h1-boot-1", incident="h1-boot-1", host="h1", term=1, outcome="confirmed_off",
            started_at=now, finished_at=now, boot_id="h1-boot")))
        # The retry, or (before) the restarted scheduler's second announcement.
        await eventually(lambda: len(started_ack_lost_once) >= 2, timeout=20)
    stored = await _stored(nc, "hafence.vm.vm-a.started")
    assert len(stored) == 1, stored
    event, msg_id = stored[0]
    assert event.target == "h2" and msg_id == "vm:vm-a:h1-boot-1:started:h2" == vm_event_id(event)
    assert started_ack_lost_once == [msg_id, msg_id]
    assert starts == ["vm-a"]  # asked once: nothing crashed, nothing was asked again
    assert [r.getMessage() for r in caplog.records if "failed; restarting" in r.getMessage()] == []


async def _stored(nc: NatsClient, subject: str) -> list[tuple[VmEvent, str]]:
    js = nc.jetstream()
    info = await js.stream_info("HAFENCE_EVENTS")
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("HAFENCE_EVENTS", seq)
        if msg.subject == subject:
            out.append((Decoders.vm_event.decode(msg.data), (msg.headers or {}).get("Nats-Msg-Id", "")))
    return out
