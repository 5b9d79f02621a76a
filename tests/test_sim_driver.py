"""The simulation's generic driver (hafence.sim.driver) and lease (hafence.sim.lease), with toy cores."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest

from hafence import routes
from hafence.config import parse_config
from hafence.contracts import AgentReply, DeadLetter, FenceRequest, FenceResult, Heartbeat, VmStop, encode
from hafence.core import (
    Ack,
    Asked,
    Call,
    CancelTimer,
    CaughtUp,
    Consume,
    Delivered,
    Effect,
    Event,
    InProgress,
    Inputs,
    Lease,
    LeaseChanged,
    Log,
    Now,
    Publish,
    ReplayInput,
    Reply,
    Request,
    Returned,
    Serve,
    SetTimer,
    Started,
    Subscribe,
    TimerFired,
)
from hafence.sim.clock import NodeClock, Scheduler, SimFuture
from hafence.sim.driver import SimService
from hafence.sim.provision import provision
from hafence.sim.transport import Faults, SimNats

Script = Callable[["ToyCore", Event, Now], list[Effect]]

REQUESTS = Consume("requests", "HAFENCE_FENCE_REQUESTS", "fencer", ["hafence.fence.request.*"], FenceRequest,
                   ack_wait=5.0)


@dataclass
class ToyCore:
    """A core whose decisions are a test's script; it records what it was handed."""

    script: Script
    wants: Inputs = field(default_factory=Inputs)
    name: str = "toy"
    seen: list[tuple[Event, Now]] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)

    def inputs(self) -> Inputs:
        return self.wants

    def handle(self, event: Event, now: Now) -> list[Effect]:
        self.seen.append((event, now))
        return self.script(self, event, now)


class World:
    """A scheduler, a provisioned SimNats, and a client to put messages in."""

    def __init__(self, seed: int = 1, faults: Faults | None = None, lease_ttl: float = 6.0) -> None:
        self.s = Scheduler()
        self.net = SimNats(self.s, random.Random(seed), faults)
        config = parse_config(f'[timings]\nlease_ttl_s = {lease_ttl}\n[[hosts]]\nname = "h1"\nmemory_mb = 1024\n')
        self.names = provision(self.net, config)
        self.client = self.net.connect("client")
        self.cores: list[ToyCore] = []

    def service(self, script: Script, wants: Inputs, ports: dict[str, object] | None = None,
                node: str = "n1", name: str = "toy", **kw: Any) -> SimService:
        def factory() -> ToyCore:
            core = ToyCore(script, wants, name)
            self.cores.append(core)
            return core

        clock = NodeClock(self.s, node)
        svc = SimService(name, node, factory, ports or {}, self.net.connect(node, clock), clock, self.net, **kw)
        svc.start()
        return svc

    def publish(self, subject: str, data: bytes, msg_id: str = "") -> None:
        self.s.run_until_complete(self.client.js_publish(subject, data, msg_id=msg_id))

    def stored(self, stream: str) -> list[tuple[str, bytes]]:
        return [(m.subject, m.data) for m in self.net.streams[stream].msgs.values()]

    def run(self, seconds: float) -> None:
        self.s.run(until=self.s.now + seconds)


def request(host: str = "h1", rid: str = "r1", term: int = 1) -> FenceRequest:
    return FenceRequest(request_id=rid, incident="i1", host=host, term=term, requested_at=1.0)


def kinds(core: ToyCore) -> list[str]:
    return [type(e).__name__ for e, _ in core.seen]


def fencer_script(core: ToyCore, event: Event, now: Now) -> list[Effect]:
    """Fence each request through the power port, publish the result, then ack."""
    if isinstance(event, Delivered):
        req = event.message
        assert isinstance(req, FenceRequest)
        core.memory[req.request_id] = (event.token, req)
        return [InProgress(event.token), Call("power", "fence", (req.host,), tag=req.request_id)]
    if isinstance(event, Returned) and event.tag in core.memory:
        token, req = core.memory.pop(event.tag)
        outcome = "confirmed_off" if event.ok else "failed"
        result = FenceResult(request_id=req.request_id, incident=req.incident, host=req.host, term=req.term,
                             outcome=outcome, reason=event.error, started_at=now.wall, finished_at=now.wall)
        return [Publish(f"hafence.fence.result.{req.host}", result, msg_id=f"result-{req.request_id}"),
                Ack(token), Log("info", "fenced", {"host": req.host, "outcome": outcome})]
    return []


