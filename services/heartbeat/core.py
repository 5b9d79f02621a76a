"""The heartbeat monitor's decisions as one sans-I/O core (docs/cores.md, "heartbeat").

``HeartbeatCore.handle(event, now) -> [effects]`` is every rule of the monitor;
the service (``service.py``) and the simulation only carry events in and effects
out. The rules, in the order they apply:

* a heartbeat (``Delivered(source="heartbeats")``, or the production fast path
  calling ``heard`` directly: the same function) is news of life (``liveness.py``);
  a host back from silence is published ``alive`` by the lease holder;
* every quarter interval (timer ``tick``) the monitor first measures its own lag
  (``load.py``, L4: loop lag, backlog, deafness, late heartbeats, and heartbeats
  lost on the way, which ``liveness.py`` counts from gaps in each boot's ``seq``):
  overloaded, it suspects nobody and alerts, whoever leads;
  otherwise hosts silent for a detection window become ``suspect``, once per
  incident, with the hosts late at that moment (``late_hosts``) and the boot last
  heard (S6); only the lease holder publishes;
* a monitor that takes the lease re-announces every open suspicion as it was
  declared (same message id: the stream drops what the old leader already sent),
  and ``alive`` for every host it heard return from suspicion since it last took
  the lease and still hears: that return may have been decided while nobody led,
  or its event lost with the lease (simulation seed 966: a host back on a new
  boot during a leadership gap stayed "suspect" in every service's view);
* the lease holder publishes a view of the watchdog hosts it hears (``view.py``,
  timer ``views``).

Clocks: decisions on ``now.mono``; messages stamped from ``now.wall``. A lease
past ``valid_until`` is not held, whatever the driver last said. Randomness: none;
the lifetime's ``nonce`` (incident ids of never-heard hosts) is given to the
constructor.
"""

from __future__ import annotations

import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from hafence import metrics
from hafence.config import ClusterConfig
from hafence.contracts import Alert, Heartbeat, HostEvent
from hafence.core.effects import Effect, Log, Publish, SetTimer, Span
from hafence.core.events import Delivered, Event, LeaseChanged, Now, Returned, Started, TimerFired
from hafence.core.inputs import Inputs, Lease, Subscribe
from hafence.heartbeat import view
from hafence.heartbeat.liveness import Alive, Liveness, Suspect, Transition, UnknownHost
from hafence.heartbeat.load import Change, LoadGuard, Overloaded, Recovered, Sample, SenderClocks
from hafence.subjects import Subjects

SOURCE = "heartbeats"  # the subscription heartbeats are delivered from
TICK = "tick"
VIEWS = "views"
# Not a timer the core sets: the service's fast path feeds it when heartbeats it
# passed to ``heard`` decided something (see ``defer``).
FLUSH = "flush"
# What the fast path decided goes out at most this many hosts' events at a time,
# the next batch once the last is stored (as the service did before the core): a
# starting monitor hears every host come alive at once, and sending them all at
# once would keep its event loop busy past the load guard's lag limit.
FLUSH_BATCH = 256
# Host events are published tagged (sent in order, not awaited: a slow stream must
# not hold up the ticks, the load guard's lag probe); a host's next event waits
# until its previous one is stored or given up on, so a retried publish can never
# let an "alive" overtake the "suspect" after it.
HOST_EVENT_TAG = "hostevent:"
# Labelled metrics cost microseconds each: set once every few seconds, not per heartbeat.
METRICS_EVERY_S = 5.0
# A sender's clock baseline is its quickest delivery over the last 2 to 4 detection
# windows: a lag building up shows against it, a clock's step is forgotten after it.
BASELINE_WINDOWS = 2
# A host unheard for this many intervals is "late": reported with a suspect as
# probably lost with it (the arbiter's storm guard counts it at once). A live host
# is silent about one interval; one that died with the suspect, at least
# missed - 1.25 intervals (last heard up to an interval earlier, noticed up to a
# tick later): so the list is sent only when missed_heartbeats >= 3.
LATE_AFTER_INTERVALS = 1.5
# Beyond this many late hosts the list is not sent (None): a message stays small,
# and the arbiter falls back to its settle wait, which sees the storm too.
MAX_LATE_REPORTED = 1000


