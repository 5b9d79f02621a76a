"""The one host-phase state machine (hafence.host_phase) and its adoption by the operator's view."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from hafence.cli import view as cli_view
from hafence.clusterview import ClusterView
from hafence.contracts import FenceResult, HostEvent, Inventory
from hafence.host_phase import ILLEGAL, TRANSITIONS, EventKind, Illegal, Phase, step, suspect_event
from tests.conftest import cluster_toml


def test_the_table_is_total_every_pair_is_a_transition_or_explicitly_illegal() -> None:
    for phase in Phase:
        for event in EventKind:
            pair = (phase, event)
            assert (pair in TRANSITIONS) != (pair in ILLEGAL), pair
    assert all(isinstance(p, Phase) for p in TRANSITIONS.values())


def test_an_illegal_event_is_a_named_value_not_a_silent_no_op() -> None:
    result = step(Phase.FENCED, EventKind.FENCE_FAILED)
    assert isinstance(result, Illegal)
    assert "already confirmed off" in str(result) and "fence_failed in phase fenced" in str(result)


@pytest.mark.parametrize("phase", [Phase.FENCED, Phase.FENCED_CLEARED, Phase.QUARANTINED])
def test_a_host_heard_again_after_its_fence_is_not_up(phase: Phase) -> None:
    # The case the four trackers disagreed on: the arbiter's policy made such a host "up".
    assert step(phase, EventKind.HEARD) == phase
    assert step(phase, EventKind.SUSPECT) == phase


def test_only_a_new_boot_moves_a_fenced_host_on_and_only_cleared_lifts_its_quarantine() -> None:
    assert step(Phase.FENCED, EventKind.REPORTED) == Phase.FENCED  # a late report of the fenced boot
    assert step(Phase.FENCED, EventKind.NEW_BOOT) == Phase.QUARANTINED
    assert step(Phase.QUARANTINED, EventKind.NEW_BOOT) == Phase.QUARANTINED
    assert step(Phase.QUARANTINED, EventKind.CLEARED) == Phase.UP
    # cleared in advance (the pill removed while the host was off): back and free.
    assert step(Phase.FENCED, EventKind.CLEARED) == Phase.FENCED_CLEARED
    assert step(Phase.FENCED_CLEARED, EventKind.NEW_BOOT) == Phase.UP


def test_a_fence_that_has_begun_is_finished() -> None:
    for event in (EventKind.HEARD, EventKind.NEW_BOOT, EventKind.SUSPECT, EventKind.CLEARED):
        assert step(Phase.FENCING, event) == Phase.FENCING
        assert step(Phase.FENCE_FAILED, event) == Phase.FENCE_FAILED
    assert step(Phase.FENCING, EventKind.REFUSED) == Phase.SUSPECT  # a stale leader's: open again
    assert step(Phase.FENCE_FAILED, EventKind.FENCE_REQUESTED) == Phase.FENCING


def inv(host: str, boot: str) -> Inventory:
    return Inventory(host=host, boot_id=boot, memory_mb=1000, vcpus=4, sent_at=0.0)


def fenced_view() -> ClusterView:
    view = ClusterView()
    view.apply(inv("a", "b1"))
    view.apply(HostEvent(host="a", kind="suspect", at=1.0))
    view.apply(HostEvent(host="a", kind="fence_requested", at=1.5))
    view.apply(FenceResult(request_id="r", incident="i", host="a", term=1, outcome="confirmed_off",
                           started_at=1.5, finished_at=2.0))
    view.apply(HostEvent(host="a", kind="fenced", at=2.0))
    return view


def test_the_view_keeps_a_host_heard_after_its_fence_fenced_until_a_new_boot_then_quarantined() -> None:
    view = fenced_view()
    row = view.hosts["a"]
    view.apply(HostEvent(host="a", kind="alive", at=3.0))  # a heartbeat still in flight
    assert (row.state, row.quarantined) == ("fenced", False)
    view.apply(inv("a", "b2"))
    assert (row.state, row.quarantined) == ("quarantined", True)
    view.apply(HostEvent(host="a", kind="alive", at=4.0))
    assert row.state == "quarantined"
    assert view.illegal == {}


def test_the_view_counts_an_illegal_event_keeps_the_phase_and_says_so() -> None:
    view = fenced_view()
    view.apply(HostEvent(host="a", kind="fence_failed", at=3.0, reason="timeout"))
    row = view.hosts["a"]
    assert row.state == "fenced" and row.alert == ""
    assert view.illegal == {"fence_failed in fenced": 1}
    assert any("illegal" in a and "a: fence_failed in phase fenced" in a for a in view.alerts())


def test_status_json_shows_the_illegal_event_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cluster.toml"
    config.write_text(cluster_toml("nats://127.0.0.1:1", tmp_path / "state"))
    view = fenced_view()
    view.apply(HostEvent(host="a", kind="fence_failed", at=3.0, reason="timeout"))

    async def read_view(*args: object, **kwargs: object) -> ClusterView:
        return view  # the fold is what is tested here, not reading the stream

    monkeypatch.setattr(cli_view, "_read_view", read_view)
    # Exit 1: status has alerts to show (the illegal event among them).
    assert cli_view.cmd_view(argparse.Namespace(config=str(config), json=True, command="status")) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["illegal_events"]["counts"] == {"fence_failed in fenced": 1}
    assert out["hosts"][0]["phase"] == "fenced"


# --- a fence covers one boot (simulation seed 247) -------------------------------------------


def test_a_later_boot_that_goes_silent_after_a_fence_is_a_new_incident_still_quarantined() -> None:
    assert step(Phase.FENCED, EventKind.NEW_BOOT_SUSPECT) == Phase.QUARANTINED_SUSPECT
    assert step(Phase.QUARANTINED, EventKind.NEW_BOOT_SUSPECT) == Phase.QUARANTINED_SUSPECT
    assert step(Phase.FENCED_CLEARED, EventKind.NEW_BOOT_SUSPECT) == Phase.SUSPECT  # cleared in advance
    # Fenced like a suspect; heard again it is still quarantined; only cleared lifts that.
    assert step(Phase.QUARANTINED_SUSPECT, EventKind.FENCE_REQUESTED) == Phase.FENCING
    assert step(Phase.QUARANTINED_SUSPECT, EventKind.HEARD) == Phase.QUARANTINED
    assert step(Phase.QUARANTINED_SUSPECT, EventKind.CLEARED) == Phase.SUSPECT
    # A fence under way is finished first (the caller keeps the suspicion for after it).
    assert step(Phase.FENCING, EventKind.NEW_BOOT_SUSPECT) == Phase.FENCING
    assert step(Phase.FENCE_FAILED, EventKind.NEW_BOOT_SUSPECT) == Phase.FENCE_FAILED


def test_only_a_suspicion_naming_another_known_boot_is_a_later_boots() -> None:
    assert suspect_event("b2", "b1") == EventKind.NEW_BOOT_SUSPECT
    assert suspect_event("b1", "b1") == EventKind.SUSPECT  # the fenced boot's, named again
    assert suspect_event("", "b1") == EventKind.SUSPECT  # a monitor that never heard it: not known
    assert suspect_event("b2", "") == EventKind.SUSPECT


def test_the_view_shows_a_later_boot_suspected_after_the_fence_as_quarantined_and_suspect() -> None:
    view = ClusterView()
    view.apply(inv("a", "b1"))
    view.apply(HostEvent(host="a", kind="suspect", at=1.0, boot_id="b1"))
    view.apply(inv("a", "b2"))
    view.apply(HostEvent(host="a", kind="alive", at=1.5))
    view.apply(FenceResult(request_id="r", incident="i", host="a", term=1, outcome="confirmed_off",
                           started_at=1.5, finished_at=2.0, boot_id="b1"))
    row = view.hosts["a"]
    assert (row.phase, row.fenced_boot) == (Phase.FENCED, "b1")
    view.apply(HostEvent(host="a", kind="suspect", at=3.0, boot_id="b1", incident="i-again"))
    assert row.phase == Phase.FENCED
    view.apply(HostEvent(host="a", kind="suspect", at=4.0, boot_id="b2", incident="i2"))
    assert (row.phase, row.quarantined) == (Phase.QUARANTINED_SUSPECT, True)
    view.apply(HostEvent(host="a", kind="fenced", at=4.5, boot_id="b1"))  # the earlier fence's news
    assert row.phase == Phase.QUARANTINED_SUSPECT
    view.apply(HostEvent(host="a", kind="fence_requested", at=5.0, incident="i2", boot_id="b2"))
    view.apply(HostEvent(host="a", kind="fenced", at=6.0, incident="i2", boot_id="b2"))
    assert (row.phase, row.fenced_boot) == (Phase.FENCED, "b2")
    assert view.illegal == {}