class Power:
    def __init__(self, world: World, delay: float = 0.5, fail: bool = False) -> None:
        self.world, self.delay, self.fail = world, delay, fail
        self.calls: list[str] = []

    def fence(self, host: str) -> SimFuture[str]:
        self.calls.append(host)
        fut: SimFuture[str] = self.world.s.future("fence")
        if self.fail:
            self.world.s.call_later(self.delay, fut.set_exception, OSError("BMC unreachable"))
        elif self.delay >= 0:
            self.world.s.call_later(self.delay, fut.set_result, "off")
        return fut  # a negative delay: the device never answers


# -- work queue, ports, publish ------------------------------------------------------------

def test_a_request_goes_through_the_core_its_result_is_stored_and_the_request_acked() -> None:
    w = World()
    power = Power(w)
    svc = w.service(fencer_script, Inputs(consumers=[REQUESTS]), {"power": power})
    w.publish("hafence.fence.request.h1", encode(request()))
    w.run(10)
    core = w.cores[0]
    assert kinds(core) == ["Started", "Delivered", "Returned"]
    delivered = core.seen[1][0]
    assert isinstance(delivered, Delivered) and delivered.attempt == 1 and delivered.token > 0
    assert delivered.stored_at is not None
    assert power.calls == ["h1"]
    (subject, data), = w.stored("HAFENCE_EVENTS")
    assert subject == "hafence.fence.result.h1"
    assert msgspec.json.decode(data, type=FenceResult).outcome == "confirmed_off"
    assert not w.net.streams["HAFENCE_FENCE_REQUESTS"].msgs  # acked out of the work queue
    assert "info: fenced host=h1 outcome=confirmed_off" in w.net.log.text()
    assert svc.failures == []


def test_a_port_that_raises_or_fails_comes_back_as_an_error_string() -> None:
    w = World()

    class Broken:
        def fence(self, host: str) -> str:
            raise ValueError(f"no device for {host}")

    w.service(fencer_script, Inputs(consumers=[REQUESTS]), {"power": Broken()})
    w.publish("hafence.fence.request.h1", encode(request()))
    w.run(5)
    returned = w.cores[0].seen[-1][0]
    assert returned == Returned("r1", None, "ValueError: no device for h1")
    w2 = World()
    w2.service(fencer_script, Inputs(consumers=[REQUESTS]), {"power": Power(w2, fail=True)})
    w2.publish("hafence.fence.request.h1", encode(request()))
    w2.run(5)
    assert w2.cores[0].seen[-1][0] == Returned("r1", None, "OSError: BMC unreachable")


def test_a_call_to_a_port_the_service_lacks_is_an_error() -> None:
    w = World()
    w.service(fencer_script, Inputs(consumers=[REQUESTS]), {})
    w.publish("hafence.fence.request.h1", encode(request()))
    w.run(5)
    event = w.cores[0].seen[-1][0]
    assert isinstance(event, Returned) and "no port 'power'" in event.error


def test_concurrency_bounds_the_deliveries_the_core_holds_unsettled() -> None:
    w = World()
    power = Power(w, delay=2.0)
    consume = Consume("requests", "HAFENCE_FENCE_REQUESTS", "fencer", ["hafence.fence.request.*"], FenceRequest,
                      concurrency=2)
    w.service(fencer_script, Inputs(consumers=[consume]), {"power": power})
    for i in range(4):
        w.publish(f"hafence.fence.request.h{i}", encode(request(f"h{i}", f"r{i}")), msg_id=f"r{i}")
    w.run(1.0)
    assert len(power.calls) == 2  # two held, two waiting for a slot
    w.run(10)
    assert len(power.calls) == 4 and len(w.stored("HAFENCE_EVENTS")) == 4


def test_an_untagged_stored_publish_holds_the_next_effects_and_events_until_stored() -> None:
    w = World()
    result = FenceResult(request_id="r", incident="i", host="h1", term=1, outcome="failed", started_at=0.0,
                         finished_at=0.0)

    def script(core: ToyCore, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, Started):
            return [SetTimer("t", 0.1), Publish("hafence.fence.result.h1", result, msg_id="x"),
                    Log("info", "after the publish")]
        return []

    w.net.restart(down_for=2.0)  # the publish waits for NATS (retried with the same msg-id)
    w.service(script, Inputs())
    w.run(10)
    (_, now), = [(e, n) for e, n in w.cores[0].seen if isinstance(e, TimerFired)]
    stored_at = w.net.streams["HAFENCE_EVENTS"].msgs[1].time - w.net.clock.wall_offset
    assert now.mono > stored_at > 2.0  # the timer's event waited for the stream
    assert len(w.stored("HAFENCE_EVENTS")) == 1
    log = w.net.log.text()
    assert log.index("stored HAFENCE_EVENTS#1") < log.index("info: after the publish")


