"""VM-level HA, the pure parts: what the agent reports about its VMs' stops
(vm_watch) and the scheduler's restart policy (restarts.py): same host first,
then elsewhere, back-off, limits, a guest's own shutdown, and S0 (nothing starts
elsewhere unless the failing host confirmed the stop or was fenced)."""

from __future__ import annotations

from hafence.agent.vm_watch import VmWatch
from hafence.contracts import FenceResult, HostEvent, Inventory, VmEvent, VmInfo, VmSpec
from hafence.scheduler.restarts import (
    RETRY_S,
    AnnounceFailure,
    RestartLimit,
    RestartPending,
    RestartPolicy,
    RestartVm,
    VmRestarts,
)
from hafence.scheduler.state import SchedulerState


def running(name: str, ha: bool = True) -> VmInfo:
    return VmInfo(spec=VmSpec(name=name, memory_mb=1000, ha=ha), state="running")


def stopped(name: str, reason: str, at: float, ha: bool = True) -> VmInfo:
    return VmInfo(spec=VmSpec(name=name, memory_mb=1000, ha=ha), state="stopped", stop_reason=reason, stopped_at=at)


def inv(host: str, *vms: VmInfo, boot: str = "") -> Inventory:
    return Inventory(host=host, boot_id=boot or f"{host}-boot", memory_mb=10000, vcpus=8, sent_at=0.0, vms=list(vms))


def cluster(**policy: object) -> SchedulerState:
    s = SchedulerState(restarts=VmRestarts(RestartPolicy(**policy)))  # type: ignore[arg-type]
    s.on_inventory(inv("a", running("vm1")))
    s.on_inventory(inv("b"))
    s.on_inventory(inv("c"))
    return s


def restarts(effects: list) -> list[RestartVm]:  # type: ignore[type-arg]
    return [e for e in effects if isinstance(e, RestartVm)]


def crash_and_restart(s: SchedulerState, at: float, now: float) -> RestartVm:
    """vm1 fails where it runs; the restart the policy makes is carried out."""
    host = s.running_on()["vm1"]
    s.on_inventory(inv(host, stopped("vm1", "crashed", at)))
    [effect] = restarts(s.effects(now))
    s.restarts.on_result(effect, "started", now, s)
    s.on_inventory(inv(effect.target, running("vm1")))
    return effect


# -- the agent's report ----------------------------------------------------------------


def test_the_agent_reports_a_stop_it_did_not_order_as_a_failure_and_its_own_as_command() -> None:
    w = VmWatch()
    vms, failed = w.observe([running("vm1"), running("vm2"), stopped("vm3", "crashed", 0)], now=1.0)
    assert failed == [] and vms[2].stop_reason == ""  # vm3 was never seen running: no story to tell
    w.stopping("vm2")
    w.stop_done("vm2", now=2.0)
    vms, failed = w.observe([stopped("vm1", "killed", 0), stopped("vm2", "killed", 0),
                             stopped("vm3", "crashed", 0)], now=3.0)
    assert [(f.vm, f.reason, f.at) for f in failed] == [("vm1", "killed", 3.0)]
    assert [(v.stop_reason, v.stopped_at) for v in vms] == [("killed", 3.0), ("command", 2.0), ("", 0.0)]
    # Reported again unchanged (the same failure, not a new one), until it runs again.
    vms2, failed = w.observe([stopped("vm1", "killed", 0)], now=9.0)
    assert failed == [] and (vms2[0].stop_reason, vms2[0].stopped_at) == ("killed", 3.0)


def test_the_agent_never_calls_a_migration_or_an_unknown_stop_a_failure() -> None:
    w = VmWatch()
    w.observe([running("vm1"), running("vm2"), running("vm3")], now=1.0)
    _, failed = w.observe([stopped("vm1", "migrated", 0), stopped("vm2", "saved", 0),
                           stopped("vm3", "weird-new-reason", 0)], now=2.0)
    assert failed == []


def test_a_vm_the_agent_started_that_dies_before_the_next_look_is_still_a_failure() -> None:
    w = VmWatch()
    w.started("vm1")  # the agent's own start; the VM crashes before any poll saw it run
    _, failed = w.observe([stopped("vm1", "crashed", 0)], now=1.0)
    assert [f.vm for f in failed] == ["vm1"]
    w.reset()  # a new boot: nothing has been seen running in it
    _, failed = w.observe([stopped("vm1", "crashed", 0)], now=2.0)
    assert failed == []


# -- the scheduler's policy ------------------------------------------------------------


