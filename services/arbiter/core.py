"""The arbiter's core: every rule of the arbiter, as ``handle(event, now) -> [effects]``.

It folds the events stream (host events and fence results, replayed from the
start, then followed) into the policy (``hafence.arbiter.policy``) and, while
it is caught up and holds the arbiter lease, carries out the policy's
decisions. The stream is the decision journal: every fence_requested /
fence_skipped / fenced event the arbiter ever published is in it, so a
restarted or standby arbiter knows every open incident.

Rules that live here (the policy decides *whether* to fence; this core decides
*when* and *how it goes out*):

- Replayed facts keep their own time: each fact is folded at the time it
  happened (``HostEvent.at``, a result's ``finished_at``, else when the stream
  stored it), carried over to the monotonic clock the policy decides by
  (``on_policy_clock``); ``now`` only decides. A host fenced days ago does not
  count toward the storm guard after a restart, a request keeps its deadline.
- Terms never go back (S3). Every term the stream shows is reported to the
  lease (``Call("lease", "learn")``), which is taken only after the replay has
  caught up (``Inputs.lease.after``). A fencer's refusal sets ``refused_below``:
  nothing is sent under a lower term; the leader first raises its term
  (``Call("lease", "raise_term")``), and if it cannot (it lost the lease, or is a
  stale leader) it sends nothing more.
- A fence request goes out *before* its fence_requested event, and the policy
  learns of it only once both are stored: a publish that fails leaves the
  decision to be taken again at the next tick, with the same request id and
  message ids (what did get through is not stored twice). The request id comes
  from the incident; the message id includes the term, so a stale leader's
  request reaches the fencer and is refused there instead of vanishing as a
  duplicate.
- A new leader re-sends the requests in flight under its own term: the fencer
  answers from its journal if it ran them (S4).
- A request with no result within ``fence_deadline_s`` is failed
  (``fence_failed`` with an alert, and ``alert.fence_deadline``): the policy
  retries and escalates instead of waiting for ever.
- A fence result is announced as a ``fenced``/``fence_failed`` host event, by
  the leader only, once caught up (a replayed result was announced when it came).
- A host's phase moves by ``hafence.host_phase`` (through the policy); for the
  table to be complete the arbiter also folds ``cleared`` host events and the
  agents' inventories (a boot other than the last known one is ``new_boot``). An
  event illegal in its host's phase is counted by the policy and logged here.
- Boot ids ride through the incident (S6): the suspect names the boot last
  heard from; requests and the events about them carry it.
- Decisions are taken every ``heartbeat_interval_s / 4``, and at once when a
  suspect arrives with nothing queued behind it (a resumed arbiter reads its
  backlog before it acts). One round of decisions is carried out before the
  next is taken, as the loop it replaces did.

Ports: ``lease`` (learn, raise_term) and ``storage`` (``live(hosts, window_s)``,
only when a storage lease directory is configured).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from hafence import metrics
from hafence.arbiter import deadline
from hafence.arbiter.policy import Policy, RequestFence, SkipFence
from hafence.config import ClusterConfig
from hafence.contracts import Alert, FenceRequest, FenceResult, HostEvent, Inventory
from hafence.core import (
    Call,
    CaughtUp,
    Delivered,
    Effect,
    Event,
    Inputs,
    Lease,
    LeaseChanged,
    Log,
    Now,
    Publish,
    ReplayInput,
    Returned,
    SetTimer,
    Span,
    Started,
    TimerFired,
)
from hafence.host_phase import SUSPECT_PHASES, Phase
from hafence.lease import MAX_TERM
from hafence.subjects import Subjects

EVENTS = "events"
TICK = "decide"
# The host event kinds the arbiter folds (the rest are its own or other services' news).
FOLDED_KINDS = ("suspect", "alive", "fence_requested", "confirmed_fenced", "maintenance_on", "maintenance_off",
                "cleared")
# What the replay of the events stream decodes: host events, fence results, inventories.
INPUT = msgspec.json.Decoder(HostEvent | FenceResult | Inventory)
Fact = HostEvent | FenceResult | Inventory
# A round of decisions whose outcomes never all came back (a driver that lost one)
# must not stop the arbiter for good: past this, the round is given up on.
ROUND_LIMIT_S = 60.0
REISSUE_REASON = "re-issued by a new arbiter leader"
# Incidents whose boot is remembered per host: the one being fenced, a later boot's
# kept for after it, and a few more named twice by the monitor replicas.
INCIDENT_BOOTS_KEPT = 4


def event_time(event: Fact, stored_at: float | None = None) -> float | None:
    """When a fact happened, on the wall clock: the event's own time (the result's
    end for a result, the sending for an inventory), else when the stream stored
    it; None when neither is known."""
    at = (event.finished_at if isinstance(event, FenceResult)
          else event.sent_at if isinstance(event, Inventory) else event.at)
    if math.isfinite(at) and at > 0:
        return at
    return stored_at


def on_policy_clock(at: float | None, wall_now: float, mono_now: float) -> float:
    """A fact's wall-clock time on the monotonic clock the policy decides by: as
    long before ``mono_now`` as it happened before ``wall_now``. Never later than
    now (a publisher's clock ahead of ours); unknown: now."""
    if at is None or not math.isfinite(at):
        return mono_now
    return mono_now - max(0.0, wall_now - at)


def fold(policy: Policy, event: Fact, at: float) -> None:
    """Fold one fact into the policy, at ``at`` (the fact's own time on the policy's
    clock, ``on_policy_clock``): pure, so a replay gives the same state whenever it runs."""
    if isinstance(event, FenceResult):
        policy.fence_result(event.host, event.request_id, event.outcome, event.reason, at, boot_id=event.boot_id,
                            incident=event.incident)
        return
    if isinstance(event, Inventory):
        policy.inventory(event.host, event.boot_id)
        return
    match event.kind:
        case "suspect":
            policy.suspect(event.host, event.incident, at, event.late_hosts, boot_id=event.boot_id)
        case "alive":
            policy.alive(event.host)
        case "fence_requested":
            policy.fence_requested(event.host, event.incident, event.request_id or f"fence-{event.incident}",
                                   at, event.attempt or 1)
        case "confirmed_fenced":
            policy.confirmed_by_operator(event.host, boot_id=event.boot_id)
        case "cleared":
            policy.cleared(event.host)
        case "maintenance_on" | "maintenance_off":
            policy.set_maintenance(event.host, event.kind == "maintenance_on")


def build_policy(config: ClusterConfig) -> Policy:
    """The policy from the config; its start-up grace begins at ``Started``."""
    timings, settings = config.timings, config.arbiter
    policy = Policy(
        [h.name for h in config.hosts],
        detection_window_s=timings.detection_window_s,
        # Nothing is decided before the driver has started the core (its grace counts from then).
        started_at=math.inf,
        # Two intervals: hosts that die together are last heard up to one interval
        # apart, and the monitor notices them up to a tick apart.
        settle_s=2 * timings.heartbeat_interval_s,
        max_concurrent=settings.max_concurrent_fences,
        storm_share=settings.storm_share,
        storm_window_s=settings.storm_window_s,
        two_host_delay_s=settings.two_host_delay_s,
        isolated_action=settings.isolated_host_action,
        fence_attempts=settings.fence_attempts,
        retry_backoff_s=settings.fence_retry_backoff_s,
        alert_repeat_s=settings.alert_repeat_s,
    )
    for host in config.hosts:
        policy.set_maintenance(host.name, host.maintenance)
    return policy


# What to do when a tagged effect's outcome comes back.
Continuation = Callable[[Returned, Now], list[Effect]]


@dataclass
class ArbiterCore:
    config: ClusterConfig
    name: str = "arbiter"
    policy: Policy = field(init=False)
    subjects: Subjects = field(init=False)
    caught_up: bool = False
    # The lease as the driver last reported it; past valid_until it is not held.
    lease_held: bool = False
    term: int = 0
    valid_until: float = 0.0
    # Terms below this were refused by the fencer (from its refusals' highest_term).
    refused_below: int = 0
    # The highest term reported to the lease port (so a replay does not report each one).
    learned: int = 0
    # host -> {incident: boot id}: the boot each of the host's latest incidents is about
    # (S6). More than one: a later boot's incident may open while an earlier one's fence
    # is still in flight (a fence covers one boot), and each request names its own.
    incident_boot: dict[str, dict[str, str]] = field(default_factory=dict)
    # incident -> the suspect's message headers (its trace context), for the driver's spans.
    incident_headers: dict[str, dict[str, str]] = field(default_factory=dict)
    # The in-flight requests were re-sent under this leadership.
    reissued: bool = False
    # A decision round under way: the tags it waits for, and when it began.
    waiting: dict[str, Continuation] = field(default_factory=dict)
    round_started: float | None = None
    # A suspect asked for a round while one was under way: take it when that one ends.
    round_wanted: bool = False
    # request id -> the decision: published, its fence_requested not yet stored.
    sending: dict[str, RequestFence] = field(default_factory=dict)
    _seq: int = 0

    def __post_init__(self) -> None:
        self.policy = build_policy(self.config)
        self.subjects = Subjects(self.config.cluster.subject_prefix)

    # --- the contract ----------------------------------------------------------

    def inputs(self) -> Inputs:
        filters = [self.subjects.host_events(kind) for kind in FOLDED_KINDS] + [
            self.subjects.fence_results(), self.subjects.inventory_all()]
        return Inputs(
            replays=[ReplayInput(EVENTS, filters, INPUT)],
            # Taken only after the replay: its term must be above every term in it (S3).
            lease=Lease(role="arbiter", ttl=self.config.timings.lease_ttl_s, after=EVENTS),
        )

    def handle(self, event: Event, now: Now) -> list[Effect]:
        out = self._handle(event, now)
        # Whatever the policy found illegal while handling this (a fold, a continuation).
        for host, illegal in self.policy.take_illegal():
            out.append(Log("warning", "host event illegal in its phase; phase kept", {
                "host": host, "event": str(illegal.event), "phase": str(illegal.phase), "why": illegal.why,
                "count": self.policy.illegal.get(f"{illegal.event} in {illegal.phase}", 0)}))
        return out

    def _handle(self, event: Event, now: Now) -> list[Effect]:
        match event:
            case Started():
                self.policy.started_at = now.mono
                return [SetTimer(TICK, self.tick_s)]
            case Delivered(message=HostEvent() | FenceResult() | Inventory() as fact):
                return self._on_fact(fact, event, now)
            case CaughtUp() if event.source == EVENTS:
                self.caught_up = True
                return []
            case LeaseChanged():
                return self._on_lease(event, now)
            case TimerFired() if event.key == TICK:
                return [SetTimer(TICK, self.tick_s), *self._round(now)]
            case Returned():
                return self._on_returned(event, now)
        return []

    # --- state ----------------------------------------------------------------

    @property
    def tick_s(self) -> float:
        return self.config.timings.heartbeat_interval_s / 4

    def held(self, now: Now) -> bool:
        """The lease, as far as this node's clock can tell: a lease the driver has
        not yet reported lost is lost anyway once past its valid_until (a pause)."""
        return self.lease_held and self.term > 0 and now.mono < self.valid_until

    def boot_of(self, host: str, incident: str) -> str:
        return self.incident_boot.get(host, {}).get(incident, "") or self.policy.boot_of(host, incident)

    def trace_headers(self, incident: str) -> dict[str, str]:
        """The trace context of an incident's suspect (empty when unknown)."""
        return self.incident_headers.get(incident, {})

    def _span(self, what: str, host: str, incident: str, decision: str, reason: str) -> Span:
        """The span of one decision, in its incident's trace even when taken at a timer."""
        return Span(f"arbiter {what} {host}", parent=self.trace_headers(incident), attributes={
            "hafence.host": host, "hafence.incident": incident, "hafence.term": self.term,
            "hafence.decision": decision, "hafence.reason": reason})

    def _tag(self, what: str) -> str:
        self._seq += 1
        return f"{what}:{self._seq}"

    def _learn(self, *terms: int) -> list[Effect]:
        """Report terms the cluster has used, so ours stays above them (S3)."""
        top = max((t for t in terms if isinstance(t, int) and 0 < t <= MAX_TERM), default=0)
        if top <= self.learned:
            return []
        self.learned = top
        return [Call("lease", "learn", (top,))]

    # --- facts in -------------------------------------------------------------

    def _on_fact(self, fact: Fact, delivery: Delivered, now: Now) -> list[Effect]:
        if fact.host not in self.policy.views:
            return [Log("warning", "event for unknown host", {"host": fact.host, "subject": delivery.subject})]
        # The fact's own time, not the time of this (re)play: ``now`` only decides.
        at = on_policy_clock(event_time(fact, delivery.stored_at), now.wall, now.mono)
        if isinstance(fact, FenceResult):
            return self._on_result(fact, at, now)
        if isinstance(fact, Inventory):
            fold(self.policy, fact, at)
            return []
        out: list[Effect] = []
        if fact.kind in ("suspect", "fence_requested") and fact.boot_id:
            boots = self.incident_boot.setdefault(fact.host, {})
            boots.pop(fact.incident, None)  # the newest last
            boots[fact.incident] = fact.boot_id
            while len(boots) > INCIDENT_BOOTS_KEPT:
                del boots[next(iter(boots))]
        if fact.kind == "suspect" and delivery.headers:
            self.incident_headers[fact.incident] = dict(delivery.headers)
        elif fact.kind == "fence_requested":
            out += self._learn(fact.term)
        fold(self.policy, fact, at)
        if fact.kind == "suspect" and delivery.pending == 0 and self.caught_up:
            # Decided on arrival (a suspect with the monitor's late list needs no settle wait);
            # one behind which more are queued waits for them, so a backlog is read before acting.
            out += self._round(now)
        return out

    def _on_result(self, result: FenceResult, at: float, now: Now) -> list[Effect]:
        out = self._learn(result.term, result.highest_term)
        if result.outcome == "refused":
            # The fencer admits nothing below this any more: never send below it again
            # (bounded: a corrupt term must not silence the arbiter for good).
            self.refused_below = min(MAX_TERM, max(self.refused_below, result.highest_term, result.term + 1))
            out += self._learn(self.refused_below)
        sent = self.sending.pop(result.request_id, None)
        if sent is not None:
            # The result of a request whose fence_requested is not stored yet (a fast
            # fencer): the result proves it went out, so the policy learns of it first;
            # else it would drop the result as one for another request.
            self.policy.fence_requested(sent.host, sent.incident, sent.request_id, now.mono, sent.attempt)
        fold(self.policy, result, at)
        if result.outcome == "refused" or not (self.caught_up and self.held(now)):
            return out
        kind = "fenced" if result.outcome == "confirmed_off" else "fence_failed"
        # The result was folded: a lost event is only lost news (the driver logs it), not a lost decision.
        out.append(Publish(
            self.subjects.host_event(result.host, kind),
            HostEvent(host=result.host, kind=kind, at=now.wall, incident=result.incident, reason=result.reason,
                      term=self.term, request_id=result.request_id, alert=kind == "fence_failed",
                      boot_id=result.boot_id or self.boot_of(result.host, result.incident)),
            msg_id=f"{kind}:{result.request_id}",
        ))
        return out

    def _on_lease(self, event: LeaseChanged, now: Now) -> list[Effect]:
        was = self.held(now)
        self.lease_held, self.term, self.valid_until = event.held, event.term, event.valid_until
        if not self.held(now):
            self.reissued = False  # a later leadership re-sends what is in flight again
            return []
        if not was:
            # A new leader acts at once: the requests in flight are re-sent without waiting a tick.
            return self._round(now)
        return []

    # --- decisions out --------------------------------------------------------

    def _round(self, now: Now) -> list[Effect]:
        """Take one round of decisions (unless one is still being carried out)."""
        if not (self.caught_up and self.held(now)):
            if not self.held(now):
                self.reissued = False
            return []
        if self.round_started is not None:
            if now.mono - self.round_started < ROUND_LIMIT_S:
                self.round_wanted = True
                return []
            stale = sorted(self.waiting)
            self.waiting.clear()
            self.round_started = None
            out: list[Effect] = [Log("error", "decision round never finished; giving up on it",
                                     {"waiting": stale})]
            return out + self._round(now)
        self.round_wanted = False
        self.round_started = now.mono
        suspects = sorted(h for h, v in self.policy.views.items() if v.phase in SUSPECT_PHASES)
        if self.config.storage.lease_dir and suspects:
            tag = self._tag("storage")
            self.waiting[tag] = self._decide_with_storage
            return [Call("storage", "live", (suspects, self.config.storage.live_window_s), tag)]
        return self._finish_if_idle(self._decide(now, {}), now)

    def _decide_with_storage(self, returned: Returned, now: Now) -> list[Effect]:
        out: list[Effect] = []
        live: dict[str, bool] = {}
        if returned.ok and isinstance(returned.value, dict):
            live = {str(h): bool(v) for h, v in returned.value.items()}
        else:
            # Unknown is treated as not live, as the policy documents (a host's lease file missing).
            out.append(Log("warning", "storage leases unknown", {"error": returned.error or "no answer"}))
        if not self.held(now):
            return out
        return out + self._decide(now, live)

    def _decide(self, now: Now, live: dict[str, bool]) -> list[Effect]:
        """The round itself: re-issue what is in flight (a new leader), fail what is
        overdue, then the policy's decisions."""
        fences: list[RequestFence] = []
        reissuing: set[str] = set()
        if not self.reissued:
            # A new leader re-sends the requests in flight, under its own term: the fencer
            # answers from its journal if it ran them (S4); if the old leader died before
            # they arrived, this is what finishes the incident.
            self.reissued = True
            for host in self.policy.in_flight():
                view = self.policy.views[host]
                reissuing.add(host)
                fences.append(RequestFence(host, view.incident, view.request_id, REISSUE_REASON, view.attempt or 1))
        out: list[Effect] = []
        for late in deadline.overdue(self.policy.views, now.mono, self.config.timings.fence_deadline_s):
            if late.host not in reissuing:  # re-sent now: its deadline starts again
                out += self._fail_overdue(late, now)
        for phase in Phase:
            metrics.HOSTS.labels(phase).set(sum(1 for v in self.policy.views.values() if v.phase == phase))
        for decision in self.policy.decide(now.mono, live):
            metrics.DECISIONS.labels(type(decision).__name__,
                                     decision.rule if isinstance(decision, SkipFence) else "fence").inc()
            if isinstance(decision, SkipFence):
                out += self._skip(decision, now)
            else:
                fences.append(decision)
        return out + self._fence_all(fences, now)

    def _skip(self, decision: SkipFence, now: Now) -> list[Effect]:
        tag = self._tag("skip")

        def announced(returned: Returned, _now: Now) -> list[Effect]:
            if returned.ok:
                return []
            view = self.policy.views[decision.host]
            if view.held_by == decision.rule:
                view.held_by = ""  # not announced: the policy announces it again at the next tick
            return [Log("error", "decision not published; it will be taken again",
                        {"host": decision.host, "error": returned.error})]

        self.waiting[tag] = announced
        return [
            self._span("skip", decision.host, decision.incident, "SkipFence", decision.reason),
            Log("error" if decision.alert else "warning", "not fencing",
                {"host": decision.host, "rule": decision.rule, "reason": decision.reason}),
            # No message id: a skip may be announced again for the same incident and rule
            # (a repeated alert); a retry after a lost ack may store it twice, which is harmless.
            Publish(self.subjects.host_event(decision.host, "fence_skipped"),
                    HostEvent(host=decision.host, kind="fence_skipped", at=now.wall, incident=decision.incident,
                              reason=decision.reason, term=self.term, rule=decision.rule, alert=decision.alert,
                              boot_id=self.boot_of(decision.host, decision.incident)),
                    tag=tag),
        ]

    def _fence_all(self, fences: list[RequestFence], now: Now) -> list[Effect]:
        if not fences:
            return []
        if self.term >= self.refused_below:
            return [e for fence in fences for e in self._send_request(fence, now)]
        # The fencer refused this term already: raise it first (above every known term),
        # or send nothing (a stale leader). The policy asks again next tick.
        tag = self._tag("raise")

        def raised(returned: Returned, now: Now) -> list[Effect]:
            if not (returned.ok and returned.value is True) or not self.held(now) or self.term < self.refused_below:
                if any(f.reason == REISSUE_REASON for f in fences):
                    self.reissued = False  # the requests in flight are sent again at the next round
                return [Log("warning", "not fencing under a term the fencer refused",
                            {"hosts": [f.host for f in fences], "term": self.term,
                             "refused_below": self.refused_below, "error": returned.error})]
            return [e for fence in fences for e in self._send_request(fence, now)]

        self.waiting[tag] = raised
        return [Call("lease", "raise_term", (), tag)]

    def _send_request(self, decision: RequestFence, now: Now) -> list[Effect]:
        term, boot = self.term, self.boot_of(decision.host, decision.incident)
        request = FenceRequest(
            request_id=decision.request_id, incident=decision.incident, host=decision.host,
            action=self.config.arbiter.action, term=term, requested_at=now.wall, reason=decision.reason,
            method="watchdog" if decision.method == "watchdog" else "topology", boot_id=boot,
        )
        tag = self._tag("request")

        def not_sent(returned: Returned) -> list[Effect]:
            if decision.reason == REISSUE_REASON:
                self.reissued = False  # every request in flight is sent again at the next round
            return [Log("error", "decision not published; it will be taken again",
                        {"host": decision.host, "request_id": decision.request_id, "error": returned.error})]

        def requested(returned: Returned, now: Now) -> list[Effect]:
            if not returned.ok:
                self.sending.pop(decision.request_id, None)
                return not_sent(returned)
            if not self.held(now):
                self.sending.pop(decision.request_id, None)
                return []  # the next leader re-decides (same request id: the fencer's journal de-duplicates)
            event_tag = self._tag("requested")
            self.waiting[event_tag] = recorded
            return [Publish(
                self.subjects.host_event(decision.host, "fence_requested"),
                HostEvent(host=decision.host, kind="fence_requested", at=now.wall, incident=decision.incident,
                          reason=decision.reason, term=term, request_id=decision.request_id,
                          attempt=decision.attempt, boot_id=boot),
                msg_id=f"fence_requested:{decision.request_id}:t{term}", tag=event_tag,
            )]

        def recorded(returned: Returned, now: Now) -> list[Effect]:
            if self.sending.pop(decision.request_id, None) is None:
                return []  # its result came first and was folded with it
            if not returned.ok:
                return not_sent(returned)
            # Both are out: only now does the policy count the request as in flight.
            self.policy.fence_requested(decision.host, decision.incident, decision.request_id, now.mono,
                                        decision.attempt)
            return []

        self.waiting[tag] = requested
        self.sending[decision.request_id] = decision
        return [
            self._span("fence", decision.host, decision.incident, "RequestFence", decision.reason),
            Log("warning", "fencing", {"host": decision.host, "request_id": decision.request_id, "term": term}),
            Publish(self.subjects.fence_request(decision.host), request,
                    msg_id=f"{decision.request_id}:t{term}", tag=tag),
        ]

    def _fail_overdue(self, late: deadline.Overdue, now: Now) -> list[Effect]:
        """A request with no result within the deadline is failed, with an alert."""
        limit = self.config.timings.fence_deadline_s
        reason = (f"no result for fence request {late.request_id} within {limit:g}s "
                  "(fencer down, stuck, or refusing); failed so it is retried and escalated")
        tag = self._tag("overdue")

        def failed(returned: Returned, now: Now) -> list[Effect]:
            if not returned.ok:
                # Not published: the request stays overdue and is failed again at the next tick.
                return [Log("error", "decision not published; it will be taken again",
                            {"host": late.host, "request_id": late.request_id, "error": returned.error})]
            self.policy.fence_result(late.host, late.request_id, "failed", reason, now.mono)
            # The fence_failed event above is the one that counts; a lost alert is only logged.
            return [Publish(self.subjects.alert("fence_deadline"),
                            Alert(kind="fence_deadline", at=now.wall, service="arbiter", reason=reason,
                                  host=late.host, term=self.term),
                            msg_id=f"fence_deadline:{late.request_id}")]

        self.waiting[tag] = failed
        # Published before it is folded: if it cannot be, the request stays overdue.
        return [
            Log("error", "fence past its deadline", {"host": late.host, "request_id": late.request_id}),
            Publish(self.subjects.host_event(late.host, "fence_failed"),
                    HostEvent(host=late.host, kind="fence_failed", at=now.wall, incident=late.incident,
                              reason=reason, term=self.term, request_id=late.request_id, alert=True,
                              boot_id=self.boot_of(late.host, late.incident)),
                    msg_id=f"fence_failed:{late.request_id}", tag=tag),
        ]

    def _on_returned(self, returned: Returned, now: Now) -> list[Effect]:
        then = self.waiting.pop(returned.tag, None)
        if then is None:
            return []  # a round given up on, or an untagged outcome
        return self._finish_if_idle(then(returned, now), now)

    def _finish_if_idle(self, out: list[Effect], now: Now) -> list[Effect]:
        """A round ends when nothing of it is awaited any more; a round asked for
        meanwhile (a suspect arrived) is taken then."""
        if self.waiting:
            return out
        self.round_started = None
        if self.round_wanted:
            return out + self._round(now)
        return out
