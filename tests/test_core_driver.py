"""The production driver runs a core over a real nats-server: every input kind,
every effect kind, settlement of work-queue deliveries, and a core that raises."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.client import Client as NatsClient

from hafence.config import ClusterConfig
from hafence.contracts import AgentReply, Decoders, FenceRequest, HostEvent, Placements, VmEvent, VmStop, encode
from hafence.core import (
    Ack,
    Asked,
    Call,
    CaughtUp,
    Consume,
    Delivered,
    Effect,
    Event,
    Inputs,
    Lease,
    LeaseChanged,
    Nak,
    Now,
    Publish,
    ReplayInput,
    Reply,
    Returned,
    Serve,
    SetTimer,
    Span,
    Started,
    Term,
    TimerFired,
)
from hafence.core.driver import drive, request_error
from hafence.service import Runtime
from hafence.subjects import Subjects
from tests.conftest import eventually, running
from tests.helpers import dead_letters

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


class Echo:
    """Answers 42 to ``Call("echo", "answer")``."""

    async def answer(self) -> int:
        await asyncio.sleep(0.01)
        return 42

    def broken(self) -> int:
        raise ValueError("the device said no")


@dataclass
class ToyCore:
    subjects: Subjects
    streams_fence: str
    name: str = "toy"
    seen: list[Event] = field(default_factory=list)
    nows: list[Now] = field(default_factory=list)

    def inputs(self) -> Inputs:
        s = self.subjects
        return Inputs(
            consumers=[Consume("requests", self.streams_fence, "fencer", [s.fence_requests()],
                               Decoders.fence_request, ack_wait=5.0)],
            replays=[ReplayInput("events", [s.host_events("alive")], Decoders.host_event)],
            serves=[Serve("cmd", s.agent_cmd("h1"), Decoders.agent_command)],
            lease=Lease(role="toy", ttl=2.0, after="events"),
        )

    def handle(self, event: Event, now: Now) -> list[Effect]:
        self.seen.append(event)
        self.nows.append(now)
        match event:
            case Started():
                return [SetTimer("tick", 0.05), Call("echo", "answer", (), "answer"),
                        Call("echo", "broken", (), "broken")]
            case TimerFired(key="tick"):
                # A decision at a timer joins the trace of the message it is about.
                return [Span("toy decide", parent={"traceparent": TRACEPARENT}),
                        Publish(self.subjects.host_event("h1", "alive"),
                                HostEvent(host="h1", kind="alive", at=now.wall), msg_id="alive-1", tag="published")]
            case Delivered(source="requests", message=FenceRequest(reason="explode"), attempt=1):
                raise RuntimeError("a bug in the core")
            case Delivered(source="requests", token=token, message=FenceRequest(reason=reason), attempt=attempt):
                if reason == "retry" and attempt == 1:
                    return [Nak(token, delay=0.05)]
                if reason == "poison":
                    return [Term(token, "the core says this can never succeed")]
                return [Ack(token)]
            case Asked(token=token, message=VmStop(vm=vm)):
                return [Reply(token, AgentReply(host="h1", vm=vm, ok=True, state="stopped"))]
        return []

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.seen if isinstance(e, kind)]


async def test_a_core_runs_over_nats_with_every_input_and_effect(
    nc: NatsClient, make_config: Any
) -> None:
    config: ClusterConfig = make_config()
    subjects = Subjects(config.cluster.subject_prefix)
    js = nc.jetstream()
    holder: dict[str, ToyCore] = {}

    async def body(rt: Runtime) -> None:
        core = holder["core"] = ToyCore(rt.bus.subjects, rt.bus.streams.fence_requests)
        await drive(core, rt, {"echo": Echo()})

    async with running("toy", config, body):
        await eventually(lambda: "core" in holder)
        core = holder["core"]
        # Started first, then the port calls come back (one value, one named error).
        await eventually(lambda: {r.tag for r in core.of(Returned)} >= {"answer", "broken", "published"})
        assert isinstance(core.seen[0], Started)
        returned = {r.tag: r for r in core.of(Returned)}
        assert returned["answer"].value == 42 and returned["answer"].ok
        assert "ValueError" in returned["broken"].error and "the device said no" in returned["broken"].error
        # The timer's publish is stored, replayed back, and the replay catches up; the lease follows it.
        await eventually(lambda: any(isinstance(e, Delivered) and e.source == "events" for e in core.seen))
        await eventually(lambda: core.of(CaughtUp) != [])
        await eventually(lambda: any(e.held and e.term >= 1 for e in core.of(LeaseChanged)))
        replayed = next(e for e in core.seen if isinstance(e, Delivered) and e.source == "events")
        assert replayed.stored_at is not None and abs(replayed.stored_at - time.time()) < 60
        assert TRACE_ID in replayed.headers.get("traceparent", "")

        # Work queue: ack, nak then redelivery (attempt 2), term -> dead letter, a raising core -> retried.
        for i, reason in enumerate(["fine", "retry", "poison", "explode"]):
            await js.publish(subjects.fence_request("h1"), encode(FenceRequest(
                request_id=f"r{i}", incident="i", host="h1", term=1, requested_at=time.time(), reason=reason)))

        def attempts(reason: str) -> list[int]:
            return [e.attempt for e in core.of(Delivered)
                    if e.source == "requests" and e.message.reason == reason]

        await eventually(lambda: attempts("retry") == [1, 2] and attempts("explode") == [1, 2]
                         and attempts("fine") == [1] and attempts("poison") == [1], timeout=15)
        letters = await dead_letters(nc)
        assert any("can never succeed" in letter.error for letter in letters)
        info = await js.consumer_info(config_stream(config), "fencer")
        assert info.num_ack_pending == 0 and info.num_pending == 0

        # Request/reply through Serve and Reply.
        reply = await nc.request(subjects.agent_cmd("h1"), encode(VmStop(vm="vm1")), timeout=5)
        assert msgspec.json.decode(reply.data)["vm"] == "vm1"
        # Every event got the node's clocks.
        assert all(n.wall > 1e9 and n.mono > 0 for n in core.nows)


def config_stream(config: ClusterConfig) -> str:
    from hafence.bus.names import StreamNames

    return StreamNames.for_prefix(config.cluster.subject_prefix).fence_requests


def test_request_errors_say_whether_the_request_may_have_been_done() -> None:
    import nats.errors

    assert request_error(nats.errors.NoRespondersError()).startswith("no_responders:")
    assert request_error(nats.errors.TimeoutError()).startswith("timeout:")
    assert request_error(TimeoutError()).startswith("timeout:")
    assert request_error(ValueError("x")).startswith("error: ValueError")


async def test_a_compare_and_set_publish_loses_to_a_newer_message_on_its_subject(
    nc: NatsClient, make_config: Any
) -> None:
    """Two replicas that both believe they lead cannot both claim a subject: the
    second publish expecting the old last sequence gets a conflict, the first is stored."""
    config: ClusterConfig = make_config()
    subjects = Subjects(config.cluster.subject_prefix)
    subject = subjects.host_event("h1", "alive")
    holder: dict[str, CasCore] = {}

    async def body(rt: Runtime) -> None:
        core = holder["core"] = CasCore(rt.bus.subjects, subject)
        await drive(core, rt)

    async with running("cas", config, body):
        await eventually(lambda: "core" in holder and len(holder["core"].outcomes) == 2)
        first, second = holder["core"].outcomes
        assert first.ok
        assert second.error.startswith("conflict:"), second.error


async def test_a_compare_and_set_over_a_filter_loses_to_a_newer_message_on_any_subject_it_matches(
    nc: NatsClient, make_config: Any
) -> None:
    """Placement records: each on a subject of its own, one compare-and-set over all of
    them (nats-server's ``Nats-Expected-Last-Subject-Sequence-Subject``). A record
    expecting none loses to one stored on another record subject; the ack says where
    the stored one is, and a record expecting that sequence is stored."""
    config: ClusterConfig = make_config()
    subjects = Subjects(config.cluster.subject_prefix)
    holder: dict[str, FilterCasCore] = {}

    async def body(rt: Runtime) -> None:
        core = holder["core"] = FilterCasCore(subjects)
        await drive(core, rt)

    async with running("cas", config, body):
        await eventually(lambda: "core" in holder and len(holder["core"].outcomes) == 3)
    first, second, third = sorted(holder["core"].outcomes, key=lambda r: r.tag)
    assert first.ok and isinstance(first.value, int) and first.value > 0
    assert second.error.startswith("conflict:"), second.error
    assert third.ok and third.value > first.value


@dataclass
class FilterCasCore:
    subjects: Subjects
    name: str = "cas"
    outcomes: list[Returned] = field(default_factory=list)

    def inputs(self) -> Inputs:
        return Inputs()

    def record(self, tag: str, expect: int) -> Publish:
        placed = [VmEvent(vm="vm-a", kind="placed", at=1.0, target="h2")]
        return Publish(self.subjects.placement_record(f"r-{tag}"), Placements(at=1.0, placed=placed),
                       msg_id=tag, tag=tag, expect_last_subject_seq=expect,
                       expect_last_of=self.subjects.placement_records())

    def handle(self, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, Started):
            return [self.record("p1", 0), self.record("p2", 0)]
        if isinstance(event, Returned):
            self.outcomes.append(event)
            if event.tag == "p1" and event.ok:
                return [self.record("p3", event.value)]
        return []


@dataclass
class CasCore:
    subjects: Subjects
    subject: str
    name: str = "cas"
    outcomes: list[Returned] = field(default_factory=list)

    def inputs(self) -> Inputs:
        return Inputs()

    def handle(self, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, Started):
            # Both expect "nothing on the subject yet"; only one can be right.
            return [Publish(self.subject, HostEvent(host="h1", kind="alive", at=now.wall), tag=f"p{i}",
                            msg_id=f"cas-{i}", expect_last_subject_seq=0) for i in (1, 2)]
        if isinstance(event, Returned):
            self.outcomes.append(event)
        return []


@dataclass
class BurstCore:
    """Handles a burst of queued events, each taking a little CPU and asking the
    ``probe`` port for something (a request or a publish would do the same: a task)."""

    name: str = "burst"
    handled: int = 0

    def inputs(self) -> Inputs:
        return Inputs()

    def handle(self, event: Event, now: Now) -> list[Effect]:
        if not isinstance(event, TimerFired):
            return []
        self.handled += 1
        deadline = time.perf_counter() + 0.0002
        while time.perf_counter() < deadline:  # the work of one event
            pass
        return [Call("probe", "mark", (event.key,))]


async def test_what_a_burst_of_events_sends_goes_out_while_the_burst_is_handled() -> None:
    """50 placed acks, then 50 replies, reach the scheduler back to back. The worker
    took the next event as long as one waited, so the requests and publishes their
    effects made (each a task) wrote nothing until the whole burst was handled: the
    first VmStart of a wave waited for the last one's decision."""
    from types import SimpleNamespace
    from typing import cast

    from hafence.core.driver import Driver

    core = BurstCore()
    seen_at: dict[str, int] = {}

    class Probe:
        def mark(self, key: str) -> None:
            seen_at[key] = core.handled

    driver = Driver(core, cast(Runtime, SimpleNamespace(bus=None, args=SimpleNamespace())), {"probe": Probe()})
    for i in range(200):
        driver.feed(TimerFired(str(i)))
    task = asyncio.create_task(driver.run())
    try:
        await eventually(lambda: len(seen_at) == 200, timeout=10)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    # The first event's call ran long before the 200th event was handled.
    assert seen_at["0"] < 50, f"the first event's call ran after {seen_at['0']} of 200 events"
