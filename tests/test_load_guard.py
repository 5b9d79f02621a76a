"""L4 in the pure core: the monitor's own lag suspends suspicion and is an alert."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hafence.heartbeat.load import LoadGuard, Overloaded, Recovered, Sample, default_lag_limit


def guard(**kw: float) -> LoadGuard:
    # interval 1 s, window 3 s: lag limit 0.5 s
    return LoadGuard(interval_s=1.0, window_s=3.0, now=0.0, **kw)  # type: ignore[arg-type]


def steady(g: LoadGuard, start: float, end: float, rate: int = 1000) -> list[object]:
    out: list[object] = []
    t = start
    while t < end:
        t = round(t + 0.25, 6)
        out += g.observe(Sample(t, 0.01, processed=rate // 4, late=0, pending=3))
    return out


def test_a_monitor_that_keeps_up_may_suspect_after_its_first_window() -> None:
    g = guard()
    assert steady(g, 0.0, 10.0) == []
    assert g.may_suspect(10.0)


def test_a_stalled_loop_suspends_suspicion_alerts_and_recovers_by_itself() -> None:
    g = guard()
    steady(g, 0.0, 5.0)
    [alert] = g.observe(Sample(7.0, loop_lag_s=1.75, processed=0, pending=8000))
    assert isinstance(alert, Overloaded) and "event loop 1.75s late" in alert.reason
    assert not g.may_suspect(7.0)
    out = steady(g, 7.0, 8.5)
    [recovered] = [c for c in out if isinstance(c, Recovered)]
    assert recovered.resume_at == 10.0  # one full window after the last sign
    assert not g.overloaded and not g.may_suspect(9.9)
    assert g.may_suspect(10.0)


def test_a_backlog_of_unprocessed_heartbeats_is_lag() -> None:
    g = guard()
    steady(g, 0.0, 2.0)
    # 400 processed in 0.25 s (1,600/s) with 2,000 waiting: 1.25 s of work behind.
    [alert] = g.observe(Sample(2.25, 0.05, processed=400, pending=2000))
    assert isinstance(alert, Overloaded) and "2000 heartbeats waiting" in alert.reason
    # The same queue, drained faster than it builds, is no lag.
    g2 = guard()
    assert g2.observe(Sample(0.25, 0.05, processed=40_000, pending=2000)) == []


def test_old_heartbeats_are_lag_but_one_skewed_clock_is_not() -> None:
    g = guard()
    out = []
    for i in range(1, 9):
        out += g.observe(Sample(i * 0.25, 0.0, processed=100, late=99))
    assert any(isinstance(c, Overloaded) and "later than" in c.reason for c in out)
    g = guard()
    for i in range(1, 40):  # one host in ten always looks late: its clock, not the monitor
        assert g.observe(Sample(i * 0.25, 0.0, processed=100, late=10)) == []


def test_the_alert_is_repeated_while_the_overload_lasts() -> None:
    g = guard(alert_repeat_s=5.0)
    first = g.observe(Sample(1.0, 2.0))
    assert [type(c) for c in first] == [Overloaded]
    kinds = []
    for i in range(1, 30):
        kinds += [(type(c), getattr(c, "repeat", None)) for c in g.observe(Sample(1.0 + i * 0.25, 2.0))]
    assert kinds == [(Overloaded, True)]


def test_the_default_limit_stays_inside_the_detection_window() -> None:
    assert default_lag_limit(1.0, 3.0) == 0.5
    assert default_lag_limit(0.2, 0.6) == pytest.approx(0.2)
    assert default_lag_limit(5.0, 15.0) == 2.5


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0.01, 2.0), st.floats(0.0, 3.0), st.integers(0, 5000), st.integers(0, 5000)),
                max_size=80))
def test_no_suspicion_within_a_window_of_any_sign_of_lag(samples: list[tuple[float, float, int, int]]) -> None:
    g = guard()
    t = 0.0
    for dt, lag, processed, pending in samples:
        t += dt
        g.observe(Sample(t, lag, processed, 0, pending))
        if g.may_suspect(t):
            assert t - g.last_sign_at >= g.window_s and not g.overloaded
        if lag > g.lag_limit_s:
            assert g.overloaded and not g.may_suspect(t)


def test_liveness_names_the_hosts_that_are_late_with_a_suspect() -> None:
    from hafence.heartbeat.liveness import Liveness

    live = Liveness(["a", "b", "c", "d"], interval=1.0, missed=3, now=0.0, nonce="n")
    live.heartbeat("a", "boot", 1, now=0.5)
    live.heartbeat("b", "boot", 1, now=1.0)
    live.heartbeat("c", "boot", 1, now=1.6)
    live.heartbeat("d", "boot", 1, now=2.9)
    assert [s.host for s in live.tick(3.6)] == ["a"]
    assert live.late(3.6, after=1.5) == ["b", "c"]


def test_late_heartbeats_from_one_sender_are_its_clock_not_the_monitors_lag() -> None:
    # Seeds 242/128: the only host still heard has a stepped clock; every heartbeat looks late.
    g = guard()
    for i in range(1, 40):
        assert g.observe(Sample(i * 0.25, 0.0, processed=1, late=1, late_senders=1)) == []
    assert g.may_suspect(10.0)
    # The same share from two senders is the monitor's lag.
    g = guard()
    out = []
    for i in range(1, 9):
        out += g.observe(Sample(i * 0.25, 0.0, processed=2, late=2, late_senders=2))
    assert any(isinstance(c, Overloaded) and "from 2 senders" in c.reason for c in out)


def test_a_senders_clock_offset_and_step_cancel_out_of_its_lateness() -> None:
    from hafence.heartbeat.load import SenderClocks

    c = SenderClocks(span_s=6.0, now=0.0)
    # a's clock is 100 s behind the monitor: every delay is ~100 s, none of it lateness.
    assert c.lateness("a", 100.01) == 0.0
    assert c.lateness("a", 100.02) == pytest.approx(0.01)
    assert c.lateness("b", -3.0) == 0.0  # b's clock ahead
    assert c.lateness("b", -1.0) == pytest.approx(2.0)  # the monitor (or b's path) 2 s late
    # a's clock stepped back 5 s: late against its old baseline, forgotten within two spans.
    assert c.lateness("a", 105.01) == pytest.approx(5.0)
    c.roll(6.0)
    assert c.lateness("a", 105.01) == pytest.approx(5.0)
    c.roll(12.0)
    assert c.lateness("a", 105.01) == 0.0
