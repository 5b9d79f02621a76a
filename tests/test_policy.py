from hypothesis import given, settings
from hypothesis import strategies as st

from hafence.arbiter.policy import Policy, RequestFence, SkipFence

HOSTS = ["a", "b", "c", "d"]


def make(**kw: object) -> Policy:
    args: dict[str, object] = dict(detection_window_s=3.0, started_at=0.0, settle_s=0.5, max_concurrent=2)
    args.update(kw)
    return Policy(HOSTS, **args)  # type: ignore[arg-type]


def test_a_lone_dead_host_is_fenced_after_settling() -> None:
    p = make()
    p.suspect("a", "a-1", now=10.0)
    assert p.decide(10.2) == []
    [d] = p.decide(10.6)
    assert isinstance(d, RequestFence) and (d.host, d.request_id) == ("a", "fence-a-1")


def test_nothing_is_fenced_during_start_up_grace() -> None:
    p = make(started_at=100.0)
    p.suspect("a", "a-1", now=100.1)
    assert p.decide(102.9) == []
    assert [type(d) for d in p.decide(103.1)] == [RequestFence]


def test_storm_of_lost_hosts_fences_nobody_and_alerts_once() -> None:
    p = make()
    for h in ("a", "b", "c"):
        p.suspect(h, f"{h}-1", now=10.0)
    out = p.decide(11.0)
    assert all(isinstance(d, SkipFence) and d.rule == "storm" for d in out)
    assert {d.host for d in out} == {"a", "b", "c"}
    assert "3 of 4 hosts lost within 60s" in out[0].reason
    assert p.decide(12.0) == []  # announced once, not every tick
    # The storm passes: two come back, the one still dead is fenced.
    p.alive("b")
    p.alive("c")
    [d] = p.decide(13.0)
    assert isinstance(d, RequestFence) and d.host == "a"


def test_fencing_the_first_host_of_a_storm_does_not_make_room_to_fence_the_next() -> None:
    """Suspicions of one storm arrive spread out: the first host is fenced before
    the others are seen. Its fence must still count, or the others follow."""
    p = make()
    p.suspect("c", "c-1", now=10.0)
    [d] = p.decide(10.6)
    p.fence_requested("c", "c-1", d.request_id, 10.6)
    p.fence_result("c", d.request_id, "confirmed_off", "ok", now=10.8)
    p.suspect("a", "a-1", now=10.9)
    p.suspect("b", "b-1", now=11.0)
    out = p.decide(12.0)
    assert {(type(d).__name__, d.host) for d in out} == {("SkipFence", "a"), ("SkipFence", "b")}
    # Long after, an unrelated loss is not part of that storm.
    p.alive("a")
    p.alive("b")
    p.suspect("b", "b-2", now=200.0)
    assert [type(d) for d in p.decide(201.0)] == [RequestFence]


def test_half_the_hosts_lost_is_not_a_storm() -> None:
    p = make()
    p.suspect("a", "a-1", now=10.0)
    p.suspect("b", "b-1", now=10.0)
    assert {d.host for d in p.decide(11.0) if isinstance(d, RequestFence)} == {"a", "b"}


def test_hosts_in_maintenance_are_never_fenced() -> None:
    p = make()
    p.set_maintenance("a", True)
    p.suspect("a", "a-1", now=10.0)
    [d] = p.decide(11.0)
    assert isinstance(d, SkipFence) and d.rule == "maintenance"


def test_concurrency_limit_holds_fences_back_until_a_slot_frees() -> None:
    p = make(max_concurrent=1, storm_share=1.0)
    p.suspect("a", "a-1", now=10.0)
    p.suspect("b", "b-1", now=10.1)
    out = p.decide(11.0)
    assert [(type(d).__name__, d.host) for d in out] == [("RequestFence", "a"), ("SkipFence", "b")]
    p.fence_requested("a", "a-1", "fence-a-1", 11.0)
    assert p.decide(11.5) == []
    p.fence_result("a", "fence-a-1", "confirmed_off", "ok", now=11.8)
    [d] = p.decide(12.0)
    assert isinstance(d, RequestFence) and d.host == "b"


