"""L3 and S5 on a real NATS server: a catalogue of hostile payloads and forgeries on
every subject a service consumes (core subscriptions, the fencer's work queue, the
events stream the scheduler, arbiter and CLI replay), then a real failover that
must complete with no service restarted and nothing forged believed.

One lab run for the whole catalogue: the services are started once.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import msgspec
from nats.aio.client import Client as NatsClient

from hafence.agent.service import run as agent
from hafence.arbiter.service import run as arbiter
from hafence.bus import Bus
from hafence.cli.view import _read_view
from hafence.config import ClusterConfig
from hafence.contracts import (
    AgentReply,
    Decoders,
    FenceResult,
    HostEvent,
    Inventory,
    VmEvent,
    VmSpec,
    VmStart,
    encode,
)
from hafence.fencer.service import run as fencer
from hafence.heartbeat.service import run as heartbeat
from hafence.routes import MAX_MESSAGE_BYTES
from hafence.scheduler.service import run as scheduler
from tests.conftest import eventually, running
from tests.helpers import dead_letters, read_stream

VMS = """
[[vms]]
name = "vm-a"
host = "h2"
memory_mb = 1024
ha = true
"""

# Every subject some service consumes, and who consumes it (the CLI reads the events stream too).
CORE = {"hafence.hb.h1": {"heartbeat"}, "hafence.agent.h1.cmd": {"agent"}}
WORK_QUEUE = {"hafence.fence.request.h1": {"fencer"}}
EVENTS = {
    "hafence.inventory.h1": {"scheduler"},
    "hafence.host.h1.suspect": {"scheduler", "arbiter"},
    "hafence.host.h1.alive": {"scheduler", "arbiter"},
    "hafence.host.h1.confirmed_fenced": {"scheduler", "arbiter"},
    "hafence.host.h1.maintenance_on": {"scheduler", "arbiter"},
    "hafence.host.h1.fence_requested": {"arbiter"},
    "hafence.fence.result.h1": {"scheduler", "arbiter"},
    "hafence.vm.vm-a.started": set(),  # only the CLI reads VM events
}


def _catalogue() -> list[tuple[bytes, dict[str, str] | None]]:
    """Hostile bodies, each starting with distinct bytes (so its dead letter can be found)."""
    deep = b'{"hostile":"deep","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    near = b'{"hostile":"near-limit","x":"' + b"a" * (MAX_MESSAGE_BYTES - 64) + b'"}'
    over = b'{"hostile":"over-limit","x":"' + b"a" * MAX_MESSAGE_BYTES + b'"}'
    spec = {"name": "vm-c\n", "memory_mb": 1, "ha": True}  # by hand: VmSpec itself refuses the name
    newline_names = msgspec.json.encode({
        "type": "inventory", "host": "h1", "boot_id": "b", "memory_mb": 1, "vcpus": 1, "sent_at": 1.0,
        "vms": [{"spec": spec, "state": "running"}],
    })
    return [
        (deep, None),
        (near, None),
        (over, None),
        (b"\xff\xfe invalid utf-8", None),
        (b"", None),
        (newline_names, None),
        (msgspec.json.encode({"host": "h1\n", "type": "heartbeat", "boot_id": "b", "seq": 1, "sent_at": 1}), None),
        (b'{"seq":"wrong type","type":"heartbeat","host":"h1","boot_id":"b","sent_at":1}', None),
        (b'{"term":' + b"9" * 40 + b',"type":"fence_request","request_id":"r","incident":"i","host":"h1",'
         b'"requested_at":1}', None),
        (b'{"type":"bogus","host":"h1"}', None),
        (b'{"hostile":"steers the DLQ"}', {"Nats-Expected-Stream": "HAFENCE_EVENTS", "Nats-Msg-Id": "x"}),
    ]


def _forgeries() -> list[tuple[str, bytes]]:
    """Well-formed messages on a subject that does not carry them (issue 10, item 1)."""
    return [
        # An agent's own inventory subject: a confirmed_off of the other, live host...
        ("hafence.inventory.h1", encode(FenceResult(
            request_id="forged", incident="forged", host="h2", term=99, outcome="confirmed_off",
            started_at=1.0, finished_at=2.0))),
        # ... an operator's confirmation of it, and h2's inventory claiming it runs nothing.
        ("hafence.inventory.h1", encode(HostEvent(host="h2", kind="confirmed_fenced", at=1.0, by="forged"))),
        ("hafence.inventory.h1", encode(Inventory(host="h2", boot_id="forged", memory_mb=1, vcpus=1, sent_at=1.0))),
        # A kind that is not the subject's, and a host that is not.
        ("hafence.host.h1.alive", encode(HostEvent(host="h1", kind="confirmed_fenced", at=1.0, by="forged"))),
        ("hafence.fence.result.h1", encode(FenceResult(
            request_id="forged2", incident="forged2", host="h2", term=99, outcome="confirmed_off",
            started_at=1.0, finished_at=2.0))),
    ]


async def test_hostile_catalogue_on_every_consumed_subject_then_a_failover_with_no_restart(
    nc: NatsClient, make_config, tmp_path: Path, caplog
) -> None:
    caplog.set_level(logging.WARNING)
    config = make_config(hosts=2, extra=VMS)
    await _provision(config)
    power = str(tmp_path / "power")
    agent_args = dict(driver="sim", sim_power=power, boot_vms=True)
    catalogue = _catalogue()
    forgeries = _forgeries()
    async with (
        running("fencer", config, fencer),
        running("heartbeat", config, heartbeat),
        running("arbiter", config, arbiter),
        running("scheduler", config, scheduler),
        running("agent", config, agent, host="h1", instance="agent-h1", **agent_args),
    ):
        async with running("agent", config, agent, host="h2", instance="agent-h2", **agent_args):
            await eventually(lambda: _leaders(nc))
            await eventually(lambda: _inventories(nc, {"h1", "h2"}), timeout=15)
            js = nc.jetstream()
            for body, headers in catalogue:
                for subject in CORE:
                    if subject.endswith(".cmd"):
                        reply = await nc.request(subject, body, timeout=5, headers=headers)
                        assert b'"type":"error"' in reply.data, reply.data[:200]
                    else:
                        await nc.publish(subject, body, headers=headers)
                for subject in (*WORK_QUEUE, *EVENTS):
                    if headers and "Nats-Expected-Stream" in headers:
                        stream = "HAFENCE_FENCE_REQUESTS" if subject in WORK_QUEUE else "HAFENCE_EVENTS"
                        headers = {**headers, "Nats-Expected-Stream": stream, "Nats-Msg-Id": f"x-{subject}"}
                    await js.publish(subject, body, headers=headers)
            for subject, body in forgeries:
                await js.publish(subject, body)
            # Every hostile body is dead-lettered by every service that consumes its subject.
            expected = {(svc, subject, body[:40]) for body, _ in catalogue
                        for subject, services in {**CORE, **WORK_QUEUE, **EVENTS}.items() for svc in services}
            expected |= {(svc, s, b[:40]) for s, b in forgeries for svc in EVENTS[s]}
            try:
                await eventually(lambda: _dead_lettered(nc, expected), timeout=30)
            except AssertionError:
                raise AssertionError(f"not dead-lettered: {_missing}") from None
            # The agent still serves commands after all that.
            raw = await nc.request(
                "hafence.agent.h1.cmd", encode(VmStart(vm=VmSpec(name="vm-x", memory_mb=10))), timeout=2
            )
            assert msgspec.json.decode(raw.data, type=AgentReply).ok
            # The CLI reads the same stream: it skips what is forged or broken, and believes none of it.
            view = await _read_view(config)
            assert view.hosts["h2"].state == "up"
            assert view.vms["vm-a"].host == "h2" and view.vms["vm-a"].state == "running"
            # S0: the forged confirmed_off of a live h2 restarted nothing elsewhere.
            assert not [e for e in await _vm_events(nc) if e.vm == "vm-a"]
            await asyncio.sleep(config.timings.detection_window_s)  # the arbiter's start-up grace
        # h2 dies: the whole pipeline still runs.
        await eventually(lambda: _started(nc, "vm-a"), timeout=30)
    restarts = [r.getMessage() for r in caplog.records if "failed; restarting" in r.getMessage()]
    assert not restarts, restarts
    # Terminated work-queue messages are gone: nothing left for the fencer to trip on.
    assert (await nc.jetstream().stream_info("HAFENCE_FENCE_REQUESTS")).state.messages == 0
    for letter in await dead_letters(nc):
        assert len(letter.raw) <= 64 * 1024 and letter.size >= len(letter.raw)
        assert letter.error


async def _provision(config: ClusterConfig) -> None:
    bus = await Bus.connect(config, "provisioner")
    try:
        await bus.provision()
    finally:
        await bus.close()


async def _leaders(nc: NatsClient) -> bool:
    try:
        kv = await nc.jetstream().key_value("HAFENCE_leases")
        return {"heartbeat", "arbiter", "scheduler"} <= set(await kv.keys())
    except Exception:
        return False


async def _inventories(nc: NatsClient, hosts: set[str]) -> bool:
    try:
        reports = await read_stream(nc, "HAFENCE_EVENTS", "hafence.inventory.*", Decoders.inventory)
    except Exception:
        return False
    return hosts <= {r.host for r in reports}


async def _dead_lettered(nc: NatsClient, expected: set[tuple[str, str, bytes]]) -> bool:
    got = {(d.service, d.subject, d.raw[:40]) for d in await dead_letters(nc)}
    _missing[:] = sorted(expected - got)
    return expected <= got


_missing: list[tuple[str, str, bytes]] = []


async def _vm_events(nc: NatsClient) -> list[VmEvent]:
    # Only VM subjects (the stream also holds megabytes of hostile bodies), and skip what
    # does not decode: the catalogue put hostile bodies on vm.vm-a.started too.
    js = nc.jetstream()
    sub = await js.pull_subscribe("hafence.vm.>", stream="HAFENCE_EVENTS")
    out = []
    try:
        while True:
            try:
                msgs = await sub.fetch(100, timeout=0.5)
            except TimeoutError:
                break
            for msg in msgs:
                try:
                    out.append(Decoders.vm_event.decode(msg.data or b""))
                except Exception:
                    pass
    finally:
        await sub.unsubscribe()
    return out


async def _started(nc: NatsClient, vm: str) -> bool:
    return any(e.vm == vm and e.kind == "started" and e.target == "h1" for e in await _vm_events(nc))

