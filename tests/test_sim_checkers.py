"""The simulation's checkers on hand-made observations: each rule fires on what
breaks it and stays quiet on the legitimate sequence next to it."""

from __future__ import annotations

import random

import pytest

from hafence.contracts import FenceRequest, FenceResult, HostEvent, VmSpec, VmStart, encode
from hafence.core.effects import Call, Publish, Request
from hafence.fencer.admission import Answer, Refuse, Run
from hafence.sim.checkers import Checkers, SafetyViolation
from hafence.sim.clock import NodeClock, Scheduler
from hafence.sim.watchdog import WorldSlots
from hafence.sim.world import World


def setup(levels: list[list[str]] | None = None) -> tuple[Scheduler, World, Checkers]:
    s = Scheduler()
    w = World(s, random.Random(5))
    w.add_host("h1", levels=levels)  # type: ignore[arg-type]
    w.add_host("h2")
    w.add_vm("vm1", "h1")
    return s, w, Checkers(w)


def suspect(host: str = "h1", incident: str = "i1") -> Publish:
    return Publish(f"hafence.host.{host}.suspect", HostEvent(host=host, kind="suspect", at=0.0, incident=incident))


def announce(c: Checkers, effect: Publish) -> None:
    """A monitor's suspect, published and stored in the events stream."""
    c.on_effect("heartbeat", effect)
    c.on_stored(effect.subject, encode(effect.message))


def host_event(kind: str, host: str = "h1", incident: str = "i1", **kw: object) -> Publish:
    return Publish(f"hafence.host.{host}.{kind}",
                   HostEvent(host=host, kind=kind, at=0.0, incident=incident, **kw))  # type: ignore[arg-type]


def start(vm: str = "vm1", target: str = "h2") -> Request:
    return Request(f"hafence.agent.{target}.cmd", VmStart(vm=VmSpec(name=vm, memory_mb=1024, ha=True)), 10.0, "t")


def fence_request(rid: str = "r1", term: int = 1, host: str = "h1", incident: str = "i1") -> FenceRequest:
    return FenceRequest(request_id=rid, incident=incident, host=host, term=term, requested_at=0.0)


def result(rid: str = "r1", level: int | None = 1, outcome: str = "confirmed_off", incident: str = "i1") -> Publish:
    return Publish("hafence.fence.result.h1", FenceResult(
        request_id=rid, incident=incident, host="h1", term=1, outcome=outcome,  # type: ignore[arg-type]
        level=level, started_at=0.0, finished_at=0.0))


def rule_of(call: object) -> str:
    with pytest.raises(SafetyViolation) as err:
        call()  # type: ignore[operator]
    return err.value.violation.rule


# -- S0 -----------------------------------------------------------------------------------
def test_s0_fires_when_a_vm_runs_on_two_powered_hosts_and_not_on_a_powered_off_one() -> None:
    s, w, c = setup()
    c.after_step()
    s.run_until_complete(w.hypervisor("h2").start(VmSpec(name="vm1", memory_mb=1024)))
    with pytest.raises(SafetyViolation) as err:
        c.after_step()
    assert err.value.violation.rule == "S0" and "h1, h2" in err.value.violation.what


def test_s0_is_quiet_when_the_first_host_is_off() -> None:
    s, w, c = setup()
    w.lose_power("h1")
    s.run_until_complete(w.hypervisor("h2").start(VmSpec(name="vm1", memory_mb=1024)))
    c.after_step()
    assert not c.violations


def test_s0_counts_a_hung_host() -> None:
    s, w, c = setup()
    w.hang("h1")
    s.run_until_complete(w.hypervisor("h2").start(VmSpec(name="vm1", memory_mb=1024)))
    assert rule_of(c.after_step) == "S0"


# -- S1 -----------------------------------------------------------------------------------
def test_s1_fires_on_a_start_elsewhere_during_an_open_incident() -> None:
    _s, w, c = setup()
    w.lose_power("h1")  # it is off, but nobody confirmed it: the start is still premature
    announce(c, suspect())
    assert rule_of(lambda: c.on_effect("scheduler", start())) == "S1"


