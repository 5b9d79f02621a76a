"""The arbiter service: folds host events into the policy core and, while it
holds the lease, carries out the core's decisions.

State comes from replaying the events stream (the stream is the decision
journal: every fence_requested / fence_skipped / fenced event the arbiter ever
published is in it), so a restarted or standby arbiter knows every open
incident. A fence request is published *before* its fence_requested event, with
a request id derived from the incident: if the leader dies in between, the next
leader publishes the same request again and JetStream and the fencer's journal
make it a no-op (S4).
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from hafence.arbiter.policy import Decision, Policy, RequestFence, SkipFence
from hafence.contracts import Decoders, FenceRequest, FenceResult, HostEvent
from hafence.lease import LeaderLease
from hafence.logs import fields
from hafence.service import Runtime
from hafence.telemetry import extract_context, tracer

log = logging.getLogger("hafence.arbiter")


async def run(rt: Runtime) -> None:
    bus, config, timings = rt.bus, rt.config, rt.config.timings
    subjects = bus.subjects
    kv = await bus.js.key_value(bus.streams.leases)
    lease = LeaderLease(kv, "arbiter", rt.instance, timings.lease_ttl_s)
    policy = Policy(
        [h.name for h in config.hosts],
        detection_window_s=timings.detection_window_s,
        started_at=time.monotonic(),
        settle_s=timings.heartbeat_interval_s,
        max_concurrent=config.arbiter.max_concurrent_fences,
    )
    for host in config.hosts:
        policy.set_maintenance(host.name, host.maintenance)
    caught_up = asyncio.Event()
    # Trace context of each open incident, so the decision joins the incident's trace.
    incident_context: dict[str, Context] = {}

    async def on_event(event: HostEvent | FenceResult, msg: Msg) -> None:
        now = time.monotonic()
        if event.host not in policy.views:
            log.warning("event for unknown host", extra=fields(host=event.host, subject=msg.subject))
            return
        if isinstance(event, FenceResult):
            policy.fence_result(event.host, event.request_id, event.outcome == "confirmed_off", event.reason)
            if caught_up.is_set() and lease.held():
                kind = "fenced" if event.outcome == "confirmed_off" else "fence_failed"
                await bus.publish(
                    subjects.host_event(event.host, kind),
                    HostEvent(host=event.host, kind=kind, at=time.time(), incident=event.incident,
                              reason=event.reason, term=lease.term),
                    msg_id=f"{kind}:{event.request_id}",
                )
            return
        match event.kind:
            case "suspect":
                incident_context[event.incident] = extract_context(msg.headers)
                policy.suspect(event.host, event.incident, now)
            case "alive":
                policy.alive(event.host)
            case "fence_requested":
                policy.fence_requested(event.host, event.incident, f"fence-{event.incident}", now)

    async def carry_out(decision: Decision) -> None:
        parent = incident_context.get(decision.incident, Context())
        with tracer().start_as_current_span(
            f"arbiter decide {decision.host}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes={"hafence.host": decision.host, "hafence.incident": decision.incident,
                        "hafence.term": lease.term, "hafence.decision": type(decision).__name__,
                        "hafence.reason": decision.reason},
        ):
            if isinstance(decision, SkipFence):
                log.warning("not fencing", extra=fields(host=decision.host, rule=decision.rule, reason=decision.reason))
                await bus.publish(
                    subjects.host_event(decision.host, "fence_skipped"),
                    HostEvent(host=decision.host, kind="fence_skipped", at=time.time(),
                              incident=decision.incident, reason=decision.reason, term=lease.term),
                )
                return
            assert isinstance(decision, RequestFence)
            request = FenceRequest(
                request_id=decision.request_id, incident=decision.incident, host=decision.host,
                action=config.arbiter.action, term=lease.term, requested_at=time.time(), reason=decision.reason,
            )
            log.warning("fencing", extra=fields(host=decision.host, request_id=decision.request_id, term=lease.term))
            await bus.publish(subjects.fence_request(decision.host), request, msg_id=decision.request_id)
            await bus.publish(
                subjects.host_event(decision.host, "fence_requested"),
                HostEvent(host=decision.host, kind="fence_requested", at=time.time(),
                          incident=decision.incident, reason=decision.reason, term=lease.term),
                msg_id=f"fence_requested:{decision.request_id}",
            )
            policy.fence_requested(decision.host, decision.incident, decision.request_id, time.monotonic())

    async def decide_loop() -> None:
        await caught_up.wait()
        reissued = False
        while True:
            await asyncio.sleep(timings.heartbeat_interval_s / 4)
            if not lease.held():
                reissued = False
                continue
            if not reissued:
                reissued = True
                await reissue_in_flight()
            for decision in policy.decide(time.monotonic()):
                await carry_out(decision)

    async def reissue_in_flight() -> None:
        """A new leader re-sends the requests in flight: a no-op if they arrived (S4),
        the rescue of the incident if the old leader died before they did."""
        for host in policy.in_flight():
            view = policy.views[host]
            await carry_out(RequestFence(host, view.incident, view.request_id, "re-issued by a new arbiter leader"))

    filters = [
        subjects.host_events("suspect"),
        subjects.host_events("alive"),
        subjects.host_events("fence_requested"),
        subjects.fence_results(),
    ]
    async with asyncio.TaskGroup() as tg:
        tg.create_task(lease.run())
        tg.create_task(bus.replay(filters, Decoders.arbiter_input, on_event, caught_up))
        tg.create_task(decide_loop())