class Feed(Protocol):
    """Where heartbeats come from, as the load guard sees it: read at every tick,
    in memory (the subscription's own counters), never waited on."""

    def connected(self) -> bool: ...
    def pending(self) -> int: ...


class AlwaysConnected:
    """The feed of a core whose heartbeats come from its driver's subscription:
    the driver reports no connection state, so silence is taken at its word."""

    def connected(self) -> bool:
        return True

    def pending(self) -> int:
        return 0


@dataclass(frozen=True, slots=True)
class Settings:
    subjects: Subjects
    hosts: list[str]  # the hosts this monitor (its shard) watches
    interval_s: float
    missed: int
    role: str  # its lease
    lease_ttl_s: float
    instance: str  # named in its alerts
    # Subjects to subscribe to through the driver; empty when the service feeds
    # heartbeats itself (the fast path: ``heard``).
    heartbeat_subjects: list[str] = field(default_factory=list)
    others: frozenset[str] = frozenset()  # configured hosts other shards watch: not news, not an error
    # A shard sees only its own hosts late: its list would hide a storm across shards,
    # so a sharded monitor sends none and the arbiter settles instead (policy rule 2).
    report_late: bool = True
    watchdog_hosts: list[str] = field(default_factory=list)
    view_period_s: float = 1.0
    alert_repeat_s: float = 300.0

    @property
    def tick_s(self) -> float:
        return self.interval_s / 4