def test_s1_an_incident_begins_when_its_suspect_is_stored_not_when_its_monitor_decided() -> None:
    """Seed 219 with reboots: a monitor cut off from NATS decided h1 suspect; before its
    suspect reached the stream, h1's new boot reported and the scheduler released the
    old boot's VMs (a new boot proves the old one gone). No service could know of that
    incident: no violation. Once stored, the same start is one."""
    _s, w, c = setup()
    w.lose_power("h1")
    c.on_effect("heartbeat", suspect())
    c.on_effect("scheduler", start())  # decided, not stored: nobody can know
    stored = suspect()
    c.on_stored(stored.subject, encode(stored.message))
    assert rule_of(lambda: c.on_effect("scheduler", start())) == "S1"


def test_s1_is_quiet_after_a_confirmed_off_of_the_fencer_for_that_incident() -> None:
    s, w, c = setup()
    announce(c, suspect())
    report = s.run_until_complete(w.power.fence(fence_request()))
    assert report.verdict.outcome == "confirmed_off"
    c.after_step()
    c.on_effect("fencer", result())
    c.on_effect("scheduler", start())
    assert not c.violations


def test_s1_is_not_released_by_a_result_from_anyone_but_the_fencer_or_for_another_incident() -> None:
    s, w, c = setup()
    announce(c, suspect())
    s.run_until_complete(w.power.fence(fence_request(incident="old")))
    c.stop_at_first = False
    c.on_effect("agent-h2", result())  # forged, not counted
    c.on_effect("fencer", result(incident="old"))  # another incident's result
    c.on_effect("scheduler", start())
    assert "S1" in [v.rule for v in c.violations]


def test_s1_is_released_by_an_operators_confirmation() -> None:
    _s, w, c = setup()
    w.lose_power("h1")
    announce(c, suspect())
    c.on_effect("operator", host_event("confirmed_fenced", incident="", by="ops"))
    c.on_effect("scheduler", start())
    assert not c.violations


def test_s1_fires_on_a_start_elsewhere_while_the_vm_really_runs_even_without_an_incident() -> None:
    _s, _w, c = setup()
    assert rule_of(lambda: c.on_effect("scheduler", start())) == "S1"


def test_s1_does_not_judge_a_start_on_the_vms_own_host() -> None:
    _s, w, c = setup()
    w.crash_vm("vm1", "h1")
    announce(c, suspect())
    c.on_effect("scheduler", start(target="h1"))
    assert not c.violations


def test_an_alive_closes_the_incident_and_a_re_announce_does_not_reopen_a_released_one() -> None:
    s, w, c = setup()
    announce(c, suspect())
    s.run_until_complete(w.power.fence(fence_request()))
    c.on_effect("fencer", result())
    announce(c, suspect())  # a new monitor leader re-announces it
    c.on_effect("scheduler", start())
    assert not c.violations
    announce(c, suspect("h2", "i2"))
    c.on_effect("heartbeat", host_event("alive", host="h2", incident="i2"))
    assert not c._open("h2")


# -- S2 -----------------------------------------------------------------------------------
def test_s2_fires_on_a_confirmed_off_with_no_run_behind_it() -> None:
    _s, _w, c = setup()
    assert rule_of(lambda: c.on_effect("fencer", result())) == "S2"


def test_s2_fires_when_the_result_names_a_level_that_did_not_turn_off() -> None:
    s, w, c = setup(levels=[["pdu", "pdu"], ["bmc"]])
    w.set_behaviour("h1-pdu2", "stuck_on")
    report = s.run_until_complete(w.power.fence(fence_request()))
    assert report.verdict.level == 2
    assert rule_of(lambda: c.on_effect("fencer", result(level=1))) == "S2"
    c.stop_at_first = False
    c.on_effect("fencer", result(level=2))
    assert len(c.violations) == 1


