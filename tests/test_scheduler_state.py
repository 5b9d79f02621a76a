import msgspec
import pytest

import hafence.host_phase as host_phase
from hafence.contracts import FenceResult, HostEvent, Inventory, VmInfo, VmSpec
from hafence.host_phase import EventKind, Phase
from hafence.scheduler.state import ClearHost, Duplicate, SchedulerState, StopCopy


def inv(host: str, boot: str, *vms: tuple[str, bool]) -> Inventory:
    return Inventory(
        host=host, boot_id=boot, memory_mb=10000, vcpus=8, sent_at=0.0,
        vms=[VmInfo(spec=VmSpec(name=n, memory_mb=1000, ha=ha), state="running") for n, ha in vms],
    )


def result(host: str, outcome: str, term: int = 5, incident: str = "i1") -> FenceResult:
    return FenceResult(request_id=f"fence-{incident}", incident=incident, host=host, term=term,
                       outcome=outcome, started_at=0.0, finished_at=1.0)  # type: ignore[arg-type]


def test_s1_vms_are_released_only_by_a_confirmed_fence() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True), ("vm2", False)))
    s.on_inventory(inv("b", "b2"))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1", term=5))
    assert s.lost == {}  # suspicion alone releases nothing
    assert not s.on_fence_result(result("a", "failed"))
    assert not s.on_fence_result(result("a", "refused"))
    assert s.lost == {}
    assert s.on_fence_result(result("a", "confirmed_off"))
    assert set(s.lost) == {"vm1"}  # only HA VMs
    assert [c.name for c in s.candidates()] == ["b"]


def test_vms_a_poison_pill_stopped_are_released_by_the_fence_those_an_operator_stopped_are_not() -> None:
    """The agent obeying a pill stops its VMs before its watchdog resets the host; the
    inventory says so ("pill"). They ran until the fence: its confirmation releases them
    (simulation, watchdog model: they stayed down), unlike a VM stopped by a command."""
    s = SchedulerState()
    stopped = [VmInfo(spec=VmSpec(name="vm-pill", memory_mb=1000, ha=True), state="stopped", stop_reason="pill"),
               VmInfo(spec=VmSpec(name="vm-cmd", memory_mb=1000, ha=True), state="stopped", stop_reason="command")]
    s.on_inventory(inv("a", "b1", ("vm-run", True)))
    s.on_inventory(inv("b", "b2"))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1", term=5, boot_id="b1"))
    s.on_inventory(msgspec.structs.replace(inv("a", "b1", ("vm-run", True)),
                                           vms=[*inv("a", "b1", ("vm-run", True)).vms, *stopped], pill=True))
    assert s.lost == {}
    assert s.on_fence_result(result("a", "confirmed_off"))
    assert set(s.lost) == {"vm-run", "vm-pill"}


def test_a_new_boot_releases_the_vms_its_old_boot_stopped_for_a_pill() -> None:
    s = SchedulerState()
    s.on_inventory(inv("b", "b2"))
    s.on_inventory(msgspec.structs.replace(inv("a", "b1"), pill=True, vms=[
        VmInfo(spec=VmSpec(name="vm-pill", memory_mb=1000, ha=True), state="stopped", stop_reason="pill")]))
    s.on_inventory(inv("a", "b3"))  # the watchdog reset it: no incident was open
    assert set(s.lost) == {"vm-pill"}


def test_a_confirmation_for_one_host_releases_only_that_hosts_vms() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("b", "b2", ("vm2", True)))
    assert s.on_fence_result(result("a", "confirmed_off", term=3))
    assert set(s.lost) == {"vm1"}
    # Replayed: the same confirmation does not release the VMs a second time.
    assert not s.on_fence_result(result("a", "confirmed_off", term=3))


def test_an_operator_confirmation_releases_the_vms() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_host_event(HostEvent(host="a", kind="confirmed_fenced", at=0.0, incident="manual-1"))
    assert set(s.lost) == {"vm1"}


def test_a_vm_reported_running_elsewhere_is_no_longer_lost() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_fence_result(result("a", "confirmed_off"))
    s.on_inventory(inv("b", "b2", ("vm1", True)))
    assert s.lost == {}


def test_a_late_report_from_the_fenced_boot_is_ignored_but_a_new_boot_counts() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_fence_result(result("a", "confirmed_off"))
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    assert "vm1" in s.lost and s.phases["a"] == "fenced"
    s.on_inventory(inv("a", "b9"))
    assert s.phases["a"] == "quarantined" and "vm1" in s.lost  # S6: back, but not yet cleared


