"""The scheduler as a sans-I/O core: ``SchedulerCore.handle(event, now) -> [effects]``.

It folds the events stream (inventories, host events, fence results, its own VM
events) into ``SchedulerState`` and, while it holds the lease, restarts the HA VMs
of fenced hosts (S1: only those ``state.host_released`` let go) and HA VMs that
failed on a live host (``restarts.py``). docs/cores.md, "## scheduler", lists its
events, effects and ports.

A failover is a *pass* over the priorities: every high-priority VM is started,
and its failed starts retried on other hosts (up to ``start_attempts`` rounds
while failures move), before any medium one; then low. Each round is a *wave*:

1. placement picks targets; a VM asked before for this incident (by this
   scheduler, per its store, or by the leader before it, per the placement records
   of the stream) is asked again on the same host, never placed afresh (S0);
2. every start of the wave is written to the store in one durable transaction
   (``Call("store", "record")``) before any command leaves;
3. when that is on disk: one placement record (``Placements``) for the wave's
   commands in flight, a compare-and-set on the last record of every scheduler;
   once it is stored, their ``VmStart`` requests at once. A reply lets the next
   command go: those freed while a record is on its way share the next record;
4. each reply (``Returned``) is folded as it comes: started, failed (the VM moves
   on) or unanswered (the host may be starting it: it is asked again, and the VM
   moves only if that host is fenced); when the last is in, the results are
   written (not durable) and the pass goes on.

No span per VM is opened by the core but the ``start vm <vm>`` one the trace tree
documents (a ``Span`` before each request, its parent the fence's trace).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec

from hafence import metrics
from hafence.contracts import (
    MAX_PLACEMENTS,
    Alert,
    Decoders,
    FenceResult,
    HostEvent,
    Inventory,
    Placements,
    VmEvent,
    VmStart,
    VmStop,
)
from hafence.core.effects import Call, Effect, Log, Publish, Request, SetTimer, Span
from hafence.core.events import CaughtUp, Delivered, Event, LeaseChanged, Now, Returned, Started, TimerFired
from hafence.core.inputs import Inputs, Lease, ReplayInput
from hafence.scheduler import placement
from hafence.scheduler.placement import Candidate, Pending, Strategy
from hafence.scheduler.ports import History, StartRow
from hafence.scheduler.restarts import AnnounceFailure, Outcome, RestartLimit, RestartPending, RestartVm
from hafence.scheduler.state import (
    ClearHost,
    Duplicate,
    LostVm,
    ReservationGate,
    SchedulerState,
    StartOutcome,
    StopCopy,
)
from hafence.scheduler.state import Effect as StateEffect
from hafence.subjects import Subjects

if TYPE_CHECKING:
    from hafence.config import ClusterConfig

PRIORITIES = ("high", "medium", "low")
TICK = "tick"
# Passes, effects and the reservation check are looked at again this often even
# when no event comes (resends of stops and clears, restart back-offs).
TICK_S = 1.0
# The HA reservation check (a walk over every host) runs at most this often, and
# only when capacity changed (``ReservationGate``).
RESERVATION_EVERY_S = 1.0
# Commands of a wave in flight at once (a reply lets the next one go). Agents bound
# their own parallel starts; this bounds the scheduler's reply inboxes and keeps a
# 10,000-VM wave from timing out in agents' queues.
COMMANDS_IN_FLIGHT = 128
TRACE_HEADERS = ("traceparent", "tracestate")
# Tag of VM events and alerts nobody waits for: tagged so the driver does not
# hold the next event up for their acks (a failure comes back and is logged).
EVENT_TAG = "event"

ReservationCheck = Callable[[Sequence[Candidate], dict[str, list[Any]], Strategy, float, float],
                            tuple[bool, str, str]]


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


_children: dict[tuple[int, str], Any] = {}


def _count(counter: Any, label: str) -> None:
    """``counter.labels(label).inc()`` without its lookup each time (two per VM of a wave)."""
    key = (id(counter), label)
    child = _children.get(key)
    if child is None:
        child = _children[key] = counter.labels(label)
    child.inc()


def _reservation(*args: Any, **kwargs: Any) -> tuple[bool, str, str]:
    return placement.largest_host_loss_absorbed(*args, **kwargs)


@dataclass
class _Pass:
    """Where a pass over the priorities is: which priority, which round of it."""

    index: int = 0
    rounds: int = 0
    failures: int = 0
    sent: int = 0


@dataclass
class _Wave:
    id: int
    priority: str
    jobs: list[tuple[LostVm, str]]
    waiting: dict[str, tuple[LostVm, str]] = field(default_factory=dict)
    results: list[StartRow] = field(default_factory=list)
    started: dict[str, str] = field(default_factory=dict)
    unsent: list[tuple[LostVm, str]] = field(default_factory=list)  # recorded, not asked yet (last first)
    # Start tags whose placement record was stored and whose ``VmStart`` went out (the
    # others of ``waiting`` are in the record on its way).
    sent: set[str] = field(default_factory=set)
    # Start tags that ask a host again: an earlier start of that VM there is in doubt.
    again: set[str] = field(default_factory=set)
    # Commands that may go out once the record on its way is answered (replies free them).
    credit: int = 0
    records: int = 0
    # Start tags of the record on its way.
    recording: list[str] = field(default_factory=list)
    # The other schedulers' records read when the wave was placed (``foreign_seq``).
    seen: int = 0


@dataclass(frozen=True, slots=True)
class _Reply:
    """An agent's answer to one command, as the rules read it."""

    error: str = ""
    unanswered: bool = False
    already: bool = False
    nobody: bool = False  # no responders: nobody got this command