def test_s2_fires_on_a_fenced_host_event_without_a_confirmed_run_of_that_incident() -> None:
    s, w, c = setup()
    s.run_until_complete(w.power.fence(fence_request(incident="i1")))
    c.on_effect("arbiter", host_event("fenced", incident="i1"))
    assert not c.violations
    assert rule_of(lambda: c.on_effect("arbiter", host_event("fenced", incident="i2"))) == "S2"


# -- S3, S4 -------------------------------------------------------------------------------
def test_s3_fires_when_a_run_has_a_lower_term_than_an_earlier_one() -> None:
    s, w, c = setup()
    s.run_until_complete(w.power.fence(fence_request("r1", term=5)))
    c.after_step()
    w.power_on("h1")
    s.run_until_complete(w.power.fence(fence_request("r2", term=5)))
    c.after_step()
    w.power.fence(fence_request("r3", term=4))
    assert rule_of(c.after_step) == "S3"
    s.run()


def admit(request: FenceRequest, verdict: object) -> Call:
    """The fencer writing its verdict on a request to its journal (hafence.fencer.core)."""
    return Call("journal", "admit", (request, verdict, 0.0), "journal_admit:1")


def test_s3_fires_when_the_fencer_answers_a_stale_term_from_its_journal_without_a_power_run() -> None:
    # The planted term-check bug: a stale leader's request (term 3) for a request id that
    # ran under term 5 is answered from the journal; no power run, so only the admission shows it.
    c = setup()[2]
    recorded = FenceResult(request_id="r1", incident="i1", host="h1", term=5, outcome="confirmed_off", level=1,
                           started_at=0.0, finished_at=0.0)
    c.on_effect("fencer-1", admit(fence_request("r1", term=5), Run(1, 5)))
    c.on_effect("fencer-1", admit(fence_request("r1", term=5), Answer(recorded, 5)))  # a redelivery: fine
    c.on_effect("fencer-1", admit(fence_request("r1", term=3), Refuse("stale leader term 3", 5)))  # refused: fine
    assert not c.violations
    stale = admit(fence_request("r1", term=3), Answer(recorded, 5))
    assert rule_of(lambda: c.on_effect("fencer-1", stale)) == "S3"


def test_s3_keeps_the_highest_admitted_term_across_a_fencer_restart_and_ignores_other_services() -> None:
    c = setup()[2]
    c.on_effect("fencer-1", admit(fence_request("r1", term=2), Run(1, 2)))
    c.service_crashed("fencer-1")
    c.on_effect("fencer-1", admit(fence_request("r2", term=2, host="h2"), Run(1, 2)))  # equal term: admitted
    c.on_effect("scheduler-1", admit(fence_request("r3", term=1), Run(1, 1)))  # not the fencer's journal
    assert not c.violations
    assert rule_of(lambda: c.on_effect("fencer-1", admit(fence_request("r3", term=1), Run(1, 2)))) == "S3"


def test_s4_allows_a_second_run_only_after_a_fencer_crash() -> None:
    s, w, c = setup()
    s.run_until_complete(w.power.fence(fence_request("r1")))
    c.after_step()
    c.service_crashed("fencer")
    s.run_until_complete(w.power.fence(fence_request("r1")))
    c.after_step()
    assert not c.violations
    w.power.fence(fence_request("r1"))
    assert rule_of(c.after_step) == "S4"
    s.run()


# -- L1 -----------------------------------------------------------------------------------
def test_l1_fires_for_an_ha_vm_that_runs_nowhere_and_is_quiet_once_it_runs() -> None:
    s, w, c = setup()
    w.lose_power("h1")
    assert rule_of(c.check_recovery) == "L1"
    c2 = Checkers(w)
    s.run_until_complete(w.hypervisor("h2").start(VmSpec(name="vm1", memory_mb=1024, ha=True)))
    assert c2.check_recovery() == [] and not c2.violations