def test_a_host_that_returns_during_its_fence_is_still_fenced() -> None:
    p = make()
    p.suspect("a", "a-1", now=10.0)
    p.decide(11.0)
    p.fence_requested("a", "a-1", "fence-a-1", 11.0)
    p.alive("a")
    assert p.views["a"].phase == "fencing"
    assert p.in_flight() == ["a"]


def test_a_host_that_returns_before_the_decision_is_not_fenced() -> None:
    p = make()
    p.suspect("a", "a-1", now=10.0)
    p.alive("a")
    assert p.decide(11.0) == []


def test_replayed_events_of_a_finished_incident_decide_nothing() -> None:
    p = make()
    p.suspect("a", "a-1", now=1.0)
    p.fence_requested("a", "a-1", "fence-a-1", 1.0)
    p.fence_result("a", "fence-a-1", "confirmed_off", "ok", now=1.0)
    p.suspect("a", "a-1", now=1.0)  # the same event seen again
    assert p.decide(20.0) == []


events = st.lists(
    st.tuples(
        st.sampled_from(["suspect", "alive", "result_ok", "result_fail", "maint_on", "maint_off", "tick"]),
        st.sampled_from(HOSTS),
        st.floats(0.0, 2.0),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events, st.integers(1, 3), st.sampled_from([0.25, 0.5, 0.75]))
def test_policy_never_breaks_its_rules(seq: list[tuple[str, str, float]], limit: int, share: float) -> None:
    p = make(max_concurrent=limit, storm_share=share)
    now, incident = 0.0, 0
    for kind, host, dt in seq:
        now += dt
        match kind:
            case "suspect":
                incident += 1
                p.suspect(host, f"{host}-{incident}", now)
            case "alive":
                p.alive(host)
            case "result_ok" | "result_fail":
                view = p.views[host]
                if view.phase == "fencing":
                    p.fence_result(host, view.request_id, "confirmed_off" if kind == "result_ok" else "failed", "",
                                   now)
            case "maint_on" | "maint_off":
                p.set_maintenance(host, kind == "maint_on")
        watched = [v for v in p.views.values() if not v.maintenance]
        lost = [v for v in watched if v.phase in ("suspect", "fencing")
                or (v.phase in ("fenced", "fence_failed") and now - v.lost_at <= p.storm_window_s)]
        storm = bool(watched) and len(lost) / len(watched) > share
        fences = [d for d in p.decide(now) if isinstance(d, RequestFence)]
        if now < 3.0 or storm:
            assert fences == []
        for d in fences:
            view = p.views[d.host]
            assert not view.maintenance
            if view.phase == "fence_failed":
                assert now >= view.retry_at and d.attempt <= 3
            else:
                assert view.phase == "suspect" and now - view.since >= 0.5
            p.fence_requested(d.host, d.incident, d.request_id, now, d.attempt)
        assert len(p.in_flight()) <= limit or not fences


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(HOSTS), st.floats(3.0, 100.0))
def test_a_lone_dead_host_with_no_storm_is_always_fenced(host: str, when: float) -> None:
    p = make()
    p.suspect(host, f"{host}-1", when)
    decisions = p.decide(when + 0.51)
    assert [(type(d), d.host) for d in decisions] == [(RequestFence, host)]


def test_an_isolated_host_with_a_live_storage_lease_is_not_fenced() -> None:
    p = make()
    p.suspect("a", "a-1", now=10.0)
    [d] = p.decide(11.0, storage_live={"a": True})
    assert isinstance(d, SkipFence) and d.rule == "isolated" and d.alert
    assert "storage lease" in d.reason
    # The lease stops being renewed: the host is dead after all.
    [d] = p.decide(12.0, storage_live={"a": False})
    assert isinstance(d, RequestFence)


