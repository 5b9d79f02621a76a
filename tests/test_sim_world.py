"""The simulated world: power, boots, devices, the fencer's power port, the
hypervisor and storage ports (hafence.sim.world)."""

from __future__ import annotations

import random

import pytest

from hafence.contracts import FenceRequest, VmSpec
from hafence.sim.clock import Scheduler
from hafence.sim.world import HypervisorError, World


def world(seed: int = 1) -> tuple[Scheduler, World, list[str]]:
    s = Scheduler()
    lines: list[str] = []
    w = World(s, random.Random(seed), log=lambda who, what: lines.append(f"{s.now:.6f} {who} {what}"))
    return s, w, lines


def request(host: str, rid: str = "r1", term: int = 1, action: str = "off") -> FenceRequest:
    return FenceRequest(request_id=rid, incident="i1", host=host, term=term, requested_at=0.0,
                        action=action)  # type: ignore[arg-type]


def test_a_host_boots_with_a_boot_id_from_the_prng_and_a_new_one_at_every_boot() -> None:
    _s, w, _ = world()
    h = w.add_host("h1")
    first = h.boot_id
    assert h.powered and first
    w.lose_power("h1")
    assert not h.powered
    w.restore_power("h1")
    assert h.powered and h.boot_id != first and h.boots == 2
    # Deterministic from the seed.
    _, w2, _ = world()
    h2 = w2.add_host("h1")
    assert h2.boot_id == first


def test_power_loss_loses_running_vms_and_a_boot_runs_none_of_them() -> None:
    _s, w, _ = world()
    w.add_host("h1")
    w.add_vm("vm1", "h1")
    assert w.running_on("vm1") == ["h1"]
    events: list[tuple[str, str]] = []
    w.listeners.append(lambda what, host: events.append((what, host)))
    w.lose_power("h1")
    assert w.running_on("vm1") == []
    w.restore_power("h1")
    assert w.running_on("vm1") == []
    assert events == [("off", "h1"), ("boot", "h1")]


def test_fence_off_through_a_working_bmc_is_confirmed_and_recorded() -> None:
    s, w, _ = world()
    w.add_host("h1")
    w.add_vm("vm1", "h1")
    report = s.run_until_complete(w.power.fence(request("h1", term=7)))
    assert report.verdict.outcome == "confirmed_off" and report.verdict.level == 1
    assert not w.powered("h1") and w.running_on("vm1") == []
    assert [(op.request_id, op.term, op.device, op.action) for op in w.ops] == [("r1", 7, "h1-bmc", "off")]
    assert w.runs[0].truly_off == {1: True} and w.runs[0].outcome == "confirmed_off"


def test_reboot_powers_the_confirmed_level_on_again_with_a_new_boot() -> None:
    s, w, _ = world()
    h = w.add_host("h1")
    boot = h.boot_id
    report = s.run_until_complete(w.power.fence(request("h1", action="reboot")))
    assert report.verdict.outcome == "confirmed_off"
    s.run(until=s.now + 5)
    assert h.powered and h.boot_id != boot
    assert [op.action for op in w.ops] == ["off", "on"]


@pytest.mark.parametrize("behaviour", ["stuck_on", "unreachable", "bad_credentials"])
def test_a_broken_bmc_fails_the_level_and_the_pdu_level_fences(behaviour: str) -> None:
    s, w, _ = world()
    h = w.add_host("h1", levels=[["bmc"], ["pdu", "pdu"]])
    w.set_behaviour("h1-bmc", behaviour)  # type: ignore[arg-type]
    report = s.run_until_complete(w.power.fence(request("h1")))
    assert report.verdict.outcome == "confirmed_off" and report.verdict.level == 2
    level1 = [e for e in report.evidence if e.level == 1]
    assert level1 and not level1[0].confirmed and level1[0].error
    assert not h.powered
    assert w.runs[0].truly_off[2]
    if behaviour == "bad_credentials":  # never retried
        assert len([op for op in w.ops if op.device == "h1-bmc"]) == 1


