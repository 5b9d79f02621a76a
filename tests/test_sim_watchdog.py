"""Watchdog self-fencing in the simulation (hafence.sim.watchdog): the agent's guard and
the fencer's watchdog level are production's, on the world's slots, hardware watchdogs
and virtual time; the checkers judge a watchdog level's confirmed_off against the truth."""

from __future__ import annotations

import time

import pytest

import hafence.fencer.drivers.watchdog as watchdog_driver
from hafence.contracts import FenceRequest
from hafence.sim.checkers import SafetyViolation
from hafence.sim.cluster import ClusterShape, SimCluster
from hafence.sim.permissions import publish_grants

MSGWAIT = 20.0  # 2 x the simulated hosts' 10 s watchdog timeout


def cluster(seed: int = 3, watchdogs: float = 1.0) -> SimCluster:
    c = SimCluster(seed, ClusterShape(hosts=3, pdu_share=0.0, watchdog_share=watchdogs))
    c.net.publish_grants = publish_grants(c.config, {svc.node for svc in c.services})
    c.checkers.stop_at_first = False
    c.start()
    run(c, 30.0)
    return c


def run(c: SimCluster, until: float) -> None:
    c.scheduler.run(until=until, after_step=c.checkers.after_step)
    assert not c.failures and not c.scheduler.unhandled and not c.net.denied, (
        c.failures, c.scheduler.unhandled, c.net.denied)


def ha_vms_of(c: SimCluster, host: str) -> list[str]:
    return sorted(vm for vm, d in c.world.vms.items() if d.home == host and d.spec.ha)


def runs_on_live_host(c: SimCluster, vm: str) -> bool:
    return any(vm in h.running for h in c.world.hosts.values() if h.answers)


def test_every_watchdog_host_arms_its_watchdog_and_reports_it_in_its_slot() -> None:
    c = cluster()
    for name, host in sorted(c.world.hosts.items()):
        record = c.world.slot_records[name]
        assert host.wd_armed and record.armed and record.timeout_s == 10.0 and record.boot_id == host.boot_id
    assert c.world.watchdog_resets == 0 and not c.checkers.violations


def test_a_host_whose_bmc_dies_with_it_is_fenced_through_its_pill_and_its_vms_restart() -> None:
    c = cluster()
    w = c.world
    vms = ha_vms_of(c, "h1")
    w.lose_power("h1")  # the host and its BMC: level 1 cannot answer
    lost_at = c.scheduler.now
    run(c, lost_at + 150.0)
    confirmed = [r for r in w.runs if r.host == "h1" and r.outcome == "confirmed_off"]
    assert confirmed and confirmed[0].level == 2 and confirmed[0].truly_off[2]
    pill = next(op for op in w.ops if op.device == "h1-wd" and op.request_id == confirmed[0].request_id)
    assert confirmed[0].finished is not None and confirmed[0].finished - pill.at >= MSGWAIT
    assert all(runs_on_live_host(c, vm) for vm in vms), {vm: c.world.running_on(vm) for vm in vms}
    assert c.checkers.check_recovery() == [] and not c.checkers.violations


def test_without_a_watchdog_the_same_host_is_given_up_on_and_l1_excuses_it() -> None:
    c = cluster(watchdogs=0.0)
    w = c.world
    w.lose_power("h1")
    run(c, c.scheduler.now + 300.0)
    assert not any(r.host == "h1" and r.outcome == "confirmed_off" for r in w.runs)
    assert not any(runs_on_live_host(c, vm) for vm in ha_vms_of(c, "h1"))
    assert c.checkers.given_up.get("h1") and not c.checkers.given_up_with_watchdog.get("h1")
    assert any("given up" in e for e in c.checkers.check_recovery()) and not c.checkers.violations


def test_a_hung_host_with_a_refusing_bmc_is_reset_by_its_watchdog_and_boots_quarantined_by_the_pill() -> None:
    c = cluster()
    w = c.world
    h1 = w.hosts["h1"]
    boots = h1.boots
    w.set_behaviour("h1-bmc", "bad_credentials")
    w.hang("h1")
    hung_at = c.scheduler.now
    run(c, hung_at + 120.0)
    assert w.watchdog_resets == 1 and h1.boots == boots + 1 and h1.answers
    assert w.pill_boot["h1"] == boots  # the pill was for the boot that hung
    confirmed = [r for r in w.runs if r.host == "h1" and r.outcome == "confirmed_off"]
    assert confirmed and confirmed[0].level == 2 and confirmed[0].truly_off[2]
    # Booted with the pill: it arms nothing, starts nothing, says so.
    guard = c.agent_watchdogs["h1"].guard
    assert guard is not None and guard.pill and not guard.armed and not h1.wd_armed
    assert "poison pill" in c.agent_watchdogs["h1"].start_refusal()
    assert not h1.running and all(runs_on_live_host(c, vm) for vm in ha_vms_of(c, "h1"))
    assert not c.checkers.violations


def test_a_host_cut_from_storage_but_heard_by_the_monitor_is_fed_by_the_views_and_not_reset() -> None:
    c = cluster()
    c.world.cut_storage("h1")
    run(c, c.scheduler.now + 90.0)
    assert c.world.watchdog_resets == 0 and c.world.hosts["h1"].boots == 1 and not c.checkers.violations


