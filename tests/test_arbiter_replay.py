"""The arbiter's fold of the events stream: replayed facts keep their own time.

Folding the same history gives the same state whenever it is folded (a host
fenced days ago never counts toward the storm guard; a request keeps its
deadline across a restart, and a re-issue restarts it)."""

from __future__ import annotations

import time

import pytest
from nats.aio.client import Client as NatsClient

from hafence.arbiter.core import event_time, fold, on_policy_clock
from hafence.arbiter.deadline import overdue
from hafence.arbiter.policy import Policy, RequestFence, SkipFence
from hafence.arbiter.service import run as arbiter
from hafence.contracts import Decoders, FenceResult, HostEvent, encode
from tests.conftest import eventually, running
from tests.helpers import read_stream

DAY = 86400.0
HOSTS = ["h1", "h2", "h3", "h4"]


def fenced_history(host: str, at: float) -> list[HostEvent | FenceResult]:
    """A host suspected, fenced and confirmed off at ``at`` (wall clock)."""
    incident, request = f"{host}-boot-1", f"fence-{host}-boot-1"
    return [
        HostEvent(host=host, kind="suspect", at=at, incident=incident, boot_id="boot"),
        HostEvent(host=host, kind="fence_requested", at=at + 1, incident=incident, request_id=request, term=3),
        FenceResult(request_id=request, incident=incident, host=host, term=3, outcome="confirmed_off",
                    started_at=at + 1, finished_at=at + 3),
    ]


def folded(history: list[HostEvent | FenceResult], wall_now: float, mono_now: float) -> Policy:
    policy = Policy(HOSTS, detection_window_s=1.0, started_at=mono_now - 100, storm_share=0.5, storm_window_s=60)
    for event in history:
        fold(policy, event, on_policy_clock(event_time(event), wall_now, mono_now))
    return policy


def decide_on_live_suspect(history: list[HostEvent | FenceResult], wall_now: float, mono_now: float) -> list:  # type: ignore[type-arg]
    policy = folded(history, wall_now, mono_now)
    live = HostEvent(host="h3", kind="suspect", at=wall_now, incident="h3-boot-9")
    fold(policy, live, on_policy_clock(event_time(live), wall_now, mono_now))
    return policy.decide(mono_now + 1)


def test_the_same_history_folded_at_two_times_gives_the_same_storm_count() -> None:
    """h1 and h2 were fenced two days before the first fold. Folded then, or three
    days later on a monotonic clock that has nothing to do with the first, their
    losses are as old as they are: a new lone suspect is fenced, not held by a
    storm of 3 of 4. Before, each fold stamped the replayed facts with its own
    ``now``, and the two old fences counted for a storm window after every restart."""
    t0 = 1_800_000_000.0
    history = fenced_history("h1", t0) + fenced_history("h2", t0 + 5)
    folds = [(t0 + 2 * DAY, 500.0), (t0 + 5 * DAY, 90_000.0)]
    for wall_now, mono_now in folds:
        [decision] = decide_on_live_suspect(history, wall_now, mono_now)
        assert isinstance(decision, RequestFence) and decision.host == "h3", decision
    # The same state, relative to when it is folded: every fact is as old as it is.
    a, b = (folded(history, w, m) for w, m in folds)
    for host in ("h1", "h2"):
        va, vb = a.views[host], b.views[host]
        assert va.phase == vb.phase == "fenced"
        assert (folds[0][1] - va.lost_at) - (folds[0][0] - t0) == pytest.approx(
            (folds[1][1] - vb.lost_at) - (folds[1][0] - t0), abs=1e-6)


def test_recent_losses_still_count_whenever_they_are_folded() -> None:
    """The other side: the same two fences 10 s before the fold are part of a storm."""
    t0 = 1_800_000_000.0
    history = fenced_history("h1", t0) + fenced_history("h2", t0 + 5)
    for mono_now in (500.0, 90_000.0):
        [decision] = decide_on_live_suspect(history, t0 + 15, mono_now)
        assert isinstance(decision, SkipFence) and decision.rule == "storm", decision


def test_a_fact_is_never_placed_in_the_future_and_an_unknown_time_is_now() -> None:
    assert on_policy_clock(1_000.0 + 30, wall_now=1_000.0, mono_now=50.0) == 50.0  # a clock ahead of ours
    assert on_policy_clock(None, wall_now=1_000.0, mono_now=50.0) == 50.0
    assert on_policy_clock(990.0, wall_now=1_000.0, mono_now=50.0) == 40.0
    no_time = HostEvent(host="h1", kind="alive", at=0.0)
    assert event_time(no_time, stored_at=123.0) == 123.0 and event_time(no_time) is None


def test_a_request_keeps_its_deadline_across_a_replay_and_a_reissue_restarts_it() -> None:
    """A request sent 300 s before the fold, no result: past a 180 s deadline however
    late it is folded (before, the replay restarted its clock). The new leader's
    re-issue (its own fence_requested event, same request id) counts from its send."""
    wall_now, mono_now = 1_800_000_000.0, 500.0
    history = fenced_history("h1", wall_now - 301)[:2]
    policy = folded(history, wall_now, mono_now)
    [late] = overdue(policy.views, mono_now, 180.0)
    assert late.request_id == "fence-h1-boot-1" and late.waited_s == pytest.approx(300.0)
    reissue = HostEvent(host="h1", kind="fence_requested", at=wall_now, incident="h1-boot-1",
                        request_id="fence-h1-boot-1", term=4)
    fold(policy, reissue, on_policy_clock(event_time(reissue), wall_now, mono_now))
    assert overdue(policy.views, mono_now + 1, 180.0) == []


# -- through the arbiter's shell, against a real NATS server --------------------------------------


async def publish(nc: NatsClient, event: HostEvent | FenceResult) -> None:
    if isinstance(event, FenceResult):
        subject = f"hafence.fence.result.{event.host}"
    else:
        subject = f"hafence.host.{event.host}.{event.kind}"
    await nc.jetstream().publish(subject, encode(event))


async def decision_for(nc: NatsClient, host: str) -> str:
    for kind in ("fence_requested", "fence_skipped"):
        try:
            if await read_stream(nc, "HAFENCE_EVENTS", f"hafence.host.{host}.{kind}", Decoders.host_event):
                return kind
        except Exception:
            pass
    return ""


async def test_a_restarted_arbiter_does_not_count_old_fences_toward_the_storm_guard(
    nc: NatsClient, make_config
) -> None:
    """Two of four hosts were fenced two days ago (their history is in the stream).
    The arbiter starts, and a third host becomes suspect: it is fenced. Before,
    the replay stamped the old fences with the time of the replay: 3 of 4 hosts
    'lost within 60 s', and the live host was held by the storm guard."""
    config = make_config(hosts=4)
    async with running("arbiter", config, arbiter):
        old = time.time() - 2 * DAY
        for event in fenced_history("h1", old) + fenced_history("h2", old + 5):
            await publish(nc, event)
        await publish(nc, HostEvent(host="h3", kind="suspect", at=time.time(), incident="h3-boot-9"))
        await eventually(lambda: decision_for(nc, "h3"), timeout=20)
    assert await decision_for(nc, "h3") == "fence_requested"
