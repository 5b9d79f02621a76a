"""The arbiter's core on its own: events in, effects out, no NATS, no clock.

Each test names a rule of the arbiter (services/arbiter/core.py) and breaks if
the rule is broken: replayed facts keep their own time; results are announced
only by a caught-up leader; a refused term is raised before anything is sent
again; a request goes out before its fence_requested event; a lease past its
valid_until decides nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from hafence.arbiter.core import TICK, ArbiterCore
from hafence.config import parse_config
from hafence.contracts import FenceRequest, FenceResult, HostEvent, Inventory
from hafence.core import (
    Call,
    CaughtUp,
    Delivered,
    Effect,
    Event,
    LeaseChanged,
    Log,
    Now,
    Publish,
    Returned,
    SetTimer,
    Span,
    Started,
    TimerFired,
)
from tests.conftest import cluster_toml

DAY = 86400.0
WALL0, MONO0 = 1_800_000_000.0, 1_000.0


def at(seconds: float) -> Now:
    """``seconds`` after the core started, on both clocks."""
    return Now(mono=MONO0 + seconds, wall=WALL0 + seconds)


def make_core(tmp_path: Path, hosts: int = 4, extra: str = "") -> ArbiterCore:
    return ArbiterCore(parse_config(cluster_toml("nats://127.0.0.1:1", tmp_path, hosts, extra), "test.toml"))


def delivered(fact: HostEvent | FenceResult | Inventory, pending: int = 0) -> Delivered:
    subject = (f"hafence.fence.result.{fact.host}" if isinstance(fact, FenceResult)
               else f"hafence.inventory.{fact.host}" if isinstance(fact, Inventory)
               else f"hafence.host.{fact.host}.{fact.kind}")
    return Delivered("events", subject, fact, pending=pending)


def suspect(host: str, wall: float, incident: str = "", late: list[str] | None = None) -> HostEvent:
    # ``late`` given (even empty): the monitor's list came with it, so it is decided without a settle wait.
    return HostEvent(host=host, kind="suspect", at=wall, incident=incident or f"{host}-boot-1", boot_id="boot",
                     late_hosts=[] if late is None else late)


def fenced_history(host: str, wall: float) -> list[HostEvent | FenceResult]:
    incident, request = f"{host}-old", f"fence-{host}-old"
    return [
        suspect(host, wall, incident),
        HostEvent(host=host, kind="fence_requested", at=wall + 1, incident=incident, request_id=request, term=3),
        FenceResult(request_id=request, incident=incident, host=host, term=3, outcome="confirmed_off",
                    started_at=wall + 1, finished_at=wall + 3),
    ]


def published(effects: list[Effect], kind: type | None = None) -> list[Publish]:
    return [e for e in effects if isinstance(e, Publish) and (kind is None or isinstance(e.message, kind))]


def host_events(effects: list[Effect], kind: str) -> list[HostEvent]:
    return [p.message for p in published(effects, HostEvent) if isinstance(p.message, HostEvent)
            and p.message.kind == kind]


def requests(effects: list[Effect]) -> list[FenceRequest]:
    return [p.message for p in published(effects, FenceRequest) if isinstance(p.message, FenceRequest)]


def tagged(effects: list[Effect]) -> list[Publish | Call]:
    return [e for e in effects if isinstance(e, Publish | Call) and e.tag]


class Harness:
    """Feeds a core and answers its tagged effects, keeping every effect in order."""

    def __init__(self, core: ArbiterCore) -> None:
        self.core = core
        self.log: list[Effect] = []

    def feed(self, event: Event, now: Now) -> list[Effect]:
        out = self.core.handle(event, now)
        self.log += out
        return out

    def settle(self, effects: list[Effect], now: Now, answer: dict[str, object] | None = None) -> list[Effect]:
        """Answer every tagged effect (and those its answers lead to) with success."""
        answer = answer or {}
        everything: list[Effect] = []
        todo = list(effects)
        while todo:
            effect = todo.pop(0)
            everything.append(effect)
            if isinstance(effect, Publish | Call) and effect.tag:
                value = answer.get(effect.op) if isinstance(effect, Call) else None
                todo += self.feed(Returned(effect.tag, value=value), now)
        return everything

    def start(self, term: int = 5, valid_for: float = 1e6, replay: list[HostEvent | FenceResult] = ()) -> None:
        self.feed(Started(), at(0))
        for fact in replay:
            self.feed(delivered(fact), at(0))
        self.feed(CaughtUp("events"), at(0))
        self.lease(term, valid_for, at(0))

    def lease(self, term: int, valid_for: float, now: Now, held: bool = True) -> list[Effect]:
        return self.settle(self.feed(LeaseChanged(held, term, now.mono + valid_for), now), now)


# --- replayed facts keep their own time -----------------------------------------------------


def test_a_restart_does_not_count_fences_of_days_ago_toward_the_storm_guard(tmp_path: Path) -> None:
    """h1 and h2 were fenced two days ago; the arbiter starts, replays them, and h3
    becomes suspect: 1 of 4 hosts lost, h3 is fenced. Folded at the time of the
    replay instead, the old fences are 3 of 4 lost within the storm window."""
    core = Harness(make_core(tmp_path))
    old = WALL0 - 2 * DAY
    core.start(replay=fenced_history("h1", old) + fenced_history("h2", old + 5))
    effects = core.settle(core.feed(delivered(suspect("h3", WALL0 + 10)), at(10)), at(10))
    assert [r.host for r in requests(effects)] == ["h3"]
    assert host_events(effects, "fence_skipped") == []


def test_the_same_old_fences_a_few_seconds_ago_still_hold_a_storm(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.start(replay=fenced_history("h1", WALL0 - 10) + fenced_history("h2", WALL0 - 5))
    effects = core.settle(core.feed(delivered(suspect("h3", WALL0 + 10)), at(10)), at(10))
    assert requests(effects) == []
    assert [e.rule for e in host_events(effects, "fence_skipped")] == ["storm"]


def test_a_request_replayed_from_before_a_restart_keeps_its_deadline(tmp_path: Path) -> None:
    """Sent 200 s ago (deadline 180 s), no result: failed at the first round after the
    restart. Re-stamped with the replay's time, it would wait another 180 s."""
    core = Harness(make_core(tmp_path))
    history = fenced_history("h1", WALL0 - 201)[:2]
    core.feed(Started(), at(0))
    for fact in history:
        core.feed(delivered(fact), at(0))
    core.feed(CaughtUp("events"), at(0))
    core.core.reissued = True  # this test is about the deadline, not the new leader's re-issue
    effects = core.lease(5, 1e6, at(1))  # a new leader decides at once
    [failed] = host_events(effects, "fence_failed")
    assert failed.request_id == "fence-h1-old" and failed.alert
    assert [p.subject for p in published(effects) if p.subject.startswith("hafence.alert")] == [
        "hafence.alert.fence_deadline"]