def shard_of(host: str, shards: int) -> int:
    """Stable across processes and versions (not Python's salted hash())."""
    return zlib.crc32(host.encode()) % shards


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> (I, N); ``""`` -> (0, 1), the whole cluster."""
    if not text:
        return 0, 1
    try:
        i, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text!r}: need 0 <= I < N")
    return i, n


def settings_of(config: ClusterConfig, instance: str, shard: int = 0, shards: int = 1,
                subscribe: bool = True) -> Settings:
    """The monitor of shard ``shard`` of ``shards`` (0 of 1: the whole cluster)."""
    subjects = Subjects(config.cluster.subject_prefix)
    hosts = [h.name for h in config.hosts if shards == 1 or shard_of(h.name, shards) == shard]
    timings = config.timings
    return Settings(
        subjects=subjects, hosts=hosts, interval_s=timings.heartbeat_interval_s, missed=timings.missed_heartbeats,
        role="heartbeat" if shards == 1 else f"heartbeat-{shard}-of-{shards}", lease_ttl_s=timings.lease_ttl_s,
        instance=instance,
        heartbeat_subjects=([] if not subscribe else [subjects.hb_all()] if shards == 1
                            else [subjects.hb(h) for h in hosts]),
        others=frozenset(h.name for h in config.hosts) - frozenset(hosts), report_late=shards == 1,
        watchdog_hosts=view.watchdog_hosts(config, hosts), view_period_s=view.view_period(config),
        alert_repeat_s=config.arbiter.alert_repeat_s,
    )


def late_hosts(live: Liveness, suspects: list[Suspect], now: float, interval: float, missed: int
               ) -> dict[str, list[str] | None]:
    """For each new suspect, the other hosts it was probably lost with: late now, or suspect in the same tick."""
    if missed < 3:
        return {}
    late = live.late(now, LATE_AFTER_INTERVALS * interval) + [s.host for s in suspects]
    if len(late) > MAX_LATE_REPORTED:
        return {s.incident: None for s in suspects}
    return {s.incident: sorted(h for h in late if h != s.host) for s in suspects}


def suspect_event(t: Suspect, window: float, term: int, wall_offset: float,
                  late: list[str] | None = None) -> HostEvent:
    """As declared, also when a new leader re-announces it (same message id): the
    silence it was declared after, and the time it was declared (its own time)."""
    return HostEvent(
        host=t.host, kind="suspect", at=t.last_seen + t.silent_for + wall_offset, incident=t.incident,
        reason=f"no heartbeat for {t.silent_for:.1f}s (window {window:.1f}s)",
        term=term, last_seen=t.last_seen + wall_offset, late_hosts=late,
        boot_id=t.boot_id,  # the boot last heard from: the incident is about it (S6)
    )


def alive_event(t: Alive, term: int, wall: float) -> HostEvent:
    return HostEvent(host=t.host, kind="alive", at=wall, term=term,
                     reason="heartbeat received" + (" after suspicion" if t.was_suspect else ""))


def suspect_msg_id(incident: str) -> str:
    return f"suspect:{incident}"


class HeartbeatCore:
    name = "heartbeat"

    def __init__(self, settings: Settings, *, nonce: str, feed: Feed | None = None) -> None:
        self.settings = settings
        self.subjects = settings.subjects
        self.nonce = nonce
        self.feed: Feed = feed or AlwaysConnected()
        # Built at Started: the start-up grace and the load guard count from then.
        self.live: Liveness | None = None
        self.guard: LoadGuard | None = None
        self.window = settings.interval_s * settings.missed
        self.wall_offset = 0.0  # wall - mono at Started: a suspicion's times are stamped alike whenever sent
        # The lease, as the driver last reported it.
        self.term = 0
        self.lease_held = False
        self.valid_until = 0.0
        self.announced = False  # the open suspicions were (re-)announced under the lease held now
        # What the load guard is fed at each tick, counted per heartbeat.
        self.processed = 0
        self.late = 0
        self.age_limit_s = float("inf")
        # Lateness is judged against each sender's own clock (L4: one sender's clock
        # fault is not the monitor's lag); the senders of this tick's late ones.
        self.clocks = SenderClocks(BASELINE_WINDOWS * self.window, 0.0)
        self.late_from: set[str] = set()
        self.per_host: dict[str, int] = {}
        self.metric_children: dict[str, Any] = {}
        self.unknown_warned: set[str] = set()
        self.due = 0.0  # when the tick timer should fire: its lateness is the loop's lag
        self.next_metrics = 0.0
        # Decided on the fast path (one heartbeat's effects each), sent in batches from a FLUSH.
        self.outbox: deque[list[Effect]] = deque()
        self.batch_out: set[str] = set()  # hosts of the batch sent, not yet stored
        self.in_flight: set[str] = set()  # hosts with a host event sent, not yet stored
        self.held_back: dict[str, list[list[Effect]]] = {}  # host -> its next events, in order
        # Hosts heard back from suspicion since the lease was last taken: their alive may
        # have been decided while not leading, or dropped with the lease (flush,
        # held_back); the next (re-)announce says it again while they are still heard.
        self.returned: set[str] = set()

    def inputs(self) -> Inputs:
        return Inputs(
            subscriptions=[Subscribe(SOURCE, s, Heartbeat) for s in self.settings.heartbeat_subjects],
            lease=Lease(self.settings.role, self.settings.lease_ttl_s),
        )

    def held(self, mono: float) -> bool:
        return self.lease_held and mono < self.valid_until

    def handle(self, event: Event, now: Now) -> list[Effect]:
        if isinstance(event, Delivered):
            if event.source == SOURCE and isinstance(event.message, Heartbeat):
                return self.delivered(event.message, now)
            return [Log("warning", "unexpected delivery", {"source": event.source, "subject": event.subject})]
        if isinstance(event, TimerFired):
            if event.key == TICK:
                return self.tick(now)
            if event.key == VIEWS:
                return self.publish_views(now)
            if event.key == FLUSH:
                return self.flush(now)
            return []
        if isinstance(event, LeaseChanged):
            return self.lease_changed(event, now)
        if isinstance(event, Returned):
            if event.tag.startswith(HOST_EVENT_TAG):
                return self.host_event_done(event, now)
            return []
        if isinstance(event, Started):
            return self.started(now)
        return []

    # --- events -------------------------------------------------------------

    def started(self, now: Now) -> list[Effect]:
        s = self.settings
        self.live = Liveness(s.hosts, s.interval_s, s.missed, now.mono, nonce=self.nonce)
        self.guard = LoadGuard(s.interval_s, self.window, now.mono, alert_repeat_s=s.alert_repeat_s)
        self.age_limit_s = self.guard.lag_limit_s
        self.clocks = SenderClocks(BASELINE_WINDOWS * self.window, now.mono)
        self.wall_offset = now.wall - now.mono
        self.due = now.mono + s.tick_s
        self.next_metrics = now.mono + METRICS_EVERY_S
        out: list[Effect] = [SetTimer(TICK, s.tick_s)]
        if s.watchdog_hosts:
            out.append(SetTimer(VIEWS, s.view_period_s))
        return out

    def delivered(self, hb: Heartbeat, now: Now) -> list[Effect]:
        try:
            return self.heard(hb.host, hb.boot_id, hb.seq, hb.sent_at, now.mono, now.wall)
        except UnknownHost:
            if hb.host in self.settings.others or hb.host in self.unknown_warned:
                return []  # another shard's host; or said once already
            self.unknown_warned.add(hb.host)
            return [Log("warning", "heartbeat of a host not in the cluster configuration", {"host": hb.host})]

    def heard(self, host: str, boot_id: str, seq: int, sent_at: float, mono: float, wall: float) -> list[Effect]:
        """One heartbeat: the decision both ingest paths call (the production fast
        path calls it directly with the clocks, without building an event). Raises
        ``UnknownHost`` for a host this monitor does not watch."""
        live = self.live
        if live is None:
            return []  # before Started: not counted (the start-up grace begins then anyway)
        out = live.heartbeat(host, boot_id, seq, mono)
        self.processed += 1
        # Against the monitor's monotonic clock: its own wall clock's steps are no lag
        # either. SenderClocks.lateness, inlined: this runs 50,000 times a second.
        delay = mono - sent_at
        clocks = self.clocks
        base = clocks.cur.get(host)
        if base is None or delay < base:
            clocks.cur[host] = base = delay
        prev = clocks.prev.get(host)
        if prev is not None and prev < base:
            base = prev
        if delay - base > self.age_limit_s:
            self.late += 1
            self.late_from.add(host)
        per_host = self.per_host
        per_host[host] = per_host.get(host, 0) + 1
        if not out:
            return []
        return self.announce(out, mono, wall)

    def defer(self, effects: list[Effect]) -> bool:
        """Keep what the fast path's ``heard`` decided, to be carried out in order with
        every other decision. True: nothing was waiting or being sent, so the caller
        feeds one ``TimerFired(FLUSH)``; else the batch under way brings the rest."""
        idle = not self.outbox and not self.batch_out
        self.outbox.append(effects)
        return idle

    def flush(self, now: Now) -> list[Effect]:
        """The next batch of what the fast path decided."""
        if self.batch_out:
            return []  # a batch is under way: its last Returned sends the next
        if not self.held(now.mono):
            # Decided while leading, lost since: the next leader announces what is suspect.
            for effects in self.outbox:
                for e in effects:
                    if isinstance(e, Publish) and e.tag.startswith(HOST_EVENT_TAG):
                        self.in_flight.discard(e.tag[len(HOST_EVENT_TAG):])
            self.outbox.clear()
            return []
        out: list[Effect] = []
        while self.outbox and len(self.batch_out) < FLUSH_BATCH:
            effects = self.outbox.popleft()
            out += effects
            self.batch_out.update(e.tag[len(HOST_EVENT_TAG):] for e in effects
                                  if isinstance(e, Publish) and e.tag.startswith(HOST_EVENT_TAG))
        return out

    def tick(self, now: Now) -> list[Effect]:
        live, guard, s = self.live, self.guard, self.settings
        if live is None or guard is None:
            return []
        mono = now.mono
        # The tick is its own lag probe: after a stall it finds itself late before
        # anyone could be suspected for a silence that was the monitor's own.
        lag = max(0.0, mono - self.due)
        self.due = mono + s.tick_s
        processed, late, self.processed, self.late = self.processed, self.late, 0, 0
        late_senders = len(self.late_from)
        self.late_from.clear()
        lost, live.lost = live.lost, 0
        self.clocks.roll(mono)
        metrics.MONITOR_LAG.set(lag)
        out: list[Effect] = [SetTimer(TICK, s.tick_s)]
        # Lost senders are counted over the guard's whole interval, not per tick: at one
        # heartbeat a host an interval, two hosts' gaps rarely fall in the same quarter
        # of it. (Late senders are still counted per tick, the guard keeping the largest.)
        for change in guard.observe(Sample(mono, lag, processed, late, late_senders=late_senders,
                                           pending=self.feed.pending(), connected=self.feed.connected(),
                                           lost=lost, lost_senders=len(live.lost_from))):
            metrics.MONITOR_OVERLOADED.set(1 if guard.overloaded else 0)
            out += self.alert(change, now)
        if guard.interval_closed:
            live.lost_from.clear()
        if self.held(mono) and not self.announced:
            # The lease came back without a LeaseChanged since (its validity had run
            # out). Before this tick's own suspects, which go out with their late hosts.
            out += self.reannounce(now)
        elif not self.held(mono):
            self.announced = False
        transitions: list[Transition] = live.tick(mono) if guard.may_suspect(mono) else []
        if transitions:
            suspects = [t for t in transitions if isinstance(t, Suspect)]
            late_of = (late_hosts(live, suspects, mono, s.interval_s, s.missed)
                       if suspects and s.report_late else {})
            out += self.announce(transitions, mono, now.wall, late_of)
        if mono >= self.next_metrics:
            self.next_metrics = mono + METRICS_EVERY_S
            self.flush_metrics()
        return out

    def lease_changed(self, event: LeaseChanged, now: Now) -> list[Effect]:
        self.lease_held, self.term, self.valid_until = event.held, event.term, event.valid_until
        if not self.held(now.mono):
            self.announced = False
            return []
        if self.announced:
            return []  # renewed
        return self.reannounce(now)

    def reannounce(self, now: Now) -> list[Effect]:
        """Announce what is already suspect: the old leader may have died before it
        could; and the returns from suspicion that may not have been announced."""
        self.announced = True
        live = self.live
        if live is None:
            return []
        back: list[Transition] = [Alive(h, was_suspect=True) for h in sorted(self.returned)
                                  if live.state(h) == "alive"]
        out = self.announce([*back, *live.suspects()], now.mono, now.wall)
        self.returned.clear()  # said again under this lease: not owed any more
        return out

    def publish_views(self, now: Now) -> list[Effect]:
        s = self.settings
        out: list[Effect] = [SetTimer(VIEWS, s.view_period_s)]
        if self.live is not None and self.held(now.mono):
            out += view.views(self.subjects, self.live, s.watchdog_hosts, now.mono, now.wall, s.interval_s,
                              self.term)
        return out

    # --- effects ------------------------------------------------------------

    def announce(self, transitions: list[Transition], mono: float, wall: float,
                 late_of: dict[str, list[str] | None] | None = None) -> list[Effect]:
        """Host events for ``transitions``, in order; nothing unless this monitor leads."""
        for t in transitions:
            # Kept whether or not this monitor leads (see ``returned``).
            if isinstance(t, Suspect):
                self.returned.discard(t.host)
            elif t.was_suspect:
                self.returned.add(t.host)
        if not self.held(mono):
            return []
        out: list[Effect] = []
        tag = HOST_EVENT_TAG
        for t in transitions:
            one: list[Effect]
            if isinstance(t, Suspect):
                late = late_of.get(t.incident) if late_of else None
                one = [
                    Span(f"host suspect {t.host}", attributes={
                        "hafence.host": t.host, "hafence.incident": t.incident,
                        "hafence.silent_for_s": round(t.silent_for, 3), "hafence.term": self.term}, root=True),
                    Log("warning", "host is suspect", {"host": t.host, "incident": t.incident}),
                    Publish(self.subjects.host_event(t.host, "suspect"),
                            suspect_event(t, self.window, self.term, self.wall_offset, late),
                            msg_id=suspect_msg_id(t.incident), tag=tag + t.host),
                ]
            else:
                one = [Publish(self.subjects.host_event(t.host, "alive"), alive_event(t, self.term, wall),
                               tag=tag + t.host)]
                # Every host comes alive when a monitor starts: only a return from suspicion is news.
                if t.was_suspect:
                    one.insert(0, Log("info", "host is alive", {"host": t.host, "was_suspect": True}))
            if t.host in self.in_flight:
                self.held_back.setdefault(t.host, []).append(one)
            else:
                self.in_flight.add(t.host)
                out += one
        return out

    def host_event_done(self, event: Returned, now: Now) -> list[Effect]:
        """A host event was stored (or given up on): that host's next one may go,
        if this monitor still leads (else the next leader announces what is suspect)."""
        host = event.tag[len(HOST_EVENT_TAG):]
        out: list[Effect] = []
        if event.error:
            out.append(Log("error", "host event not published", {"host": host, "error": event.error}))
        if not self.held(now.mono):
            self.held_back.pop(host, None)
        waiting = self.held_back.get(host)
        if waiting:
            out += waiting.pop(0)
            if not waiting:
                del self.held_back[host]
        else:
            self.in_flight.discard(host)
        if host in self.batch_out:
            self.batch_out.discard(host)
            if not self.batch_out and self.outbox:
                out += self.flush(now)
        return out

    def alert(self, change: Change, now: Now) -> list[Effect]:
        """L4: the monitor's own lag is an alert, never a fence. Every replica raises
        its own (a standby that lags would be a lagging leader after a take-over)."""
        instance = self.settings.instance
        if isinstance(change, Overloaded):
            kind = "monitor_overloaded"
            reason = (f"heartbeat monitor {instance} lags: {change.reason}; nobody is declared suspect "
                      "until it has kept up for a full detection window")
            log = Log("error", "monitor overloaded: suspecting nobody", {"reason": change.reason,
                                                                         "repeat": change.repeat})
        elif isinstance(change, Recovered):
            kind = "monitor_recovered"
            reason = (f"heartbeat monitor {instance} keeps up again after {change.lasted_s:.1f}s; "
                      f"suspicion resumes in {max(0.0, change.resume_at - now.mono):.1f}s")
            log = Log("warning", "monitor recovered", {"lasted_s": round(change.lasted_s, 2)})
        return [log, Publish(self.subjects.alert(kind),
                             Alert(kind=kind, at=now.wall, service="heartbeat", reason=reason, term=self.term))]

    def flush_metrics(self) -> None:
        counts, self.per_host = self.per_host, {}
        children = self.metric_children
        for host, n in counts.items():
            child = children.get(host)
            if child is None:
                child = children[host] = metrics.HEARTBEATS.labels(host)
            child.inc(n)
        if self.live is None:
            return
        states = {"alive": 0, "suspect": 0, "unknown": 0}
        for host in self.settings.hosts:
            states[self.live.state(host)] += 1
        for state, n in states.items():
            metrics.HOSTS.labels(state).set(n)