def test_a_failed_ha_vm_is_announced_and_restarted_on_its_own_host_first() -> None:
    s = cluster()
    s.on_inventory(inv("a", stopped("vm1", "crashed", 100.0)))
    effects = s.effects(1000.0)
    [announce] = [e for e in effects if isinstance(e, AnnounceFailure)]
    assert (announce.vm, announce.host, announce.reason) == ("vm1", "a", "crashed")
    [restart] = restarts(effects)
    assert (restart.target, restart.same_host, restart.confirm_stop) == ("a", True, False)
    assert restarts(s.effects(1000.5)) == []  # in flight: asked once
    s.restarts.on_result(restart, "started", 1001.0, s)
    s.on_inventory(inv("a", running("vm1")))
    assert s.restarts.open == {} and s.effects(1002.0) == []


def test_a_second_failure_waits_its_back_off_then_moves_elsewhere_after_its_host_confirms_the_stop() -> None:
    s = cluster(backoff_s=10.0)
    first = crash_and_restart(s, at=1.0, now=100.0)
    assert first.target == "a"
    s.on_inventory(inv("a", stopped("vm1", "panicked", 2.0)))
    assert restarts(s.effects(101.0)) == []  # 1 restart in the window: wait 10 s after it
    [second] = restarts(s.effects(110.5))
    # The one same-host restart is used: elsewhere, and only once a has stopped it (S0).
    assert second.target in ("b", "c") and second.confirm_stop and not second.same_host


def test_back_off_doubles_and_is_capped() -> None:
    p = RestartPolicy(backoff_s=10.0, backoff_max_s=25.0)
    assert [p.backoff(n) for n in range(5)] == [0.0, 10.0, 20.0, 25.0, 25.0]


def test_a_crash_loop_stops_being_restarted_and_raises_the_limit_once() -> None:
    s = cluster(max_restarts=2, backoff_s=0.0)
    crash_and_restart(s, at=1.0, now=10.0)
    crash_and_restart(s, at=2.0, now=20.0)
    s.on_inventory(inv(s.running_on()["vm1"], stopped("vm1", "crashed", 3.0)))
    effects = s.effects(30.0)
    assert restarts(effects) == []
    [limit] = [e for e in effects if isinstance(e, RestartLimit)]
    assert "2 restarts" in limit.reason and limit.vm == "vm1"
    assert s.effects(31.0) == []  # said once
    # Outside the window the count forgets: a failure a day later is restarted again.
    s.on_inventory(inv(s.running_on().get("vm1", "a"), running("vm1")))
    s.on_inventory(inv(s.running_on()["vm1"], stopped("vm1", "crashed", 4.0)))
    assert restarts(s.effects(30.0 + 86400))


def test_a_per_vm_limit_of_zero_means_never_restarted() -> None:
    s = SchedulerState(restarts=VmRestarts(RestartPolicy(vm_max_restarts={"vm1": 0})))
    s.on_inventory(inv("a", running("vm1")))
    s.on_inventory(inv("a", stopped("vm1", "crashed", 1.0)))
    assert [type(e).__name__ for e in s.effects(2.0)] == ["AnnounceFailure", "RestartLimit"]


def test_a_guest_shutdown_is_not_a_failure_unless_the_vm_says_so() -> None:
    s = cluster()
    s.on_inventory(inv("a", stopped("vm1", "guest_shutdown", 1.0)))
    assert s.effects(2.0) == []  # the guest meant it
    s = SchedulerState(restarts=VmRestarts(RestartPolicy(vm_on_guest_shutdown={"vm1": True})))
    s.on_inventory(inv("a", running("vm1")))
    s.on_inventory(inv("a", stopped("vm1", "guest_shutdown", 1.0)))
    assert [r.target for r in restarts(s.effects(2.0))] == ["a"]


def test_non_ha_vms_migrations_and_unknown_stops_are_never_restarted() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", running("vm1"), running("web", ha=False), running("vm2")))
    s.on_inventory(inv("a", stopped("vm1", "migrated", 1.0), stopped("web", "crashed", 1.0, ha=False),
                       stopped("vm2", "other", 1.0)))
    assert s.effects(2.0) == []


def test_s0_a_host_cannot_get_a_vm_running_elsewhere_restarted_by_reporting_it_failed() -> None:
    s = cluster()
    # vm1 runs on a; b claims it crashed there (a forged or confused report).
    s.on_inventory(inv("b", stopped("vm1", "crashed", 5.0)))
    assert s.effects(6.0) == []
    # Nor does a later boot of a itself (the failure must come from the boot it ran on).
    s.on_inventory(inv("a", stopped("vm1", "crashed", 5.0), boot="a-boot-2"))
    assert restarts(s.effects(7.0)) == []


