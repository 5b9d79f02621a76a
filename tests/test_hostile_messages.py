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
from nats.aio.msg import Msg

from hafence.bus import Bus
from hafence.bus import consume as consume_module
from hafence.cli.view import _read_view
from hafence.contracts import (
    AgentReply,
    Decoders,
    FenceRequest,
    FenceResult,
    HostEvent,
    Inventory,
    VmEvent,
    VmSpec,
    VmStart,
    VmStop,
    encode,
)
from hafence.routes import MAX_MESSAGE_BYTES
from tests.conftest import eventually, provision, whole_cluster
from tests.helpers import dead_letters

VMS = """
[[vms]]
name = "vm-a"
host = "h2"
memory_mb = 1024
ha = true
"""

# Every subject some service consumes, and who consumes it (the CLI reads the events stream too).
CORE = {"hafence.hb.h1": {"heartbeat"}, "hafence.agent.h1.cmd": {"agent-h1"}}
WORK_QUEUE = {"hafence.fence.request.h1": {"fencer"}}
EVENTS = {
    "hafence.inventory.h1": {"scheduler"},
    "hafence.host.h1.suspect": {"scheduler", "arbiter"},
    "hafence.host.h1.alive": {"scheduler", "arbiter"},
    "hafence.host.h1.confirmed_fenced": {"scheduler", "arbiter"},
    "hafence.host.h1.maintenance_on": {"scheduler", "arbiter"},
    "hafence.host.h1.fence_requested": {"arbiter"},
    "hafence.fence.result.h1": {"scheduler", "arbiter"},
    # The agent watches its own "cleared" events on a core subscription as well.
    "hafence.host.h1.cleared": {"scheduler", "agent-h1"},
    "hafence.vm.vm-a.started": set(),  # only the CLI reads VM events and alerts
    "hafence.alert.overload": set(),
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
    await provision(config)
    catalogue = _catalogue()
    forgeries = _forgeries()
    async with whole_cluster(nc, config, tmp_path / "power") as h2:
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
        await h2.aclose()
        # h2 dies: the whole pipeline still runs.
        await eventually(lambda: _started(nc, "vm-a"), timeout=30)
    restarts = [r.getMessage() for r in caplog.records if "failed; restarting" in r.getMessage()]
    assert not restarts, restarts
    # Terminated work-queue messages are gone: nothing left for the fencer to trip on.
    assert (await nc.jetstream().stream_info("HAFENCE_FENCE_REQUESTS")).state.messages == 0
    for letter in await dead_letters(nc):
        assert len(letter.raw) <= 64 * 1024 and letter.size >= len(letter.raw)
        assert letter.error


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



# -- the bus's own L3 rules, one consumer kind at a time (no services: fast) ----------------

def _request(host: str = "h1") -> FenceRequest:
    return FenceRequest(request_id="r1", incident="i1", host=host, term=1, requested_at=1.0)


async def test_consume_terminates_a_message_that_keeps_failing_and_keeps_it_if_the_dlq_is_down(
    nc: NatsClient, make_config, monkeypatch
) -> None:
    monkeypatch.setattr(consume_module, "DEAD_LETTER_RETRY_S", 0.2)
    config = make_config(hosts=2)
    await provision(config)
    bus = await Bus.connect(config, "fencer")
    js = nc.jetstream()
    calls: list[int] = []

    async def failing(request: FenceRequest, msg: Msg) -> None:
        calls.append(msg.metadata.num_delivered or 1)
        raise RuntimeError("device driver bug")

    try:
        # The DLQ is gone: giving up must not lose the request, nor end the consumer.
        await js.delete_stream("HAFENCE_DLQ")
        await js.publish("hafence.fence.request.h1", encode(_request()))
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(bus.consume("HAFENCE_FENCE_REQUESTS", "fencer", Decoders.fence_request, failing,
                                              max_attempts=2))
            await eventually(lambda: len(calls) >= 2)
            await asyncio.sleep(0.5)  # the give-up happened and failed: the request is still there
            assert (await js.stream_info("HAFENCE_FENCE_REQUESTS")).state.messages == 1
            assert not task.done()
            await provision(config)  # the DLQ is back: the next delivery is dead-lettered
            await eventually(lambda: _letters(nc, "fencer"), timeout=10)
            await eventually(lambda: _queue_empty(nc))
            task.cancel()
    except* asyncio.CancelledError:
        pass
    finally:
        await bus.close()
    assert len(calls) == 2  # the handler is not run again after it gave up
    [letter] = await dead_letters(nc)
    assert letter.error.startswith("handler failed") and "device driver bug" in letter.error


async def test_replay_dead_letters_and_skips_what_fails_and_never_twice(nc: NatsClient, make_config) -> None:
    config = make_config(hosts=2)
    await provision(config)
    js = nc.jetstream()
    await js.publish("hafence.host.h1.suspect", encode(HostEvent(host="h1", kind="suspect", at=1.0)))
    await js.publish("hafence.inventory.h1", encode(FenceResult(
        request_id="f", incident="f", host="h2", term=1, outcome="confirmed_off", started_at=1.0, finished_at=1.0)))
    await js.publish("hafence.host.h1.alive", encode(HostEvent(host="h1", kind="alive", at=2.0)),
                     headers={"Nats-Expected-Stream": "HAFENCE_EVENTS"})
    await js.publish("hafence.host.h2.alive", encode(HostEvent(host="h2", kind="alive", at=3.0)))
    filters = ["hafence.host.*.*", "hafence.inventory.*"]
    seen: list[object] = []

    async def handler(event: object, msg: Msg) -> None:
        if isinstance(event, HostEvent) and event.host == "h1" and event.kind == "alive":
            raise KeyError("a bug in the fold")
        seen.append(event)

    for _ in range(2):  # a restarted service replays the same history
        seen.clear()
        bus = await Bus.connect(config, "scheduler")
        caught_up = asyncio.Event()
        task = asyncio.create_task(bus.replay(filters, Decoders.scheduler_input, handler, caught_up))
        try:
            await asyncio.wait_for(caught_up.wait(), timeout=10)
            assert [(e.host, e.kind) for e in seen] == [("h1", "suspect"), ("h2", "alive")]  # type: ignore[attr-defined]
            assert not task.done()
            await eventually(lambda: _letters(nc, "scheduler", 2))
        finally:
            task.cancel()
            await bus.close()
    letters = await dead_letters(nc)
    assert len(letters) == 2  # the second replay's letters had the same ids
    assert {letter.subject for letter in letters} == {"hafence.inventory.h1", "hafence.host.h1.alive"}
    assert any("FenceResult on hafence.inventory.h1, which carries only Inventory" in d.error for d in letters)
    assert any("KeyError" in d.error for d in letters)


async def test_serve_answers_an_error_when_the_handler_raises_and_goes_on(nc: NatsClient, make_config) -> None:
    config = make_config(hosts=2)
    await provision(config)
    bus = await Bus.connect(config, "agent")

    async def handler(cmd: VmStart | VmStop, msg: Msg) -> AgentReply:
        if isinstance(cmd, VmStop):
            raise ValueError("hypervisor exploded")
        return AgentReply(host="h1", vm=cmd.vm.name, ok=True, state="running")

    task = asyncio.create_task(bus.serve("hafence.agent.h1.cmd", Decoders.agent_command, handler))
    try:
        await asyncio.sleep(0.2)
        bad = await nc.request("hafence.agent.h1.cmd", encode(VmStop(vm="vm-a")), timeout=2,
                               headers={"Nats-Expected-Stream": "NOPE"})
        assert b"handler failed" in bad.data and b"hypervisor exploded" in bad.data
        good = await nc.request("hafence.agent.h1.cmd", encode(VmStart(vm=VmSpec(name="vm-a", memory_mb=1))),
                                timeout=2)
        assert msgspec.json.decode(good.data, type=AgentReply).ok
        await eventually(lambda: _letters(nc, "agent"))
    finally:
        task.cancel()
        await bus.close()


async def test_a_dead_letter_never_raises(nc: NatsClient, make_config) -> None:
    config = make_config(hosts=2)
    await provision(config)
    bus = await Bus.connect(config, "scheduler")
    try:
        # A hostile Nats-Expected-Stream on the original made the DLQ publish fail, and the replay crash.
        assert await bus.dead_letter("hafence.inventory.h1", b"x" * 200_000, "e" * 10_000,
                                     {"Nats-Expected-Stream": "HAFENCE_EVENTS", "Nats-Expected-Last-Sequence": "1"})
        [letter] = await dead_letters(nc)
        assert letter.truncated and letter.size == 200_000 and len(letter.raw) == 64 * 1024
        await nc.jetstream().delete_stream("HAFENCE_DLQ")
        assert not await bus.dead_letter("hafence.inventory.h1", b"{}", "no DLQ", None)
    finally:
        await bus.close()


async def _letters(nc: NatsClient, service: str, n: int = 1) -> bool:
    try:
        return len([d for d in await dead_letters(nc) if d.service == service]) >= n
    except Exception:
        return False


async def _queue_empty(nc: NatsClient) -> bool:
    return (await nc.jetstream().stream_info("HAFENCE_FENCE_REQUESTS")).state.messages == 0