def test_a_host_that_lost_power_with_its_bmc_cannot_be_confirmed_through_it() -> None:
    s, w, _ = world()
    w.add_host("h1")
    w.lose_power("h1")
    report = s.run_until_complete(w.power.fence(request("h1")))
    assert report.verdict.outcome == "failed"
    assert "unreachable" in report.evidence[0].error


def test_one_pdu_of_two_stuck_on_keeps_the_host_powered_and_the_level_unconfirmed() -> None:
    s, w, _ = world()
    h = w.add_host("h1", levels=[["pdu", "pdu"]])
    w.set_behaviour("h1-pdu2", "stuck_on")
    report = s.run_until_complete(w.power.fence(request("h1")))
    assert report.verdict.outcome == "failed"
    assert h.powered
    assert w.runs[0].truly_off == {1: False}


def test_a_slow_device_takes_simulated_time() -> None:
    s, w, _ = world()
    w.add_host("h1")
    w.set_behaviour("h1-bmc", "slow")
    report = s.run_until_complete(w.power.fence(request("h1")))
    assert report.verdict.outcome == "confirmed_off"
    assert s.now > 4.0


def test_check_reads_every_device_and_says_whether_the_host_is_protected() -> None:
    s, w, _ = world()
    w.add_host("h1", levels=[["bmc"], ["pdu"]])
    p = s.run_until_complete(w.power.check("h1"))
    assert p.protected and p.working_levels == [1, 2] and p.power == "on"
    w.set_behaviour("h1-bmc", "bad_credentials")
    w.set_behaviour("h1-pdu1", "unreachable")
    p = s.run_until_complete(w.power.check("h1"))
    assert not p.protected
    assert not w.ops  # a check powers nothing


def test_the_hypervisor_starts_and_stops_and_a_dead_or_hung_host_does_not_answer() -> None:
    s, w, _ = world()
    w.add_host("h1", memory_mb=2048)
    hv = w.hypervisor("h1")
    spec = VmSpec(name="vm1", memory_mb=1024, ha=True)
    s.run_until_complete(hv.start(spec))
    assert w.running_on("vm1") == ["h1"]
    assert s.run_until_complete(hv.is_running("vm1"))
    with pytest.raises(HypervisorError):
        s.run_until_complete(hv.start(VmSpec(name="big", memory_mb=4096)))
    infos = s.run_until_complete(hv.list_vms())
    assert [(i.spec.name, i.state) for i in infos] == [("vm1", "running")]
    s.run_until_complete(hv.stop("vm1"))
    assert w.running_on("vm1") == []
    w.hang("h1")
    pending = hv.list_vms()
    s.run(until=s.now + 100)
    assert not pending.done()
    w.unhang("h1")
    w.lose_power("h1")
    assert not hv.is_running("vm1").done()


def test_two_starts_at_once_must_fit_together_and_a_repeated_ask_is_not_counted_twice() -> None:
    """Seed 14: two starts in flight each passed the memory check alone and the host ran
    2048 MiB more than it had. A start takes its memory when it begins."""
    s, w, _ = world()
    w.add_host("h1", memory_mb=2048)
    hv = w.hypervisor("h1")
    first = hv.start(VmSpec(name="vm1", memory_mb=1536))
    again = hv.start(VmSpec(name="vm1", memory_mb=1536))  # the same start asked again: no second share
    second = hv.start(VmSpec(name="vm2", memory_mb=1024))
    assert second.done() and isinstance(second.exception(), HypervisorError)
    s.run(until=10)
    assert first.done() and again.done() and first.exception() is None and again.exception() is None
    assert w.running_on("vm1") == ["h1"] and w.hosts["h1"].used_memory() == 1536
    w.lose_power("h1")
    w.restore_power("h1")
    cut = hv.start(VmSpec(name="vm3", memory_mb=1024))
    w.lose_power("h1")  # a start cut off by the power frees its share
    w.restore_power("h1")
    s.run_until_complete(hv.start(VmSpec(name="vm2", memory_mb=2048)))
    assert w.running_on("vm2") == ["h1"] and not cut.done()