# -- S5: decoding and the subject check ----------------------------------------------------------

def test_a_message_that_breaks_its_subject_is_dead_lettered_and_termed_and_never_reaches_the_core() -> None:
    w = World()
    power = Power(w)
    w.service(fencer_script, Inputs(consumers=[REQUESTS]), {"power": power}, name="fencer")
    # A request for h2 on h1's subject (S5), and a body that is not JSON.
    w.publish("hafence.fence.request.h1", encode(request("h2")))
    w.publish("hafence.fence.request.h1", b"{not json")
    w.run(10)
    assert kinds(w.cores[0]) == ["Started"] and power.calls == []
    letters = [msgspec.json.decode(d, type=DeadLetter) for s, d in w.stored("HAFENCE_DLQ")]
    assert [s for s, _ in w.stored("HAFENCE_DLQ")] == ["hafence.dlq.fencer"] * 2
    assert "host 'h2' on hafence.fence.request.h1" in letters[0].error
    assert letters[1].error.startswith("undecodable message")
    assert not w.net.streams["HAFENCE_FENCE_REQUESTS"].msgs  # termed: never redelivered


def test_the_subject_check_is_production_s_looked_up_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug 'accept a message from the wrong subject' reaches the simulated driver."""
    monkeypatch.setattr(routes, "_violation", lambda *_: None)
    w = World()
    w.service(fencer_script, Inputs(consumers=[REQUESTS]), {"power": Power(w)})
    w.publish("hafence.fence.request.h1", encode(request("h2")))
    w.run(10)
    assert kinds(w.cores[0]) == ["Started", "Delivered", "Returned"]


def test_a_bad_request_is_answered_with_an_error_and_dead_lettered() -> None:
    w = World()
    w.service(lambda c, e, n: [], Inputs(serves=[Serve("cmd", "hafence.agent.h1.cmd", VmStop)]), name="agent")
    reply = w.s.run_until_complete(w.client.request("hafence.agent.h1.cmd", encode(request())))
    assert b'"error"' in reply.data and b"FenceRequest" in reply.data
    w.run(2)
    assert w.stored("HAFENCE_DLQ") and kinds(w.cores[0]) == ["Started"]


# -- core subscriptions, replay, request/reply ----------------------------------------------------

def test_subscribe_replay_and_caught_up_in_order() -> None:
    w = World()
    for i in range(3):
        result = FenceResult(request_id=f"r{i}", incident="i", host="h1", term=1, outcome="failed",
                             started_at=0.0, finished_at=0.0)
        w.publish("hafence.fence.result.h1", encode(result))
    wants = Inputs(replays=[ReplayInput("events", ["hafence.fence.result.*"], FenceResult)],
                   subscriptions=[Subscribe("hb", "hafence.hb.*", Heartbeat)])
    w.service(lambda c, e, n: [], wants)
    w.run(1)
    w.client.publish("hafence.hb.h1", encode(Heartbeat(host="h1", boot_id="b", seq=1, sent_at=0.0)))
    w.run(1)
    seen = [e for e, _ in w.cores[0].seen]
    assert [type(e).__name__ for e in seen] == ["Started", "Delivered", "Delivered", "Delivered", "CaughtUp",
                                                 "Delivered"]
    assert [e.message.request_id for e in seen[1:4]] == ["r0", "r1", "r2"]  # type: ignore[union-attr]
    assert seen[4] == CaughtUp("events") and seen[5].source == "hb"  # type: ignore[union-attr]


def test_a_stored_publish_reaches_core_subscribers_of_its_subject_too() -> None:
    """As on a real server (the agent hears its ``cleared`` on a plain subscription)."""
    w = World()
    wants = Inputs(subscriptions=[Subscribe("results", "hafence.fence.result.h1", FenceResult)])
    w.service(lambda c, e, n: [], wants)
    w.run(0.1)
    result = FenceResult(request_id="r", incident="i", host="h1", term=1, outcome="failed", started_at=0.0,
                         finished_at=0.0)
    w.publish("hafence.fence.result.h1", encode(result), msg_id="once")
    w.publish("hafence.fence.result.h1", encode(result), msg_id="once")  # a duplicate for the stream
    w.run(1)
    got = [e for e, _ in w.cores[0].seen if isinstance(e, Delivered)]
    assert [e.message for e in got] == [result, result] and len(w.stored("HAFENCE_EVENTS")) == 1


def test_request_and_reply_between_two_cores_and_no_responders() -> None:
    w = World()

    def agent(core: ToyCore, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, Asked):
            return [Reply(event.token, AgentReply(host="h1", vm="vm1", ok=True, state="stopped"))]
        return []

    def asker(core: ToyCore, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, Started):
            return [Request("hafence.agent.h1.cmd", VmStop(vm="vm1"), 1.0, "stop"),
                    Request("hafence.agent.h9.cmd", VmStop(vm="vm1"), 1.0, "nobody")]
        return []

    w.service(agent, Inputs(serves=[Serve("cmd", "hafence.agent.h1.cmd", VmStop)]), node="h1", name="agent")
    w.run(0.1)
    w.service(asker, Inputs(), node="n2", name="scheduler")
    w.run(2)
    returned = {e.tag: e for e, _ in w.cores[1].seen if isinstance(e, Returned)}
    assert msgspec.json.decode(returned["stop"].value, type=AgentReply).ok
    assert returned["nobody"].error.startswith("no_responders: ")


# -- timers, crash, pause ------------------------------------------------------------------------

def ticker(core: ToyCore, event: Event, now: Now) -> list[Effect]:
    if isinstance(event, Started):
        return [SetTimer("tick", 1.0), SetTimer("gone", 2.0), SetTimer("moved", 1.0), SetTimer("moved", 3.0),
                CancelTimer("gone")]
    return []


def test_timers_fire_on_the_node_clock_and_a_timer_set_again_or_cancelled_fires_at_most_once() -> None:
    w = World()
    w.service(ticker, Inputs())
    w.run(10)
    fired = [(e.key, round(n.mono, 6)) for e, n in w.cores[0].seen if isinstance(e, TimerFired)]
    assert fired == [("tick", 1.0), ("moved", 3.0)]


def test_a_timer_replaced_after_it_fired_but_before_its_event_was_handled_is_not_delivered() -> None:
    w = World()

    def script(core: ToyCore, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, Started):
            return [SetTimer("a", 1.0)]
        return []

    svc = w.service(script, Inputs())
    w.run(0.5)
    svc.pause(1.0)  # "a" fires while paused; its event waits in the queue
    w.run(0.7)
    svc._do(SetTimer("a", 5.0))  # as the core would, on an event handled before the old one
    w.run(10)
    fired = [round(n.mono, 6) for e, n in w.cores[0].seen if isinstance(e, TimerFired)]
    assert fired == [6.2]


def test_a_pause_queues_events_and_timers_fire_late_on_resume() -> None:
    w = World()
    svc = w.service(ticker, Inputs())
    w.run(0.5)
    svc.pause(10.0)
    w.run(20)
    fired = [(e.key, round(n.mono, 6)) for e, n in w.cores[0].seen if isinstance(e, TimerFired)]
    assert fired == [("tick", 10.5), ("moved", 10.5)]


def test_a_crash_loses_memory_timers_and_unsettled_deliveries_which_come_back_after_restart() -> None:
    w = World()
    power = Power(w, delay=-1)  # the device never answers: the delivery stays unsettled
    svc = w.service(fencer_script, Inputs(consumers=[REQUESTS]), {"power": power})
    w.publish("hafence.fence.request.h1", encode(request()))
    w.run(1)
    svc._do(SetTimer("old", 2.0))
    svc.crash()
    assert not svc.alive
    svc.start()
    w.run(40)
    old, new = w.cores
    assert kinds(old) == ["Started", "Delivered"]
    redelivered = [e for e, _ in new.seen if isinstance(e, Delivered)]
    assert kinds(new)[0] == "Started" and not any(isinstance(e, TimerFired) for e, _ in new.seen)
    assert [e.attempt for e in redelivered] == [2]  # after the ack wait (fence_ack_wait_s, 30 s)
    assert power.calls == ["h1", "h1"]


def test_a_core_that_raises_is_recorded_its_delivery_comes_back_and_the_service_goes_on() -> None:
    w = World()

    def script(core: ToyCore, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, Delivered) and event.attempt == 1:
            raise KeyError("boom")
        return fencer_script(core, event, now)

    svc = w.service(script, Inputs(consumers=[REQUESTS]), {"power": Power(w)})
    w.publish("hafence.fence.request.h1", encode(request()))
    w.run(5)
    assert len(svc.failures) == 1 and "KeyError: 'boom' handling Delivered(" in svc.failures[0][1]
    attempts = [e.attempt for e, _ in w.cores[0].seen if isinstance(e, Delivered)]
    assert attempts == [1, 2] and len(w.cores) == 1  # nak'd, redelivered to the same core
    assert len(w.stored("HAFENCE_EVENTS")) == 1


# -- the observer -------------------------------------------------------------------------------

def test_the_observer_sees_every_event_before_the_core_and_every_effect_before_it_is_done() -> None:
    w = World()
    order: list[str] = []

    class Watch:
        def on_event(self, service: SimService, event: Event) -> None:
            order.append(f"event {type(event).__name__} handled={service.handled}")

        def on_effect(self, service: SimService, effect: Effect) -> None:
            order.append(f"effect {type(effect).__name__} stored={len(w.stored('HAFENCE_EVENTS'))}")

    w.service(fencer_script, Inputs(consumers=[REQUESTS]), {"power": Power(w)}, observer=Watch())
    w.publish("hafence.fence.request.h1", encode(request()))
    w.run(5)
    assert order == ["event Started handled=0", "event Delivered handled=1", "effect InProgress stored=0",
                     "effect Call stored=0", "event Returned handled=2", "effect Publish stored=0",
                     "effect Ack stored=1", "effect Log stored=1"]  # an untagged publish is awaited


# -- the lease -------------------------------------------------------------------------------------

def leased(core: ToyCore, event: Event, now: Now) -> list[Effect]:
    if isinstance(event, LeaseChanged):
        core.memory["lease"] = event
    if isinstance(event, Returned) and event.tag == "raise":
        core.memory["raised"] = event.value
    return []


def lease_state(core: ToyCore) -> LeaseChanged | None:
    return core.memory.get("lease")


def test_one_holder_and_a_paused_holder_loses_to_a_higher_term() -> None:
    w = World(lease_ttl=4.0)
    wants = Inputs(lease=Lease("arbiter", ttl=4.0))
    a = w.service(leased, wants, node="a", name="arbiter")
    w.run(0.5)
    w.service(leased, wants, node="b", name="arbiter")
    w.run(5)
    ca, cb = w.cores
    first = lease_state(ca)
    assert first is not None and first.held and first.term > 0
    assert lease_state(cb) is None  # never held: nothing to report
    assert first.valid_until > 0
    a.pause(10.0)  # past its TTL: the key expires, b takes it with a higher term
    w.run(8)
    taken = lease_state(cb)
    assert taken is not None and taken.held and taken.term > first.term
    # While paused a has handled nothing; at resume it learns it lost (or its now says so).
    paused_events = [n for e, n in ca.seen if 5.5 < n.mono < 15.5]
    assert paused_events == []
    w.run(10)
    lost = lease_state(ca)
    assert lost is not None and not lost.held


def test_a_lease_after_a_replay_waits_for_its_caught_up_and_raise_term_goes_through_the_port() -> None:
    w = World()
    wants = Inputs(replays=[ReplayInput("events", ["hafence.host.>"], FenceResult)],
                   lease=Lease("arbiter", ttl=6.0, after="events"))

    def script(core: ToyCore, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, CaughtUp):
            return [Call("lease", "learn", (1000,))]  # a term seen in the replay
        if isinstance(event, LeaseChanged) and event.held and "asked" not in core.memory:
            core.memory["asked"] = True
            return [Call("lease", "learn", (event.term + 50,)), Call("lease", "raise_term", (), "raise")]
        return leased(core, event, now)

    w.service(script, wants)
    w.run(10)
    core = w.cores[0]
    order = kinds(core)
    assert order.index("CaughtUp") < order.index("LeaseChanged")
    terms = [e.term for e, _ in core.seen if isinstance(e, LeaseChanged)]
    assert terms[0] > 1000  # above what the replay showed
    assert core.memory["raised"] is True and terms[-1] > terms[0] + 50


def test_after_the_bucket_is_lost_a_term_learned_and_raised_goes_above_the_last_one() -> None:
    w = World()
    for _ in range(5):  # other keys' writes: the bucket's revisions are past 5
        w.s.run_until_complete(w.client.key_value(w.names.leases).put("scheduler", b"{}"))
    wants = Inputs(lease=Lease("arbiter", ttl=6.0))
    a = w.service(leased, wants, node="a")
    w.run(3)
    first = lease_state(w.cores[0])
    assert first is not None and first.held and first.term > 1
    a.crash()
    w.net.delete_bucket(w.names.leases)
    w.net.create_bucket(w.names.leases, ttl=6.0)
    b = w.service(leased, wants, node="b")
    w.run(3)
    second = lease_state(w.cores[1])
    assert second is not None and second.held and second.term < first.term  # revisions restarted at 1
    b._do(Call("lease", "learn", (first.term,)))  # as a core does from a fencer's refusal
    b._do(Call("lease", "raise_term", (), "raise"))
    w.run(1)
    raised = lease_state(w.cores[1])
    assert w.cores[1].memory["raised"] is True
    assert raised is not None and raised.held and raised.term > first.term


def test_a_stale_lease_bound_as_production_binds_it_keeps_believing_while_another_takes_over() -> None:
    """The lab's StaleLease (what ``lease_factory`` binds for the S3 test) on the simulated
    lease: the old leader, paused past its TTL, still says it holds its term for ever."""
    from hafence.lab.stale_arbiter import StaleLease

    w = World(lease_ttl=4.0)
    wants = Inputs(lease=Lease("arbiter", ttl=4.0))
    stale = SimService("arbiter", "a", lambda: ToyCore(leased, wants), {}, None, NodeClock(w.s, "a"), w.net)
    stale.lease_factory = StaleLease
    stale.start()
    w.run(1)
    w.service(leased, wants, node="b", name="arbiter")
    old = stale.core.memory["lease"]  # type: ignore[union-attr]
    stale.pause(10.0)
    w.run(20)
    new = lease_state(w.cores[0])
    assert new is not None and new.held and new.term > old.term
    assert stale.core.memory["lease"] == old  # type: ignore[union-attr]
    assert old.held and old.valid_until == float("inf")


# -- determinism and no real time ------------------------------------------------------------------

def busy_world(seed: int) -> str:
    w = World(seed, Faults(latency_max=0.01, ack_loss=0.1, spike_probability=0.05, spike_max=0.5))
    power = Power(w, delay=0.3)
    w.service(fencer_script, Inputs(consumers=[REQUESTS]), {"power": power}, name="fencer")
    w.service(leased, Inputs(lease=Lease("arbiter", ttl=6.0)), node="a", name="arbiter")
    svc = w.service(leased, Inputs(lease=Lease("arbiter", ttl=6.0)), node="b", name="arbiter")
    for i in range(20):
        w.publish(f"hafence.fence.request.h{i % 3}", encode(request(f"h{i % 3}", f"r{i}")), msg_id=f"r{i}")
        w.run(0.7)
        if i == 7:
            svc.pause(9.0)
    w.run(30)
    return w.net.log.text()


def test_the_same_seed_gives_the_same_log() -> None:
    assert busy_world(3) == busy_world(3)
    assert busy_world(3) != busy_world(4)


def test_no_real_time_is_read(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object) -> float:
        raise AssertionError("the simulated driver read real time")

    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "sleep"):
        monkeypatch.setattr(time, name, forbidden)
    assert busy_world(5).count("\n") > 200


# -- the whole cluster on the driver -------------------------------------------------------------

def test_a_host_that_loses_power_is_fenced_and_its_vms_run_again_elsewhere() -> None:
    """Every real core on the simulated driver, no random fault: h1 loses its power with
    its BMC at t=60 (its PDU, if it has one, or nothing can confirm it off)."""
    from hafence.sim.run import build

    cluster, _ = build(2, minutes=4.0, kinds=())
    cluster.start()
    s, world = cluster.scheduler, cluster.world
    s.run(until=60.0, after_step=cluster.checkers.after_step)
    assert {h for h, a in cluster.agents.items() if a.alive} == set(world.hosts)
    assert sorted(world.running_on("vm1-1")) == ["h1"]
    victim = next(h for h in sorted(world.hosts) if len(world.hosts[h].devices) > 1)  # it has a PDU level
    vms = sorted(world.hosts[victim].running)
    world.lose_power(victim)
    s.run(until=180.0, after_step=cluster.checkers.after_step)
    assert cluster.checkers.violations == [] and cluster.failures == []
    confirmed = [r for r in world.runs if r.host == victim and r.outcome == "confirmed_off"]
    assert confirmed and confirmed[0].started - 60.0 < 10.0  # detection (3 s) and the arbiter's decision
    for vm in vms:
        (where,) = world.running_on(vm)
        assert where != victim
