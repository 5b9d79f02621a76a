"""L4: does the monitor lag, and may it suspect anyone? Pure: samples and ``now`` in, decisions out.

A monitor that falls behind hears heartbeats late (or never: NATS drops what a
slow consumer cannot take) and would turn its own slowness into suspicions. It
watches four signs of its own lag, fed in every tick by the service:

* loop lag: the tick woke up later than it asked to (the event loop was busy,
  the process was stopped or starved of CPU);
* backlog: heartbeats received but not yet processed, in seconds of work at the
  rate they are being processed;
* deafness: the heartbeat subscription is down (NATS restarting, a network
  cut at the monitor): silence then says nothing about the hosts;
* age: the share of heartbeats, over one heartbeat interval, that were older than
  the limit when processed (processing time minus the agent's ``sent_at``). A
  share and not the oldest, so that one host with a skewed clock is not read as
  the monitor's lag; a monitor whose own clock is off by more than the limit
  reports itself overloaded, which is the safe way to be wrong.

Any sign above ``lag_limit_s`` makes the monitor *overloaded*: it declares no
one suspect and raises an alert, repeated every ``alert_repeat_s`` while it
lasts. It recovers by itself after ``calm_s`` without a sign. Suspicion resumes
only a full detection window after the last sign: every live host has then had
a whole window to be heard since the monitor caught up, so what was queued or
dropped while it lagged cannot make anyone look silent.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sample:
    """What the service measured since the previous sample."""

    at: float
    loop_lag_s: float = 0.0
    processed: int = 0  # heartbeats processed since the previous sample
    late: int = 0  # of those, older than the limit when processed
    pending: int = 0  # received, not yet processed (the subscription's queue)
    connected: bool = True  # the heartbeat subscription is up


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
        age = ""
        if s.at - self._age_from >= self.interval_s:
            processed, late = self._processed, self._late
            self._age_from, self._processed, self._late = s.at, 0, 0
            if late * 2 > processed:
                age = (f"{late} of {processed} heartbeats older than {limit:.2f}s when processed "
                       "(the monitor lags, or its clock is off)")
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
        return age
