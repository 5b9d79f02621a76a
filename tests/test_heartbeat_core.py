"""The heartbeat monitor's core, driven by hand: events in, effects out, no NATS,
no clock but the one given. Each test names the rule it proves."""

from __future__ import annotations

import pytest

from hafence.contracts import Alert, Heartbeat, HostEvent, MonitorView
from hafence.core import Delivered, LeaseChanged, Now, Publish, Returned, SetTimer, Span, Started, TimerFired
from hafence.core.effects import Effect
from hafence.core.events import Event
from hafence.heartbeat import liveness
from hafence.heartbeat.core import FLUSH, FLUSH_BATCH, SOURCE, TICK, VIEWS, HeartbeatCore, Settings
from hafence.subjects import Subjects

WALL = 1_800_000_000.0
INTERVAL, MISSED = 1.0, 3


def at(mono: float) -> Now:
    return Now(mono, WALL + mono)


def make(hosts: list[str], nonce: str = "n1", **kw: object) -> HeartbeatCore:
    settings = Settings(subjects=Subjects(), hosts=hosts, interval_s=INTERVAL, missed=MISSED, role="heartbeat",
                        lease_ttl_s=6.0, instance="hb-test", heartbeat_subjects=["hafence.hb.*"], **kw)  # type: ignore[arg-type]
    core = HeartbeatCore(settings, nonce=nonce)
    assert core.handle(Started(), at(0.0))[0] == SetTimer(TICK, INTERVAL / 4)
    return core


def handle(core: HeartbeatCore, event: Event, now: Now) -> list[Effect]:
    """As a driver whose publishes are stored at once: each tagged one reports back."""
    out = core.handle(event, now)
    i = 0
    while i < len(out):
        e = out[i]
        if isinstance(e, Publish) and e.tag:
            out += core.handle(Returned(e.tag), now)
        i += 1
    return out


def lead(core: HeartbeatCore, mono: float, term: int = 7) -> list[Effect]:
    return handle(core, LeaseChanged(True, term, valid_until=mono + 100.0), at(mono))


def beat(core: HeartbeatCore, host: str, seq: int, mono: float, boot: str = "boot1") -> list[Effect]:
    hb = Heartbeat(host=host, boot_id=boot, seq=seq, sent_at=WALL + mono)
    return handle(core, Delivered(SOURCE, f"hafence.hb.{host}", hb), at(mono))


def tick(core: HeartbeatCore, mono: float) -> list[Effect]:
    """A tick on time (the load guard reads a late one as the monitor's own stall)."""
    core.due = mono
    return handle(core, TimerFired(TICK), at(mono))


def ticks(core: HeartbeatCore, start: float, stop: float) -> list[Effect]:
    """Tick every quarter interval, on time, from ``start`` up to ``stop``."""
    out: list[Effect] = []
    core.due = start
    t = start
    while t <= stop + 1e-9:
        out += handle(core, TimerFired(TICK), at(t))
        t += INTERVAL / 4
    return out


def events(effects: list[Effect], kind: str) -> list[HostEvent]:
    return [e.message for e in effects
            if isinstance(e, Publish) and isinstance(e.message, HostEvent) and e.message.kind == kind]


def test_a_silent_host_becomes_suspect_once_with_the_hosts_late_with_it() -> None:
    core = make(["a", "b", "c", "d"])
    lead(core, 0.0)
    beat(core, "a", 1, 0.5)
    beat(core, "b", 1, 1.0)
    beat(core, "c", 1, 1.6)
    beat(core, "d", 1, 2.9)
    out = tick(core, 3.6)
    [suspect] = events(out, "suspect")
    assert suspect.host == "a" and suspect.incident == "a-boot1-1" and suspect.boot_id == "boot1"
    assert suspect.late_hosts == ["b", "c"]  # unheard for more than 1.5 intervals: lost with it, probably
    assert suspect.term == 7 and suspect.last_seen == WALL + 0.5
    [publish] = [e for e in out if isinstance(e, Publish) and e.message is suspect]
    assert publish.msg_id == "suspect:a-boot1-1" and publish.subject == "hafence.host.a.suspect"
    # The suspicion is the root of its incident's trace: its span opens just before it.
    [span] = [e for e in out if isinstance(e, Span)]
    assert span.root and span.name == "host suspect a" and out.index(span) < out.index(publish)
    # Later ticks declare nothing again about "a" (the others fall silent in their turn).
    later = ticks(core, 3.85, 20.0)
    assert "a" not in {e.host for e in events(later, "suspect")}
    assert sorted(e.host for e in events(later, "suspect")) == ["b", "c", "d"]


