"""The fencer service: a durable work-queue consumer of fence requests.

For each request, in this order (S3 and S4 under concurrency):

1. take the host's lock, telling JetStream the message is in progress while
   waiting for it (so it is not redelivered to a second handler meanwhile);
2. in one journal transaction: refuse the request if its term is older than the
   newest admitted (S3), else raise the newest term, and answer from the journal
   if this very request (id, incident and host) was recorded (S4), else record it;
3. run the host's topology, journal the result, and only then publish and ack.

Every result carries the request's ``boot_id`` (the boot of the host the
incident is about), so the scheduler folds it against that boot's inventory (S6).

A request redelivered, or re-issued with the same request id, while the first
one runs waits at step 1 and gets the recorded result at step 2: the host is
power-cycled once. A fencer killed mid-request gets the request redelivered and
runs it again: the power state is read back from the devices, never assumed.

A refusal carries the fencer's highest term (``highest_term``), so a new arbiter
leader can take a term above it, and raises an alert (``alert.fence_refused``).

Any number of replicas may run (docs/fencer-replicas.md). Step 2 is checked
against the state every replica shares first (``replicas.SharedRequests``: the
highest term, the request's record), then the request is **claimed** across
replicas before this replica's journal admits it; a redelivery that reaches
another replica waits for the claim's result, or for the claim to expire. Every
device operation holds the device's lock across replicas (``locks.KvLocks``).
A replica that cannot renew its claim in time stops, publishes nothing, and
leaves the request to the replica that takes it over.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import AbstractAsyncContextManager

from nats.aio.msg import Msg
from opentelemetry import trace
from opentelemetry.context import Context

from hafence import metrics
from hafence.bus import Reject, Retry
from hafence.bus.provision import fencer_locks_bucket, fencer_state_bucket
from hafence.contracts import Alert, Decoders, FenceRequest, FenceResult, HostEvent
from hafence.fencer.admission import Answer, Refuse, Run
from hafence.fencer.drivers import make_driver
from hafence.fencer.drivers.watchdog import fencer_context, levels_for, uses_watchdog, watch_views
from hafence.fencer.executor import Executor
from hafence.fencer.journal import FenceJournal
from hafence.fencer.locks import KvLocks, LockLost, Token, kv_key
from hafence.fencer.replicas import SharedRequests
from hafence.logs import fields
from hafence.service import Runtime
from hafence.telemetry import tracer

log = logging.getLogger("hafence.fencer")


async def run(rt: Runtime) -> None:
    bus, config = rt.bus, rt.config
    subjects = bus.subjects
    hosts = {h.name: h for h in config.hosts}
    locks_kv = await bus.js.key_value(fencer_locks_bucket(bus.streams))
    ttl = (await locks_kv.status()).ttl
    if not ttl:
        raise RuntimeError(f"bucket {fencer_locks_bucket(bus.streams)} has no TTL: a dead replica's locks would "
                           "never expire; run `hafence deploy provision --config FILE`")
    # The bucket's TTL, not the config's: the server expires keys by it.
    locks = KvLocks(locks_kv, rt.instance, ttl)
    shared = SharedRequests(await bus.js.key_value(fencer_state_bucket(bus.streams)), locks)

    def device_lock(lock_key: str) -> AbstractAsyncContextManager[Token]:
        return locks.hold(kv_key("dev", lock_key), f"device {lock_key}")

    # The watchdog level watches the monitor's views (docs/watchdog.md).
    watchdog = fencer_context(config, lambda: int(bus.nc.stats["reconnects"]))
    executor = Executor(config, device_lock=device_lock,
                        driver_factory=lambda name, device, port: make_driver(name, device, port, watchdog))
    journal = await FenceJournal.open(rt.db_path("fencer.db"))
    host_locks: dict[str, asyncio.Lock] = {h: asyncio.Lock() for h in hosts}
    ack_wait = config.timings.fence_ack_wait_s
    await bus.ensure_consumer(bus.streams.fence_requests, "fencer", [subjects.fence_requests()], ack_wait=ack_wait)

    async def keep_alive(msg: Msg) -> None:
        while True:
            await asyncio.sleep(ack_wait / 3)
            await msg.in_progress()

    async def alert(kind: str, request: FenceRequest, reason: str) -> None:
        """Best effort: the result is what the arbiter acts on; an alert that cannot
        be published (NATS permissions, a full stream) must not block it."""
        try:
            await bus.publish(subjects.alert(kind), Alert(kind=kind, at=time.time(), service="fencer",
                                                           reason=reason, host=request.host, term=request.term),
                              msg_id=f"{kind}:{request.request_id}:t{request.term}")
        except Exception as err:
            log.error("cannot publish alert", extra=fields(kind=kind, error=str(err)))

    def refused(request: FenceRequest, reason: str, highest: int, started: float) -> tuple[FenceResult, str]:
        log.error("refusing fence request", extra=fields(request_id=request.request_id, reason=reason))
        return FenceResult(
            request_id=request.request_id, incident=request.incident, host=request.host,
            term=request.term, outcome="refused", reason=reason, started_at=started,
            finished_at=time.time(), highest_term=highest, boot_id=request.boot_id,
        ), f"refused:{request.request_id}:t{request.term}"

    def answered(request: FenceRequest, recorded: FenceResult, where: str) -> tuple[FenceResult, str]:
        log.info(f"request seen before: answering from the {where}",
                 extra=fields(request_id=request.request_id, outcome=recorded.outcome))
        return recorded, f"result:{request.request_id}"

    async def decide(request: FenceRequest) -> tuple[FenceResult, str]:
        """Steps 1-3 under the host's lock; returns the result and its message id."""
        started = time.time()
        async with host_locks[request.host]:
            # Across replicas first: a term another replica admitted, a request another ran.
            match await shared.admit(request):
                case Refuse(reason=reason, highest=highest):
                    return refused(request, reason, highest, started)
                case Answer(result=recorded):
                    return answered(request, recorded, "record another replica wrote")
                case Run(highest=highest):
                    pass
            try:
                async with shared.claim(request, highest) as claim:
                    if isinstance(claim, Answer):
                        return answered(request, claim.result, "record another replica wrote")
                    return await run_claimed(request, started, claim, highest)
            except LockLost as err:
                # Paused or cut off past the claim's validity: another replica may be
                # running it now. Publish nothing; the request is redelivered to whoever
                # holds the claim, or waits for it.
                raise Retry(f"request {request.request_id}: {err}", delay=ack_wait) from None

    async def run_claimed(request: FenceRequest, started: float, token: Token,
                          shared_highest: int) -> tuple[FenceResult, str]:
        """Under the claim: this replica's journal (S3/S4 as before), then the fence."""
        verdict = await journal.admit(request)
        match verdict:
            case Refuse(reason=reason, highest=highest):
                # This replica's journal knew a newer term than the bucket (the bucket
                # was recreated): every replica learns it.
                await shared.raise_term(highest)
                return refused(request, reason, highest, started)
            case Answer(result=recorded):
                await shared.record(request, recorded)
                return answered(request, recorded, "journal")
            case Run(attempts=attempts, highest=local_highest):
                highest = max(local_highest, shared_highest)
                if attempts > 1:
                    log.warning("resuming a fence interrupted before it was recorded; reading power state again",
                                extra=fields(request_id=request.request_id, attempts=attempts))
        with tracer().start_as_current_span(
            f"fence {request.host}",
            attributes={"hafence.host": request.host, "hafence.action": request.action,
                        "hafence.request_id": request.request_id, "hafence.claim_token": token.fence},
        ) as fence_span:
            report = await executor.fence(levels_for(config, hosts[request.host], request.method), request.action)
            fence_span.set_attribute("hafence.outcome", report.verdict.outcome)
        result = FenceResult(
            request_id=request.request_id, incident=request.incident, host=request.host, term=request.term,
            outcome=report.verdict.outcome, level=report.verdict.level, evidence=report.evidence,
            reason=report.verdict.reason, started_at=started, finished_at=time.time(), boot_id=request.boot_id,
            highest_term=highest,
        )
        if locks.now() >= token.valid_until:
            # The claim's deadline is due but has not fired yet: a result taken past it
            # is never recorded (another replica may own the request now).
            raise LockLost(f"claim on request {request.request_id} expired before its result was recorded")
        await journal.record(request, result)
        await shared.record(request, result)
        metrics.FENCES.labels(request.host, result.outcome).inc()
        metrics.FENCE_SECONDS.labels(result.outcome).observe(result.finished_at - started)
        log.warning("fence finished", extra=fields(host=request.host, outcome=result.outcome, reason=result.reason))
        return result, f"result:{request.request_id}"

    async def on_request(request: FenceRequest, msg: Msg) -> None:
        if msg.subject != subjects.fence_request(request.host):
            raise Reject(f"request for host {request.host!r} on subject {msg.subject}")
        span = trace.get_current_span()
        span.set_attributes({"hafence.host": request.host, "hafence.request_id": request.request_id,
                             "hafence.term": request.term})
        if request.host not in hosts:
            # Not a matter of terms: this fencer cannot fence the host. A failure, so the
            # arbiter retries and escalates, instead of re-issuing into the same wall.
            reason = f"host {request.host!r} is not in the fencer's configuration"
            log.error("cannot fence", extra=fields(request_id=request.request_id, reason=reason))
            now = time.time()
            await bus.publish(subjects.fence_result(request.host), FenceResult(
                request_id=request.request_id, incident=request.incident, host=request.host, term=request.term,
                outcome="failed", reason=reason, started_at=now, finished_at=now, boot_id=request.boot_id,
            ), msg_id=f"result:{request.request_id}")
            return
        async with asyncio.TaskGroup() as tg:
            # In progress while waiting for the host's lock too: a request that waits
            # behind another must not be redelivered to a second handler.
            pinger = tg.create_task(keep_alive(msg))
            try:
                result, msg_id = await decide(request)
            finally:
                pinger.cancel()
        span.set_attribute("hafence.outcome", result.outcome)
        await bus.publish(subjects.fence_result(request.host), result, msg_id=msg_id)
        if result.outcome == "refused":
            await alert("fence_refused", request, result.reason)

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
            if uses_watchdog(config):
                tg.create_task(watch_views(bus, watchdog.views))
            tg.create_task(bus.consume(
                bus.streams.fence_requests, "fencer", Decoders.fence_request, on_request, concurrency=16
            ))
    finally:
        await asyncio.shield(executor.close())
        await asyncio.shield(journal.close())
