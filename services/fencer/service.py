"""The fencer service: a durable work-queue consumer of fence requests.

For each request: refuse it if its term is older than the newest seen (S3);
answer a redelivery from the journal (S4); otherwise run the host's topology,
journal the result, publish it, and only then ack. A fencer killed mid-request
gets the request redelivered and runs it again: the power state is read back
from the devices, never assumed.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.context import Context

from hafence import metrics
from hafence.bus import Reject
from hafence.contracts import Decoders, FenceRequest, FenceResult, HostEvent
from hafence.fencer.admission import admit
from hafence.fencer.executor import Executor
from hafence.fencer.journal import FenceJournal
from hafence.logs import fields
from hafence.service import Runtime
from hafence.telemetry import tracer

log = logging.getLogger("hafence.fencer")


async def run(rt: Runtime) -> None:
    bus, config = rt.bus, rt.config
    subjects = bus.subjects
    hosts = {h.name: h for h in config.hosts}
    executor = Executor(config)
    journal = await FenceJournal.open(rt.db_path("fencer.db"))
    host_locks: dict[str, asyncio.Lock] = {h: asyncio.Lock() for h in hosts}
    ack_wait = config.timings.fence_ack_wait_s
    await bus.ensure_consumer(bus.streams.fence_requests, "fencer", [subjects.fence_requests()], ack_wait=ack_wait)

    async def publish(result: FenceResult) -> None:
        await bus.publish(subjects.fence_result(result.host), result, msg_id=f"result:{result.request_id}")

    async def keep_alive(msg: Msg) -> None:
        while True:
            await asyncio.sleep(ack_wait / 3)
            await msg.in_progress()

    async def on_request(request: FenceRequest, msg: Msg) -> None:
        if msg.subject != subjects.fence_request(request.host):
            raise Reject(f"request for host {request.host!r} on subject {msg.subject}")
        span = trace.get_current_span()
        span.set_attributes({"hafence.host": request.host, "hafence.request_id": request.request_id,
                             "hafence.term": request.term})
        started = time.time()
        admission = admit(request.term, await journal.highest_term())
        if not admission.admitted or request.host not in hosts:
            # S3 before S4: a stale leader is told so, even for a request id that ran.
            reason = admission.reason or f"host {request.host!r} is not in the fencer's configuration"
            log.error("refusing fence request", extra=fields(request_id=request.request_id, reason=reason))
            result = FenceResult(
                request_id=request.request_id, incident=request.incident, host=request.host, term=request.term,
                outcome="refused", reason=reason, started_at=started, finished_at=time.time(),
            )
            span.set_attribute("hafence.outcome", "refused")
            await journal.record_refusal(request, reason)
            await bus.publish(subjects.fence_result(request.host), result,
                              msg_id=f"refused:{request.request_id}:t{request.term}")
            return
        recorded = await journal.recorded(request.request_id)
        if recorded is not None:
            log.info("redelivered request: answering from the journal",
                     extra=fields(request_id=request.request_id, outcome=recorded.outcome))
            span.set_attribute("hafence.outcome", recorded.outcome)
            await publish(recorded)
            return
        attempts = await journal.admit(request)
        if attempts > 1:
            log.warning("resuming a fence interrupted before it was recorded; reading power state again",
                        extra=fields(request_id=request.request_id, attempts=attempts))
        async with host_locks[request.host]:
            with tracer().start_as_current_span(
                f"fence {request.host}",
                attributes={"hafence.host": request.host, "hafence.action": request.action,
                            "hafence.request_id": request.request_id},
            ) as fence_span:
                async with asyncio.TaskGroup() as tg:
                    pinger = tg.create_task(keep_alive(msg))
                    try:
                        report = await executor.fence(hosts[request.host], request.action)
                    finally:
                        pinger.cancel()
                fence_span.set_attribute("hafence.outcome", report.verdict.outcome)
        result = FenceResult(
            request_id=request.request_id, incident=request.incident, host=request.host, term=request.term,
            outcome=report.verdict.outcome, level=report.verdict.level, evidence=report.evidence,
            reason=report.verdict.reason, started_at=started, finished_at=time.time(),
        )
        await journal.record(request, result)
        metrics.FENCES.labels(request.host, result.outcome).inc()
        metrics.FENCE_SECONDS.labels(result.outcome).observe(result.finished_at - started)
        log.warning("fence finished", extra=fields(host=request.host, outcome=result.outcome, reason=result.reason))
        span.set_attribute("hafence.outcome", result.outcome)
        await publish(result)

    async def health() -> None:
        """Check every host's devices; announce changes of protection."""
        known: dict[str, bool] = {}
        while True:
            for host in config.hosts:
                with tracer().start_as_current_span(f"check protection {host.name}", context=Context()):
                    verdict = await executor.check_host(host)
                metrics.PROTECTED.labels(host.name).set(1 if verdict.protected else 0)
                if known.get(host.name) != verdict.protected:
                    known[host.name] = verdict.protected
                    kind = "protected" if verdict.protected else "not_protected"
                    (log.info if verdict.protected else log.error)(
                        "host protection", extra=fields(host=host.name, protected=verdict.protected,
                                                        reason=verdict.reason)
                    )
                    await bus.publish(
                        subjects.host_event(host.name, kind),
                        HostEvent(host=host.name, kind=kind, at=time.time(), reason=verdict.reason),
                    )
            await asyncio.sleep(config.fencer.health_interval_s)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(health())
            tg.create_task(bus.consume(
                bus.streams.fence_requests, "fencer", Decoders.fence_request, on_request, concurrency=16
            ))
    finally:
        await asyncio.shield(executor.close())
        await asyncio.shield(journal.close())