def test_starts_sent_to_a_host_that_is_then_fenced_are_void() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("b", "b2"))
    s.on_fence_result(result("a", "confirmed_off"))
    spec = s.lost["vm1"].spec
    s.reserved[("vm1", "b")] = spec  # a start sent to b, unanswered
    s.on_fence_result(result("b", "confirmed_off", incident="i2"))
    assert ("vm1", "b") not in s.reserved
    assert "vm1" in s.lost  # still to be restarted, now elsewhere


def test_a_host_back_as_a_new_boot_is_no_target_while_its_old_boots_fence_is_unconfirmed() -> None:
    # Seeds 293 and 5: a fence of the old boot's incident is in flight (or retried) when
    # the host returns as a new boot; the fence finishes and powers the new boot off.
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("b", "b2", ("vm2", True)))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1", term=5, boot_id="b1"))
    s.on_host_event(HostEvent(host="a", kind="fence_requested", at=1.0, incident="i1", term=5, boot_id="b1"))
    s.on_inventory(inv("a", "b3"))
    s.on_host_event(HostEvent(host="a", kind="alive", at=2.0, incident="i1", term=5))
    assert s.phases["a"] == "up"
    assert [c.name for c in s.candidates()] == ["b"]
    s.on_fence_result(result("a", "failed"))
    assert [c.name for c in s.candidates()] == ["b"]  # a failed fence is retried
    # Another host's fence of an incident that is confirmed off frees nothing of a's.
    s.on_fence_result(result("b", "confirmed_off", incident="i2"))
    assert [c.name for c in s.candidates()] == []
    s.on_fence_result(result("a", "confirmed_off"))
    assert "a" not in s.fencing


def test_a_fence_requested_read_after_its_result_blocks_nothing() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1"))
    s.on_fence_result(result("a", "confirmed_off"))
    s.on_host_event(HostEvent(host="a", kind="fence_requested", at=1.0, incident="i1", term=5))
    assert not s.fence_pending("a")
    s.on_host_event(HostEvent(host="a", kind="fence_failed", at=1.0, incident="i7", term=5))
    assert s.fence_pending("a")
    s.on_host_event(HostEvent(host="a", kind="confirmed_fenced", at=2.0, incident="i7"))
    assert not s.fence_pending("a")


def test_a_fence_the_arbiter_gave_up_on_blocks_nothing_but_one_it_holds_for_a_storm_does() -> None:
    # Seed 72: a fence escalated (attempts spent) is never retried; its host, back as a
    # new boot, is a placement target again.
    s = SchedulerState()
    s.on_inventory(inv("a", "b1"))
    s.on_host_event(HostEvent(host="a", kind="fence_failed", at=1.0, incident="i1", term=5))
    s.on_host_event(HostEvent(host="a", kind="fence_skipped", at=2.0, incident="i1", rule="storm"))
    assert s.fence_pending("a")
    s.on_host_event(HostEvent(host="a", kind="fence_skipped", at=3.0, incident="i1", rule="escalated"))
    assert not s.fence_pending("a")


# --- VM definitions never come from an agent's word (issue 10, item 1) ---------------

EVIL_XML = "<domain type='kvm'><name>vm1</name><devices><disk><source file='/etc/shadow'/></disk></devices></domain>"


def test_a_lost_vm_keeps_no_definition_an_agent_reported() -> None:
    s = SchedulerState(definitions_dir="/shared/defs")
    forged = VmSpec(name="vm1", memory_mb=1, ha=True, definition=EVIL_XML)
    s.on_inventory(Inventory(host="a", boot_id="b1", memory_mb=10000, vcpus=8, sent_at=0.0,
                             vms=[VmInfo(spec=forged, state="running")]))
    s.on_inventory(inv("b", "b2"))
    assert s.on_fence_result(result("a", "confirmed_off"))
    assert s.lost["vm1"].spec.definition == "/shared/defs/vm1.xml"
    # Without a definitions directory the target must have the domain defined already.
    bare = SchedulerState()
    bare.on_inventory(Inventory(host="a", boot_id="b1", memory_mb=10000, vcpus=8, sent_at=0.0,
                                vms=[VmInfo(spec=forged, state="running")]))
    bare.on_fence_result(result("a", "confirmed_off"))
    assert bare.lost["vm1"].spec.definition == ""