def test_isolated_hosts_can_be_fenced_when_configured() -> None:
    p = make(isolated_action="fence")
    p.suspect("a", "a-1", now=10.0)
    assert [type(d) for d in p.decide(11.0, storage_live={"a": True})] == [RequestFence]


def test_two_host_clusters_wait_before_fencing_the_peer() -> None:
    p = Policy(["x", "y"], detection_window_s=3.0, started_at=0.0, settle_s=0.5, two_host_delay_s=10.0,
               storm_share=1.0)
    p.suspect("y", "y-1", now=10.0)
    assert p.decide(15.0) == []
    assert [type(d) for d in p.decide(20.1)] == [RequestFence]


def test_a_failed_fence_is_retried_with_backoff_then_escalated_with_repeated_alerts() -> None:
    p = make(fence_attempts=2, retry_backoff_s=10.0, alert_repeat_s=60.0)
    p.suspect("a", "a-1", now=10.0)
    [d1] = p.decide(11.0)
    p.fence_requested("a", "a-1", d1.request_id, 11.0, d1.attempt)
    p.fence_result("a", d1.request_id, "failed", "bmc: authentication failed", now=12.0)
    assert p.decide(21.0) == []  # back-off: 10 s after the failure
    [d2] = p.decide(22.1)
    assert isinstance(d2, RequestFence) and d2.attempt == 2 and d2.request_id == "fence-a-1-a2"
    assert "authentication failed" in d2.reason
    p.fence_requested("a", "a-1", d2.request_id, 22.1, d2.attempt)
    p.fence_result("a", d2.request_id, "failed", "bmc: authentication failed", now=23.0)
    [alert] = p.decide(100.0)
    assert isinstance(alert, SkipFence) and alert.rule == "escalated" and alert.alert
    assert "hafence confirm-fenced a" in alert.reason
    assert p.decide(130.0) == []
    assert [d.rule for d in p.decide(161.0)] == ["escalated"]  # repeated
    # A host that comes back does not clear an unresolved fence.
    p.alive("a")
    assert p.views["a"].phase == "fence_failed"
    p.confirmed_by_operator("a")
    assert p.decide(500.0) == [] and p.views["a"].phase == "fenced"


def test_storm_alert_is_repeated_while_the_storm_lasts() -> None:
    p = make(alert_repeat_s=30.0)
    for h in ("a", "b", "c"):
        p.suspect(h, f"{h}-1", now=10.0)
    assert len(p.decide(11.0)) == 3
    assert p.decide(20.0) == []
    assert len(p.decide(41.5)) == 3


def test_a_refused_request_opens_the_decision_again_for_the_current_leader() -> None:
    p = make()
    p.suspect("a", "a-1", now=10.0)
    p.fence_requested("a", "a-1", "fence-a-1", 11.0)  # sent by a stale leader
    p.fence_result("a", "fence-a-1", "refused", "stale leader term 3", now=11.5)
    [d] = p.decide(12.0)
    assert isinstance(d, RequestFence) and (d.request_id, d.attempt) == ("fence-a-1-r1", 1)  # a new id
    # A refusal of an older request does not reopen a fence now in flight under another id.
    p.fence_requested("a", "a-1", "fence-a-1-a2", 12.0, 2)
    p.fence_result("a", "fence-a-1", "refused", "stale", now=12.5)
    assert p.views["a"].phase == "fencing"


# --- rule 2 with the monitor's list of late hosts: no settle wait ------------------------------


def test_a_suspect_reported_with_no_late_hosts_is_decided_at_once() -> None:
    p = make()
    p.suspect("a", "a-1", now=10.0, late=[])
    [d] = p.decide(10.0)
    assert isinstance(d, RequestFence) and d.host == "a"


