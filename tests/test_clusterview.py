"""The operator's view folds S6: quarantine after a fence, duplicates, alerts."""

from __future__ import annotations

from hafence.clusterview import ClusterView
from hafence.contracts import Alert, FenceResult, HostEvent, Inventory, VmEvent, VmInfo, VmSpec


def inv(host: str, boot: str, quarantined: bool = False, **vms: str) -> Inventory:
    return Inventory(host=host, boot_id=boot, memory_mb=1000, vcpus=4, sent_at=0.0, quarantined=quarantined,
                     vms=[VmInfo(spec=VmSpec(name=n, memory_mb=10, ha=True), state=st) for n, st in vms.items()])  # type: ignore[arg-type]


def test_a_fenced_host_back_on_a_new_boot_is_quarantined_until_cleared() -> None:
    view = ClusterView()
    view.apply(inv("a", "b1", vm1="running"))
    view.apply(HostEvent(host="a", kind="suspect", at=1.0))
    view.apply(inv("a", "b2", quarantined=True))  # back (action "reboot") before the result was read
    view.apply(FenceResult(request_id="r", incident="i", host="a", term=1, outcome="confirmed_off",
                           started_at=0.0, finished_at=2.0))
    view.apply(inv("a", "b1", vm1="running"))  # a late report of the fenced boot changes nothing
    view.apply(inv("a", "b2", quarantined=True))
    row = view.hosts["a"]
    assert row.state == "quarantined" and row.quarantined and row.agent_quarantined
    assert any("a: quarantined after its fence" in a and "hafence host clear a" in a for a in view.alerts())
    view.apply(HostEvent(host="a", kind="cleared", at=3.0, by="alice"))
    view.apply(inv("a", "b2"))
    assert (row.state, row.quarantined, row.agent_quarantined) == ("up", False, False)
    assert view.alerts() == []


def test_a_duplicate_shows_until_the_copy_is_stopped_and_a_stopped_copy_does_not_move_the_vm() -> None:
    view = ClusterView()
    view.apply(inv("b", "b1", vm1="running"))
    view.apply(VmEvent(vm="vm1", kind="duplicate", at=1.0, target="a",
                       reason="running on a, b; stopping the copy on a (fenced, quarantined)"))
    view.apply(Alert(kind="vm_duplicate", at=1.0, service="scheduler", reason="running on a, b", host="a", vm="vm1"))
    assert view.alerts() == ["vm vm1: duplicate: running on a, b; stopping the copy on a (fenced, quarantined)"]
    view.apply(VmEvent(vm="vm1", kind="stopped", at=2.0, target="a", reason="duplicate"))
    view.apply(inv("b", "b1", vm1="running"))
    view.apply(inv("a", "b9", vm1="stopped"))
    assert (view.vms["vm1"].host, view.vms["vm1"].state) == ("b", "running")
    assert view.alerts() == []


def test_other_services_alerts_are_listed_for_an_hour() -> None:
    view = ClusterView()
    view.apply(Alert(kind="monitor_overloaded", at=100.0, service="heartbeat", reason="lagging 3.2 s"))
    assert view.alerts(now=200.0) == ["monitor_overloaded: lagging 3.2 s"]
    assert view.alerts(now=100.0 + 3601) == []
