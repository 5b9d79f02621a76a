"""A malformed message on every subject a service consumes lands in the
dead-letter stream with its reason, and the services keep working."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
from nats.aio.client import Client as NatsClient

from hafence.contracts import AgentReply, Decoders, VmEvent, VmSpec, VmStart, encode
from tests.conftest import eventually, whole_cluster
from tests.helpers import dead_letters, read_stream

GARBAGE = b'{"type":"heartbeat","host":"h1","seq":"not a number"}'

CONSUMED = {
    "heartbeat": ["hafence.hb.h1"],
    "agent-h1": ["hafence.agent.h1.cmd"],
    "fencer": ["hafence.fence.request.h1"],
    "arbiter": [
        "hafence.host.h1.suspect", "hafence.host.h1.alive", "hafence.host.h1.fence_requested",
        "hafence.fence.result.h1",
    ],
    "scheduler": [
        "hafence.inventory.h1", "hafence.host.h1.suspect", "hafence.host.h1.alive",
        "hafence.host.h1.confirmed_fenced", "hafence.fence.result.h1",
    ],
}

VMS = """
[[vms]]
name = "vm-a"
host = "h2"
memory_mb = 1024
ha = true
"""


async def test_every_consumed_subject_dead_letters_garbage_and_failover_still_works(
    nc: NatsClient, make_config, tmp_path: Path
) -> None:
    config = make_config(hosts=2, extra=VMS)
    async with whole_cluster(nc, config, tmp_path / "power") as h2:
        js = nc.jetstream()
        for service, subjects in CONSUMED.items():
            for subject in subjects:
                if service == "heartbeat" or service.startswith("agent"):
                    if subject.endswith(".cmd"):
                        reply = await nc.request(subject, GARBAGE, timeout=2)
                        assert b"undecodable message" in reply.data
                    else:
                        await nc.publish(subject, GARBAGE)
                elif service == "fencer" or subject not in _published:
                    _published.add(subject)
                    await js.publish(subject, GARBAGE)
        expected = {(svc, subj) for svc, subjects in CONSUMED.items() for subj in subjects}
        await eventually(lambda: _dead_lettered(nc, expected), timeout=15)
        # The agent still serves commands after a bad one.
        raw = await nc.request(
            "hafence.agent.h1.cmd", encode(VmStart(vm=VmSpec(name="vm-x", memory_mb=10))), timeout=2
        )
        assert msgspec.json.decode(raw.data, type=AgentReply).ok
        await asyncio.sleep(config.timings.detection_window_s)  # the arbiter's start-up grace
        await h2.aclose()
        # h2 dies: the whole pipeline still runs after all that garbage.
        await eventually(lambda: _started(nc, "vm-a"), timeout=20)
    letters = await dead_letters(nc)
    for letter in letters:
        assert letter.raw == GARBAGE
        # The reason says what is wrong and where.
        assert letter.error.startswith("undecodable message: ")
        assert "at `$." in letter.error


_published: set[str] = set()


async def _dead_lettered(nc: NatsClient, expected: set[tuple[str, str]]) -> bool:
    got = {(d.service, d.subject) for d in await dead_letters(nc)}
    return expected <= got


async def _started(nc: NatsClient, vm: str) -> bool:
    events = await read_stream(nc, "HAFENCE_EVENTS", "hafence.vm.*.*", Decoders.vm_event)
    return any(isinstance(e, VmEvent) and e.vm == vm and e.kind == "started" and e.target == "h1" for e in events)