def test_hosts_late_with_the_first_suspect_make_a_storm_at_once() -> None:
    """The storm is seen with the first suspicion: the hosts lost with it are late,
    not yet suspect. Without the list, the first host would wait for settle_s."""
    p = make()
    p.suspect("a", "a-1", now=10.0, late=["b", "c"])
    [d] = p.decide(10.0)
    assert isinstance(d, SkipFence) and d.rule == "storm" and "3 of 4 hosts lost" in d.reason
    p.suspect("b", "b-1", now=10.3, late=["a", "c"])
    p.suspect("c", "c-1", now=10.4, late=["a", "b"])
    assert all(isinstance(d, SkipFence) and d.rule == "storm" for d in p.decide(10.5))


def test_a_late_host_stops_counting_when_heard_again_or_after_the_horizon() -> None:
    p = make()
    p.suspect("a", "a-1", now=10.0, late=["b", "c"])
    assert [d.rule for d in p.decide(10.0)] == ["storm"]  # type: ignore[union-attr]
    # b was only slow: it is heard again (alive) or simply never becomes suspect.
    p.alive("b")
    [d] = p.decide(10.1)
    assert isinstance(d, RequestFence) and d.host == "a"
    q = make()
    q.suspect("a", "a-1", now=10.0, late=["b", "c"])
    [d] = q.decide(12.9)
    assert isinstance(d, SkipFence) and d.rule == "storm"
    assert [type(d) for d in q.decide(13.1)] == [RequestFence]  # past one detection window (3 s)


def test_a_two_host_cluster_still_waits_with_the_late_list() -> None:
    p = Policy(["x", "y"], detection_window_s=3.0, started_at=0.0, settle_s=0.5, two_host_delay_s=10.0,
               storm_share=1.0)
    p.suspect("y", "y-1", now=10.0, late=[])
    assert p.decide(15.0) == []
    assert [type(d) for d in p.decide(20.1)] == [RequestFence]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(HOSTS), st.lists(st.sampled_from(HOSTS), max_size=3, unique=True),
                          st.floats(0.0, 0.3)), min_size=1, max_size=8),
       st.sampled_from([0.25, 0.5, 0.75]))
def test_hosts_lost_together_are_never_fenced_as_a_storm_when_reported_late(
    losses: list[tuple[str, list[str], float]], share: float
) -> None:
    """Hosts lost in one moment, each suspicion carrying the others as late: once
    more than the storm share is lost or late, nothing more is fenced at once."""
    p = make(storm_share=share, max_concurrent=4)
    now = 10.0
    fenced: set[str] = set()
    for host, late, dt in losses:
        now += dt
        p.suspect(host, f"{host}-{now}", now, late=[h for h in late if h != host])
        counted = {h for h, v in p.views.items() if v.phase != "up" or now - v.late_at <= 3.0}
        for d in p.decide(now):
            if isinstance(d, RequestFence):
                assert len(counted) / len(HOSTS) <= share
                fenced.add(d.host)
                p.fence_requested(d.host, d.incident, d.request_id, now, d.attempt)


# --- the host-phase machine (hafence.host_phase) --------------------------------------------


def fenced(p: Policy, host: str, incident: str, now: float, boot: str = "boot-1") -> None:
    p.inventory(host, boot)
    p.suspect(host, incident, now, boot_id=boot)
    [d] = [d for d in p.decide(now + 0.6) if isinstance(d, RequestFence)]
    p.fence_requested(host, incident, d.request_id, now + 0.6)
    p.fence_result(host, d.request_id, "confirmed_off", "ok", now + 0.8, boot_id=boot)
    assert p.views[host].phase == "fenced"