def test_the_config_entry_wins_over_what_the_agent_reports() -> None:
    configured = VmSpec(name="vm1", memory_mb=8192, ha=True, priority="high", definition="/defs/vm1-prod.xml")
    s = SchedulerState(config_vms={"vm1": configured, "vm2": VmSpec(name="vm2", memory_mb=512, ha=False)},
                       definitions_dir="/shared/defs")
    lying = [VmInfo(spec=VmSpec(name="vm1", memory_mb=1, ha=True, priority="low", definition=EVIL_XML),
                    state="running"),
             # The config says vm2 is not HA: an agent cannot make it one.
             VmInfo(spec=VmSpec(name="vm2", memory_mb=1, ha=True), state="running")]
    s.on_inventory(Inventory(host="a", boot_id="b1", memory_mb=10000, vcpus=8, sent_at=0.0, vms=lying))
    s.on_fence_result(result("a", "confirmed_off"))
    assert set(s.lost) == {"vm1"}
    assert s.lost["vm1"].spec == configured


# --- S6: results fold against the fenced boot; quarantine; duplicates ------------------


def test_a_result_after_the_new_boot_reported_folds_against_the_boot_that_was_fenced() -> None:
    """action = "reboot": the host is back (boot b9, empty) before the result is read."""
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("b", "b2"))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1"))
    s.on_inventory(inv("a", "b9"))
    assert s.on_fence_result(result("a", "confirmed_off"))
    assert set(s.lost) == {"vm1"}
    assert s.phases["a"] == "quarantined"  # back already, but it takes nothing
    assert [c.name for c in s.candidates()] == ["b"]


def test_the_incidents_boot_id_names_the_inventory_to_fold() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("a", "b2", ("vm2", True)))
    s.on_fence_result(FenceResult(request_id="r", incident="i1", host="a", term=1, outcome="confirmed_off",
                                  started_at=0.0, finished_at=1.0, boot_id="b1"))
    assert set(s.lost) == {"vm1"}


def test_a_fenced_host_that_comes_back_is_quarantined_until_clean_and_cleared() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("b", "b2"))
    s.on_fence_result(result("a", "confirmed_off"))
    s.on_inventory(inv("b", "b2", ("vm1", True)))  # restarted on b
    s.on_inventory(inv("a", "b3", ("vm1", True)))  # a came back running it too (autostart, by hand)
    assert s.phases["a"] == "quarantined" and "a" not in [c.name for c in s.candidates()]
    effects = s.effects(now=100.0)
    assert Duplicate("vm1", ("a", "b"), ("a",)) in effects
    assert StopCopy("vm1", "a", ("b",)) in effects
    assert s.effects(now=101.0) == []  # announced once, stop not re-sent at once
    assert StopCopy("vm1", "a", ("b",)) in s.effects(now=106.0)  # ... but again if nothing changed
    s.on_host_event(HostEvent(host="a", kind="cleared", at=0.0, by="alice"))
    assert s.phases["a"] == "quarantined"  # cleared, but not clean
    s.on_inventory(inv("a", "b3"))  # the copy was stopped
    assert s.phases["a"] == "up" and "a" in [c.name for c in s.candidates()]
    assert s.effects(now=107.0) == []


def test_clean_but_not_cleared_stays_quarantined_unless_auto_clear() -> None:
    for auto in (False, True):
        s = SchedulerState(auto_clear=auto)
        s.on_inventory(inv("a", "b1", ("vm1", True)))
        s.on_fence_result(result("a", "confirmed_off"))
        s.on_inventory(inv("a", "b2"))
        assert s.phases["a"] == "quarantined"
        effects = s.effects(now=0.0)
        assert effects == ([ClearHost("a", "b2", "auto_clear", "reported clean after the fence of boot b1")]
                           if auto else [])


def test_a_duplicate_between_hosts_in_good_standing_is_announced_but_nothing_is_stopped() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("b", "b2", ("vm1", True)))
    assert s.effects(now=0.0) == [Duplicate("vm1", ("a", "b"), ())]


def test_an_agent_that_reports_itself_quarantined_is_told_when_it_is_not() -> None:
    s = SchedulerState()
    s.on_inventory(msgspec.structs.replace(inv("a", "b1"), quarantined=True))
    assert s.effects(now=0.0) == [ClearHost("a", "b1", "not_quarantined",
                                            "this host is not quarantined by the scheduler")]
    assert s.effects(now=1.0) == []
    s.on_inventory(inv("a", "b1"))
    assert s.effects(now=10.0) == []