def test_l1_excuses_a_fence_given_up_on_and_a_cluster_without_room() -> None:
    _s, w, c = setup()
    w.lose_power("h1")
    c.on_effect("arbiter", host_event("fence_failed", alert=True))
    assert c.check_recovery() and not c.violations
    assert c.excused == {"vm1": "given up"}
    _s, w, c = setup()
    w.hosts["h2"].memory_mb = 512
    w.lose_power("h1")
    assert "no room" in c.check_recovery()[0]
    assert c.excused == {"vm1": "no room"}


def test_l1_says_why_each_host_could_take_no_vm() -> None:
    """How much L1 did not check, and why: a reader of the batch tells a cluster sized too
    tight (full) from one that lost its hosts (off, fenced, quarantined)."""
    s, w, c = setup()
    w.add_host("h3")
    w.add_host("h4")
    w.hosts["h2"].memory_mb = 512
    w.hang("h4")
    s.run_until_complete(w.power.fence(fence_request()))
    s.run(until=10)
    w.lose_power("h3")
    excuse = c.check_recovery()[0]
    assert excuse.startswith("no room: 1 HA VM down (1024 MiB), 512 MiB free"), excuse
    assert excuse.endswith("h1 off (fenced), h2 full (512 MiB free), h3 off (no mains), h4 hung"), excuse
    w.power_on("h1")  # back after its fence, not cleared
    assert "h1 fenced and quarantined" in c.check_recovery()[0]


def test_l1_counts_no_room_on_a_fenced_host_that_came_back_until_it_is_cleared() -> None:
    s, w, c = setup()
    w.hosts["h2"].memory_mb = 512  # no room there
    s.run_until_complete(w.power.fence(fence_request()))
    s.run(until=10)
    w.power_on("h1")  # back after its fence, quarantined
    assert "no room" in c.check_recovery()[0]
    c.on_effect("operator", host_event("cleared", by="ops"))
    assert rule_of(c.check_recovery) == "L1"


def test_l1_counts_no_room_on_a_host_with_a_poison_pill_in_its_slot_until_it_is_cleared() -> None:
    """Seed 1082 with fences that reboot: four hosts up and empty, each fenced through
    its poison pill, the fifth full. Their agents start nothing until an operator takes
    the pill out, and the simulation has none: no room, not an L1 violation. Once the
    pill is out, the same cluster is judged."""
    s, w, c = setup()
    w.lose_power("h1")
    slots = WorldSlots(w, "", NodeClock(s, "fencer"))
    slots.write_pill("h2", by="fencer", reason="test")
    excuses = c.check_recovery()
    assert "no room" in excuses[0] and "h2 has a poison pill in its slot" in excuses[0]
    slots.clear_pill("h2")
    assert rule_of(c.check_recovery) == "L1"


def test_l1_excuses_a_vm_a_compromised_agent_claimed() -> None:
    _s, w, c = setup()
    w.lose_power("h1")
    c.disputed.add("vm1")
    assert "compromised" in c.check_recovery()[0]


def test_s1_does_not_hold_a_vm_to_an_incident_of_a_later_boot_that_never_ran_it() -> None:
    s, w, c = setup()
    old_boot = w.hosts["h1"].boot_id
    w.lose_power("h1")
    w.restore_power("h1")  # a new boot, running nothing
    announce(c, Publish("hafence.host.h1.suspect", HostEvent(
        host="h1", kind="suspect", at=0.0, incident="i2", boot_id=w.hosts["h1"].boot_id)))
    c.on_effect("scheduler", start())
    assert not c.violations
    announce(c, Publish("hafence.host.h1.suspect", HostEvent(
        host="h1", kind="suspect", at=0.0, incident="i1", boot_id=old_boot)))
    assert rule_of(lambda: c.on_effect("scheduler", start())) == "S1"
    s.run()


