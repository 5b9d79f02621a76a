"""L4: does the monitor lag, and may it suspect anyone? Pure: samples and ``now`` in, decisions out.

A monitor that falls behind hears heartbeats late (or never: NATS drops what a
slow consumer cannot take) and would turn its own slowness into suspicions. It
watches five signs of its own lag, fed in every tick by the service:

* loop lag: the tick woke up later than it asked to (the event loop was busy,
  the process was stopped or starved of CPU);
* backlog: heartbeats received but not yet processed, in seconds of work at the
  rate they are being processed;
* deafness: the heartbeat subscription is down (NATS restarting, a network
  cut at the monitor): silence then says nothing about the hosts;
* age: the share of heartbeats, over one heartbeat interval, that were later
  than the limit when processed. A heartbeat's lateness is measured against its
  own sender's clock (``SenderClocks``): processing time minus ``sent_at``, less
  the smallest such difference that sender showed recently, so a sender's clock
  offset, step or drift cancels out (and so does the monitor's own). It is a sign
  only when more than half the heartbeats and at least ``MIN_LATE_SENDERS``
  different senders were late: one sender's clock, stepped or drifting faster
  than its baseline follows, is never read as the monitor's lag (seeds 242 and
  128: the only host left heard had a stepped clock, and the monitor suspected
  nobody while another host lost its power).
* loss: the share of heartbeats, over one heartbeat interval, that were sent
  and never processed: gaps in each sender's ``seq`` within a boot, counted by
  ``Liveness`` only for hosts alive and heard within the last detection window
  (a gap after a longer silence is the host's own, not the monitor's loss; see
  ``liveness.py``). A sign when more were lost than processed (more than half
  of what was sent) and from at least ``MIN_LATE_SENDERS`` different senders:
  one host's flaky link or stuck agent loses only its own. What arrives after a
  drop is fresh, so none of the other signs sees it (nats-server closing the
  monitor as a slow consumer between two ticks, a route between NATS nodes
  dropping what the monitor's node should have had); at one heartbeat a host an
  interval, such drops would make live hosts look silent.

Any sign above ``lag_limit_s`` makes the monitor *overloaded*: it declares no
one suspect and raises an alert, repeated every ``alert_repeat_s`` while it
lasts. It recovers by itself after ``calm_s`` without a sign. Suspicion resumes
only a full detection window after the last sign: every live host has then had
a whole window to be heard since the monitor caught up, so what was queued or
dropped while it lagged cannot make anyone look silent.
"""

from __future__ import annotations

from dataclasses import dataclass

# The age sign needs late heartbeats from this many different senders: a lag of
# the monitor delays everyone, one sender's clock fault delays only itself.
MIN_LATE_SENDERS = 2


class SenderClocks:
    """Per sender, the smallest ``received - sent_at`` seen over the last one to two
    ``span_s``: that sender's clock offset plus the monitor's quickest delivery.
    Lateness is the excess over it. Two generations of minima, swapped every
    ``span_s``, so a step or drift of the sender's clock is forgotten within
    ``2 * span_s`` without keeping any history per heartbeat."""

    __slots__ = ("_roll_at", "cur", "prev", "span_s")

    def __init__(self, span_s: float, now: float) -> None:
        self.span_s = span_s
        self.cur: dict[str, float] = {}
        self.prev: dict[str, float] = {}
        self._roll_at = now + span_s

    def lateness(self, host: str, delay: float) -> float:
        """How much later than its sender's usual this heartbeat (``delay`` =
        received - sent_at) arrived; 0 for the first one heard."""
        cur = self.cur
        base = cur.get(host)
        if base is None or delay < base:
            cur[host] = base = delay
        prev = self.prev.get(host)
        if prev is not None and prev < base:
            base = prev
        return delay - base

    def roll(self, now: float) -> None:
        if now >= self._roll_at:
            self._roll_at = now + self.span_s
            self.prev, self.cur = self.cur, {}


@dataclass(frozen=True, slots=True)
class Sample:
    """What the service measured since the previous sample."""

    at: float
    loop_lag_s: float = 0.0
    processed: int = 0  # heartbeats processed since the previous sample
    late: int = 0  # of those, later than the limit (against their sender's clock) when processed
    pending: int = 0  # received, not yet processed (the subscription's queue)
    connected: bool = True  # the heartbeat subscription is up
    late_senders: int = MIN_LATE_SENDERS  # how many different senders the late ones came from
    # Sent and never processed (gaps in their senders' seq), and how many different
    # senders they were lost from.
    lost: int = 0
    lost_senders: int = MIN_LATE_SENDERS