def read_reply(returned: Returned, target: str, command: str = "start") -> _Reply:
    """A ``Returned`` of a VmStart/VmStop request. Nobody listening means nobody got
    the command (safe to move on); no answer in time, or any other transport error,
    means the agent may have got it and be doing it."""
    if returned.error:
        if returned.error.startswith("no_responders"):
            return _Reply(f"no agent listens on {target}", nobody=True)
        return _Reply(f"no answer from agent {target} ({returned.error.split(':', 1)[0]}); will ask it again",
                      unanswered=True)
    raw: bytes = returned.value
    try:
        reply = Decoders.agent_reply.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return _Reply(f"agent answered with an error: {raw[:200]!r}")
    if not reply.ok:
        return _Reply(reply.error or "agent refused")
    if command == "stop" and reply.state != "stopped":
        return _Reply(f"agent {target} answered {reply.state!r} to a stop")
    return _Reply(already=reply.already)


class SchedulerCore:
    name = "scheduler"

    def __init__(self, config: ClusterConfig, reservation_check: ReservationCheck | None = None) -> None:
        self.config = config
        self.subjects = Subjects(config.cluster.subject_prefix)
        self.state = SchedulerState.from_config(config)
        self.timeout = config.timings.agent_command_timeout_s
        self.reservation_check = reservation_check or _reservation
        self.caught_up = False
        self.held, self.term, self.valid_until = False, 0, 0.0
        self.started_mono: float | None = None
        # The store's history of the incidents being acted on (incident -> VM ->
        # [(target, state)], oldest first), loaded once per incident; and what the
        # stream says was asked (``placed``/``started`` of any leader, S0 on a takeover).
        self.history: History = {}
        self.announced_starts: History = {}
        # The stream sequence of the last placement record (any scheduler's) this process
        # read or wrote: its next record is a compare-and-set on it, so of two processes
        # that both believe they lead (one woke from a suspension its monotonic clock
        # missed) only one places anything; the other's starts are not sent (S0/S1).
        self.placements_seq = 0
        # After a refused record, the sequence it expected: nothing is placed until the
        # replay brings a record newer than that (then every VM is decided again).
        self.placements_blocked: int | None = None
        # The tag of the record on its way (one at a time: each expects the one before),
        # and the VM restarts whose record waits for it.
        self.placing = ""
        self.placing_expected = 0
        self.placing_record = ""
        self.restart_queue: list[RestartVm] = []
        # The highest sequence of another scheduler's record read, and the ids of this
        # process's records not read back yet (told apart in the replay; a refused one is
        # forgotten at once). A record is sent only if no other scheduler's record was
        # read since its placements were decided: the compare-and-set then proves no
        # record was stored between that decision and this record.
        self.foreign_seq = 0
        self.own_records: set[str] = set()
        self.restart_seen: dict[tuple[str, int], int] = {}
        self.loading = False
        self.want = False
        # After the store failed, no pass before this (monotonic): not a busy loop on a full disk.
        self.store_retry_at = 0.0
        self.run: _Pass | None = None
        self.wave: _Wave | None = None
        self.waves = 0
        self.announced_pending: dict[str, str] = {}
        self.fence_confirmed_at: dict[str, float] = {}
        self.failover_remaining: dict[str, set[str]] = {}
        # Trace headers: of each incident's fence, of each VM failure's report.
        self.incident_trace: dict[str, dict[str, str]] = {}
        self.failure_trace: dict[str, dict[str, str]] = {}
        # Commands in flight other than a wave's: tag -> what they are about.
        self.stops: dict[str, StopCopy] = {}
        self.restarts: dict[str, RestartVm] = {}
        # Hosts whose VMs the fold just released (host, incident): logged at the next round.
        self.releases: list[tuple[str, str]] = []
        self.reservation_ok: bool | None = None
        self.gate = ReservationGate(every_s=RESERVATION_EVERY_S)

    # -- the contract -----------------------------------------------------------------

    def inputs(self) -> Inputs:
        s = self.subjects
        filters = [
            s.inventory_all(),
            *(s.host_events(kind) for kind in
              ("suspect", "alive", "fence_requested", "fence_failed", "fence_skipped", "confirmed_fenced",
               "maintenance_on", "maintenance_off", "cleared")),
            s.fence_results(),
            # What this scheduler (or the one before it) did: starts of failovers, VM-level HA.
            *(f"{s.prefix}.vm.*.{kind}" for kind in
              ("crashed", "placed", "started", "restarted", "failed", "restart_limit")),
            s.placement_records(),
        ]
        return Inputs(replays=[ReplayInput("events", filters, (Decoders.scheduler_input, VmEvent, Placements))],
                      lease=Lease("scheduler", self.config.timings.lease_ttl_s, after="events"))

    def handle(self, event: Event, now: Now) -> list[Effect]:
        out: list[Effect] = []
        match event:
            case Started():
                self.started_mono = now.mono
            case Delivered(subject=subject, message=message, headers=headers, sequence=sequence):
                self._fold(message, headers, now, sequence, subject)
            case CaughtUp():
                self.caught_up = True
                out.append(SetTimer(TICK, TICK_S))
            case LeaseChanged(held=held, term=term, valid_until=valid_until):
                self.held, self.term, self.valid_until = held, term, valid_until
            case TimerFired(key=key) if key == TICK:
                out.append(SetTimer(TICK, TICK_S))
            case Returned():
                self._returned(event, now, out)
        if self.caught_up and not (isinstance(event, Returned) and event.tag == EVENT_TAG and event.ok):
            self.want = True
            # The walk for duplicates, clears and VM restarts (over every host) is not
            # repeated for each reply of a wave, nor for each of its own VM events read
            # back: a failover's come in bursts; the next tick or other event walks.
            burst = ((isinstance(event, Returned) and event.tag.startswith(("start:", "placements:wave:")))
                     or (isinstance(event, Delivered) and isinstance(event.message, VmEvent | Placements)))
            self._round(now, out, effects=not burst)
        # What the host-phase table found illegal while folding this (the phase was kept).
        for host, illegal in self.state.take_illegal():
            out.append(Log("warning", "host event illegal in its phase; phase kept", {
                "host": host, "event": str(illegal.event), "phase": str(illegal.phase), "why": illegal.why,
                "count": self.state.illegal.get(f"{illegal.event} in {illegal.phase}", 0)}))
        return out

    def leader(self, now: Now) -> bool:
        return self.held and now.mono < self.valid_until

    # -- the fold ---------------------------------------------------------------------

    def _fold(self, message: object, headers: dict[str, str], now: Now, sequence: int = 0,
              subject: str = "") -> None:
        state = self.state
        trace = {k: v for k, v in headers.items() if k in TRACE_HEADERS}
        match message:
            case Inventory():
                for failure_id in state.on_inventory(message):
                    self.failure_trace[failure_id] = trace
                if state.reboots:
                    # A new boot proved the old one gone, with no incident to release its VMs.
                    for host, incident in state.reboots:
                        self._released(host, incident, message.sent_at, trace)
                    state.reboots.clear()
            case Placements():
                self.placements_seq = max(self.placements_seq, sequence)
                record = subject.rsplit(".", 1)[-1]
                if record in self.own_records:
                    self.own_records.discard(record)  # read back: each is stored once
                else:
                    self.foreign_seq = max(self.foreign_seq, sequence)
                for placed in message.placed:
                    state.on_vm_event(placed)
                    self._fold_start(placed)
            case VmEvent():  # a ``placed`` of its own: written by a scheduler before records
                state.on_vm_event(message)
                self._fold_start(message)
            case HostEvent():
                if state.on_host_event(message):
                    self._released(message.host, message.incident, message.at, trace)
            case FenceResult():
                if state.on_fence_result(message):
                    self._released(message.host, message.incident, message.finished_at, trace)

    def _released(self, host: str, incident: str, at: float, trace: dict[str, str]) -> None:
        self.fence_confirmed_at[incident] = at
        self.failover_remaining[incident] = {
            name for name, v in self.state.lost.items() if v.incident == incident}
        self.incident_trace[incident] = trace
        self.releases.append((host, incident))

    def _fold_start(self, event: VmEvent) -> None:
        """A host failover's ``placed``/``started`` (this leader's or one before it):
        that host was asked, and is asked again rather than another (S0 on a takeover)."""
        lost = self.state.lost.get(event.vm)
        if event.kind not in ("placed", "started") or lost is None or lost.incident != event.incident:
            return
        runs = self.announced_starts.setdefault(event.incident, {}).setdefault(event.vm, [])
        runs[:] = [r for r in runs if r[0] != event.target]
        runs.append((event.target, "sending" if event.kind == "placed" else "started"))

    # -- one round: effects of the fold, the failover pass, the reservation ----------

    def _round(self, now: Now, out: list[Effect], effects: bool) -> None:
        state = self.state
        for host, incident in self.releases:
            out.append(Log("warning", "fence confirmed: restarting HA VMs",
                           {"host": host, "incident": incident,
                            "vms": sum(1 for v in state.lost.values() if v.incident == incident)}))
        self.releases = []
        metrics.PENDING.set(len(state.lost))
        if not self.leader(now):
            return
        if effects:
            for effect in state.effects(now.wall):
                self._carry_out(effect, now, out)
        self._advance(now, out)
        version = state.capacity_version
        if self.gate.due(version, now.mono, failover_busy=self.wave is not None):
            if self._check_reservation(now, out):
                self.gate.done(version, now.mono)

    # -- the failover pass ----------------------------------------------------------

    def _advance(self, now: Now, out: list[Effect]) -> None:
        state = self.state
        failures: int | None = None  # ``state.failures()`` is a walk: once per wave
        while self.wave is None and not self.loading:
            if self.run is None:
                if not state.lost and (self.history or self.incident_trace or self.failover_remaining):
                    self._forget(set())
                if not (self.want and state.lost and self.leader(now)) or now.mono < self.store_retry_at:
                    return
                if self.blocked():
                    return  # another scheduler placed since: its record first, then decide
                self.want = False
                incidents = {lost.incident for lost in state.lost.values()}
                self._forget(incidents)
                missing = sorted(incidents - self.history.keys())
                if missing:
                    self.loading = True
                    out.append(Call("store", "load", (missing,), tag="load"))
                    return
                in_flight = {vm for vm, _ in state.reserved}
                if all(name in in_flight for name in state.lost):
                    # Every lost VM is being started (or started, not yet in an inventory):
                    # a pass would place nothing and change nothing. After a wave, most
                    # events of a failover (its own VM events read back, inventories) came
                    # here and ran one, three waves' worth of walks each.
                    return
                self.run = _Pass()
            run = self.run
            if failures is None:
                failures = state.failures()
            if run.index >= len(PRIORITIES):
                self.run = None
                if run.sent:
                    self.want = True  # their results may have freed or moved something
                continue
            if run.rounds and (run.rounds >= state.start_attempts or failures == run.failures):
                run.index, run.rounds = run.index + 1, 0
                continue
            if not self.leader(now) or self.blocked():
                self.run = None
                return
            run.rounds += 1
            run.failures = failures
            run.sent += self._wave(PRIORITIES[run.index], now, out)
            failures = None  # only a wave moves it (``next_step`` notes targets fenced since)

    def _forget(self, incidents: set[str]) -> None:
        """Drop what is kept about incidents with no lost VM left (their history, and
        what the replay folded about incidents long over)."""
        tables: tuple[dict[str, Any], ...] = (self.history, self.announced_starts, self.incident_trace,
                                              self.fence_confirmed_at, self.failover_remaining)
        for table in tables:
            for gone in table.keys() - incidents:
                del table[gone]

    def _history_of(self, lost: LostVm) -> list[tuple[str, str]]:
        mine = self.history.get(lost.incident, {}).get(lost.spec.name, [])
        theirs = self.announced_starts.get(lost.incident, {}).get(lost.spec.name, [])
        if not theirs:
            return list(mine)
        # Another leader's starts come first (older); this store's own word wins for a target.
        known = {target for target, _ in mine}
        return [r for r in theirs if r[0] not in known] + list(mine)

    def _wave(self, priority: str, now: Now, out: list[Effect]) -> int:
        state, cfg = self.state, self.config.scheduler
        in_flight = {vm for vm, _ in state.reserved}
        held = state.held_by_suspects()
        todo: list[LostVm] = []
        resend: list[tuple[LostVm, str]] = []
        for lost in list(state.lost.values()):
            if lost.spec.name in in_flight or lost.spec.priority != priority:
                continue
            if lost.spec.name in held:
                continue  # S1: a suspect host reported it running; its fence decides
            step, target = state.next_step(lost, self._history_of(lost))
            if step == "resend":
                resend.append((lost, target))
            elif step == "place":
                todo.append(lost)
        # A start asked again may be running on its host already: its room there is
        # taken before anything else of this wave is placed (simulation seed 14: a
        # host left with -2048 MiB, the VM asked again and a new one both sent to it).
        for lost, target in resend:
            state.reserved[(lost.spec.name, target)] = lost.spec
        by_name = {lost.spec.name: lost for lost in todo}
        exhausted = {lost.spec.name for lost in todo if state.exhausted(lost.spec.name)}
        specs = [lost.spec for lost in todo if lost.spec.name not in exhausted]
        placements: list[placement.Placement] = []
        pending: list[Pending] = []
        if specs:
            # Only with something to place: a pass runs after most events of a failover
            # (3 priorities each), and the candidates (every host's load plus the
            # reservations) were most of the scheduler's CPU in the pipeline bench.
            placements, pending = placement.place(
                specs, state.candidates(), cfg.strategy, cfg.memory_overcommit,
                {vm: hosts for vm, hosts in state.failed_on.items() if vm in by_name},
                cpu_overcommit=cfg.cpu_overcommit,
            )
        pending += [Pending(by_name[vm].spec, f"start failed on {len(state.failed_on[vm])} hosts "
                            f"({', '.join(sorted(state.failed_on[vm]))}); waiting for capacity to change")
                    for vm in sorted(exhausted)]
        for p in pending:
            if self.announced_pending.get(p.vm.name) != p.reason:
                self.announced_pending[p.vm.name] = p.reason
                out.append(Log("warning", "VM pending", {"vm": p.vm.name, "reason": p.reason}))
                out.append(Span(f"vm {p.vm.name} pending", self.incident_trace.get(by_name[p.vm.name].incident, {}),
                                {"hafence.vm": p.vm.name}))
                out.append(self._vm_event(by_name[p.vm.name], "pending", now, reason=p.reason))
        jobs = [(by_name[p.vm.name], p.host) for p in placements] + resend
        if not jobs:
            return 0
        for lost, target in jobs[:len(placements)]:  # the starts asked again hold theirs already
            state.reserved[(lost.spec.name, target)] = lost.spec
        self.waves += 1
        self.wave = _Wave(self.waves, priority, jobs, seen=self.foreign_seq)
        self.wave.again = {f"start:{self.waves}:{lost.spec.name}" for lost, _ in resend}
        # S0: every start is on disk before any command of the wave leaves, so a
        # scheduler restarted mid-failover asks the same host again, never another.
        rows = [(lost.spec.name, lost.incident, target, "sending", "", now.wall) for lost, target in jobs]
        out.append(Call("store", "record", (rows, True), tag=f"record:{self.wave.id}"))
        return len(jobs)

    def _send_wave(self, wave: _Wave, now: Now, out: list[Effect]) -> None:
        """The wave is on disk: its first record (up to ``COMMANDS_IN_FLIGHT`` starts),
        then, once that is stored, their commands at once."""
        for lost, target in wave.jobs:
            self._note(lost, target, "sending")
        wave.unsent = list(reversed(wave.jobs))
        wave.credit = COMMANDS_IN_FLIGHT
        self._record_more(wave, now, out)

    def _record_more(self, wave: _Wave, now: Now, out: list[Effect]) -> None:
        """The next placement record of the wave: as many starts as replies have freed
        (one record at a time; a VM's ``VmStart`` goes out once its record is stored)."""
        if self.placing or not wave.unsent or wave.credit <= 0:
            return
        if self.foreign_seq > wave.seen:
            # Another scheduler's record was read since the wave was placed: the rest of
            # it was decided without it. Withdrawn, and decided again (it has been read).
            self._withdraw(wave, wave.unsent, "another scheduler placed VMs since this wave was placed", now, out)
            wave.unsent = []
            self._wave_step(wave, now, out, freed=0)
            return
        batch = [wave.unsent.pop() for _ in range(min(wave.credit, len(wave.unsent), MAX_PLACEMENTS))]
        wave.credit -= len(batch)
        wave.records += 1
        by_incident: dict[str, list[tuple[LostVm, str]]] = {}
        for lost, target in batch:
            by_incident.setdefault(lost.incident, []).append((lost, target))
        for incident, jobs in by_incident.items():
            # One span per record and incident carries its VMs (and the record the trace).
            out.append(Span(f"start wave {wave.priority}", self.incident_trace.get(incident, {}), {
                "hafence.incident": incident, "hafence.wave": wave.id, "hafence.priority": wave.priority,
                "hafence.vms": [lost.spec.name for lost, _ in jobs],
                "hafence.targets": [target for _, target in jobs]}))
        wave.recording = []
        for lost, target in batch:
            tag = f"start:{wave.id}:{lost.spec.name}"
            wave.waiting[tag] = (lost, target)
            wave.recording.append(tag)
        placed = [self._placed(lost.spec.name, lost.incident, lost.from_host, target, now)
                  for lost, target in batch]
        self._publish_record(f"placements:wave:{wave.id}:{wave.records}", placed,
                             [vm_event_id(p) for p in placed], now, out)

    def _placed(self, vm: str, incident: str, from_host: str, target: str, now: Now, reason: str = "") -> VmEvent:
        """One VM's placement, as a record carries it (a failover's, or a VM restart's)."""
        _count(metrics.VM_EVENTS, "placed")
        return VmEvent(vm=vm, kind="placed", at=now.wall, incident=incident, from_host=from_host, target=target,
                       reason=reason)

    def _publish_record(self, tag: str, placed: list[VmEvent], ids: list[str], now: Now,
                        out: list[Effect]) -> None:
        """One placement record, a compare-and-set on the last record of every scheduler
        this process knows of. Its id is the record's content and that sequence: sent
        again (a retry whose ack was lost), it is one message in the stream."""
        expected = self.placements_seq
        record = f"r{expected}-{zlib.crc32(';'.join(ids).encode()):08x}"
        self.placing, self.placing_expected, self.placing_record = tag, expected, record
        self.own_records.add(record)
        out.append(Publish(self.subjects.placement_record(record), Placements(at=now.wall, placed=placed),
                           f"placements:{record}", tag=tag, expect_last_subject_seq=expected,
                           expect_last_of=self.subjects.placement_records()))

    def blocked(self) -> bool:
        """A record of this process was refused: another scheduler placed VMs since the
        last record this one read. Nothing is placed until the replay brings it."""
        if self.placements_blocked is None:
            return False
        if self.placements_seq > self.placements_blocked:
            self.placements_blocked = None
            return False
        return True

    def _recorded(self, event: Returned, now: Now, out: list[Effect]) -> None:
        """The record on its way was stored, refused (another scheduler's came first), or
        not published; then the next record may go (a queued restart's, or the wave's)."""
        if event.tag != self.placing:
            return
        self.placing = ""
        if event.ok and isinstance(event.value, int):
            self.placements_seq = max(self.placements_seq, event.value)
        elif event.error.startswith("conflict"):
            self.placements_blocked = max(self.placements_blocked or 0, self.placing_expected)
            self.own_records.discard(self.placing_record)  # never stored: never read back
        if event.tag.startswith("placements:wave:"):
            if self.wave is not None and event.tag == f"placements:wave:{self.wave.id}:{self.wave.records}":
                self._wave_recorded(self.wave, event, now, out)
        else:
            effect = self.restarts.pop(event.tag, None)
            if effect is not None:
                self._restart_recorded(effect, event, now, out)
        while self.restart_queue and not self.placing:
            self._restart_placed(self.restart_queue.pop(0), now, out)
        wave = self.wave
        if wave is not None and not self.placing:
            if self.leader(now):
                self._record_more(wave, now, out)
            elif wave.unsent:
                self._abandon(wave)

    def _wave_recorded(self, wave: _Wave, event: Returned, now: Now, out: list[Effect]) -> None:
        """The wave's record was stored (its starts go out), or refused (nothing of the
        wave is sent: the replay brings the other scheduler's record, then every VM is
        decided again), or not published."""
        tags, wave.recording = wave.recording, []
        if event.ok and self.leader(now):
            for tag in tags:
                lost, target = wave.waiting[tag]
                vm = lost.spec.name
                wave.sent.add(tag)
                out.append(Span(f"start vm {vm}", self.incident_trace.get(lost.incident, {}), {
                    "hafence.vm": vm, "hafence.target_host": target, "hafence.from_host": lost.from_host,
                    "hafence.incident": lost.incident, "hafence.vm.memory_mb": lost.spec.memory_mb}))
                out.append(Request(self.subjects.agent_cmd(target), VmStart(vm=lost.spec, incident=lost.incident),
                                   self.timeout, tag))
            return
        dropped = [wave.waiting.pop(tag) for tag in tags]
        vms = [lost.spec.name for lost, _ in dropped]
        if event.error.startswith("conflict"):
            # No command of the record went out, nor will any of the wave's.
            self._withdraw(wave, dropped + wave.unsent, event.error, now, out)
            wave.unsent = []
        else:
            for lost, target in dropped:
                self.state.reserved.pop((lost.spec.name, target), None)
            if event.error:
                # Perhaps stored: the "sending" records stay, the same hosts are asked at a later pass.
                self.store_retry_at = now.mono + TICK_S
                out.append(Log("error", "placement record not published: starts not sent",
                               {"vms": vms, "error": event.error}))
            else:
                out.append(Log("warning", "lease lost: starts not sent", {"vms": vms}))
            if wave.unsent:
                self._abandon(wave)
        self._wave_step(wave, now, out, freed=0)

    def _start_result(self, wave: _Wave, event: Returned, now: Now, out: list[Effect]) -> None:
        lost, target = wave.waiting.pop(event.tag)
        vm, state = lost.spec.name, self.state
        reply = read_reply(event, target)
        if reply.nobody and event.tag in wave.again:
            # Nobody got this ask, but an earlier one there is in doubt (unanswered, or
            # recorded by a scheduler that died): the agent may have started it and lost
            # its connection since (seed 44: started elsewhere while it ran there, S1).
            # It waits for that host's fate like any start in doubt.
            reply = _Reply(f"{reply.error}; an earlier start there is in doubt: will ask it again", unanswered=True)
        outcome: StartOutcome = "unanswered" if reply.unanswered else ("failed" if reply.error else "started")
        state.on_start_result(vm, target, outcome)
        if outcome == "unanswered":
            # Its "sending" record stays: the next round asks this host again (or,
            # once the host is fenced, moves the VM on).
            out.append(Log("warning", "VM start unanswered", {"vm": vm, "target": target}))
            out.append(self._vm_event(lost, "failed", now, target, reply.error))
        elif outcome == "failed":
            out.append(Log("error", "VM start failed", {"vm": vm, "target": target, "error": reply.error}))
            _count(metrics.PLACEMENTS, "failed")
            self._note(lost, target, "failed")
            wave.results.append((vm, lost.incident, target, "failed", reply.error, now.wall))
            out.append(self._vm_event(lost, "failed", now, target, reply.error))
        else:
            _count(metrics.PLACEMENTS, "started")
            self._note(lost, target, "started")
            wave.results.append((vm, lost.incident, target, "started", "", now.wall))
            wave.started[vm] = target
            remaining = self.failover_remaining.get(lost.incident)
            if remaining is not None:
                remaining.discard(vm)
                if not remaining:
                    del self.failover_remaining[lost.incident]
                    metrics.FAILOVER_SECONDS.observe(now.wall - self.fence_confirmed_at[lost.incident])
            out.append(self._vm_event(lost, "started", now, target, "already running" if reply.already else ""))
        self._wave_step(wave, now, out)

    def _withdraw(self, wave: _Wave, jobs: list[tuple[LostVm, str]], why: str, now: Now,
                  out: list[Effect]) -> None:
        """Starts of the wave never sent: their "sending" records are withdrawn (durable),
        so neither this process nor a later leader asks those hosts on their account."""
        if not jobs:
            return
        rows = []
        for lost, target in jobs:
            self.state.reserved.pop((lost.spec.name, target), None)
            self._note(lost, target, "withdrawn")
            rows.append((lost.spec.name, lost.incident, target, "withdrawn", why, now.wall))
        out.append(Call("store", "record", (rows, True)))
        out.append(Log("warning", "VMs placed by another scheduler since: starts not sent",
                       {"vms": [lost.spec.name for lost, _ in jobs], "wave": wave.id, "error": why}))

    def _wave_step(self, wave: _Wave, now: Now, out: list[Effect], freed: int = 1) -> None:
        """Jobs of the wave are done: as many more go out; after the last, its results."""
        wave.credit += freed
        if self.leader(now):
            self._record_more(wave, now, out)
        elif wave.unsent:
            self._abandon(wave)
        if wave.waiting:
            return
        self.wave = None
        # Results may be lost (a crash, or a power cut: not durable) at no risk: the
        # "sending" record then stands, and the same host is asked again and answers
        # "already running" (or fails again, and the VM moves on).
        if wave.results:
            out.append(Call("store", "record", (wave.results, False)))
        if wave.started:
            # One line per wave: at 50 VMs a line each was ~5 ms of the loop.
            out.append(Log("info", "VMs started",
                           {"priority": wave.priority, "count": len(wave.started), "vms": wave.started}))

    def _abandon(self, wave: _Wave) -> None:
        """Send no more of this wave: what was not sent is no longer reserved."""
        unsent = wave.unsent if wave.unsent or wave.waiting else wave.jobs
        for lost, target in unsent:
            self.state.reserved.pop((lost.spec.name, target), None)
        wave.unsent = []
        if not wave.waiting:
            self.wave, self.run = None, None

    def _note(self, lost: LostVm, target: str, status: str) -> None:
        """Mirror of one upsert into the table (an updated row moves to the end, as its ``at`` does)."""
        runs = self.history.setdefault(lost.incident, {}).setdefault(lost.spec.name, [])
        runs[:] = [r for r in runs if r[0] != target]
        runs.append((target, status))

    def _vm_event(self, lost: LostVm, kind: str, now: Now, target: str = "", reason: str = "") -> Publish:
        _count(metrics.VM_EVENTS, kind)
        event = VmEvent(vm=lost.spec.name, kind=kind, at=now.wall, incident=lost.incident,  # type: ignore[arg-type]
                        from_host=lost.from_host, target=target, reason=reason)
        return Publish(self.subjects.vm_event(lost.spec.name, kind), event, vm_event_id(event), tag=EVENT_TAG)

    # -- outcomes ---------------------------------------------------------------------

    def _returned(self, event: Returned, now: Now, out: list[Effect]) -> None:
        tag = event.tag
        if tag == EVENT_TAG:
            if event.error:
                out.append(Log("error", "event not published", {"error": event.error}))
        elif tag == "load":
            self.loading = False
            if event.error:
                out.append(Log("error", "start history not loaded", {"error": event.error}))
                self.store_retry_at = now.mono + TICK_S
                return
            self.history.update(event.value)
        elif tag.startswith("record:"):
            wave = self.wave
            if wave is None or tag != f"record:{wave.id}":
                return
            if event.error:
                # Nothing was sent: the VMs are free to be placed again at the next round.
                for lost, target in wave.jobs:
                    self.state.reserved.pop((lost.spec.name, target), None)
                self.wave, self.run = None, None
                self.store_retry_at = now.mono + TICK_S
                out.append(Log("error", "starts not recorded: nothing sent", {"error": event.error}))
                return
            if not self.leader(now):
                # The lease ran out while the records were written: a leader sends
                # commands, not this process. The "sending" records make whoever
                # leads next (this one again, from its store) ask the same hosts.
                self._abandon(wave)
                out.append(Log("warning", "lease lost: the wave's starts were not sent", {"wave": wave.id}))
                return
            self._send_wave(wave, now, out)
        elif tag.startswith("start:"):
            if self.wave is not None and tag in self.wave.sent:
                self.wave.sent.discard(tag)
                self._start_result(self.wave, event, now, out)
        elif tag.startswith("placements:"):
            self._recorded(event, now, out)
        elif tag in self.stops:
            self._stopped(self.stops.pop(tag), event, now, out)
        elif tag in self.restarts:
            self._restart_step(tag, self.restarts.pop(tag), event, now, out)

    # -- what the state asks for ----------------------------------------------------

    def _carry_out(self, effect: StateEffect, now: Now, out: list[Effect]) -> None:
        match effect:
            case Duplicate(vm=vm, hosts=hosts, stop_on=stop_on):
                action = (f"stopping the copy on {', '.join(stop_on)} (fenced, quarantined)" if stop_on
                          else "no host is known to hold the wrong copy: a person must decide")
                reason = f"running on {', '.join(hosts)}; {action}"
                out.append(Log("error", "VM runs on two hosts", {"vm": vm, "hosts": list(hosts)}))
                _count(metrics.VM_EVENTS, "duplicate")
                out.append(Publish(self.subjects.vm_event(vm, "duplicate"),
                                   VmEvent(vm=vm, kind="duplicate", at=now.wall, target=",".join(stop_on),
                                           reason=reason), tag=EVENT_TAG))
                out.append(Publish(self.subjects.alert("vm_duplicate"),
                                   Alert(kind="vm_duplicate", at=now.wall, service="scheduler", reason=reason,
                                         host=stop_on[0] if stop_on else hosts[0], vm=vm), tag=EVENT_TAG))
            case StopCopy(vm=vm, host=host, keep=keep):
                reason = f"duplicate: also running on {', '.join(keep)}; {host} was fenced"
                tag = f"stop:{vm}:{host}:{now.mono}"
                self.stops[tag] = effect
                out.append(Request(self.subjects.agent_cmd(host), VmStop(vm=vm, reason=reason), self.timeout, tag))
            case ClearHost(host=host, boot_id=boot_id, rule=rule, reason=reason):
                out.append(Log("info", "clearing host", {"host": host, "rule": rule}))
                out.append(Publish(self.subjects.host_event(host, "cleared"),
                                   HostEvent(host=host, kind="cleared", at=now.wall, reason=reason, rule=rule,
                                             by="scheduler", boot_id=boot_id), tag=EVENT_TAG))
            case AnnounceFailure() | RestartLimit() | RestartPending():
                self._failure_event(effect, now, out)
            case RestartVm():
                self._restart(effect, now, out)

    def _stopped(self, effect: StopCopy, event: Returned, now: Now, out: list[Effect]) -> None:
        """S6: the copy of a duplicate VM on the host that was fenced."""
        reply = read_reply(event, effect.host)
        if reply.error:  # the state sends it again later
            out.append(Log("error", "stopping a duplicate failed",
                           {"vm": effect.vm, "host": effect.host, "error": reply.error}))
            return
        reason = f"duplicate: also running on {', '.join(effect.keep)}; {effect.host} was fenced"
        out.append(Log("warning", "duplicate copy stopped", {"vm": effect.vm, "host": effect.host}))
        _count(metrics.VM_EVENTS, "stopped")
        out.append(Publish(self.subjects.vm_event(effect.vm, "stopped"),
                           VmEvent(vm=effect.vm, kind="stopped", at=now.wall, target=effect.host, reason=reason),
                           tag=EVENT_TAG))

    def _failure_event(self, effect: AnnounceFailure | RestartLimit | RestartPending, now: Now,
                       out: list[Effect]) -> None:
        kind = {AnnounceFailure: "crashed", RestartLimit: "restart_limit", RestartPending: "pending"}[type(effect)]
        if isinstance(effect, AnnounceFailure):
            reason = f"{effect.reason} on {effect.host}: {effect.action}"
            out.append(Log("error", "HA VM failed", {"vm": effect.vm, "host": effect.host, "reason": effect.reason}))
        else:
            reason = effect.reason
            out.append(Log("error" if kind == "restart_limit" else "warning",
                           "HA VM not restarted" if kind == "restart_limit" else "HA VM restart pending",
                           {"vm": effect.vm, "host": effect.host, "reason": reason}))
        _count(metrics.VM_EVENTS, kind)
        out.append(Span(f"vm {effect.vm} {kind}", self.failure_trace.get(effect.failure_id, {}),
                        {"hafence.vm": effect.vm, "hafence.host": effect.host}))
        event = VmEvent(vm=effect.vm, kind=kind, at=now.wall,  # type: ignore[arg-type]
                        incident=effect.failure_id, from_host=effect.host, reason=reason)
        out.append(Publish(self.subjects.vm_event(effect.vm, kind), event, vm_event_id(event), tag=EVENT_TAG))
        if isinstance(effect, RestartLimit):
            metrics.VM_RESTART_LIMITS.inc()
            out.append(Publish(self.subjects.alert("vm_restart_limit"),
                               Alert(kind="vm_restart_limit", at=now.wall, service="scheduler", reason=reason,
                                     host=effect.host, vm=effect.vm), tag=EVENT_TAG))

    # -- VM-level HA: one restart is stop (if it moves), placed, start ---------------

    def _restart_span(self, effect: RestartVm) -> Span:
        return Span(f"restart vm {effect.spec.name}", self.failure_trace.get(effect.failure_id, {}), {
            "hafence.vm": effect.spec.name, "hafence.from_host": effect.from_host,
            "hafence.target_host": effect.target, "hafence.incident": effect.failure_id,
            "hafence.restart.where": "same_host" if effect.same_host else "elsewhere",
            "hafence.restart.attempt": effect.attempt})

    def _restart(self, effect: RestartVm, now: Now, out: list[Effect]) -> None:
        key = f"{effect.failure_id}:{effect.attempt}"
        self.restart_seen[(effect.failure_id, effect.attempt)] = self.foreign_seq
        out.append(self._restart_span(effect))
        if effect.confirm_stop:
            # S0: it moves only once the host it failed on says it is not running there.
            stop = VmStop(vm=effect.spec.name, reason=f"{effect.spec.name} failed ({effect.reason}): moving it to "
                                                      f"{effect.target}; confirm it is not running here")
            self.restarts[f"rstop:{key}"] = effect
            out.append(Request(self.subjects.agent_cmd(effect.from_host), stop, self.timeout, f"rstop:{key}"))
        else:
            self._restart_placed(effect, now, out)

    def _restart_placed(self, effect: RestartVm, now: Now, out: list[Effect]) -> None:
        """Its placement record, stored before the start is sent: a scheduler taking over
        asks this host again. If it cannot be stored, nothing is sent. It waits for a
        wave's record on its way (one record at a time)."""
        if self.placing and self.leader(now):
            self.restart_queue.append(effect)
            return
        seen = self.restart_seen.pop((effect.failure_id, effect.attempt), self.foreign_seq)
        if not self.leader(now) or self.blocked() or self.foreign_seq > seen:
            # Not leading; or another scheduler placed VMs since (its record not read yet,
            # or read after this restart was decided): decided again after the back-off.
            why = "lease lost" if not self.leader(now) else "another scheduler placed VMs since"
            out.append(Log("warning", f"{why}: restart not sent", {"vm": effect.spec.name, "target": effect.target}))
            self.state.restarts.on_result(effect, "unconfirmed", now.wall, self.state)
            return
        placed = self._placed(effect.spec.name, effect.failure_id, effect.from_host, effect.target, now,
                              effect.reason)
        tag = f"placements:restart:{effect.failure_id}:{effect.attempt}"
        self.restarts[tag] = effect
        self._publish_record(tag, [placed], [vm_event_id(placed, effect.attempt)], now, out)

    def _restart_recorded(self, effect: RestartVm, event: Returned, now: Now, out: list[Effect]) -> None:
        vm, target = effect.spec.name, effect.target
        if event.error.startswith("conflict"):
            # Another process placed VMs since the last record this one read: nothing is
            # sent; the replay brings that record, and the restart is decided again.
            out.append(Log("warning", "VM placed by another scheduler: restart not sent",
                           {"vm": vm, "target": target, "error": event.error}))
            self.state.restarts.on_result(effect, "unconfirmed", now.wall, self.state)
            return
        if event.error:  # NATS gone mid-way: the core asks again (the same host)
            out.append(Log("error", "VM restart not completed", {"vm": vm, "target": target,
                                                                 "error": event.error}))
            self.state.restarts.on_result(effect, "unanswered", now.wall, self.state)
            return
        start = f"rstart:{effect.failure_id}:{effect.attempt}"
        self.restarts[start] = effect
        out.append(self._restart_span(effect))
        out.append(Request(self.subjects.agent_cmd(target), VmStart(vm=effect.spec, incident=effect.failure_id),
                           self.timeout, start))

    def _restart_step(self, tag: str, effect: RestartVm, event: Returned, now: Now, out: list[Effect]) -> None:
        vm, target = effect.spec.name, effect.target
        kind = tag.split(":", 1)[0]
        if kind == "rstop":
            reply = read_reply(event, effect.from_host, "stop")
            if reply.error:
                self.restart_seen.pop((effect.failure_id, effect.attempt), None)
                error = f"{effect.from_host} did not confirm the stop: {reply.error}"
                self.state.restarts.on_result(effect, "unconfirmed", now.wall, self.state)
                out.append(Log("warning", "VM not moved", {"vm": vm, "target": target, "error": error}))
                return
            self._restart_placed(effect, now, out)
            return
        reply = read_reply(event, target)
        outcome: Outcome = "unanswered" if reply.unanswered else ("failed" if reply.error else "started")
        self.state.restarts.on_result(effect, outcome, now.wall, self.state)
        where = "same_host" if effect.same_host else "elsewhere"
        metrics.VM_RESTARTS.labels(effect.failure, where, outcome).inc()
        done = "restarted" if outcome == "started" else "failed"
        out.append(Log("info" if done == "restarted" else "error",
                       "VM restarted" if done == "restarted" else "VM restart failed",
                       {"vm": vm, "target": target, "error": reply.error}))
        _count(metrics.VM_EVENTS, done)
        out.append(Span(f"vm {vm} {done}", self.failure_trace.get(effect.failure_id, {}), {"hafence.vm": vm}))
        result = VmEvent(vm=vm, kind=done, at=now.wall, incident=effect.failure_id,  # type: ignore[arg-type]
                         from_host=effect.from_host, target=target,
                         reason=reply.error or ("already running" if reply.already else effect.reason))
        out.append(Publish(self.subjects.vm_event(vm, done), result, vm_event_id(result, effect.attempt),
                           tag=EVENT_TAG))
        if outcome in ("started", "failed"):
            self.failure_trace.pop(effect.failure_id, None)

    # -- the HA reservation ---------------------------------------------------------

    def _check_reservation(self, now: Now, out: list[Effect]) -> bool:
        """Publish a warning when the loss of the largest host could no longer be absorbed, and
        when it can again. False when there is no verdict yet (hosts still reporting in)."""
        state, cfg = self.state, self.config
        since = now.mono - (self.started_mono if self.started_mono is not None else now.mono)
        if since < 2 * cfg.timings.detection_window_s and len(state.inventories) < len(cfg.hosts):
            return False  # hosts are still reporting in: no verdict on half a cluster
        ok, host, reason = self.reservation_check(
            state.candidates(), state.ha_vms_by_host(), cfg.scheduler.strategy,
            cfg.scheduler.memory_overcommit, cfg.scheduler.cpu_overcommit,
        )
        metrics.HA_RESERVATION.set(1 if ok else 0)
        if self.reservation_ok == ok or not host:
            return True
        self.reservation_ok = ok
        kind = "ha_reservation_ok" if ok else "ha_reservation_lost"
        out.append(Log("info" if ok else "error", "HA reservation", {"ok": ok, "reason": reason}))
        out.append(Publish(self.subjects.host_event(host, kind),
                           HostEvent(host=host, kind=kind, at=now.wall, reason=reason, alert=not ok), tag=EVENT_TAG))
        return True
