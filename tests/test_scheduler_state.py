from hafence.contracts import FenceResult, HostEvent, Inventory, VmInfo, VmSpec
from hafence.scheduler.state import SchedulerState


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
    assert s.phases["a"] == "up" and "vm1" in s.lost


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