@dataclass(frozen=True, slots=True)
class Overloaded:
    reason: str
    since: float
    repeat: bool = False  # the same episode, announced again


@dataclass(frozen=True, slots=True)
class Recovered:
    lasted_s: float
    resume_at: float  # when suspicion resumes (one detection window after the last sign)


Change = Overloaded | Recovered


def default_lag_limit(interval_s: float, window_s: float) -> float:
    """Half an interval (at least 0.25 s: a busy machine's scheduling noise), and
    never more than half the time a live host may stay unheard before it is suspect."""
    return min(max(interval_s / 2, 0.25), max(window_s - interval_s, interval_s) / 2)


class LoadGuard:
    def __init__(self, interval_s: float, window_s: float, now: float, lag_limit_s: float | None = None,
                 calm_s: float | None = None, alert_repeat_s: float = 300.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self.lag_limit_s = default_lag_limit(interval_s, window_s) if lag_limit_s is None else lag_limit_s
        self.calm_s = interval_s if calm_s is None else calm_s
        self.alert_repeat_s = alert_repeat_s
        self.overloaded_since: float | None = None
        self.last_sign_at = float("-inf")
        self.last_reason = ""
        self._announced_at = float("-inf")
        self._last_at = now
        # The age share is judged over a heartbeat interval (every host heard once).
        self._age_from = now
        self._processed = 0
        self._late = 0
        self._late_senders = 0
        self._lost = 0
        self._lost_senders = 0
        # True when the last sample closed an interval of the shares: whoever counts
        # senders across samples starts a new count.
        self.interval_closed = False

    @property
    def overloaded(self) -> bool:
        return self.overloaded_since is not None

    def may_suspect(self, now: float) -> bool:
        return self.overloaded_since is None and now >= self.last_sign_at + self.window_s

    def observe(self, s: Sample) -> list[Change]:
        period = max(s.at - self._last_at, 1e-9)
        self._last_at = s.at
        reason = self._sign(s, period)
        out: list[Change] = []
        if reason:
            self.last_sign_at, self.last_reason = s.at, reason
            if self.overloaded_since is None:
                self.overloaded_since, self._announced_at = s.at, s.at
                out.append(Overloaded(reason, s.at))
            elif s.at - self._announced_at >= self.alert_repeat_s:
                self._announced_at = s.at
                out.append(Overloaded(reason, self.overloaded_since, repeat=True))
        elif self.overloaded_since is not None and s.at - self.last_sign_at >= self.calm_s:
            out.append(Recovered(s.at - self.overloaded_since, self.last_sign_at + self.window_s))
            self.overloaded_since = None
        return out

    def _sign(self, s: Sample, period: float) -> str:
        limit = self.lag_limit_s
        self._processed += s.processed
        self._late += s.late
        self._lost += s.lost
        # A sample's sender counts may be per sample (the core's late ones) or since the
        # interval began (its lost ones, kept until ``interval_closed``): the largest is
        # a lower bound of the distinct ones either way.
        self._late_senders = max(self._late_senders, s.late_senders if s.late else 0)
        self._lost_senders = max(self._lost_senders, s.lost_senders if s.lost else 0)
        age = lost = ""
        self.interval_closed = s.at - self._age_from >= self.interval_s
        if self.interval_closed:
            processed, late, senders = self._processed, self._late, self._late_senders
            dropped, dropped_from = self._lost, self._lost_senders
            span = s.at - self._age_from
            self._age_from, self._processed, self._late, self._late_senders = s.at, 0, 0, 0
            self._lost, self._lost_senders = 0, 0
            if late * 2 > processed and senders >= MIN_LATE_SENDERS:
                age = (f"{late} of {processed} heartbeats, from {senders} senders, later than "
                       f"{limit:.2f}s when processed (the monitor lags)")
            if dropped > processed and dropped_from >= MIN_LATE_SENDERS:
                lost = (f"{dropped} of {dropped + processed} heartbeats lost in {span:.2f}s, from {dropped_from} "
                        f"senders: sent and never processed (the monitor cannot take what it is sent)")
        if not s.connected:
            return "not connected to NATS: hearing no heartbeat is no news of anyone"
        if s.loop_lag_s > limit:
            return f"event loop {s.loop_lag_s:.2f}s late (limit {limit:.2f}s)"
        if s.pending:
            rate = s.processed / period
            backlog = s.pending / rate if rate > 0 else float("inf")
            if backlog > limit:
                return (f"{s.pending} heartbeats waiting, {backlog:.2f}s of work at {rate:,.0f}/s "
                        f"(limit {limit:.2f}s)")
        return age or lost
