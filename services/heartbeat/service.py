"""The heartbeat service: feeds heartbeats and the clock into the liveness core.

Every replica watches every heartbeat (warm standby); only the lease holder
publishes. On taking over, the new leader re-publishes the current suspects:
the ids are deterministic, so JetStream de-duplicates what was already sent.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

from nats.aio.msg import Msg
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from hafence import metrics
from hafence.bus import Reject
from hafence.contracts import Decoders, Heartbeat, HostEvent
from hafence.heartbeat.liveness import Alive, Liveness, Suspect, Transition, UnknownHost
from hafence.lease import LeaderLease
from hafence.logs import fields
from hafence.service import Runtime
from hafence.telemetry import tracer

log = logging.getLogger("hafence.heartbeat")


async def run(rt: Runtime) -> None:
    bus, timings = rt.bus, rt.config.timings
    kv = await bus.js.key_value(bus.streams.leases)
    lease = LeaderLease(kv, "heartbeat", rt.instance, timings.lease_ttl_s)
    # A fresh nonce per lifetime: a host silent since start gets a new incident every time (S4).
    core = Liveness(
        [h.name for h in rt.config.hosts], timings.heartbeat_interval_s, timings.missed_heartbeats,
        time.monotonic(), nonce=secrets.token_hex(8),
    )
    wall_offset = time.time() - time.monotonic()
    warned: set[str] = set()
    published_as_leader = False

    async def emit(transitions: list[Transition]) -> None:
        if not lease.held():
            return
        for t in transitions:
            if isinstance(t, Suspect):
                # The root span of the incident: everything downstream is its child.
                with tracer().start_as_current_span(
                    f"host suspect {t.host}",
                    context=Context(),
                    kind=SpanKind.PRODUCER,
                    attributes={"hafence.host": t.host, "hafence.incident": t.incident,
                                "hafence.silent_for_s": round(t.silent_for, 3), "hafence.term": lease.term},
                ):
                    log.warning("host is suspect", extra=fields(host=t.host, incident=t.incident))
                    event = HostEvent(
                        host=t.host, kind="suspect", at=time.time(), incident=t.incident,
                        reason=f"no heartbeat for {t.silent_for:.1f}s (window {core.window:.1f}s)",
                        term=lease.term, last_seen=t.last_seen + wall_offset,
                    )
                    await bus.publish(bus.subjects.host_event(t.host, "suspect"), event, msg_id=f"suspect:{t.incident}")
            elif isinstance(t, Alive):
                log.info("host is alive", extra=fields(host=t.host, was_suspect=t.was_suspect))
                event = HostEvent(host=t.host, kind="alive", at=time.time(), term=lease.term,
                                  reason="heartbeat received" + (" after suspicion" if t.was_suspect else ""))
                await bus.publish(bus.subjects.host_event(t.host, "alive"), event)

    async def on_heartbeat(hb: Heartbeat, msg: Msg) -> None:
        if msg.subject != bus.subjects.hb(hb.host):
            raise Reject(f"heartbeat of host {hb.host!r} on subject {msg.subject}")
        metrics.HEARTBEATS.labels(hb.host).inc()
        try:
            transitions = core.heartbeat(hb.host, hb.boot_id, hb.seq, time.monotonic())
        except UnknownHost:
            if hb.host not in warned:
                warned.add(hb.host)
                raise Reject(f"host {hb.host!r} is not in the cluster configuration") from None
            return
        await emit(transitions)

    async def ticker() -> None:
        nonlocal published_as_leader
        while True:
            asleep_at = time.monotonic()
            await asyncio.sleep(timings.heartbeat_interval_s / 4)
            # How late this tick ran: a starved monitor (L4) shows here before it misjudges anyone.
            metrics.MONITOR_LAG.set(max(0.0, time.monotonic() - asleep_at - timings.heartbeat_interval_s / 4))
            transitions = core.tick(time.monotonic())
            for state in ("alive", "suspect", "unknown"):
                metrics.HOSTS.labels(state).set(sum(1 for h in rt.config.hosts if core.state(h.name) == state))
            if lease.held() and not published_as_leader:
                published_as_leader = True
                # Announce what is already suspect: the old leader may have died before it could.
                transitions = [*core.suspects(), *transitions]
                transitions = list({t.host: t for t in transitions}.values())
            elif not lease.held():
                published_as_leader = False
            await emit(transitions)

    async def serve() -> None:
        await bus.serve(bus.subjects.hb_all(), Decoders.heartbeat, on_heartbeat)

    async with asyncio.TaskGroup() as tg:
        tg.create_task(lease.run())
        tg.create_task(serve())
        tg.create_task(ticker())