def test_a_start_on_a_host_that_dies_meanwhile_never_answers_and_runs_nothing() -> None:
    s, w, _ = world()
    w.add_host("h1")
    fut = w.hypervisor("h1").start(VmSpec(name="vm1", memory_mb=512))
    w.lose_power("h1")
    w.restore_power("h1")
    s.run(until=10)
    assert not fut.done() and w.running_on("vm1") == []


def test_autostart_runs_at_boot_until_the_agent_disables_it() -> None:
    s, w, _ = world()
    h = w.add_host("h1")
    w.add_vm("vm1", "h1")
    h.autostart.add("vm1")
    w.lose_power("h1")
    w.restore_power("h1")
    assert w.running_on("vm1") == ["h1"]
    assert s.run_until_complete(w.hypervisor("h1").disable_autostart({"vm1"})) == ["vm1"]
    w.lose_power("h1")
    w.restore_power("h1")
    assert w.running_on("vm1") == []


def test_a_crash_kills_the_vms_keeps_the_power_and_may_reset_the_host() -> None:
    s, w, _ = world()
    h = w.add_host("h1")
    w.add_vm("vm1", "h1")
    boot = h.boot_id
    w.crash("h1", reboot_after=30)
    assert h.powered and h.hung and w.running_on("vm1") == []
    w.unhang("h1")  # a crashed kernel does not resume
    assert h.hung
    s.run(until=31)
    assert h.powered and not h.hung and h.boot_id != boot
    w.crash("h1")
    w.reset("h1")
    assert h.boots == 3 and not h.hung


def test_storage_renewals_reach_it_only_from_a_live_host_with_a_path() -> None:
    s, w, _ = world()
    h = w.add_host("h1")
    w.add_host("h2")
    assert w.storage.renew("h1", h.boot_id)
    assert w.storage.live(["h1", "h2"], 10.0) == {"h1": True, "h2": False}
    s.run(until=11)
    assert w.storage.live(["h1"], 10.0) == {"h1": False}
    w.cut_storage("h1")
    assert not w.storage.renew("h1", h.boot_id)
    w.heal_storage("h1")
    w.hang("h1")
    assert not w.storage.renew("h1", h.boot_id)


def test_the_same_seed_gives_the_same_world_log() -> None:
    def run(seed: int) -> list[str]:
        s, w, lines = world(seed)
        w.add_host("h1", levels=[["bmc"], ["pdu"]])
        w.add_vm("vm1", "h1")
        w.set_behaviour("h1-bmc", "slow")
        s.run_until_complete(w.power.fence(request("h1", action="reboot")))
        return lines

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_the_host_port_says_power_and_boot_and_the_changed_poll_answers_a_vm_failure() -> None:
    s, w, _ = world()
    h = w.add_host("h1")
    w.add_vm("vm1", "h1")
    port = w.host_port("h1")
    assert (port.state().on, port.state().boot_id) == (True, h.boot_id)
    poll = w.hypervisor("h1").changed()
    s.run(until=1)
    assert not poll.done()
    w.crash_vm("vm1", "h1")
    s.run(until=2)
    assert poll.done()
    infos = s.run_until_complete(w.hypervisor("h1").list_vms())
    assert infos[0].state == "stopped" and infos[0].stop_reason == "crashed"
    w.lose_power("h1")
    assert not port.state().on


# -- the hardware watchdog and the slots (hafence.sim.watchdog) ------------------------------


def test_an_armed_watchdog_resets_its_host_unless_fed_and_the_host_boots_again_later() -> None:
    s, w, lines = world()
    h = w.add_host("h1", levels=[["bmc"], ["watchdog"]])
    w.add_vm("vm1", "h1")
    assert h.watchdog and [d.kind for d in h.devices] == ["bmc", "watchdog"]
    assert w.arm_watchdog("h1", 10.4) == 10.0  # whole seconds, as the Linux API asks
    for t in range(1, 30):
        s.run(until=float(t))
        w.feed_watchdog("h1")
    assert h.boots == 1 and w.watchdog_resets == 0 and w.running_on("vm1") == ["h1"]
    w.hang("h1")  # a hung host feeds nothing (and a hung host's feed does not count)
    w.feed_watchdog("h1")
    s.run(until=38.9)  # fed last at t=29
    assert h.powered and h.hung
    s.run(until=39.1)
    assert w.watchdog_resets == 1 and not h.powered and w.running_on("vm1") == []
    s.run(until=39.0 + w.reset_boot_s[1] + 1.0)
    assert h.powered and h.boots == 2 and not h.hung and not h.wd_armed  # a boot starts unarmed
    assert any("h1 watchdog fires" in line for line in lines)