def test_next_step_resends_to_the_same_host_moves_off_failed_or_fenced_ones_and_waits_for_suspects() -> None:
    s = SchedulerState(start_attempts=2)
    for h in ("a", "b", "c"):
        s.on_inventory(inv(h, f"boot-{h}", *([("vm1", True)] if h == "a" else [])))
    s.on_fence_result(result("a", "confirmed_off"))
    lost = s.lost["vm1"]
    assert s.next_step(lost, []) == ("place", "")
    assert s.next_step(lost, [("b", "sending")]) == ("resend", "b")
    assert s.next_step(lost, [("b", "failed")]) == ("place", "")
    assert not s.exhausted("vm1")
    s.on_host_event(HostEvent(host="c", kind="suspect", at=0.0, incident="i2"))
    assert s.next_step(lost, [("b", "failed"), ("c", "sending")]) == ("wait", "c")
    s.on_fence_result(result("c", "confirmed_off", incident="i2"))
    assert s.next_step(lost, [("b", "failed"), ("c", "sending")]) == ("place", "")
    assert s.exhausted("vm1")


def test_a_start_that_failed_on_a_hosts_old_boot_does_not_keep_it_off_the_new_one() -> None:
    """Simulation seed 180: a VM had failed on every host, each of which then rebooted;
    it was never tried again and stayed down (L1)."""
    state = SchedulerState()
    state.on_inventory(inv("h1", "b1"))
    state.on_inventory(inv("h2", "b1"))
    state.failed_on["vm1"] = {"h1", "h2"}
    state.on_inventory(inv("h1", "b2"))
    assert state.failed_on["vm1"] == {"h2"}
    state.on_inventory(inv("h2", "b1"))  # the same boot again: its failure still counts
    assert state.failed_on["vm1"] == {"h2"}


# --- the phase through hafence.host_phase (one state machine) ---------------------------


def test_the_phase_moves_by_the_shared_table_and_a_host_heard_after_its_fence_stays_fenced() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    assert s.phases["a"] is Phase.UP
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1", boot_id="b1"))
    assert s.phases["a"] is Phase.SUSPECT
    assert s.on_fence_result(result("a", "confirmed_off"))
    s.on_host_event(HostEvent(host="a", kind="alive", at=1.0))  # a heartbeat still in flight
    assert s.phases["a"] is Phase.FENCED
    s.on_inventory(inv("a", "b2"))
    assert s.phases["a"] is Phase.QUARANTINED
    s.on_host_event(HostEvent(host="a", kind="cleared", at=2.0, by="op"))
    assert s.phases["a"] is Phase.UP and s.illegal == {}


def test_a_quarantined_host_fenced_again_is_fenced_not_a_confirmation_read_twice() -> None:
    # The table keeps quarantined on a bare confirmed_off (its fence's result read again);
    # the scheduler reads a result for a boot it has not released as a fence of its own.
    s = SchedulerState()
    s.on_inventory(inv("a", "b1"))
    s.on_fence_result(result("a", "confirmed_off"))
    s.on_inventory(inv("a", "b2", ("vm1", True)))
    assert s.phases["a"] == "quarantined"
    fence = FenceResult(request_id="fence-i2", incident="i2", host="a", term=5, outcome="confirmed_off",
                        started_at=0.0, finished_at=1.0, boot_id="b2")
    assert s.on_fence_result(fence)
    assert s.phases["a"] == "fenced" and "vm1" in s.lost


def test_a_later_boots_suspicion_on_a_quarantined_host_waits_for_its_fence() -> None:
    s = SchedulerState()
    s.on_inventory(inv("a", "b1"))
    s.on_fence_result(FenceResult(request_id="f1", incident="i1", host="a", term=5, outcome="confirmed_off",
                                  started_at=0.0, finished_at=1.0, boot_id="b1"))
    s.on_inventory(inv("a", "b2"))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=2.0, incident="i1-again", boot_id="b1"))
    assert s.phases["a"] == "quarantined"  # the fenced boot's, named again
    s.on_host_event(HostEvent(host="a", kind="suspect", at=3.0, incident="i2", boot_id="b2"))
    assert s.phases["a"] == "quarantined_suspect" and s.voided("a")
    s.on_host_event(HostEvent(host="a", kind="alive", at=4.0))
    assert s.phases["a"] == "quarantined"  # heard again: still not cleared