def test_s1_a_confirmed_off_of_the_same_boot_releases_an_incident_named_twice() -> None:
    s, w, c = setup()
    boot = w.hosts["h1"].boot_id
    for incident in ("i1", "i2"):  # two monitor replicas named one outage twice
        announce(c, Publish("hafence.host.h1.suspect", HostEvent(
            host="h1", kind="suspect", at=0.0, incident=incident, boot_id=boot)))
    s.run_until_complete(w.power.fence(fence_request(incident="i2")))
    c.on_effect("fencer", Publish("hafence.fence.result.h1", FenceResult(
        request_id="r1", incident="i2", host="h1", term=1, outcome="confirmed_off", level=1, started_at=0.0,
        finished_at=0.0, boot_id=boot)))
    c.on_effect("scheduler", start())
    assert not c.violations


def test_s1_a_suspect_of_a_boot_already_confirmed_off_is_released_by_that_fence() -> None:
    # Sim seed 10 (control-plane faults): h2's boot was fenced (confirmed_off), then a
    # monitor replica suspected the same dead boot again under a new incident id; the
    # VM's restart after it is safe: that boot is off.
    s, w, c = setup()
    boot = w.hosts["h1"].boot_id
    s.run_until_complete(w.power.fence(fence_request(incident="i1")))
    announce(c, Publish("hafence.host.h1.suspect", HostEvent(
        host="h1", kind="suspect", at=0.0, incident="i1", boot_id=boot)))
    c.on_effect("fencer", Publish("hafence.fence.result.h1", FenceResult(
        request_id="r1", incident="i1", host="h1", term=1, outcome="confirmed_off", level=1, started_at=0.0,
        finished_at=0.0, boot_id=boot)))
    announce(c, Publish("hafence.host.h1.suspect", HostEvent(
        host="h1", kind="suspect", at=0.0, incident="i2", boot_id=boot)))
    c.on_effect("scheduler", start())
    assert not c.violations
    # Nor by one naming no boot (a restarted monitor's "never seen" incident, sim seed 80):
    # the boot the VM ran in is proven off.
    announce(c, Publish("hafence.host.h1.suspect", HostEvent(
        host="h1", kind="suspect", at=0.0, incident="i3", boot_id="")))
    c.on_effect("scheduler", start(target="h2"))
    assert not c.violations


def test_s1_an_incident_naming_no_boot_still_holds_a_vm_whose_boot_was_never_fenced() -> None:
    c = setup()[2]
    announce(c, Publish("hafence.host.h1.suspect", HostEvent(
        host="h1", kind="suspect", at=0.0, incident="i3", boot_id="")))
    assert rule_of(lambda: c.on_effect("scheduler", start(target="h2"))) == "S1"


def test_l1_excuses_the_vms_of_a_host_whose_agent_is_compromised() -> None:
    _s, w, c = setup()
    w.lose_power("h1")
    c.compromised.add("h1")
    assert "compromised" in c.check_recovery()[0] and not c.violations


def test_l1_does_not_excuse_a_fence_given_up_on_while_the_hosts_watchdog_level_worked() -> None:
    from hafence.slots import SlotRecord

    _s, w, c = setup(levels=[["bmc"], ["watchdog"]])
    w.slot_records["h1"] = SlotRecord(host="h1", boot_id=w.hosts["h1"].boot_id, counter=3, armed=True,
                                      timeout_s=10.0)
    w.lose_power("h1")  # BMC dead with it: the pill would have fenced it
    c.on_effect("arbiter", host_event("fence_failed", alert=True))
    assert c.given_up_with_watchdog["h1"] and rule_of(c.check_recovery) == "L1"
    # An unarmed watchdog (its agent never armed it this boot): no device works, excused.
    _s, w, c = setup(levels=[["bmc"], ["watchdog"]])
    w.slot_records["h1"] = SlotRecord(host="h1", boot_id=w.hosts["h1"].boot_id, counter=1, armed=False)
    w.lose_power("h1")
    c.on_effect("arbiter", host_event("fence_failed", alert=True))
    assert "given up" in c.check_recovery()[0] and not c.violations


