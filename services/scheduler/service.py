"""The scheduler service: folds the events stream into ``SchedulerState`` and,
while it holds the lease, restarts lost HA VMs through the agents.

Every start is keyed by (VM, incident) in the scheduler's database and written
before the command is sent, so a scheduler restarted mid-failover sends a start
again only to the host it chose before, and the agent answers "already
running" if it did start. VMs of one failover start in parallel: the starts of a
wave are recorded in one transaction (one fsync) before any of its commands is
sent, and their results a wave at a time.

The rules (which host to ask again, when a VM moves on, S6's quarantine and
duplicates) are the pure core's (``state.py``); this shell feeds it the events
stream and carries out its effects: VmStart, VmStop of a duplicate copy on a
quarantined host, ``duplicate``/``stopped`` VM events, ``vm_duplicate`` alerts and
``cleared`` host events.

VM-level HA (``restarts.py``, docs/vm-ha.md): an HA VM that failed on a live host
is announced (``crashed``), restarted in the background (a stop confirmed by the
failing host first when it moves elsewhere), and its ``restarted``/``failed``
events are folded back, so the count of restarts survives a restart of the
scheduler; a VM past its limit gets ``restart_limit`` and a ``vm_restart_limit``
alert. Each restart is a span whose parent is the agent's failure report.

VM events are published with a message id that says which fact they are
(``vm_event_id``: VM, incident, kind, target, and the attempt or the reason where
one fact can happen more than once), and retried through a NATS hiccup
(``hafence.retry``): a stream electing its leader must not lose a ``started`` or
a ``placed``, and a retry whose first try did get through is not stored twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zlib

import msgspec
import nats.errors
from nats.aio.msg import Msg
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind, Status, StatusCode

from hafence import metrics
from hafence.contracts import Alert, Decoders, FenceResult, HostEvent, Inventory, VmEvent, VmStart, VmStop
from hafence.lease import LeaderLease
from hafence.logs import fields
from hafence.retry import NotPublished, publish_retrying
from hafence.scheduler.placement import Pending, largest_host_loss_absorbed, place
from hafence.scheduler.restarts import AnnounceFailure, Outcome, RestartLimit, RestartPending, RestartVm
from hafence.scheduler.state import ClearHost, Duplicate, Effect, LostVm, ReservationGate, SchedulerState, StopCopy
from hafence.service import Runtime, stop_if_cancelled
from hafence.store import open_store, write_many
from hafence.telemetry import extract_context, tracer

log = logging.getLogger("hafence.scheduler")

MIGRATIONS = [
    """
    CREATE TABLE starts (
        vm TEXT NOT NULL,
        incident TEXT NOT NULL,
        target TEXT NOT NULL,
        state TEXT NOT NULL,          -- sending, started, failed
        error TEXT NOT NULL DEFAULT '',
        at REAL NOT NULL,
        PRIMARY KEY (vm, incident, target)
    );
    """,
    # A wave reads the history of its incidents in one query each.
    "CREATE INDEX starts_by_incident ON starts (incident, at);",
]
RECORD_START = """INSERT INTO starts (vm, incident, target, state, error, at) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (vm, incident, target) DO UPDATE SET state = excluded.state, error = excluded.error, at = excluded.at"""
# Commands in flight at once (starts and restarts). Agents bound their own parallel
# starts; this only bounds the scheduler's own tasks and reply inboxes.
COMMANDS_IN_FLIGHT = 128
# The HA reservation check (a walk over every host) runs at most this often, and
# only when capacity changed (``ReservationGate``).
RESERVATION_EVERY_S = 1.0


def vm_event_id(event: VmEvent, attempt: int = 0) -> str:
    """The message id of a VM event: the same fact twice (a retry whose ack was
    lost, a new leader announcing it again) is one message in the stream. A fact
    is the VM, the incident (or failure), the kind and the target; a restart's
    events also the attempt; ``failed`` and ``pending`` also their reason, since one
    target can fail, or one VM wait, for several reasons in one incident. ``duplicate``
    and ``stopped`` have no id: the same copy can come back, and must be told again."""
    parts = ["vm", event.vm, event.incident, event.kind, event.target]
    if attempt:
        parts.append(f"a{attempt}")
    if event.kind in ("failed", "pending"):
        parts.append(f"{zlib.crc32(event.reason.encode()):08x}")
    return ":".join(parts)


async def run(rt: Runtime) -> None:
    bus, config = rt.bus, rt.config
    subjects = bus.subjects
    kv = await bus.js.key_value(bus.streams.leases)
    lease = LeaderLease(kv, "scheduler", rt.instance, config.timings.lease_ttl_s)
    db = await open_store(rt.db_path("scheduler.db"), MIGRATIONS)
    state = SchedulerState.from_config(config)
    caught_up = asyncio.Event()
    wake = asyncio.Event()
    incident_context: dict[str, Context] = {}
    announced_pending: dict[str, str] = {}
    slots = asyncio.Semaphore(COMMANDS_IN_FLIGHT)
    fence_confirmed_at: dict[str, float] = {}
    failover_remaining: dict[str, set[str]] = {}
    # VM-level HA: the trace of each failure (its report's), and where restarts run.
    failure_context: dict[str, Context] = {}
    background: list[asyncio.TaskGroup] = []

    async def on_event(event: Inventory | HostEvent | FenceResult | VmEvent, msg: Msg) -> None:
        match event:
            case Inventory():
                for failure_id in state.on_inventory(event):
                    failure_context[failure_id] = extract_context(msg.headers)
            case VmEvent():
                state.on_vm_event(event)
            case HostEvent():
                state.on_host_event(event)
                if event.kind == "confirmed_fenced":
                    incident_context[event.incident] = extract_context(msg.headers)
            case FenceResult():
                if state.on_fence_result(event):
                    fence_confirmed_at[event.incident] = event.finished_at
                    failover_remaining[event.incident] = {
                        name for name, v in state.lost.items() if v.incident == event.incident
                    }
                    incident_context[event.incident] = extract_context(msg.headers)
                    log.warning("fence confirmed: restarting HA VMs",
                                extra=fields(host=event.host, vms=len(state.lost)))
        wake.set()

    # The starts table as this process reads and writes it: incident -> VM -> [(target,
    # state)], oldest first. Read from the table once per open incident (after a
    # restart the table is the truth), dropped when the incident has no lost VM left.
    history: dict[str, dict[str, list[tuple[str, str]]]] = {}

    async def load_history(incidents: set[str]) -> None:
        for incident in incidents - history.keys():
            runs: dict[str, list[tuple[str, str]]] = {}
            async with db.execute("SELECT vm, target, state FROM starts WHERE incident = ? ORDER BY at",
                                  (incident,)) as cur:
                for vm, target, status in await cur.fetchall():
                    runs.setdefault(vm, []).append((target, status))
            history[incident] = runs
        for incident in history.keys() - incidents:
            del history[incident]

    def note(lost: LostVm, target: str, status: str) -> None:
        """Mirror of one upsert into the table (an updated row moves to the end, as its ``at`` does)."""
        runs = history.setdefault(lost.incident, {}).setdefault(lost.spec.name, [])
        runs[:] = [run for run in runs if run[0] != target]
        runs.append((target, status))

    async def vm_event(lost: LostVm, kind: str, target: str = "", reason: str = "") -> None:
        """A failover's VM event. The starts table is the record the scheduler acts on,
        so an event that cannot be published at all is logged, and the failover goes on."""
        metrics.VM_EVENTS.labels(kind).inc()
        event = VmEvent(vm=lost.spec.name, kind=kind, at=time.time(), incident=lost.incident,  # type: ignore[arg-type]
                        from_host=lost.from_host, target=target, reason=reason)
        try:
            await publish_retrying(bus, subjects.vm_event(lost.spec.name, kind), event, vm_event_id(event))
        except NotPublished as err:
            log.error("VM event lost", extra=fields(vm=lost.spec.name, kind=kind, error=str(err)))

    async def start(lost: LostVm, target: str, results: list[tuple[str, str, str, str, str, float]]) -> None:
        """One start of a wave; its "sending" record is already on disk. Its result is
        appended to ``results``, which the wave writes once all its starts are done."""
        async with slots:
            with tracer().start_as_current_span(
                f"start vm {lost.spec.name}",
                context=incident_context.get(lost.incident, Context()),
                kind=SpanKind.CLIENT,
                attributes={"hafence.vm": lost.spec.name, "hafence.target_host": target,
                            "hafence.from_host": lost.from_host, "hafence.incident": lost.incident,
                            "hafence.vm.memory_mb": lost.spec.memory_mb},
            ) as span:
                # The "sending" record on disk is what a scheduler restarted mid-failover
                # acts on; the placed event is for people and tools. So it goes out with
                # the command, not before it: waiting for its JetStream ack held every
                # command up by a round trip (10-15 ms with a wave of 50 on the wire).
                # One yield lets the task write its message into the connection's buffer
                # ahead of the command: on the wire (and to every subscriber) the placed
                # event still comes first; only its ack is not waited for.
                placed = asyncio.create_task(vm_event(lost, "placed", target))
                await asyncio.sleep(0)
                error = ""
                unanswered = False
                try:
                    raw = await bus.request(
                        subjects.agent_cmd(target), VmStart(vm=lost.spec, incident=lost.incident),
                        timeout=config.timings.agent_command_timeout_s,
                    )
                    reply = Decoders.agent_reply.decode(raw)
                    if not reply.ok:
                        error = reply.error or "agent refused"
                except (msgspec.DecodeError, msgspec.ValidationError):
                    error = f"agent answered with an error: {raw[:200]!r}"
                except nats.errors.NoRespondersError:
                    error = f"no agent listens on {target}"  # nobody got the command: safe to move on
                except Exception as err:
                    # The agent may have got it and be starting the VM: moving it elsewhere
                    # now could run it twice. Ask the same host again; only a fence of
                    # that host (which kills whatever it started) frees the VM to move.
                    unanswered = True
                    error = f"no answer from agent {target} ({type(err).__name__}); will ask it again"
                await placed  # never raises: an event that cannot be published is logged
                if unanswered:
                    span.set_status(Status(StatusCode.ERROR, error))
                    log.warning("VM start unanswered", extra=fields(vm=lost.spec.name, target=target))
                    # Its "sending" record stays: the next round asks this host again (or,
                    # once the host is fenced, moves the VM on).
                    state.on_start_result(lost.spec.name, target, "unanswered")
                    await vm_event(lost, "failed", target, error)
                elif error:
                    span.set_status(Status(StatusCode.ERROR, error))
                    log.error("VM start failed", extra=fields(vm=lost.spec.name, target=target, error=error))
                    state.on_start_result(lost.spec.name, target, "failed")
                    metrics.PLACEMENTS.labels("failed").inc()
                    note(lost, target, "failed")
                    results.append((lost.spec.name, lost.incident, target, "failed", error, time.time()))
                    await vm_event(lost, "failed", target, error)
                else:
                    state.on_start_result(lost.spec.name, target, "started")
                    # One info line per wave (below): at 50 VMs a line each was ~5 ms of this loop.
                    log.debug("VM started", extra=fields(vm=lost.spec.name, target=target))
                    metrics.PLACEMENTS.labels("started").inc()
                    note(lost, target, "started")
                    results.append((lost.spec.name, lost.incident, target, "started", "", time.time()))
                    remaining = failover_remaining.get(lost.incident)
                    if remaining is not None:
                        remaining.discard(lost.spec.name)
                        if not remaining:
                            del failover_remaining[lost.incident]
                            metrics.FAILOVER_SECONDS.observe(time.time() - fence_confirmed_at[lost.incident])
                    await vm_event(lost, "started", target, "already running" if reply.already else "")
        wake.set()

    async def schedule_once() -> int:
        """Priority waves: every high-priority VM is started (in parallel), and its
        failed starts retried on other hosts, before any medium one; then low.
        Returns how many starts were sent."""
        sent = 0
        await load_history({lost.incident for lost in state.lost.values()})
        for priority in ("high", "medium", "low"):
            for _ in range(config.scheduler.start_attempts):
                failures = state.failures()
                sent += await wave(priority)
                if state.failures() == failures:
                    break
        return sent

    async def wave(priority: str) -> int:
        in_flight = {vm for vm, _ in state.reserved}
        todo: list[LostVm] = []
        resend: list[tuple[LostVm, str]] = []
        for lost in list(state.lost.values()):
            if lost.spec.name in in_flight or lost.spec.priority != priority:
                continue
            step, target = state.next_step(lost, list(history.get(lost.incident, {}).get(lost.spec.name, ())))
            if step == "resend":
                resend.append((lost, target))
            elif step == "place":
                todo.append(lost)
        by_name = {lost.spec.name: lost for lost in todo}
        exhausted = {lost.spec.name for lost in todo if state.exhausted(lost.spec.name)}
        placements, pending = place(
            [lost.spec for lost in todo if lost.spec.name not in exhausted], state.candidates(),
            config.scheduler.strategy, config.scheduler.memory_overcommit,
            {vm: hosts for vm, hosts in state.failed_on.items() if vm in by_name},
            cpu_overcommit=config.scheduler.cpu_overcommit,
        )
        pending += [Pending(by_name[vm].spec, f"start failed on {len(state.failed_on[vm])} hosts "
                            f"({', '.join(sorted(state.failed_on[vm]))}); waiting for capacity to change")
                    for vm in sorted(exhausted)]
        for p in pending:
            lost = by_name[p.vm.name]
            if announced_pending.get(p.vm.name) != p.reason:
                announced_pending[p.vm.name] = p.reason
                log.warning("VM pending", extra=fields(vm=p.vm.name, reason=p.reason))
                await vm_event(lost, "pending", reason=p.reason)
        jobs = [(by_name[p.vm.name], p.host) for p in placements] + resend
        if not jobs:
            return 0
        for lost, target in jobs:
            state.reserved[(lost.spec.name, target)] = lost.spec
        # S0: every start is on disk before any command of the wave leaves, so a
        # scheduler restarted mid-failover asks the same host again, never another.
        # synchronous=FULL (the store's default): the record must outlive a power cut
        # of this machine too, since the command it stands for may already have
        # reached the agent. One transaction, so one fsync for the whole wave.
        now = time.time()
        try:
            await write_many(db, RECORD_START,
                             [(lost.spec.name, lost.incident, target, "sending", "", now) for lost, target in jobs])
        except BaseException:
            for lost, target in jobs:
                state.reserved.pop((lost.spec.name, target), None)
            raise
        for lost, target in jobs:
            note(lost, target, "sending")
        results: list[tuple[str, str, str, str, str, float]] = []
        async with asyncio.TaskGroup() as tg:
            for lost, target in jobs:
                tg.create_task(start(lost, target, results))
        # Results may be lost (a crash, or a power cut: synchronous=NORMAL) at no
        # risk: the "sending" record then stands, and the same host is asked again
        # and answers "already running" (or fails again, and the VM moves on).
        if results:
            await write_many(db, RECORD_START, results, durable=False)
        started = {vm: target for vm, _, target, status, _, _ in results if status == "started"}
        if started:
            log.info("VMs started", extra=fields(priority=priority, count=len(started), vms=started))
        return len(jobs)

    async def stop_copy(effect: StopCopy) -> None:
        """S6: stop the copy of a duplicate VM on the host that was fenced."""
        reason = f"duplicate: also running on {', '.join(effect.keep)}; {effect.host} was fenced"
        try:
            raw = await bus.request(subjects.agent_cmd(effect.host), VmStop(vm=effect.vm, reason=reason),
                                    timeout=config.timings.agent_command_timeout_s)
            reply = Decoders.agent_reply.decode(raw)
            error = "" if reply.ok else (reply.error or "agent refused")
        except Exception as err:  # no answer, garbage: the core sends it again later
            error = f"{type(err).__name__}: {err}"
        if error:
            log.error("stopping a duplicate failed", extra=fields(vm=effect.vm, host=effect.host, error=error))
            return
        log.warning("duplicate copy stopped", extra=fields(vm=effect.vm, host=effect.host))
        metrics.VM_EVENTS.labels("stopped").inc()
        await publish_retrying(bus, subjects.vm_event(effect.vm, "stopped"),
                               VmEvent(vm=effect.vm, kind="stopped", at=time.time(), target=effect.host,
                                       reason=reason))

    async def carry_out(effect: Effect) -> None:
        match effect:
            case Duplicate(vm=vm, hosts=hosts, stop_on=stop_on):
                action = (f"stopping the copy on {', '.join(stop_on)} (fenced, quarantined)" if stop_on
                          else "no host is known to hold the wrong copy: a person must decide")
                reason = f"running on {', '.join(hosts)}; {action}"
                log.error("VM runs on two hosts", extra=fields(vm=vm, hosts=list(hosts)))
                metrics.VM_EVENTS.labels("duplicate").inc()
                await publish_retrying(bus, subjects.vm_event(vm, "duplicate"),
                                       VmEvent(vm=vm, kind="duplicate", at=time.time(), target=",".join(stop_on),
                                               reason=reason))
                await bus.publish(subjects.alert("vm_duplicate"),
                                  Alert(kind="vm_duplicate", at=time.time(), service="scheduler", reason=reason,
                                        host=stop_on[0] if stop_on else hosts[0], vm=vm))
            case StopCopy():
                await stop_copy(effect)
            case AnnounceFailure() | RestartLimit() | RestartPending():
                await vm_failure_event(effect)
            case RestartVm():
                # In the background: a host that does not answer must not hold up failovers.
                background[0].create_task(restart(effect))
            case ClearHost(host=host, boot_id=boot_id, rule=rule, reason=reason):
                log.info("clearing host", extra=fields(host=host, rule=rule))
                await bus.publish(subjects.host_event(host, "cleared"),
                                  HostEvent(host=host, kind="cleared", at=time.time(), reason=reason, rule=rule,
                                            by="scheduler", boot_id=boot_id))

    async def vm_failure_event(effect: AnnounceFailure | RestartLimit | RestartPending) -> None:
        kind = {AnnounceFailure: "crashed", RestartLimit: "restart_limit", RestartPending: "pending"}[type(effect)]
        if isinstance(effect, AnnounceFailure):
            reason = f"{effect.reason} on {effect.host}: {effect.action}"
            log.error("HA VM failed", extra=fields(vm=effect.vm, host=effect.host, reason=effect.reason))
        else:
            reason = effect.reason
            (log.error if kind == "restart_limit" else log.warning)(
                "HA VM not restarted" if kind == "restart_limit" else "HA VM restart pending",
                extra=fields(vm=effect.vm, host=effect.host, reason=reason))
        metrics.VM_EVENTS.labels(kind).inc()
        with tracer().start_as_current_span(f"vm {effect.vm} {kind}",
                                            context=failure_context.get(effect.failure_id, Context()),
                                            attributes={"hafence.vm": effect.vm, "hafence.host": effect.host}):
            event = VmEvent(vm=effect.vm, kind=kind, at=time.time(),  # type: ignore[arg-type]
                            incident=effect.failure_id, from_host=effect.host, reason=reason)
            await publish_retrying(bus, subjects.vm_event(effect.vm, kind), event, vm_event_id(event))
            if isinstance(effect, RestartLimit):
                metrics.VM_RESTART_LIMITS.inc()
                await bus.publish(subjects.alert("vm_restart_limit"),
                                  Alert(kind="vm_restart_limit", at=time.time(), service="scheduler",
                                        reason=reason, host=effect.host, vm=effect.vm))

    async def ask(target: str, command: VmStart | VmStop) -> tuple[str, bool, bool]:
        """(error, unanswered, already): an agent's answer to one command."""
        try:
            raw = await bus.request(subjects.agent_cmd(target), command,
                                    timeout=config.timings.agent_command_timeout_s)
        except nats.errors.NoRespondersError:
            return f"no agent listens on {target}", False, False  # nobody got it
        except Exception as err:  # it may have got it, and be doing it
            return f"no answer from agent {target} ({type(err).__name__})", True, False
        try:
            reply = Decoders.agent_reply.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return f"agent answered with an error: {raw[:200]!r}", False, False
        if not reply.ok:
            return reply.error or "agent refused", False, False
        if isinstance(command, VmStop) and reply.state != "stopped":
            return f"agent {target} answered {reply.state!r} to a stop", False, False
        return "", False, reply.already

    async def restart(effect: RestartVm) -> None:
        """One restart of a failed VM; never raises (it runs in the service's task group)."""
        vm, target = effect.spec.name, effect.target
        outcome: Outcome = "failed"
        error, already = "", False
        where = "same_host" if effect.same_host else "elsewhere"
        try:
            async with slots:
                with tracer().start_as_current_span(
                    f"restart vm {vm}", context=failure_context.get(effect.failure_id, Context()),
                    kind=SpanKind.CLIENT,
                    attributes={"hafence.vm": vm, "hafence.from_host": effect.from_host, "hafence.target_host": target,
                                "hafence.incident": effect.failure_id, "hafence.restart.where": where,
                                "hafence.restart.attempt": effect.attempt},
                ) as span:
                    if effect.confirm_stop:
                        # S0: it moves only once the host it failed on says it is not running there.
                        stop = VmStop(vm=vm, reason=f"{vm} failed ({effect.reason}): moving it to {target}; "
                                                    "confirm it is not running here")
                        error, _, _ = await ask(effect.from_host, stop)
                        if error:
                            outcome, error = "unconfirmed", f"{effect.from_host} did not confirm the stop: {error}"
                    if outcome != "unconfirmed":
                        # Recorded before it is sent: a scheduler taking over asks this host again.
                        # If it cannot be published, nothing is sent (the error ends this try).
                        placed = VmEvent(vm=vm, kind="placed", at=time.time(), incident=effect.failure_id,
                                         from_host=effect.from_host, target=target, reason=effect.reason)
                        await publish_retrying(bus, subjects.vm_event(vm, "placed"), placed,
                                               vm_event_id(placed, effect.attempt))
                        error, unanswered, already = await ask(target, VmStart(vm=effect.spec,
                                                                               incident=effect.failure_id))
                        outcome = "unanswered" if unanswered else ("failed" if error else "started")
                    if error:
                        span.set_status(Status(StatusCode.ERROR, error))
                    state.restarts.on_result(effect, outcome, time.time(), state)
                    if outcome == "unconfirmed":
                        log.warning("VM not moved", extra=fields(vm=vm, target=target, error=error))
                        return
                    metrics.VM_RESTARTS.labels(effect.failure, where, outcome).inc()
                    kind = "restarted" if outcome == "started" else "failed"
                    (log.info if kind == "restarted" else log.error)(
                        "VM restarted" if kind == "restarted" else "VM restart failed",
                        extra=fields(vm=vm, target=target, error=error))
                    metrics.VM_EVENTS.labels(kind).inc()
                    done = VmEvent(vm=vm, kind=kind, at=time.time(), incident=effect.failure_id,  # type: ignore[arg-type]
                                   from_host=effect.from_host, target=target,
                                   reason=error or ("already running" if already else effect.reason))
                    await publish_retrying(bus, subjects.vm_event(vm, kind), done, vm_event_id(done, effect.attempt))
        except Exception as err:  # NATS gone mid-way: the core asks again (the same host)
            log.error("VM restart not completed: %s", err, extra=fields(vm=vm, target=target))
            if effect.spec.name in state.restarts.in_flight:
                state.restarts.on_result(effect, "unanswered", time.time(), state)
        finally:
            if outcome in ("started", "failed"):
                failure_context.pop(effect.failure_id, None)
            wake.set()

    async def carry_out_effects() -> None:
        effects = state.effects(time.time())
        if effects:
            async with asyncio.TaskGroup() as tg:
                for effect in effects:
                    tg.create_task(carry_out(effect))

    reservation: dict[str, object] = {"ok": None}
    gate = ReservationGate(every_s=RESERVATION_EVERY_S)
    started_at = time.monotonic()

    async def check_reservation() -> bool:
        """Publish a warning when the loss of the largest host could no longer be absorbed, and
        when it can again. False when there is no verdict yet (hosts still reporting in)."""
        settling = time.monotonic() - started_at < 2 * config.timings.detection_window_s
        if settling and len(state.inventories) < len(config.hosts):
            return False  # hosts are still reporting in: no verdict on half a cluster
        ok, host, reason = largest_host_loss_absorbed(
            state.candidates(), state.ha_vms_by_host(), config.scheduler.strategy,
            config.scheduler.memory_overcommit, config.scheduler.cpu_overcommit,
        )
        metrics.HA_RESERVATION.set(1 if ok else 0)
        if reservation["ok"] == ok or not host:
            return True
        reservation["ok"] = ok
        kind = "ha_reservation_ok" if ok else "ha_reservation_lost"
        (log.info if ok else log.error)("HA reservation", extra=fields(ok=ok, reason=reason))
        await bus.publish(subjects.host_event(host, kind),
                          HostEvent(host=host, kind=kind, at=time.time(), reason=reason, alert=not ok))
        return True

    async def schedule_loop() -> None:
        await caught_up.wait()
        while True:
            stop_if_cancelled()
            try:
                async with asyncio.timeout(1.0):  # not wait_for: it can swallow a cancellation on 3.11
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
            metrics.PENDING.set(len(state.lost))
            if lease.held():
                await carry_out_effects()
            sent = 0
            if lease.held() and state.lost:
                sent = await schedule_once()
            # The reservation is a function of what placement sees: rechecked when that
            # moved (an inventory sent again unchanged does not move it), at most once a
            # second, and not in a round that sent starts (failover work first; the next
            # round comes as their results do).
            version = state.capacity_version
            if lease.held() and gate.due(version, time.monotonic(), failover_busy=sent > 0):
                if await check_reservation():
                    gate.done(version, time.monotonic())

    filters = [
        subjects.inventory_all(),
        subjects.host_events("suspect"),
        subjects.host_events("alive"),
        subjects.host_events("confirmed_fenced"),
        subjects.host_events("maintenance_on"),
        subjects.host_events("maintenance_off"),
        subjects.host_events("cleared"),
        subjects.fence_results(),
        # VM-level HA: what this scheduler (or the one before it) did about failures.
        *(f"{subjects.prefix}.vm.*.{kind}" for kind in ("crashed", "placed", "restarted", "failed", "restart_limit")),
    ]
    try:
        async with asyncio.TaskGroup() as tg:
            background.append(tg)
            tg.create_task(lease.run())
            tg.create_task(bus.replay(filters, (Decoders.scheduler_input, VmEvent), on_event, caught_up))
            tg.create_task(schedule_loop())
    finally:
        await asyncio.shield(db.close())