def test_a_host_cut_from_storage_and_nats_resets_itself() -> None:
    c = cluster()
    c.world.set_behaviour("h1-bmc", "bad_credentials")  # else its BMC fences it first
    c.world.cut_storage("h1")
    c.net.cut("h1")
    cut_at = c.scheduler.now
    run(c, cut_at + 20.0)
    # No view after 3 s, no slot check at all: fed at most 3 s more, reset 10 s later.
    reset = next(line for line in c.log.text().splitlines() if "h1 watchdog fires" in line)
    assert c.world.watchdog_resets == 1 and float(reset.split()[0]) <= cut_at + 3.0 + 10.0 + 1.5


def test_an_agent_paused_briefly_keeps_its_host() -> None:
    c = cluster()
    c.world.set_behaviour("h2-bmc", "bad_credentials")
    c.agents["h2"].pause(2.0)  # a GC pause: under the detection time and the watchdog timeout
    run(c, c.scheduler.now + 60.0)
    assert c.world.watchdog_resets == 0 and c.world.hosts["h2"].boots == 1 and not c.checkers.violations


def test_an_agent_dead_longer_than_the_timeout_has_its_host_reset() -> None:
    """Its BMC refuses the fencer: only the watchdog can take a host whose agent is dead."""
    c = cluster()
    c.world.set_behaviour("h2-bmc", "bad_credentials")
    agent = c.agents["h2"]
    agent.crash()
    c.checkers.service_crashed(agent)
    crashed_at = c.scheduler.now
    run(c, crashed_at + 60.0)
    # Fed last just before the crash; the reset kills the VMs and their restart waits
    # for the fence through the pill.
    reset = next(line for line in c.log.text().splitlines() if "h2 watchdog fires" in line)
    assert c.world.watchdog_resets == 1 and float(reset.split()[0]) <= crashed_at + 10.0 + 1.0
    assert any(r.host == "h2" and r.outcome == "confirmed_off" and r.level == 2 for r in c.world.runs)
    assert all(runs_on_live_host(c, vm) for vm in ha_vms_of(c, "h2")) and not c.checkers.violations


def test_s2_catches_a_fencer_that_confirms_its_watchdog_level_before_msgwait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The planted bug: msgwait forgotten. The hung host has not reset yet when the
    fencer says it is off: the boot the pill was for still runs its VMs."""
    monkeypatch.setattr(watchdog_driver, "msgwait_s", lambda device, storage, record: 0.5)
    c = cluster()
    c.world.set_behaviour("h1-bmc", "bad_credentials")
    c.world.hang("h1")
    with pytest.raises(SafetyViolation):
        c.checkers.stop_at_first = True
        run(c, c.scheduler.now + 60.0)
    assert c.checkers.violations[0].rule == "S2" and "level 2" in c.checkers.violations[0].what


def test_a_watchdog_cluster_replays_byte_for_byte_and_reads_no_real_time(monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(*_: object) -> float:
        raise AssertionError("the simulation read real time")

    def story() -> str:
        c = cluster(seed=11)
        c.world.set_behaviour("h1-bmc", "unreachable")
        c.world.hang("h1")
        c.world.slot_delay["h2"] = (1.0, 8.0)
        run(c, 150.0)
        assert c.world.watchdog_resets >= 1 and c.world.pills
        return c.log.text()

    first = story()
    for name in ("time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "sleep"):
        monkeypatch.setattr(time, name, forbidden)
    assert story() == first


def test_a_host_the_monitor_still_lists_is_never_confirmed_through_its_pill() -> None:
    """Cut from its storage, it cannot see the pill; heard, it is listed in the views the
    fencer follows: the watchdog level must not confirm it, msgwait or not."""
    c = cluster()
    w = c.world
    w.cut_storage("h1")
    request = FenceRequest(request_id="ops-1", incident="ops", host="h1", term=1 << 30, requested_at=0.0,
                           method="watchdog")
    report = c.scheduler.run_until_complete(w.power.fence(request), limit=c.scheduler.now + 120.0)
    assert report.verdict.outcome != "confirmed_off" and w.hosts["h1"].boots == 1
    assert "h1" in w.pills and w.watchdog_resets == 0 and not c.checkers.violations


def test_the_vms_a_pill_stopped_are_restarted_once_the_fence_confirms() -> None:
    """A GC pause of the agent (4 s) gets its host suspected; its BMC refuses, so the
    fencer writes the pill. The agent wakes still connected, sees the pill, stops its VMs
    (ordered stops: the VM watch does not count them as failures) and its inventory says
    so; the watchdog resets the host. The fence confirms through the pill at t=77.6, and
    the scheduler logs "fence confirmed: restarting HA VMs ... vms=0": the VMs stay down."""
    c = cluster()
    w = c.world
    w.set_behaviour("h1-bmc", "bad_credentials")
    c.agents["h1"].pause(4.0)
    run(c, c.scheduler.now + 200.0)
    assert any(r.host == "h1" and r.outcome == "confirmed_off" and r.level == 2 for r in w.runs)
    assert w.watchdog_resets == 1
    vms = ha_vms_of(c, "h1")
    assert all(runs_on_live_host(c, vm) for vm in vms), {vm: w.running_on(vm) for vm in vms}