def test_s2_judges_a_watchdog_level_by_the_boot_its_pill_was_for() -> None:
    from hafence.sim.clock import NodeClock
    from hafence.sim.world import PowerRun

    s, w, c = setup(levels=[["bmc"], ["watchdog"]])
    w.set_behaviour("h1-bmc", "bad_credentials")
    from hafence.sim.watchdog import WorldSlots

    WorldSlots(w, "", NodeClock(s, "ctl")).write_pill("h1", "fencer", "fence")
    w.hang("h1")  # hung, not reset: the boot the pill was for still holds vm1
    w.runs.append(PowerRun("r1", "i1", 1, "h1", "off", 0.0, 25.0, "confirmed_off", 2,
                           {1: False, 2: w.pill_gone("h1")}))
    assert rule_of(lambda: c.on_effect("fencer", result(level=2))) == "S2"
    s2, w2, c2 = setup(levels=[["bmc"], ["watchdog"]])
    WorldSlots(w2, "", NodeClock(s2, "ctl")).write_pill("h1", "fencer", "fence")
    w2.crash("h1")
    w2.reset("h1")  # the watchdog reset it: a new boot that runs nothing
    w2.runs.append(PowerRun("r1", "i1", 1, "h1", "off", 0.0, 25.0, "confirmed_off", 2,
                            {1: False, 2: w2.pill_gone("h1")}))
    c2.on_effect("fencer", result(level=2))
    assert not c2.violations


def test_s1_a_confirmed_off_naming_no_boot_releases_the_boot_the_truth_shows_gone() -> None:
    # Sim seed 571: a restarted monitor's "never seen" incident was fenced (its result
    # names no boot) and h2 really went off; a replica then suspected h2's last boot
    # under its own name. The VM's restart is safe: that boot was off at read-back.
    s, w, c = setup()
    boot = w.hosts["h1"].boot_id
    announce(c, suspect(incident="h1-never-seen"))
    s.run_until_complete(w.power.fence(fence_request(incident="h1-never-seen")))
    assert w.runs[0].off_boot == boot
    c.on_effect("fencer", result(incident="h1-never-seen"))  # boot_id: ""
    announce(c, Publish("hafence.host.h1.suspect", HostEvent(
        host="h1", kind="suspect", at=0.0, incident="i2", boot_id=boot)))
    c.on_effect("scheduler", start())
    assert not c.violations
    # A run that did not turn the host off proves no boot gone.
    s, w, c = setup()
    w.set_behaviour("h1-bmc", "stuck_on")
    s.run_until_complete(w.power.fence(fence_request(incident="h1-never-seen")))
    assert w.runs[0].off_boot == ""
    announce(c, Publish("hafence.host.h1.suspect", HostEvent(
        host="h1", kind="suspect", at=0.0, incident="i2", boot_id=w.hosts["h1"].boot_id)))
    assert rule_of(lambda: c.on_effect("scheduler", start())) == "S1"


def test_the_seed_line_and_the_batch_say_how_many_vms_l1_excused_and_why() -> None:
    from hafence.sim.__main__ import excused_summary
    from hafence.sim.run import RunResult

    r = RunResult(7, 10.0, 5, excused={"no room": 3})
    assert r.summary().endswith(": ok; L1 excused 3 VMs (no room)")
    r.excused = {"no room": 2, "given up": 1}
    assert r.summary().endswith("; L1 excused 3 VMs (1 given up, 2 no room)")
    assert RunResult(8, 10.0, 5).summary().endswith(": ok")
    assert excused_summary({}, {}, 0, 300) == "no VM in 300 seed(s)"
    assert excused_summary({"no room": 12, "given up": 1}, {"no room": 4, "given up": 1}, 5, 300) == (
        "13 VM(s) in 5 of 300 seed(s) (given up: 1 VM(s) in 1 seed(s); no room: 12 VM(s) in 4 seed(s))")