def test_a_host_without_a_watchdog_cannot_arm_one_and_a_disarmed_one_never_fires() -> None:
    s, w, _ = world()
    w.add_host("h1")
    with pytest.raises(OSError):
        w.arm_watchdog("h1", 10.0)
    h2 = w.add_host("h2", levels=[["bmc"], ["watchdog"]])
    w.arm_watchdog("h2", 10.0)
    w.disarm_watchdog("h2")  # magic close: the agent stopped cleanly
    s.run(until=100.0)
    assert h2.boots == 1 and w.watchdog_resets == 0


def test_the_pills_boot_is_gone_only_once_the_host_is_off_or_a_later_boot_runs_nothing() -> None:
    from hafence.sim.clock import NodeClock
    from hafence.sim.watchdog import WorldSlots

    s, w, _ = world()
    h = w.add_host("h1", levels=[["bmc"], ["watchdog"]])
    w.add_vm("vm1", "h1")
    fencer = WorldSlots(w, "", NodeClock(s, "ctl"))
    assert not w.pill_gone("h1")  # no pill: nothing to judge
    fencer.write_pill("h1", "fencer", "test")
    assert w.pill_boot == {"h1": 1} and not w.pill_gone("h1")
    w.hang("h1")
    assert not w.pill_gone("h1")  # hung: its VMs resume with it
    w.crash("h1")
    w.reset("h1")  # a new boot, which saw the pill and runs nothing
    assert h.boots == 2 and w.pill_gone("h1")
    s.run_until_complete(w.hypervisor("h1").start(VmSpec(name="vm1", memory_mb=1024, ha=True)))
    assert not w.pill_gone("h1")  # a later boot that runs a VM: the pill did not hold
    w.lose_power("h1")
    assert w.pill_gone("h1")


def test_an_agent_reaches_its_slot_only_with_its_storage_and_the_fencer_always() -> None:
    from hafence.sim.clock import NodeClock
    from hafence.sim.watchdog import WorldSlots
    from hafence.slots import SlotRecord, SlotUnreachable

    s, w, _ = world()
    w.add_host("h1")
    agent, fencer = WorldSlots(w, "h1", NodeClock(s, "h1")), WorldSlots(w, "", NodeClock(s, "ctl"))
    agent.write_record(SlotRecord(host="h1", boot_id="b", counter=1, armed=True, timeout_s=10.0))
    w.cut_storage("h1")
    with pytest.raises(SlotUnreachable):
        agent.pill("h1")
    with pytest.raises(SlotUnreachable):
        agent.write_record(SlotRecord(host="h1", boot_id="b", counter=2, armed=True, timeout_s=10.0))
    fencer.write_pill("h1", "fencer", "fence")
    record = fencer.record("h1")
    assert record is not None and record.counter == 1 and fencer.pill("h1") is not None
    w.heal_storage("h1")
    assert agent.pill("h1") is not None
    assert fencer.clear_pill("h1") and agent.pill("h1") is None and "h1" not in w.pill_boot


def test_a_watchdog_armed_again_after_a_reset_fires_for_the_new_boot() -> None:
    """Simulation seed 33: a reset that kept the old boot's "armed" left the new boot's
    watchdog without a timer, so a host hung in its second boot was never reset."""
    s, w, _ = world()
    h = w.add_host("h1", levels=[["bmc"], ["watchdog"]])
    w.arm_watchdog("h1", 10.0)
    w.crash("h1")
    w.reset("h1")
    assert h.boots == 2 and not h.wd_armed
    w.arm_watchdog("h1", 10.0)
    w.hang("h1")
    s.run(until=11.0)
    assert w.watchdog_resets == 1 and not h.powered
