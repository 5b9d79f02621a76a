"""The arbiter service: folds host events into the policy core and, while it
holds the lease, carries out the core's decisions.

State comes from replaying the events stream (the stream is the decision
journal: every fence_requested / fence_skipped / fenced event the arbiter ever
published is in it), so a restarted or standby arbiter knows every open
incident. A fence request is published *before* its fence_requested event, with
a request id derived from the incident: if the leader dies in between, the next
leader publishes the same request again, and the fencer's journal makes it a
no-op (S4). Each request carries the leader's term; its message id includes
the term, so a stale leader's request reaches the fencer and is refused there
(S3) instead of silently vanishing as a duplicate.

Terms never go back (S3). The lease learns every arbiter term and fencer
``highest_term`` the replay shows, and is taken only once the replay has caught
up, so a new leader's term is above all of them even if the lease bucket was
recreated. When the fencer refuses a request anyway, the leader
raises its term to above the refusal's ``highest_term`` and the policy re-issues
with a new request id; a leader that cannot raise it (it lost the lease) sends
nothing more under the refused term. A request with no result within ``fence_deadline_s`` is
failed (``fence_failed`` with an alert, and ``alert.fence_deadline``), so the
policy retries and escalates instead of waiting for ever.

Replayed facts keep their own time. Each event is folded at the time it
happened (``HostEvent.at``, a result's ``finished_at``, else when the stream
stored it), carried over to the monotonic clock the policy decides by; ``now``
only decides. So folding the stream gives the same state whenever it is folded:
a host fenced days ago does not count toward the storm guard after a restart,
and a request sent before a restart keeps its deadline.

Boot ids ride through the incident: the monitor's suspect names the boot it
last heard from; the request, the ``fence_requested``/``fenced``/``fence_failed``
events carry it, so the scheduler folds the result against that boot (S6).

A decision whose publish fails (a stream electing its leader) is retried a few
times with back-off (``hafence.retry``); if it still fails, the decision is left
to be taken again at the next tick, and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from pathlib import Path

from nats.aio.msg import Msg
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from hafence import metrics
from hafence.arbiter.deadline import overdue
from hafence.arbiter.policy import Decision, Policy, RequestFence, SkipFence
from hafence.contracts import Alert, Decoders, FenceRequest, FenceResult, HostEvent
from hafence.lease import MAX_TERM, LeaderLease
from hafence.logs import fields
from hafence.retry import NotPublished, publish_retrying
from hafence.service import Runtime
from hafence.telemetry import extract_context, tracer

log = logging.getLogger("hafence.arbiter")


def storage_leases(lease_dir: str, hosts: list[str], live_window_s: float, now: float) -> dict[str, bool]:
    """Which hosts renewed ``<lease_dir>/<host>.lease`` within the window (wall clock, the storage's mtime)."""
    live = {}
    for host in hosts:
        try:
            live[host] = now - os.stat(Path(lease_dir) / f"{host}.lease").st_mtime <= live_window_s
        except OSError:
            live[host] = False
    return live


def event_time(event: HostEvent | FenceResult, stored_at: float | None = None) -> float | None:
    """When a fact happened, on the wall clock: the event's own time (the result's
    end for a result), else when the stream stored it; None when neither is known."""
    at = event.finished_at if isinstance(event, FenceResult) else event.at
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


def fold(policy: Policy, event: HostEvent | FenceResult, at: float) -> None:
    """Fold one fact into the policy, at ``at`` (the fact's own time on the policy's
    clock, ``on_policy_clock``): pure, so a replay gives the same state whenever it runs."""
    if isinstance(event, FenceResult):
        policy.fence_result(event.host, event.request_id, event.outcome, event.reason, at)
        return
    match event.kind:
        case "suspect":
            policy.suspect(event.host, event.incident, at, event.late_hosts)
        case "alive":
            policy.alive(event.host)
        case "fence_requested":
            policy.fence_requested(event.host, event.incident, event.request_id or f"fence-{event.incident}",
                                   at, event.attempt or 1)
        case "confirmed_fenced":
            policy.confirmed_by_operator(event.host)
        case "maintenance_on" | "maintenance_off":
            policy.set_maintenance(event.host, event.kind == "maintenance_on")


def _stored_at(msg: Msg) -> float | None:
    """When the stream stored the message (JetStream metadata), if known."""
    try:
        return msg.metadata.timestamp.timestamp()
    except Exception:  # not a JetStream message (tests)
        return None


def _more_queued(msg: Msg) -> bool:
    """Whether more events wait behind this one in the stream (JetStream metadata)."""
    try:
        return bool(msg.metadata.num_pending)
    except Exception:  # not a JetStream message (tests): nothing known to wait
        return False


async def run(rt: Runtime) -> None:
    bus, config, timings = rt.bus, rt.config, rt.config.timings
    settings = config.arbiter
    subjects = bus.subjects
    kv = await bus.js.key_value(bus.streams.leases)
    # A port: the lab's S3 test binds a lease that never notices its loss (the lab's stale_arbiter module).
    lease_factory: type[LeaderLease] = getattr(rt.args, "lease_factory", LeaderLease)
    lease = lease_factory(kv, "arbiter", rt.instance, timings.lease_ttl_s)
    policy = Policy(
        [h.name for h in config.hosts],
        detection_window_s=timings.detection_window_s,
        started_at=time.monotonic(),
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
    caught_up = asyncio.Event()
    # A suspect that came with the monitor's late list is decided on arrival, not at the next tick.
    decide_now = asyncio.Event()
    # Terms below this were refused by the fencer (from its refusals' highest_term).
    refused_below = 0
    # Trace context of each open incident, so every decision joins the incident's trace.
    incident_context: dict[str, Context] = {}
    # host -> (incident, boot id): the boot the host's latest incident is about (S6).
    incident_boot: dict[str, tuple[str, str]] = {}

    def boot_of(host: str, incident: str) -> str:
        known = incident_boot.get(host)
        return known[1] if known is not None and known[0] == incident else ""

    async def publish(subject: str, message: HostEvent | FenceRequest, msg_id: str = "") -> bool:
        """Publish a decision (retried through a NATS hiccup); False if it could not be."""
        try:
            await publish_retrying(bus, subject, message, msg_id)
            return True
        except NotPublished as err:
            log.error("decision not published; it will be taken again", extra=fields(error=str(err)))
            return False

    async def on_event(event: HostEvent | FenceResult, msg: Msg) -> None:
        nonlocal refused_below
        if event.host not in policy.views:
            log.warning("event for unknown host", extra=fields(host=event.host, subject=msg.subject))
            return
        # The fact's own time, not the time of this (re)play: ``now`` only decides.
        at = on_policy_clock(event_time(event, _stored_at(msg)), time.time(), time.monotonic())
        if isinstance(event, HostEvent) and event.kind in ("suspect", "fence_requested") and event.boot_id:
            incident_boot[event.host] = (event.incident, event.boot_id)
        if isinstance(event, FenceResult):
            # Terms the cluster has used: ours must stay above them (S3).
            lease.learn(event.term)
            lease.learn(event.highest_term)
            if event.outcome == "refused":
                # The fencer admits nothing below this any more: never send below it again
                # (bounded: a corrupt term must not silence the arbiter for good).
                refused_below = min(MAX_TERM, max(refused_below, event.highest_term, event.term + 1))
                lease.learn(refused_below)
            fold(policy, event, at)
            if caught_up.is_set() and lease.held() and event.outcome != "refused":
                kind = "fenced" if event.outcome == "confirmed_off" else "fence_failed"
                # The result was folded: a lost event is only lost news (logged), not a lost decision.
                await publish(
                    subjects.host_event(event.host, kind),
                    HostEvent(host=event.host, kind=kind, at=time.time(), incident=event.incident,
                              reason=event.reason, term=lease.term, request_id=event.request_id,
                              alert=kind == "fence_failed",
                              boot_id=event.boot_id or boot_of(event.host, event.incident)),
                    msg_id=f"{kind}:{event.request_id}",
                )
            return
        if event.kind == "suspect":
            incident_context[event.incident] = extract_context(msg.headers)
        elif event.kind == "fence_requested":
            lease.learn(event.term)
        fold(policy, event, at)
        if event.kind == "suspect" and not _more_queued(msg):  # a resumed arbiter reads its backlog before it acts
            decide_now.set()

    async def carry_out(decision: Decision) -> bool:
        """Carry out one decision; False if it was not (it is taken again next tick)."""
        parent = incident_context.get(decision.incident, Context())
        with tracer().start_as_current_span(
            f"arbiter {'fence' if isinstance(decision, RequestFence) else 'skip'} {decision.host}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={"hafence.host": decision.host, "hafence.incident": decision.incident,
                        "hafence.term": lease.term, "hafence.decision": type(decision).__name__,
                        "hafence.reason": decision.reason},
        ):
            metrics.DECISIONS.labels(type(decision).__name__,
                                     decision.rule if isinstance(decision, SkipFence) else "fence").inc()
            if isinstance(decision, SkipFence):
                (log.error if decision.alert else log.warning)(
                    "not fencing", extra=fields(host=decision.host, rule=decision.rule, reason=decision.reason))
                # No message id: a skip may be announced again for the same incident and rule
                # (a repeated alert); a retry after a lost ack may store it twice, which is harmless.
                if not await publish(
                    subjects.host_event(decision.host, "fence_skipped"),
                    HostEvent(host=decision.host, kind="fence_skipped", at=time.time(), incident=decision.incident,
                              reason=decision.reason, term=lease.term, rule=decision.rule, alert=decision.alert,
                              boot_id=boot_of(decision.host, decision.incident)),
                ):
                    # Not announced: let the policy announce it again at the next tick.
                    policy.views[decision.host].held_by = ""
                    return False
                return True
            if lease.term < refused_below and not await lease.raise_term():
                # The fencer refused this term already: raise it first (above every known
                # term), or send nothing (a stale leader). The policy asks again next tick.
                log.warning("not fencing under a term the fencer refused",
                            extra=fields(host=decision.host, term=lease.term, refused_below=refused_below))
                return False
            boot = boot_of(decision.host, decision.incident)
            request = FenceRequest(
                request_id=decision.request_id, incident=decision.incident, host=decision.host,
                action=settings.action, term=lease.term, requested_at=time.time(), reason=decision.reason,
                method="watchdog" if decision.method == "watchdog" else "topology", boot_id=boot,
            )
            log.warning("fencing", extra=fields(host=decision.host, request_id=decision.request_id, term=lease.term))
            # The policy learns of the request only once both are out: a publish that
            # fails leaves the decision to be taken again (same request id and message
            # ids, so what did get through is not stored twice).
            if not await publish(subjects.fence_request(decision.host), request,
                                 msg_id=f"{decision.request_id}:t{lease.term}"):
                return False
            if not await publish(
                subjects.host_event(decision.host, "fence_requested"),
                HostEvent(host=decision.host, kind="fence_requested", at=time.time(), incident=decision.incident,
                          reason=decision.reason, term=lease.term, request_id=decision.request_id,
                          attempt=decision.attempt, boot_id=boot),
                msg_id=f"fence_requested:{decision.request_id}:t{lease.term}",
            ):
                return False
            policy.fence_requested(decision.host, decision.incident, decision.request_id, time.monotonic(),
                                   decision.attempt)
            return True

    def storage_view() -> dict[str, bool]:
        if not config.storage.lease_dir:
            return {}
        suspects = [h for h, v in policy.views.items() if v.phase == "suspect"]
        return storage_leases(config.storage.lease_dir, suspects, config.storage.live_window_s, time.time())

    async def decide_loop() -> None:
        await caught_up.wait()
        reissued = False
        while True:
            try:
                await asyncio.wait_for(decide_now.wait(), timings.heartbeat_interval_s / 4)
            except TimeoutError:
                pass
            decide_now.clear()
            if not lease.held():
                reissued = False
                continue
            if not reissued:
                reissued = await reissue_in_flight()
            await fail_overdue()
            live = await asyncio.to_thread(storage_view)
            for phase in ("up", "suspect", "fencing", "fenced", "fence_failed"):
                metrics.HOSTS.labels(phase).set(sum(1 for v in policy.views.values() if v.phase == phase))
            for decision in policy.decide(time.monotonic(), live):
                await carry_out(decision)

    async def fail_overdue() -> None:
        """A request with no result within the deadline is failed, with an alert."""
        deadline = timings.fence_deadline_s
        for late in overdue(policy.views, time.monotonic(), deadline):
            reason = (f"no result for fence request {late.request_id} within {deadline:g}s "
                      "(fencer down, stuck, or refusing); failed so it is retried and escalated")
            log.error("fence past its deadline", extra=fields(host=late.host, request_id=late.request_id))
            # Published before it is folded: if it cannot be, the request stays overdue
            # and is failed again at the next tick.
            if not await publish(
                subjects.host_event(late.host, "fence_failed"),
                HostEvent(host=late.host, kind="fence_failed", at=time.time(), incident=late.incident,
                          reason=reason, term=lease.term, request_id=late.request_id, alert=True,
                          boot_id=boot_of(late.host, late.incident)),
                msg_id=f"fence_failed:{late.request_id}",
            ):
                continue
            policy.fence_result(late.host, late.request_id, "failed", reason, time.monotonic())
            try:
                await bus.publish(subjects.alert("fence_deadline"), Alert(
                    kind="fence_deadline", at=time.time(), service="arbiter", reason=reason, host=late.host,
                    term=lease.term), msg_id=f"fence_deadline:{late.request_id}")
            except Exception as err:  # the fence_failed event above is the one that counts
                log.error("cannot publish alert", extra=fields(kind="fence_deadline", error=str(err)))

    async def reissue_in_flight() -> bool:
        """A new leader re-sends the requests in flight, under its own term: the
        fencer answers from its journal if it ran them (S4); if the old leader died
        before they arrived, this is what finishes the incident. False if one could
        not be sent (all are sent again at the next tick)."""
        done = True
        for host in policy.in_flight():
            view = policy.views[host]
            done = await carry_out(RequestFence(host, view.incident, view.request_id,
                                                "re-issued by a new arbiter leader", view.attempt or 1)) and done
        return done

    filters = [
        subjects.host_events(kind)
        for kind in ("suspect", "alive", "fence_requested", "confirmed_fenced", "maintenance_on", "maintenance_off")
    ] + [subjects.fence_results()]
    async with asyncio.TaskGroup() as tg:
        # The lease is taken only after the replay: its term must be above every term in it.
        tg.create_task(lease.run(ready=caught_up))
        tg.create_task(bus.replay(filters, Decoders.arbiter_input, on_event, caught_up))
        tg.create_task(decide_loop())