def test_a_host_heard_again_after_suspicion_is_published_alive() -> None:
    core = make(["a"])
    lead(core, 0.0)
    beat(core, "a", 1, 0.5)
    assert events(tick(core, 3.6), "suspect")
    [alive] = events(beat(core, "a", 2, 4.0), "alive")
    assert alive.reason == "heartbeat received after suspicion" and alive.at == WALL + 4.0


def test_a_standby_publishes_nothing_and_a_new_leader_reannounces_open_suspects() -> None:
    core = make(["a", "b"])
    beat(core, "a", 1, 0.5)
    beat(core, "b", 1, 3.0)
    out = tick(core, 3.6)  # "a" is suspect, but this replica does not lead
    assert not [e for e in out if isinstance(e, Publish) and isinstance(e.message, HostEvent)]
    # Much later it takes the lease: "a" is announced as it was declared, under the same id.
    beat(core, "b", 2, 40.0)
    [again] = events(lead(core, 40.1, term=9), "suspect")
    assert again.incident == "a-boot1-1" and again.term == 9
    assert again.reason == "no heartbeat for 3.1s (window 3.0s)" and again.at == WALL + 3.6
    # Renewals announce nothing more.
    assert not events(lead(core, 42.0, term=9), "suspect")


def test_a_return_from_suspicion_heard_while_nobody_led_is_announced_when_the_lease_is_taken() -> None:
    """Seed 966: "a" was suspect; it came back (a new boot) while this monitor had lost
    the lease; when it took the lease again nobody had said "a" was alive, and every
    service kept it suspect. The new leader says it (once), with the open suspicions."""
    core = make(["a", "b"])
    lead(core, 0.0)
    beat(core, "a", 1, 0.5)
    beat(core, "b", 1, 3.0)
    assert events(tick(core, 3.6), "suspect")
    handle(core, LeaseChanged(False, 7, valid_until=0.0), at(4.0))
    assert not events(beat(core, "a", 1, 5.0, boot="boot2"), "alive")  # decided, not led: not sent
    beat(core, "b", 2, 5.0)
    [alive] = events(lead(core, 6.0, term=8), "alive")
    assert alive.host == "a" and alive.term == 8
    assert not events(lead(core, 8.0, term=8), "alive")  # a renewal says nothing again
    # Taken again later, it is not repeated; a host suspect again is not said alive.
    handle(core, LeaseChanged(False, 8, valid_until=0.0), at(9.0))
    assert not events(lead(core, 10.0, term=9), "alive")


def test_a_lease_past_its_validity_is_not_held() -> None:
    core = make(["a"])
    core.handle(LeaseChanged(True, 3, valid_until=2.0), at(0.0))
    beat(core, "a", 1, 0.5)
    # The driver has not said it was lost (a paused process): the core stops acting by itself.
    assert not events(tick(core, 3.6), "suspect")
    # Renewed afterwards: the suspicion it held back is announced then.
    [again] = events(lead(core, 5.0, term=3), "suspect")
    assert again.host == "a"


def test_incident_ids_differ_between_incidents_of_the_same_host() -> None:
    core = make(["a"])
    lead(core, 0.0)
    beat(core, "a", 1, 0.5)
    [first] = events(tick(core, 3.6), "suspect")
    beat(core, "a", 2, 4.0)
    [second] = events(tick(core, 7.1), "suspect")
    assert first.incident != second.incident
    # A host never heard from: a new incident in each monitor lifetime (each its nonce).
    lifetimes = []
    for nonce in ("life1", "life2"):
        other = make(["z"], nonce=nonce)
        lead(other, 0.0)
        [s] = events(tick(other, 3.1), "suspect")
        lifetimes.append(s.incident)
    assert lifetimes[0] != lifetimes[1]