def test_an_event_illegal_in_the_phase_is_counted_and_kept_not_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    # No event the scheduler steps is illegal in a phase it reaches with today's table:
    # make "heard in fenced" illegal to see that it is looked up through the module.
    monkeypatch.delitem(host_phase.TRANSITIONS, (Phase.FENCED, EventKind.HEARD))
    monkeypatch.setitem(host_phase.ILLEGAL, (Phase.FENCED, EventKind.HEARD), "planted")
    s = SchedulerState()
    s.on_inventory(inv("a", "b1"))
    s.on_fence_result(result("a", "confirmed_off"))
    s.on_host_event(HostEvent(host="a", kind="alive", at=1.0))
    assert s.phases["a"] == "fenced" and s.illegal == {"heard in fenced": 1}
    [(host, illegal)] = s.take_illegal()
    assert host == "a" and illegal.why == "planted" and s.take_illegal() == []


def test_starts_sent_to_a_new_boot_an_old_incidents_fence_powered_off_are_released_by_its_own_fence() -> None:
    """Seed 247 as the scheduler sees it: a's boot b1 is suspect; a is back as b2 and
    heard; b1's VM is released (a new boot proves b1 gone) and a start is sent to b2. A
    fence of b1's incident then powers a off: its result names b1 (released already) and
    releases nothing. b2 goes silent: the start there waits for b2's fate, and b2's own
    fence (the arbiter's new incident) voids it, so the VM moves on."""
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("b", "bb"))
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1", boot_id="b1"))
    s.on_inventory(inv("a", "b2"))
    s.on_host_event(HostEvent(host="a", kind="alive", at=1.0))
    lost = s.lost["vm1"]
    assert lost.incident == "a-b1-rebooted"
    s.reserved[("vm1", "a")] = lost.spec  # the start sent to b2, unanswered
    old = FenceResult(request_id="f1", incident="i1", host="a", term=5, outcome="confirmed_off",
                      started_at=1.0, finished_at=2.0, boot_id="b1")
    assert not s.on_fence_result(old)
    s.on_host_event(HostEvent(host="a", kind="suspect", at=3.0, incident="i2", boot_id="b2"))
    assert s.next_step(lost, [("a", "sending")]) == ("wait", "a")
    new = FenceResult(request_id="f2", incident="i2", host="a", term=6, outcome="confirmed_off",
                      started_at=3.0, finished_at=4.0, boot_id="b2")
    assert s.on_fence_result(new)
    assert ("vm1", "a") not in s.reserved and s.voided("a")
    assert s.next_step(lost, [("a", "sending")]) == ("place", "")


def test_a_host_kept_off_while_its_fence_was_under_way_is_a_target_again_once_it_is_over() -> None:
    """Simulation seed 3 (fence action "reboot"): each time the host of vm1 was fenced by a
    power cycle, its new boot was heard before the fence's result, and the hold that keeps
    a released VM off a host about to be powered off (seed 293) stayed in ``failed_on``
    after the fence had ended. Three such fences and the VM waited for capacity forever,
    with every host up and cleared (L1)."""
    s = SchedulerState()
    s.on_inventory(inv("h1", "b1", ("vm1", True)))
    s.on_inventory(inv("h2", "c1"))
    s.on_host_event(HostEvent(host="h1", kind="suspect", at=0.0, incident="i1", boot_id="b1"))
    s.on_host_event(HostEvent(host="h1", kind="fence_requested", at=0.0, incident="i1"))
    s.on_inventory(inv("h1", "b2"))  # the reboot: the new boot reports before the result
    s.on_host_event(HostEvent(host="h1", kind="alive", at=0.0))
    assert set(s.lost) == {"vm1"} and s.failed_on["vm1"] == {"h1"}  # held off while the fence runs
    s.on_fence_result(result("h1", "confirmed_off", incident="i1"))
    assert "h1" not in s.failed_on["vm1"] and not s.exhausted("vm1")