# --- results are announced by a caught-up leader only ---------------------------------------


def confirmed(host: str = "h1") -> FenceResult:
    return FenceResult(request_id=f"fence-{host}-boot-1", incident=f"{host}-boot-1", host=host, term=5,
                       outcome="confirmed_off", started_at=WALL0, finished_at=WALL0 + 1)


def test_a_result_is_announced_as_fenced_only_by_a_caught_up_leader(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.feed(Started(), at(0))
    core.feed(LeaseChanged(True, 5, MONO0 + 100), at(0))  # held, but the replay is not read yet
    assert host_events(core.feed(delivered(confirmed()), at(1)), "fenced") == []
    core.feed(CaughtUp("events"), at(1))
    [fenced] = host_events(core.feed(delivered(confirmed()), at(2)), "fenced")
    assert fenced.request_id == "fence-h1-boot-1" and fenced.term == 5
    core.feed(LeaseChanged(False, 0, 0.0), at(3))  # a standby folds it and says nothing
    assert host_events(core.feed(delivered(confirmed()), at(4)), "fenced") == []


def test_a_result_after_the_lease_ran_out_is_not_announced(tmp_path: Path) -> None:
    """The driver has not reported the loss yet (a paused process): valid_until says it."""
    core = Harness(make_core(tmp_path))
    core.start(valid_for=5)
    assert host_events(core.feed(delivered(confirmed()), at(6)), "fenced") == []


def test_a_failed_result_is_announced_as_fence_failed_with_an_alert(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.start()
    failed = FenceResult(request_id="fence-h1-boot-1", incident="h1-boot-1", host="h1", term=5, outcome="failed",
                         reason="bmc unreachable", started_at=WALL0, finished_at=WALL0 + 1)
    [event] = host_events(core.feed(delivered(failed), at(1)), "fence_failed")
    assert event.alert and event.reason == "bmc unreachable"


# --- refused terms --------------------------------------------------------------------------


def refused(request_id: str, term: int, highest: int) -> FenceResult:
    return FenceResult(request_id=request_id, incident="h3-boot-1", host="h3", term=term, outcome="refused",
                       highest_term=highest, started_at=WALL0, finished_at=WALL0 + 1)


def fenced_once_then_refused(tmp_path: Path) -> tuple[Harness, list[Effect]]:
    """h3 fenced under term 3, refused (the fencer has admitted term 7); the next round."""
    core = Harness(make_core(tmp_path))
    core.start(term=3)
    effects = core.settle(core.feed(delivered(suspect("h3", WALL0 + 10)), at(10)), at(10))
    [request] = requests(effects)
    learned = core.feed(delivered(refused(request.request_id, 3, 7)), at(11))
    assert Call("lease", "learn", (7,)) in learned
    return core, core.feed(TimerFired(TICK), at(12))


def test_a_refused_term_is_raised_before_the_request_is_sent_again(tmp_path: Path) -> None:
    core, effects = fenced_once_then_refused(tmp_path)
    [raise_call] = tagged(effects)
    assert (raise_call.port, raise_call.op) == ("lease", "raise_term") and requests(effects) == []
    core.feed(LeaseChanged(True, 9, MONO0 + 1e6), at(12))  # the driver reports the raised term first
    after = core.settle(core.feed(Returned(raise_call.tag, value=True), at(12)), at(12))
    [again] = requests(after)
    assert again.term == 9 and again.request_id == "fence-h3-boot-1-r1"


def test_nothing_is_sent_under_a_refused_term_when_the_raise_fails(tmp_path: Path) -> None:
    core, effects = fenced_once_then_refused(tmp_path)
    since_refusal = len(core.log) - len(effects)
    [raise_call] = tagged(effects)
    assert requests(core.settle(core.feed(Returned(raise_call.tag, value=False), at(12)), at(12))) == []
    # Nor when the raise says yes but the term the core knows is still the refused one.
    [raise_call] = tagged(core.feed(TimerFired(TICK), at(13)))
    assert requests(core.settle(core.feed(Returned(raise_call.tag, value=True), at(13)), at(13))) == []
    assert requests(core.log[since_refusal:]) == []


# --- the request before its event -----------------------------------------------------------


def test_the_request_is_published_before_fence_requested_and_counted_only_when_both_are_out(
    tmp_path: Path,
) -> None:
    core = Harness(make_core(tmp_path))
    core.start()
    first = core.feed(delivered(suspect("h3", WALL0 + 10)), at(10))
    assert [type(p.message).__name__ for p in published(first)] == ["FenceRequest"]
    [request_pub] = published(first)
    assert request_pub.msg_id == "fence-h3-boot-1:t5" and request_pub.tag
    second = core.feed(Returned(request_pub.tag), at(10))
    [event_pub] = published(second)
    assert isinstance(event_pub.message, HostEvent) and event_pub.message.kind == "fence_requested"
    assert event_pub.msg_id == "fence_requested:fence-h3-boot-1:t5"
    assert core.core.policy.views["h3"].phase == "suspect"  # not in flight until the event is stored
    core.feed(Returned(event_pub.tag), at(10))
    assert core.core.policy.views["h3"].phase == "fencing"


def test_a_request_that_could_not_be_published_is_decided_again_with_the_same_ids(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.start()
    [first] = published(core.feed(delivered(suspect("h3", WALL0 + 10)), at(10)))
    assert published(core.feed(Returned(first.tag, error="NotPublished: no stream"), at(10))) == []
    [again] = published(core.feed(TimerFired(TICK), at(11)))
    assert again.msg_id == first.msg_id and isinstance(again.message, FenceRequest)


# --- the lease ------------------------------------------------------------------------------


def test_a_lease_past_its_valid_until_takes_no_decisions(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.start(valid_for=5)
    assert published(core.feed(delivered(suspect("h3", WALL0 + 10)), at(10))) == []
    assert core.feed(TimerFired(TICK), at(11)) == [SetTimer(TICK, 0.05)]
    # Renewed: the same suspect is decided at the next round.
    core.feed(LeaseChanged(True, 5, MONO0 + 100), at(12))
    assert [r.host for r in requests(core.log)] == ["h3"]


def test_a_new_leader_re_sends_the_requests_in_flight_under_its_term(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    history = fenced_history("h1", WALL0 - 5)[:2]
    core.feed(Started(), at(0))
    for fact in history:
        core.feed(delivered(fact), at(0))
    core.feed(CaughtUp("events"), at(0))
    effects = core.lease(8, 100, at(1))
    [again] = requests(effects)
    assert again.request_id == "fence-h1-old" and again.term == 8
    assert [e.request_id for e in host_events(effects, "fence_requested")] == ["fence-h1-old"]
    # Once only per leadership.
    assert requests(core.settle(core.feed(TimerFired(TICK), at(2)), at(2))) == []


# --- decisions on arrival, storage leases ---------------------------------------------------


def test_a_suspect_with_more_queued_behind_it_waits_for_them(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.start()
    assert core.feed(delivered(suspect("h3", WALL0 + 10), pending=2), at(10)) == []


@pytest.mark.parametrize("live", [True, False])
def test_storage_leases_are_asked_for_the_suspects_before_deciding(tmp_path: Path, live: bool) -> None:
    core = Harness(make_core(tmp_path, extra=f'[storage]\nlease_dir = "{tmp_path / "leases"}"\n'))
    core.start()
    effects = core.feed(delivered(suspect("h3", WALL0 + 10)), at(10))
    [call] = tagged(effects)
    assert (call.port, call.op, call.args) == ("storage", "live", (["h3"], 10.0)) and published(effects) == []
    after = core.settle(core.feed(Returned(call.tag, value={"h3": live}), at(10)), at(10))
    if live:
        assert [e.rule for e in host_events(after, "fence_skipped")] == ["isolated"] and requests(after) == []
    else:
        assert [r.host for r in requests(after)] == ["h3"]


def test_terms_seen_in_the_replay_are_reported_to_the_lease_once_each(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.feed(Started(), at(0))
    for fact in fenced_history("h1", WALL0 - 50) + fenced_history("h2", WALL0 - 40):
        core.feed(delivered(fact), at(0))
    assert [e for e in core.log if isinstance(e, Call)] == [Call("lease", "learn", (3,))]


def test_a_decision_taken_at_a_timer_joins_its_incidents_trace(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.start()
    trace = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    event = Delivered("events", "hafence.host.h3.suspect", suspect("h3", WALL0 + 10), pending=1, headers=trace)
    assert core.feed(event, at(10)) == []  # more queued: decided at the next tick
    effects = core.feed(TimerFired(TICK), at(11))
    [span] = [e for e in effects if isinstance(e, Span)]
    assert span.name == "arbiter fence h3" and span.parent == trace
    assert effects.index(span) < effects.index(published(effects, FenceRequest)[0])


def test_a_round_is_carried_out_before_the_next_is_taken(tmp_path: Path) -> None:
    """Ticks while a request's publish is unanswered decide nothing twice."""
    core = Harness(make_core(tmp_path))
    core.start()
    [first] = published(core.feed(delivered(suspect("h3", WALL0 + 10)), at(10)))
    assert published(core.feed(TimerFired(TICK), at(10.1))) == []
    assert published(core.feed(delivered(suspect("h4", WALL0 + 10)), at(10.2))) == []
    # The round ends when its last outcome is back; the suspect that came meanwhile is decided then.
    [event] = published(core.feed(Returned(first.tag), at(10.3)))
    after = core.feed(Returned(event.tag), at(10.3))
    assert [r.host for r in requests(after)] == ["h4"]


def test_a_result_that_comes_before_its_fence_requested_is_stored_is_not_lost(tmp_path: Path) -> None:
    """A second attempt (a new request id) answered by a fast fencer before the ack of
    its fence_requested: the result proves the request went out. Dropped as a result
    for another request, the host would stay 'fencing' until the deadline."""
    core = Harness(make_core(tmp_path))
    core.start()
    core.settle(core.feed(delivered(suspect("h3", WALL0 + 10)), at(10)), at(10))
    failed = FenceResult(request_id="fence-h3-boot-1", incident="h3-boot-1", host="h3", term=5, outcome="failed",
                         reason="bmc unreachable", started_at=WALL0 + 10, finished_at=WALL0 + 11)
    core.feed(delivered(failed), at(11))
    [retry] = published(core.feed(TimerFired(TICK), at(30)))  # after the back-off
    assert isinstance(retry.message, FenceRequest) and retry.message.request_id == "fence-h3-boot-1-a2"
    [event] = published(core.feed(Returned(retry.tag), at(30)))
    done = FenceResult(request_id="fence-h3-boot-1-a2", incident="h3-boot-1", host="h3", term=5,
                       outcome="confirmed_off", started_at=WALL0 + 30, finished_at=WALL0 + 30.2)
    assert [e.request_id for e in host_events(core.feed(delivered(done), at(30.2)), "fenced")] == [done.request_id]
    core.feed(Returned(event.tag), at(30.3))
    assert core.core.policy.views["h3"].phase == "fenced"


def test_a_new_leader_whose_term_cannot_be_raised_re_sends_at_a_later_round(tmp_path: Path) -> None:
    """In flight under term 3, refused; the new leader (term 3 again: a recreated
    bucket) cannot raise it at first: nothing goes out, and the re-send is tried again."""
    core = Harness(make_core(tmp_path))
    history = fenced_history("h1", WALL0 - 5)[:2]
    core.feed(Started(), at(0))
    for fact in [*history, FenceResult(request_id="fence-h9", incident="h9", host="h2", term=3, outcome="refused",
                                       highest_term=6, started_at=WALL0, finished_at=WALL0)]:
        core.feed(delivered(fact), at(0))
    core.feed(CaughtUp("events"), at(0))
    [raise_call] = tagged(core.feed(LeaseChanged(True, 3, MONO0 + 100), at(1)))
    assert requests(core.feed(Returned(raise_call.tag, value=False), at(1))) == []
    [raise_call] = tagged(core.feed(TimerFired(TICK), at(2)))
    core.feed(LeaseChanged(True, 7, MONO0 + 100), at(2))
    [again] = requests(core.feed(Returned(raise_call.tag, value=True), at(2)))
    assert again.request_id == "fence-h1-old" and again.term == 7


# --- the host-phase machine ------------------------------------------------------------------


def inventory(host: str, boot: str, wall: float) -> Inventory:
    return Inventory(host=host, boot_id=boot, memory_mb=1024, vcpus=2, sent_at=wall)


def test_the_replay_reads_cleared_events_and_inventories(tmp_path: Path) -> None:
    core = make_core(tmp_path)
    [replay] = core.inputs().replays
    assert "hafence.inventory.*" in replay.filters and "hafence.host.*.cleared" in replay.filters
    raw = b'{"type":"inventory","host":"h1","boot_id":"b2","memory_mb":1,"vcpus":1,"sent_at":1.0}'
    assert isinstance(replay.accepts.decode(raw), Inventory)


def test_a_host_heard_after_its_fence_is_not_fenced_again_until_cleared_and_back(tmp_path: Path) -> None:
    """Replayed: h1 fenced (its suspect named boot "boot"), heard again, suspect again:
    still fenced, nothing is sent. Its new boot reports (quarantined), it is cleared:
    up, and its next suspicion is fenced."""
    core = Harness(make_core(tmp_path))
    core.start(replay=[*fenced_history("h1", WALL0 - 100),
                       HostEvent(host="h1", kind="alive", at=WALL0 - 90)])
    assert core.core.policy.views["h1"].phase == "fenced"
    out = core.settle(core.feed(delivered(suspect("h1", WALL0 + 10, "h1-boot-2", late=[])), at(10)), at(10))
    assert requests(out) == [] and core.core.policy.views["h1"].phase == "fenced"
    core.feed(delivered(inventory("h1", "boot-2", WALL0 + 20)), at(20))
    assert core.core.policy.views["h1"].phase == "quarantined"
    core.feed(delivered(HostEvent(host="h1", kind="cleared", at=WALL0 + 21)), at(21))
    assert core.core.policy.views["h1"].phase == "up"
    out = core.settle(core.feed(delivered(suspect("h1", WALL0 + 30, "h1-boot-3", late=[])), at(30)), at(30))
    assert [r.incident for r in requests(out)] == ["h1-boot-3"]


def test_an_illegal_event_is_logged_with_its_count_not_dropped(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.start(replay=fenced_history("h1", WALL0 - 100))
    late = FenceResult(request_id="fence-h1-old", incident="h1-old", host="h1", term=3, outcome="failed",
                       reason="late", started_at=WALL0, finished_at=WALL0 + 1)
    out = core.feed(delivered(late), at(1))
    [log] = [e for e in out if isinstance(e, Log) and "illegal" in e.message]
    assert log.fields["event"] == "fence_failed" and log.fields["phase"] == "fenced" and log.fields["count"] == 1
    assert core.core.policy.views["h1"].phase == "fenced"


# --- a fence covers one boot (simulation seed 247) -------------------------------------------


def boot_suspect(host: str, wall: float, incident: str, boot: str) -> HostEvent:
    return HostEvent(host=host, kind="suspect", at=wall, incident=incident, boot_id=boot, late_hosts=[])


def test_a_later_boot_that_goes_silent_after_an_old_incidents_fence_is_fenced(tmp_path: Path) -> None:
    """Seed 247, replayed: h1's boot b1 is suspect; h1 resets to b2 (it reports, is heard,
    cleared); a stale leader's request of b1's incident (no fence_requested stored) then
    powers h1 off: confirmed_off names b1. b2 goes silent: that is a new incident, fenced
    with b2 named, so what the scheduler started on b2 is released. Before the fix h1
    stayed "fenced" and b2 was never fenced (its VMs waited for ever)."""
    core = Harness(make_core(tmp_path))
    core.start(replay=[
        boot_suspect("h1", WALL0 - 60, "h1-b1-359", "b1"),
        inventory("h1", "b2", WALL0 - 3),
        HostEvent(host="h1", kind="alive", at=WALL0 - 3),
        HostEvent(host="h1", kind="cleared", at=WALL0 - 3),
        FenceResult(request_id="fence-h1-b1-359", incident="h1-b1-359", host="h1", term=9, outcome="confirmed_off",
                    started_at=WALL0 - 3, finished_at=WALL0 - 2, boot_id="b1"),
    ])
    assert core.core.policy.views["h1"].phase == "fenced"
    # A second name of b1's outage (another monitor replica) fences nothing: b1 is off.
    out = core.settle(core.feed(delivered(boot_suspect("h1", WALL0 + 1, "h1-b1-other", "b1")), at(1)), at(1))
    assert requests(out) == [] and core.core.policy.views["h1"].phase == "fenced"
    out = core.settle(core.feed(delivered(boot_suspect("h1", WALL0 + 3, "h1-b2-0", "b2")), at(3)), at(3))
    [request] = requests(out)
    assert (request.incident, request.boot_id) == ("h1-b2-0", "b2")
    assert host_events(out, "fence_requested")[0].boot_id == "b2"


def b1_fenced_while_b2_reports() -> list[HostEvent | Inventory]:
    """h1's boot b1 suspected and its fence requested, then a report of its new boot b2."""
    return [
        boot_suspect("h1", WALL0 - 60, "h1-b1", "b1"),
        HostEvent(host="h1", kind="fence_requested", at=WALL0 - 50, incident="h1-b1", request_id="fence-h1-b1",
                  term=3, boot_id="b1"),
        inventory("h1", "b2", WALL0 - 10),
    ]


def test_a_later_boots_suspicion_during_a_fence_is_fenced_once_that_fence_is_confirmed(tmp_path: Path) -> None:
    """The other order: b1's fence is in flight when b2 reports and goes silent. The fence
    is finished first (it powers the host off, b2 too); then b2's incident is fenced."""
    core = Harness(make_core(tmp_path))
    core.start(replay=[
        *b1_fenced_while_b2_reports(),
    ])
    # b2's suspicion while b1's fence runs: nothing new is sent yet (the re-issue of b1's is).
    out = core.settle(core.feed(delivered(boot_suspect("h1", WALL0 + 1, "h1-b2", "b2")), at(1)), at(1))
    assert all(r.incident == "h1-b1" for r in requests(out))
    assert core.core.policy.views["h1"].phase == "fencing"
    result = FenceResult(request_id="fence-h1-b1", incident="h1-b1", host="h1", term=5, outcome="confirmed_off",
                         started_at=WALL0, finished_at=WALL0 + 2, boot_id="b1")
    out = core.settle(core.feed(delivered(result), at(2)), at(2))
    assert core.core.policy.views["h1"].phase == "quarantined_suspect"
    # The earlier fence's confirmation read again (a redelivery) does not end b2's incident.
    out += core.settle(core.feed(delivered(result), at(2.5)), at(2.5))
    assert core.core.policy.views["h1"].phase == "quarantined_suspect"
    out += core.settle(core.feed(TimerFired(TICK), at(3)), at(3))
    [request] = requests(out)
    assert (request.incident, request.boot_id) == ("h1-b2", "b2")


def test_a_later_boots_suspicion_is_dropped_when_the_host_is_heard_again(tmp_path: Path) -> None:
    core = Harness(make_core(tmp_path))
    core.start(replay=[
        *b1_fenced_while_b2_reports(),
        boot_suspect("h1", WALL0 - 5, "h1-b2", "b2"),
        HostEvent(host="h1", kind="alive", at=WALL0 - 4),
    ])
    result = FenceResult(request_id="fence-h1-b1", incident="h1-b1", host="h1", term=5, outcome="confirmed_off",
                         started_at=WALL0, finished_at=WALL0 + 2, boot_id="b1")
    core.settle(core.feed(delivered(result), at(2)), at(2))
    assert core.core.policy.views["h1"].phase == "fenced"


def test_a_fence_of_a_suspicion_naming_no_boot_names_the_boot_the_host_last_reported(tmp_path: Path) -> None:
    """Seeds 613, 680: h1's boot b1 was suspected (held by the storm guard), then a
    restarted monitor that never heard h1 suspected it again under a new name, with no
    boot. The fence of that name must say which boot it is about (b1), or its result
    cannot be tied to b1's first incident by anyone reading the stream."""
    core = Harness(make_core(tmp_path))
    history = [inventory("h1", "b1", WALL0 - 60), boot_suspect("h1", WALL0 - 50, "h1-b1-88", "b1"),
               HostEvent(host="h1", kind="suspect", at=WALL0 - 10, incident="h1-never-seen-x", boot_id="")]
    effects: list[Effect] = []
    core.feed(Started(), at(0))
    for fact in history:
        core.feed(delivered(fact), at(0))
    core.feed(CaughtUp("events"), at(0))
    effects += core.lease(5, 1e6, at(10))
    effects += core.settle(core.feed(TimerFired(TICK), at(11)), at(11))
    [request] = requests(effects)
    assert (request.incident, request.boot_id) == ("h1-never-seen-x", "b1")
    [requested] = host_events(effects, "fence_requested")
    assert requested.boot_id == "b1"