def test_the_incident_id_comes_from_the_liveness_module_at_run_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The simulation plants "reuse an incident id" here: the core must call it through the module."""
    monkeypatch.setattr(liveness, "new_incident_id", lambda host, boot, seq, nonce: f"{host}-planted")
    core = make(["a"])
    lead(core, 0.0)
    beat(core, "a", 1, 0.5)
    [s] = events(tick(core, 3.6), "suspect")
    assert s.incident == "a-planted"


def test_an_overloaded_monitor_holds_its_suspects_and_alerts() -> None:
    core = make(["a", "b"])
    lead(core, 0.0)
    ticks(core, 0.25, 2.0)
    beat(core, "a", 1, 2.0)
    beat(core, "b", 1, 2.0)
    # The process stalls for 4 s (SIGSTOP, a starved VM): the first tick after it is
    # 4 s late, and everyone has been silent past the window, for the monitor's fault.
    core.due = 2.25
    out = handle(core, TimerFired(TICK), at(6.25))
    assert not events(out, "suspect")
    [alert] = [e.message for e in out if isinstance(e, Publish) and isinstance(e.message, Alert)]
    assert alert.kind == "monitor_overloaded" and "event loop" in alert.reason
    # Hosts keep heartbeating while it catches up; "b" really dies.
    out = []
    t = 6.5
    seq = 2
    while t < 12.0:
        out += beat(core, "a", seq, t)
        core.due = t
        out += handle(core, TimerFired(TICK), at(t))
        t += INTERVAL / 4
        seq += 1
    assert "monitor_recovered" in [e.message.kind for e in out
                                   if isinstance(e, Publish) and isinstance(e.message, Alert)]
    # Suspicion resumes a full window after the last sign of lag, not at once.
    [b] = events(out, "suspect")
    assert b.host == "b" and b.at - WALL >= 6.25 + INTERVAL * MISSED


def test_a_deaf_monitor_suspects_nobody() -> None:
    class Deaf:
        def connected(self) -> bool:
            return False

        def pending(self) -> int:
            return 0

    core = make(["a"])
    core.feed = Deaf()
    lead(core, 0.0)
    beat(core, "a", 1, 0.5)
    out = ticks(core, 0.25, 10.0)
    assert not events(out, "suspect")
    assert any(isinstance(e, Publish) and isinstance(e.message, Alert) and "not connected" in e.message.reason
               for e in out)


def test_the_leader_publishes_views_of_the_watchdog_hosts_it_hears() -> None:
    core = make(["a", "b"], watchdog_hosts=["a", "b"], view_period_s=1.0)
    beat(core, "a", 1, 0.5)
    beat(core, "b", 1, 0.5)
    assert [e for e in core.handle(TimerFired(VIEWS), at(1.0)) if isinstance(e, Publish)] == []  # not leading
    lead(core, 1.0, term=4)
    beat(core, "a", 2, 1.5)
    views = [e for e in core.handle(TimerFired(VIEWS), at(2.2)) if isinstance(e, Publish)]
    assert [(v.subject, v.core) for v in views] == [("hafence.view.a", True)]  # "b" unheard for 1.7 intervals
    assert views[0].message == MonitorView(host="a", term=4, at=WALL + 2.2)


def test_the_fast_path_and_a_delivery_share_one_decision() -> None:
    core = make(["a"])
    lead(core, 0.0)
    beat(core, "a", 1, 0.5)
    tick(core, 3.6)
    # The fast path: no event object, the same function.
    [alive] = events(core.heard("a", "boot1", 2, WALL + 4.0, 4.0, WALL + 4.0), "alive")
    assert alive.host == "a"
    assert core.heard("a", "boot1", 2, WALL + 4.0, 4.1, WALL + 4.1) == []  # a replay is no news
    with pytest.raises(liveness.UnknownHost):
        core.heard("x", "b", 1, WALL, 4.2, WALL + 4.2)
    assert core.processed == 2  # counted for the load guard since the tick: unknown hosts are not


def test_what_the_fast_path_decided_is_carried_out_in_order_in_batches() -> None:
    """A starting monitor hears every host come alive at once: one FLUSH is fed for
    the lot; a batch goes out, and the next only once the last is stored (a flood
    of publishes would keep the event loop past the load guard's lag limit)."""
    hosts = [f"h{i:04d}" for i in range(2 * FLUSH_BATCH + 10)]
    core = make(hosts)
    lead(core, 0.0)
    feeds = 0
    for host in hosts:
        out = core.heard(host, "b", 1, WALL + 0.5, 0.5, WALL + 0.5)
        if out and core.defer(out):
            feeds += 1
    assert feeds == 1
    batch = [e for e in core.handle(TimerFired(FLUSH), at(0.6)) if isinstance(e, Publish)]
    published: list[str] = []
    batches = 0
    while batch:
        batches += 1
        assert len(batch) <= FLUSH_BATCH
        published += [e.message.host for e in batch]  # type: ignore[union-attr]
        following: list[Effect] = []
        for i, e in enumerate(batch):
            more = core.handle(Returned(e.tag), at(0.7))
            assert not more or i == len(batch) - 1  # nothing new before the whole batch is stored
            following += more
        batch = [e for e in following if isinstance(e, Publish)]
    assert published == hosts and batches == 3
    # Idle again: the next host back is fed a FLUSH of its own.
    core.handle(TimerFired(TICK), at(0.75))
    assert core.defer([]) is True


def test_the_service_fast_path_calls_the_cores_own_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    """Production ingests raw frames without building events (issue 12); it must
    still decide through the very function ``handle(Delivered)`` uses."""
    from hafence.contracts import encode
    from hafence.heartbeat.service import Ingest

    calls: list[tuple[str, str]] = []
    heard = HeartbeatCore.heard

    def spy(self: HeartbeatCore, host: str, *rest: object) -> list[Effect]:
        calls.append(("core", host))
        return heard(self, host, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(HeartbeatCore, "heard", spy)
    core = make(["a", "b"])
    core.handle(LeaseChanged(True, 7, valid_until=float("inf")), at(0.0))  # the ingest reads the real clock
    beat(core, "a", 1, 0.5)
    flushes: list[int] = []
    ingest = Ingest(core, "hafence.hb.", lambda: flushes.append(1))
    hb = Heartbeat(host="b", boot_id="boot1", seq=1, sent_at=WALL)
    ingest.take("hafence.hb.b", encode(hb))
    ingest.take("hafence.hb.a", encode(hb))  # S5: b's heartbeat on a's subject never reaches the core
    assert calls == [("core", "a"), ("core", "b")]
    assert [r.error for r in ingest.rejected] == ["rejected: heartbeat of host 'b' on subject hafence.hb.a"]
    # b came alive: its event waits in the outbox for the one FLUSH the shell fed.
    assert flushes == [1] and [e.host for e in events(core.handle(TimerFired(FLUSH), at(0.6)), "alive")] == ["b"]


def test_a_hosts_next_event_waits_until_its_previous_one_is_stored() -> None:
    """Host events are not awaited (a slow stream must not hold up the ticks), so
    a retried "alive" could land after the "suspect" that follows it: a host's
    next event is sent only once its previous one was stored or given up on."""
    core = make(["a", "b"])
    lead(core, 0.0)
    hb = Heartbeat(host="a", boot_id="boot1", seq=1, sent_at=WALL + 0.5)
    [alive] = [e for e in core.handle(Delivered(SOURCE, "hafence.hb.a", hb), at(0.5)) if isinstance(e, Publish)]
    assert alive.tag  # sent, not awaited: its outcome comes back as Returned(tag)
    beat(core, "b", 1, 3.0)
    core.due = 3.6
    held = core.handle(TimerFired(TICK), at(3.6))  # "a" is suspect now, its "alive" still in flight
    assert events(held, "suspect") == []
    out = core.handle(Returned(alive.tag, error="error: NotPublished: nats down"), at(5.0))
    [suspect] = events(out, "suspect")
    assert suspect.host == "a" and suspect.at == WALL + 3.6  # as declared, not as sent


def test_one_hosts_stepped_clock_is_not_the_monitors_lag() -> None:
    """L4, seeds 242/128: the only host still heard has its wall clock stepped back 5 s,
    so its heartbeats look 5 s old; the monitor must not call that its own lag, and
    the hosts that fell silent are suspected on time."""
    core = make(["a", "b", "c"])
    lead(core, 0.0)
    out: list[Effect] = []
    t, seq = 0.25, 0
    while t <= 12.0 + 1e-9:
        if abs(t - round(t)) < 1e-9:  # a heartbeat of each live host every interval
            seq += 1
            if t < 4.0:  # a and b lose their power at 4
                beat(core, "a", seq, t)
                beat(core, "b", seq, t)
            step = 5.0 if t >= 5.0 else 0.0  # c's wall clock stepped back at t=5
            hb = Heartbeat(host="c", boot_id="boot1", seq=seq, sent_at=WALL + t - step)
            handle(core, Delivered(SOURCE, "hafence.hb.c", hb), at(t))
        out += tick(core, t)
        t += INTERVAL / 4
    assert not [e for e in out if isinstance(e, Publish) and isinstance(e.message, Alert)]
    assert sorted(e.host for e in events(out, "suspect")) == ["a", "b"]