def test_a_start_that_really_failed_on_a_host_is_not_forgotten_when_its_fence_ends() -> None:
    s = SchedulerState()
    s.on_inventory(inv("h1", "b1", ("vm1", True)))
    s.on_inventory(inv("h2", "c1"))
    s.on_host_event(HostEvent(host="h2", kind="suspect", at=0.0, incident="i2", boot_id="c1"))
    s.on_host_event(HostEvent(host="h2", kind="fence_requested", at=0.0, incident="i2"))
    s.on_start_result("vm1", "h2", "failed")
    s.on_fence_result(result("h2", "confirmed_off", incident="i2"))
    assert s.failed_on["vm1"] == {"h2"}


def test_a_host_with_a_poison_pill_in_its_slot_is_no_placement_target() -> None:
    """Simulation seed 127 (fences that reboot): hosts fenced through their pill were up
    for the scheduler (and cleared as not quarantined by it), but their agents refuse
    every start until an operator takes the pill out; the VMs tried there ran out of
    attempts and stayed pending while a host with room was up (L1)."""
    s = SchedulerState()
    s.on_inventory(msgspec.structs.replace(inv("h1", "b1"), pill=True, quarantined=True))
    s.on_inventory(inv("h2", "c1"))
    assert s.phases["h1"] is Phase.UP
    assert [c.name for c in s.candidates()] == ["h2"]
    s.on_inventory(inv("h1", "b1"))  # the operator's `hafence host clear` took it out
    assert sorted(c.name for c in s.candidates()) == ["h1", "h2"]


def test_a_boots_report_listed_before_the_one_held_does_not_replace_it() -> None:
    """A host cut from NATS flushes reports it buffered after the newer ones went out:
    the boot's word is its latest listing (the host's monotonic clock), not the latest
    delivered, or its fence releases none of the VMs started there since (seeds 151, 187)."""
    s = SchedulerState()
    s.on_inventory(inv("b", "b2"))
    newer = msgspec.structs.replace(inv("a", "b1", ("vm1", True), ("vm2", True)), listed_at=50.0, sent_at=9.0)
    older = msgspec.structs.replace(inv("a", "b1", ("vm1", True)), listed_at=40.0, sent_at=99.0)  # stepped wall clock
    s.on_inventory(newer)
    s.on_inventory(older)
    assert s.inventories["a"] == newer
    s.on_host_event(HostEvent(host="a", kind="suspect", at=0.0, incident="i1", term=5, boot_id="b1"))
    assert s.on_fence_result(result("a", "confirmed_off"))
    assert set(s.lost) == {"vm1", "vm2"}
    # A report that says nothing of its listing (an older agent) is taken as it comes.
    t = SchedulerState()
    t.on_inventory(newer)
    unordered = inv("a", "b1", ("vm1", True))
    t.on_inventory(unordered)
    assert t.inventories["a"] == unordered


def test_a_fenced_boots_report_runs_nothing_when_a_later_boot_that_never_reported_is_suspected() -> None:
    """Simulation seed 869 with fences that reboot: a's boot b1 ran vm1 and was fenced;
    vm1 was restarted on b. a came back as b2 and went silent before it reported, so a
    is suspect again, its latest report still b1's. That report counted again: vm1
    "ran" on a and on b (a duplicate, a stop sent to a quarantined host nobody listened
    on), and when b was fenced, vm1 was released nowhere (it "ran" on a): L1."""
    s = SchedulerState()
    s.on_inventory(inv("a", "b1", ("vm1", True)))
    s.on_inventory(inv("b", "b5"))
    s.on_inventory(inv("c", "b7"))
    s.on_fence_result(FenceResult(request_id="f1", incident="i1", host="a", term=5, outcome="confirmed_off",
                                  started_at=0.0, finished_at=1.0, boot_id="b1"))
    assert "vm1" in s.lost
    s.on_inventory(inv("b", "b5", ("vm1", True)))
    assert "vm1" not in s.lost
    s.on_host_event(HostEvent(host="a", kind="suspect", at=3.0, incident="i2", boot_id="b2"))
    assert s.phases["a"] != "fenced"  # the fenced phase no longer hides a's report
    assert s.copies().get("vm1") == ["b"]
    assert not [e for e in s.effects(4.0) if isinstance(e, Duplicate | StopCopy)]
    s.on_host_event(HostEvent(host="b", kind="suspect", at=5.0, incident="i3", boot_id="b5"))
    assert s.on_fence_result(FenceResult(request_id="f3", incident="i3", host="b", term=5,
                                         outcome="confirmed_off", started_at=5.0, finished_at=6.0, boot_id="b5"))
    assert "vm1" in s.lost