def test_a_host_heard_after_its_fence_stays_fenced_and_is_not_fenced_again() -> None:
    """Before, ``alive`` made a fenced host ``up``: the arbiter disagreed with the
    scheduler and the CLI, and a later suspicion fenced it again. The heartbeat may be
    the fenced boot's, still in flight: the host stays fenced until it is cleared."""
    p = make()
    fenced(p, "a", "a-1", 10.0)
    p.alive("a")
    assert p.views["a"].phase == "fenced"
    p.suspect("a", "a-2", 200.0)
    assert p.views["a"].phase == "fenced" and p.decide(300.0) == []
    # Back on a new boot: quarantined (it runs no VMs), still not fenced on a suspicion.
    p.inventory("a", "boot-2")
    assert p.views["a"].phase == "quarantined"
    p.alive("a")
    p.suspect("a", "a-3", 400.0)
    assert p.views["a"].phase == "quarantined" and p.decide(500.0) == []
    # A late report from the fenced boot is not a new boot.
    q = make()
    fenced(q, "b", "b-1", 10.0)
    q.inventory("b", "boot-1")
    assert q.views["b"].phase == "fenced"


def test_cleared_then_a_new_boot_makes_a_fenced_host_up_and_fenceable_again() -> None:
    p = make()
    fenced(p, "a", "a-1", 10.0)
    p.cleared("a")  # in advance, while it is still off
    assert p.views["a"].phase == "fenced_cleared"
    p.suspect("a", "a-2", 100.0)
    assert p.decide(200.0) == []  # still off: nothing to fence
    p.inventory("a", "boot-2")
    assert p.views["a"].phase == "up"
    p.suspect("a", "a-3", 300.0, boot_id="boot-2")
    [d] = p.decide(300.6)
    assert isinstance(d, RequestFence) and d.incident == "a-3"
    # The other order: back quarantined, then cleared.
    q = make()
    fenced(q, "b", "b-1", 10.0)
    q.inventory("b", "boot-2")
    q.cleared("b")
    assert q.views["b"].phase == "up"
    q.suspect("b", "b-2", 300.0)
    assert [type(d) for d in q.decide(300.6)] == [RequestFence]


def test_an_illegal_event_keeps_the_phase_and_is_counted_and_kept_for_the_log() -> None:
    """A failure of a request already confirmed off cannot happen in a sound cluster:
    the host stays fenced (no retry), and the event is not silently dropped."""
    p = make()
    fenced(p, "a", "a-1", 10.0)
    request = p.views["a"].request_id
    p.fence_result("a", request, "failed", "late failure", 20.0)
    assert p.views["a"].phase == "fenced" and p.decide(100.0) == []
    assert p.illegal == {"fence_failed in fenced": 1}
    [(host, illegal)] = p.take_illegal()
    assert host == "a" and (illegal.phase, illegal.event) == ("fenced", "fence_failed")
    assert p.take_illegal() == []  # taken once


def test_a_fence_requested_read_after_its_result_does_not_put_the_host_back_in_flight() -> None:
    """Seed 527 with fences that reboot: the arbiter's fence request lost its ack, so its
    fence_requested was stored (publish retried) after the fencer's confirmed_off, the
    new boot's reports and the scheduler's cleared. Folded last, it made the host
    ``fencing`` again under the finished request: the fencer answers that request id
    from its journal under the same message id, the stream drops it, so no result came;
    every new leader re-sent it, and at the deadline its retry powered off a healthy
    later boot (its VMs lost at the end of the heal). A finished request stays finished."""
    p = make()
    p.suspect("a", "a-1", 10.0, boot_id="boot-1")
    [d] = p.decide(10.6)
    # As replayed from the stream: the result before the request's own event.
    p.fence_result("a", d.request_id, "confirmed_off", "ok", 11.0, boot_id="boot-1", incident="a-1")
    p.inventory("a", "boot-2")
    p.cleared("a")
    p.alive("a")
    assert p.views["a"].phase == "up"
    p.fence_requested("a", "a-1", d.request_id, 15.0)
    assert p.views["a"].phase == "up" and p.in_flight() == []
    assert p.decide(1000.0) == []  # never overdue, never retried
    # The later boot going silent is its own incident, fenced under its own request.
    p.suspect("a", "a-2", 1100.0, boot_id="boot-2")
    [d2] = p.decide(1100.6)
    assert isinstance(d2, RequestFence) and d2.request_id == "fence-a-2"
