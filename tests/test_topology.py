from hafence.contracts import DeviceEvidence
from hafence.fencer.topology import StatusPollSchedule, level_confirmed, verdict


def ev(device: str, read: str, confirmed: bool, error: str = "") -> DeviceEvidence:
    return DeviceEvidence(device=device, driver="sim", level=1, action_sent="off", power_read=read,  # type: ignore[arg-type]
                          confirmed=confirmed, error=error)


def test_a_level_is_confirmed_only_when_every_device_read_off() -> None:
    assert level_confirmed([ev("pdu-a", "off", True), ev("pdu-b", "off", True)])
    assert not level_confirmed([ev("pdu-a", "off", True), ev("pdu-b", "on", False)])
    assert not level_confirmed([])
    # S2: a device that "confirmed" without reading off does not count.
    assert not level_confirmed([ev("bmc", "unknown", True)])
    assert not level_confirmed([ev("bmc", "on", True)])


def test_the_first_confirmed_level_wins_and_failures_name_each_device() -> None:
    v = verdict([[ev("bmc", "unknown", False, "authentication failed")], [ev("pdu", "off", True)]], 2)
    assert (v.outcome, v.level) == ("confirmed_off", 2)
    v = verdict([[ev("bmc", "unknown", False, "authentication failed")], [ev("pdu", "on", False)]], 2)
    assert v.outcome == "failed" and v.level is None
    assert "level 1: bmc: authentication failed" in v.reason
    assert "level 2: pdu: power read on" in v.reason


def test_a_host_without_levels_is_not_protected() -> None:
    v = verdict([], 0)
    assert v.outcome == "failed" and "not protected" in v.reason


def test_status_polls_start_fast_and_back_off_to_a_ceiling() -> None:
    s = StatusPollSchedule(first=0.05, factor=2, ceiling=0.3)
    delays = [next(s) for _ in range(5)]
    assert delays == [0.05, 0.1, 0.2, 0.3, 0.3]
