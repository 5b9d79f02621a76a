"""L4, the fifth sign: heartbeats sent and never processed (gaps in each boot's
``seq``) are the monitor's overload when they are most of what was sent, from
several senders; a host's own silence, a new boot, a replay or one flaky sender is not.

Pure: ``Liveness`` counts, ``LoadGuard`` judges, ``HeartbeatCore`` carries one to
the other at every tick. Each test fails if the sign is removed or loosened."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from hafence.contracts import Alert
from hafence.core import Publish
from hafence.core.effects import Effect
from hafence.heartbeat.liveness import Liveness
from hafence.heartbeat.load import MIN_LATE_SENDERS, LoadGuard, Overloaded, Sample
from tests.test_heartbeat_core import INTERVAL, MISSED, beat, events, lead, make, tick

# --- Liveness: what counts as lost ---------------------------------------------


def live3() -> Liveness:
    return Liveness(["a", "b", "c"], interval=1.0, missed=3, now=0.0, nonce="n")


def test_a_gap_in_one_boots_seq_counts_the_heartbeats_never_processed() -> None:
    live = live3()
    live.heartbeat("a", "boot", 1, now=0.1)  # first heard: no number to compare with
    live.heartbeat("b", "boot", 7, now=0.1)
    live.heartbeat("c", "", 500, now=0.1)  # an empty boot id is no number heard before either
    assert (live.lost, live.lost_from) == (0, set())
    live.heartbeat("a", "boot", 2, now=1.1)  # contiguous
    assert live.lost == 0
    live.heartbeat("a", "boot", 5, now=2.1)  # 3 and 4 sent, never processed
    live.heartbeat("b", "boot", 9, now=2.1)  # 8
    assert (live.lost, live.lost_from) == (3, {"a", "b"})


def test_a_replayed_or_reordered_heartbeat_counts_nothing_and_moves_nothing() -> None:
    live = live3()
    live.heartbeat("a", "boot", 10, now=0.1)
    live.heartbeat("a", "boot", 11, now=0.2)
    for seq in (11, 10, 3, 0):  # replayed, reordered
        assert live.heartbeat("a", "boot", seq, now=0.3) == []
    assert live.lost == 0
    live.heartbeat("a", "boot", 12, now=0.4)  # the gap is measured from 11, the last that moved forward
    assert live.lost == 0
    live.heartbeat("a", "boot", 14, now=0.5)
    assert live.lost == 1


def test_a_new_boot_starts_its_numbering_again_and_loses_nothing() -> None:
    live = live3()
    live.heartbeat("a", "boot1", 500, now=0.1)
    live.heartbeat("a", "boot2", 0, now=0.2)  # rebooted: seq back to 0
    live.heartbeat("a", "boot2", 1, now=0.3)
    live.heartbeat("a", "boot3", 900, now=0.4)  # another boot, far ahead: nothing in between was sent by boot2
    live.heartbeat("a", "boot2", 2, now=0.5)  # an old boot's straggler: a boot change, not a gap of boot3
    assert live.lost == 0


def test_a_gap_after_the_hosts_own_long_silence_is_not_lost() -> None:
    live = live3()
    live.heartbeat("a", "boot", 1, now=0.0)
    live.heartbeat("b", "boot", 1, now=0.0)
    # a partition longer than the detection window (3 s): suspect, then back
    assert [s.host for s in live.tick(3.5)] == ["a", "b", "c"]
    live.heartbeat("a", "boot", 6, now=5.0)
    assert live.lost == 0 and live.state("a") == "alive"
    # silent longer than the window without being declared (the monitor was
    # overloaded and suspected nobody): its own silence too
    live.heartbeat("b", "boot", 9, now=3.5)
    assert live.state("b") == "alive" and live.lost == 0
    live.heartbeat("b", "boot", 20, now=6.6)
    assert live.lost == 0
    # within the window the same gap counts
    live.heartbeat("b", "boot", 25, now=9.5)
    assert (live.lost, live.lost_from) == (4, {"b"})


# --- LoadGuard: when loss is the monitor's --------------------------------------


def guard() -> LoadGuard:
    return LoadGuard(interval_s=1.0, window_s=3.0, now=0.0)


def run(g: LoadGuard, processed: int, lost: int, senders: int, seconds: float = 3.0) -> list[Overloaded]:
    """Four samples an interval, each with a quarter of the counts; senders counted since the interval began."""
    out: list[Overloaded] = []
    t = 0.0
    while t < seconds:
        t = round(t + 0.25, 6)
        changes = g.observe(Sample(t, 0.0, processed=processed // 4, lost=lost // 4, lost_senders=senders))
        out += [c for c in changes if isinstance(c, Overloaded)]
    return out


def test_most_heartbeats_lost_from_several_senders_is_overload() -> None:
    g = guard()
    [alert] = run(g, processed=400, lost=1200, senders=2)
    assert "1200 of 1600 heartbeats lost" in alert.reason and "from 2 senders" in alert.reason
    assert "cannot take what it is sent" in alert.reason
    assert g.overloaded and not g.may_suspect(3.0)


def test_loss_from_one_sender_or_half_or_less_is_not_overload() -> None:
    assert run(guard(), processed=400, lost=40_000, senders=1) == []  # one host's link, or its liar
    assert run(guard(), processed=400, lost=400, senders=300) == []  # half: not more than half
    g = guard()
    assert run(g, processed=400, lost=200, senders=300) == []
    assert g.may_suspect(3.0)


def test_senders_seen_in_different_ticks_of_one_interval_add_up() -> None:
    """At one heartbeat a host an interval, two hosts' gaps fall in different ticks;
    the core counts senders until the guard closes the interval (a sample then says 1, then 2)."""
    g = guard()
    changes = []
    for i, (lost, senders) in enumerate([(2, 1), (0, 1), (2, 2), (0, 2)], start=1):
        changes += g.observe(Sample(i * 0.25, 0.0, processed=1 if i % 2 else 0, lost=lost, lost_senders=senders))
    assert g.interval_closed
    assert [type(c) for c in changes] == [Overloaded]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(0, 5000), st.integers(0, 5)), min_size=1, max_size=60))
def test_loss_is_a_sign_only_when_more_than_half_from_enough_senders(
        samples: list[tuple[int, int, int]]) -> None:
    g = guard()
    processed = lost = senders = 0
    for i, (p, n, k) in enumerate(samples, start=1):
        processed, lost, senders = processed + p, lost + n, max(senders, k if n else 0)
        at = i * 0.25
        g.observe(Sample(at, 0.0, processed=p, lost=n, lost_senders=k))
        if g.interval_closed:
            sign = g.last_sign_at == at
            assert sign == (lost > processed and senders >= MIN_LATE_SENDERS)
            assert not sign or f"{lost} of {lost + processed} heartbeats lost" in g.last_reason
            processed = lost = senders = 0
        else:
            assert g.last_sign_at != at


# --- the core: from gaps to an alert, and no suspicion ---------------------------


def alerts(out: list[Effect]) -> list[Alert]:
    return [e.message for e in out if isinstance(e, Publish) and isinstance(e.message, Alert)]


def ticking(hosts: list[str], until: float,
            each_second: Callable[[Any, int, float], list[Effect] | None]) -> list[Effect]:
    """A leading monitor of ``hosts`` ticking four times an interval up to ``until``;
    ``each_second(core, second, t)`` delivers what arrives at each whole second (and
    may return the effects of those deliveries, to be kept with the ticks')."""
    core = make(hosts)
    lead(core, 0.0)
    out: list[Effect] = []
    t = 0.25
    while t <= until + 1e-9:
        if abs(t - round(t)) < 1e-9:
            out += each_second(core, int(t), t) or []
        out += tick(core, t)
        t += INTERVAL / 4
    return out


def normal_rate(hosts: list[str], until: float, step: dict[str, int] | None = None,
                stop: dict[str, float] | None = None) -> tuple[list[Effect], list[str]]:
    """Every host heartbeats once an interval; ``step[h]``: h's seq moves by that much
    each time (``step - 1`` lost on the way); ``stop[h]``: h falls silent then."""
    step, stop = step or {}, stop or {}
    seq = dict.fromkeys(hosts, 0)

    def second(core: Any, _: int, t: float) -> None:
        for h in hosts:
            if t < stop.get(h, float("inf")):
                seq[h] += step.get(h, 1)
                beat(core, h, seq[h], t)

    out = ticking(hosts, until, second)
    return out, [e.host for e in events(out, "suspect")]


def test_heartbeats_dropped_on_the_way_make_the_monitor_suspect_nobody_and_say_so() -> None:
    """Two of every three heartbeats of a and b never reach the monitor (nats-server
    dropped them for a slow consumer): what arrives is fresh and on time, so no other
    sign shows. c really dies at 5: not suspected while the loss lasts."""
    out, suspects = normal_rate(["a", "b", "c"], until=12.0, step={"a": 3, "b": 3}, stop={"c": 5.0})
    assert suspects == []
    [first, *_] = alerts(out)
    assert first.kind == "monitor_overloaded" and "heartbeats lost" in first.reason, first.reason
    assert "from 2 senders" in first.reason


def test_one_sender_losing_most_of_its_heartbeats_is_not_the_monitors_overload() -> None:
    out, suspects = normal_rate(["a", "b", "c"], until=12.0, step={"a": 3}, stop={"c": 5.0})
    assert alerts(out) == []
    assert suspects == ["c"]


def test_hosts_back_from_a_partition_longer_than_the_window_are_not_a_loss() -> None:
    """a and b cut off from 2 to 7 (their agents' numbers run on): suspected, back
    with a gap of five. Their silence was their own; c dies at 9 and is suspected."""
    def second(core: Any, seq: int, t: float) -> list[Effect]:
        out: list[Effect] = []
        for h in ("a", "b"):
            if not 2.0 <= t < 7.0:
                out += beat(core, h, seq, t)
        if t < 9.0:
            out += beat(core, "c", seq, t)
        return out

    out = ticking(["a", "b", "c"], 16.0, second)
    assert alerts(out) == []
    assert [e.host for e in events(out, "suspect")] == ["a", "b", "c"]
    assert [e.host for e in events(out, "alive") if "after suspicion" in e.reason] == ["a", "b"]


def test_every_host_rebooting_is_not_a_loss() -> None:
    """Every host reboots at once (a power cut and back): seq starts again at 0 on a new boot."""
    def second(core: Any, s: int, t: float) -> None:
        for h in ("a", "b", "c"):
            boot, seq = ("boot1", 1000 + s) if t < 5.0 else ("boot2", s - 5)
            beat(core, h, seq, t, boot=boot)

    out = ticking(["a", "b", "c"], 10.0, second)
    assert alerts(out) == [] and events(out, "suspect") == []


def test_reordered_and_replayed_heartbeats_are_not_a_loss() -> None:
    def second(core: Any, s: int, t: float) -> None:
        seq = 2 * s
        for h in ("a", "b", "c"):
            beat(core, h, seq, t)  # the newer first
            beat(core, h, seq - 1, t + 0.01)  # the older one overtaken
            beat(core, h, seq - 5, t + 0.02)  # an old one replayed

    out = ticking(["a", "b", "c"], 10.0, second)
    assert alerts(out) == [] and events(out, "suspect") == []
    assert MISSED * INTERVAL < 10.0  # long enough for a wrong suspicion to show


def test_a_heartbeat_connection_lost_and_restored_between_two_ticks_is_deafness() -> None:
    """Measured: nats-server closes the monitor's connection as a slow consumer and
    drops what it held for it; the monitor is reconnected ~0.1 s later, within one
    tick at a 1 s interval, and looked connected at every tick."""
    from hafence.heartbeat.service import FirehoseFeed

    class Sub:
        connected = True
        disconnects = 0

    sub = Sub()
    feed = FirehoseFeed(sub)  # type: ignore[arg-type]
    assert feed.connected()
    sub.disconnects = 1  # closed and back between two looks
    assert not feed.connected()
    assert feed.connected()  # said once
    sub.connected = False
    assert not feed.connected()