def test_s0_nothing_moves_while_its_host_is_suspect_and_after_a_fence_it_moves_without_asking() -> None:
    s = cluster(same_host=0)
    s.on_inventory(inv("a", stopped("vm1", "crashed", 5.0)))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=6.0, incident="i1"))
    assert restarts(s.effects(7.0)) == []  # a may be going down: its fence decides first
    s.on_fence_result(FenceResult(request_id="r", incident="i1", host="a", term=1, outcome="confirmed_off",
                                  started_at=7.0, finished_at=8.0))
    [restart] = restarts(s.effects(9.0))
    assert restart.target in ("b", "c") and not restart.confirm_stop  # the fence is the proof


def test_s0_an_unconfirmed_stop_moves_nothing_and_is_asked_again_later() -> None:
    s = cluster(same_host=0)
    s.on_inventory(inv("a", stopped("vm1", "crashed", 5.0)))
    [restart] = restarts(s.effects(10.0))
    assert restart.confirm_stop
    s.restarts.on_result(restart, "unconfirmed", 11.0, s)
    assert s.reserved == {} and restarts(s.effects(12.0)) == []
    [again] = restarts(s.effects(11.0 + RETRY_S))
    assert again.confirm_stop


def test_a_start_that_fails_on_the_same_host_moves_elsewhere_and_gives_up_after_start_attempts() -> None:
    s = cluster(attempts=2)
    s.on_inventory(inv("a", stopped("vm1", "crashed", 5.0)))
    [first] = restarts(s.effects(10.0))
    assert first.target == "a"
    s.restarts.on_result(first, "failed", 11.0, s)
    [second] = restarts(s.effects(11.0))
    assert second.target in ("b", "c") and second.confirm_stop
    s.restarts.on_result(second, "failed", 12.0, s)
    [limit] = [e for e in s.effects(12.0) if isinstance(e, RestartLimit)]
    assert "start failed on" in limit.reason


def test_no_room_elsewhere_is_announced_pending_once() -> None:
    s = SchedulerState(restarts=VmRestarts(RestartPolicy(same_host=0)))
    s.on_inventory(inv("a", running("vm1")))
    s.on_inventory(inv("a", stopped("vm1", "crashed", 5.0)))
    effects = s.effects(10.0)
    assert [type(e) for e in effects] == [AnnounceFailure, RestartPending]
    assert s.effects(11.0) == []
    s.on_inventory(inv("b"))  # capacity appears
    assert [r.target for r in restarts(s.effects(12.0))] == ["b"]


def test_the_restart_count_survives_a_scheduler_restart_through_its_own_events() -> None:
    policy = RestartPolicy(max_restarts=1)
    history = [
        inv("a", running("vm1")),
        inv("a", stopped("vm1", "crashed", 1.0)),
        VmEvent(vm="vm1", kind="crashed", at=10.0, incident=VmRestarts.failure_id("a", "vm1", 1.0), from_host="a"),
        VmEvent(vm="vm1", kind="restarted", at=11.0, incident=VmRestarts.failure_id("a", "vm1", 1.0),
                from_host="a", target="a"),
        inv("a", running("vm1")),
        inv("a", stopped("vm1", "crashed", 2.0)),
    ]
    s = SchedulerState(restarts=VmRestarts(policy))
    for event in history:  # a new scheduler replays the events stream
        s.on_vm_event(event) if isinstance(event, VmEvent) else s.on_inventory(event)
    assert [type(e).__name__ for e in s.effects(20.0)] == ["AnnounceFailure", "RestartLimit"]


def test_s0_a_scheduler_taking_over_asks_the_host_a_start_was_sent_to_never_another() -> None:
    fid = VmRestarts.failure_id("a", "vm1", 1.0)
    history = [
        inv("a", running("vm1")),
        inv("b", VmInfo(spec=VmSpec(name="big", memory_mb=5000), state="running")),  # spread would pick c
        inv("c"),
        inv("a", stopped("vm1", "crashed", 1.0)),
        # The dead leader confirmed the stop on a and sent the start to b; no answer recorded.
        VmEvent(vm="vm1", kind="placed", at=10.0, incident=fid, from_host="a", target="b"),
    ]
    s = SchedulerState(restarts=VmRestarts(RestartPolicy(same_host=0)))
    for event in history:
        s.on_vm_event(event) if isinstance(event, VmEvent) else s.on_inventory(event)
    [again] = restarts(s.effects(20.0))
    assert again.target == "b"  # b may be booting it: a start on c could run it twice


def test_a_stop_time_no_clock_gives_is_ignored_not_a_crash_of_the_fold() -> None:
    s = cluster()
    s.on_inventory(inv("a", stopped("vm1", "crashed", 1.7e308)))  # * 1000 is inf: int() of it raises
    assert s.effects(2.0) == [] and s.inventories["a"].vms[0].state == "stopped"
