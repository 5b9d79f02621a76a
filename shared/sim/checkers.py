"""The safety and liveness rules, checked while the simulation runs.

``Checkers`` watches three things: the world's truth (``hafence.sim.world``), the
effects every service core emits (``on_effect(service, effect)``, the driver's
observer hook) and the crashes of services (``service_crashed``). ``after_step``
is called after every scheduler step; the rules about messages are judged at the
moment the effect is emitted. A violation is a ``Violation`` (rule, step, time,
what was seen), kept in ``violations``, and raised as ``SafetyViolation`` when
``stop_at_first`` (the runner's default: the log up to it is the evidence).

The rules, as ../shared/SIMULATION.md states them:

* **S0** (world): no VM runs on two powered hosts (a hung host counts: its VMs
  resume with it).
* **S1** (messages + world): a ``VmStart`` sent to host T for a VM last started on
  host H (``World.last_host``, in boot B: ``World.last_boot``), H != T, is a violation
  - while H has an open incident (a ``suspect`` HostEvent published and stored in the
    events stream: one its monitor decided but could not store yet is known to no
    service) of boot B, or
    of an unnamed boot, that no ``confirmed_off`` FenceResult of the fencer for that
    incident or that boot (before or after the suspect), and no operator
    ``confirmed_fenced``, has released; an ``alive`` closes the incident (a start
    after it is judged by the second clause and S0);
  - or whenever the VM really runs on a powered host other than T right now (a
    start "elsewhere" before its host is off, whatever anyone believes).
* **S2** (messages + world): a ``confirmed_off`` FenceResult published by the
  fencer must come from a power run of the world for that request id and host
  that confirmed that level, and when that level was read back every device of it
  was really off and the host unpowered (``PowerRun.truly_off``). The arbiter's
  ``fenced`` HostEvent must likewise rest on such a run of its incident.
* **S3** (world + the fencer's admissions): the fencer never acts for a term below
  the newest it has admitted. Two observations: the terms of its power runs, in the
  order they start, never go down; and every request it admits — the journal write of
  a verdict that is not a refusal (``Call("journal", "admit", (request, verdict, at))``):
  a run, or an answer from its journal, which publishes a result without a power
  run — has a term at least the highest term of every request admitted before it.
  The second is what sees a stale leader's request answered from the journal (a
  request id that ran before under a newer term): no power run, the same result.
  The checkers keep the highest admitted term themselves, across fencer restarts
  (the journal that holds the fencer's own survives them).
* **S4** (world): power runs per request id ≤ 1 + the fencer crashes since its
  first run began (a crash mid-run may run it again; nothing else may).
* **L1** (``check_recovery``, after the heal phase): every HA VM runs on a live
  host, unless there is no room, or its host's fence was given up on
  (a ``fence_failed`` the arbiter published with ``alert``, awaiting an operator),
  or a compromised agent claimed it or ran it (an agent that lies about its own
  VMs is root on its host: no cluster can restart what it hides), which the
  design allows.

Services are told apart by name prefix (``fencer``, ``arbiter``, ``heartbeat``,
``scheduler``; ``operator`` for the operator's confirmations): replicas may be
``fencer-2``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec

from hafence.contracts import Decoders, FenceRequest, FenceResult, HostEvent, VmStart
from hafence.core.effects import Call, Publish, Request
from hafence.core.events import Started
from hafence.fencer.admission import Refuse
from hafence.sim.world import PowerRun, World


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str
    step: int
    time: float
    what: str

    def __str__(self) -> str:
        return f"{self.rule} violated at step {self.step} (t={self.time:.6f}): {self.what}"


class SafetyViolation(Exception):
    def __init__(self, violation: Violation) -> None:
        super().__init__(str(violation))
        self.violation = violation


@dataclass
class Incident:
    host: str
    incident: str
    opened: float
    boot: str = ""  # the boot the suspicion is about (HostEvent.boot_id), when the monitor said
    released: str = ""  # how: "confirmed_off <request id>" / "operator"
    closed: bool = False  # the host was heard again
    # Its suspect is in the events stream: from then on anyone can know of it (S1).
    stored: bool = False

    @property
    def open(self) -> bool:
        return not self.released and not self.closed


@dataclass
class _Tally:
    first_started: float
    runs: int = 0


@dataclass
class Checkers:
    world: World
    stop_at_first: bool = True
    log: Callable[[str, str], None] | None = None
    violations: list[Violation] = field(default_factory=list)
    incidents: dict[tuple[str, str], Incident] = field(default_factory=dict)
    # host -> whether the arbiter gave its fence up (fence_failed with alert, no fence since)
    given_up: dict[str, bool] = field(default_factory=dict)
    # host -> its watchdog level worked when its fence was given up (an armed watchdog in
    # its slot): a device that works, so L1 does not excuse that giving up
    given_up_with_watchdog: dict[str, bool] = field(default_factory=dict)
    crashes: list[tuple[float, str]] = field(default_factory=list)
    # host -> when a "cleared" HostEvent was last published for it (S6: a fenced host
    # that came back takes VMs only once cleared)
    cleared_at: dict[str, float] = field(default_factory=dict)
    # VMs a compromised agent claimed to run: a scheduler may believe it (L1 excuses them)
    disputed: set[str] = field(default_factory=set)
    # hosts whose agent is compromised: what it says of its own VMs cannot be checked
    compromised: set[str] = field(default_factory=set)
    _seen_version: int = -1
    _runs_checked: int = 0
    _highest_term: int = 0
    # the highest term of a request the fencer admitted (S3), and the request that had it
    _highest_admitted: int = 0
    # (host, boot) -> the request whose confirmed_off proved that boot off (S1)
    _off_boots: dict[tuple[str, str], str] = field(default_factory=dict)
    # (host, boot) -> a confirmed_off whose run the truth shows turned that boot off, the
    # result naming no boot: a later suspect of that boot is about a boot already gone
    _gone_boots: dict[tuple[str, str], str] = field(default_factory=dict)
    # (host, boot) -> a confirmed_off naming a forged boot id whose run took this boot down
    _forged_gone: dict[tuple[str, str], str] = field(default_factory=dict)
    _admitted_by: str = ""
    _tally: dict[str, _Tally] = field(default_factory=dict)
    _reported: set[tuple[str, str]] = field(default_factory=set)
    _crash_counts: dict[str, int] = field(default_factory=dict)
    # L1's excuses by VM (filled by check_recovery): VM -> why it was not checked
    excused: dict[str, str] = field(default_factory=dict)

    # -- reporting ---------------------------------------------------------------------
    def violation(self, rule: str, what: str, key: str = "") -> None:
        """Record a violation (once per rule and ``key``); raise it if ``stop_at_first``."""
        if (rule, key or what) in self._reported:
            return
        self._reported.add((rule, key or what))
        s = self.world.scheduler
        v = Violation(rule, s.steps, s.now, what)
        self.violations.append(v)
        if self.log is not None:
            self.log("checker", str(v))
        if self.stop_at_first:
            raise SafetyViolation(v)

    # -- hooks -----------------------------------------------------------------------------
    def service_crashed(self, service: object) -> None:
        name = _name(service)
        self.crashes.append((self.world.scheduler.now, name))
        self._crash_counts[name] = self._crash_counts.get(name, 0) + 1

    def open_incidents(self) -> list[tuple[str, str]]:
        return [(i.host, i.incident) for i in self.incidents.values() if i.open]

    def on_event(self, service: object, event: object) -> None:
        """The rules judge what cores do; from events only a restart is noted (a
        service whose ``crashes`` count grew was down: S4 allows a fencer to re-run)."""
        if isinstance(event, Started):
            name, crashes = _name(service), getattr(service, "crashes", 0)
            known = self._crash_counts.get(name, 0)
            if crashes > known:
                self._crash_counts[name] = crashes
                if not any(svc == name and at == self.world.scheduler.now for at, svc in self.crashes):
                    self.crashes.append((self.world.scheduler.now, name))

    def on_effect(self, service: object, effect: object) -> None:
        service = _name(service)
        if isinstance(effect, Publish):
            message = effect.message
            if isinstance(message, HostEvent):
                self._host_event(service, message)
            elif isinstance(message, FenceResult) and service.startswith("fencer"):
                self._fence_result(message)
        elif isinstance(effect, Request) and isinstance(effect.message, VmStart):
            self._vm_start(service, effect.subject, effect.message)
        elif (isinstance(effect, Call) and effect.port == "journal" and effect.op == "admit"
              and service.startswith("fencer") and len(effect.args) >= 2):
            self._admitted(service, effect.args[0], effect.args[1])

    def on_stored(self, subject: str, data: bytes) -> None:
        """A message the events stream stored: a suspect begins its incident for S1."""
        if not subject.endswith(".suspect") or ".host." not in subject:
            return
        try:
            event = Decoders.host_event.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        incident = self.incidents.get((event.host, event.incident))
        if incident is not None:
            incident.stored = True

    def after_step(self) -> None:
        w = self.world
        if w.version != self._seen_version:
            self._seen_version = w.version
            self._check_s0()
        if len(w.runs) != self._runs_checked:
            for run in w.runs[self._runs_checked:]:
                self._check_run(run)
            self._runs_checked = len(w.runs)

    # -- S0 --------------------------------------------------------------------------------
    def _check_s0(self) -> None:
        where: dict[str, list[str]] = {}
        for host in self.world.hosts.values():
            if host.powered:
                for vm in host.running:
                    where.setdefault(vm, []).append(host.name)
        for vm, hosts in sorted(where.items()):
            if len(hosts) > 1:
                self.violation("S0", f"{vm} runs on {len(hosts)} powered hosts: {', '.join(sorted(hosts))}",
                               key=f"{vm}@{','.join(sorted(hosts))}")

    # -- S3, S4 ----------------------------------------------------------------------------
    def _check_run(self, run: PowerRun) -> None:
        if run.term < self._highest_term:
            self.violation("S3", f"fence run {run.request_id} for {run.host} with term {run.term} after a run "
                                 f"with term {self._highest_term}", key=run.request_id)
        self._highest_term = max(self._highest_term, run.term)
        tally = self._tally.setdefault(run.request_id, _Tally(run.started))
        tally.runs += 1
        crashes = sum(1 for at, svc in self.crashes if svc.startswith("fencer") and at >= tally.first_started)
        if tally.runs > 1 + crashes:
            self.violation("S4", f"request {run.request_id} ({run.host}, incident {run.incident}) ran "
                                 f"{tally.runs} times with {crashes} fencer crash(es) since its first run",
                           key=f"{run.request_id}#{tally.runs}")

    def _admitted(self, service: str, request: object, verdict: object) -> None:
        """S3 at the fencer's door: a verdict written to its journal that is not a
        refusal admits the request, whether it then runs or is answered from the journal."""
        if isinstance(verdict, Refuse) or not isinstance(request, FenceRequest):
            return
        if request.term < self._highest_admitted:
            self.violation("S3", f"{service} admitted fence request {request.request_id} for {request.host} "
                                 f"with term {request.term} ({type(verdict).__name__.lower()}) after admitting "
                                 f"{self._admitted_by} with term {self._highest_admitted}",
                           key=f"admit {request.request_id} t{request.term}")
        if request.term > self._highest_admitted:
            self._highest_admitted, self._admitted_by = request.term, request.request_id

    # -- messages: S1, S2 ------------------------------------------------------------------
    def _host_event(self, service: str, event: HostEvent) -> None:
        host = event.host
        if event.kind == "suspect" and service.startswith("heartbeat"):
            key = (host, event.incident)
            if key not in self.incidents:  # a re-announce of the same incident is the same incident
                incident = Incident(host, event.incident, self.world.scheduler.now, event.boot_id)
                fenced = (self._off_boots.get((host, event.boot_id)) or self._gone_boots.get((host, event.boot_id))
                          if event.boot_id else None)
                if fenced is not None:
                    # A boot the fencer already confirmed off, suspected again under a new
                    # name (a monitor replica, seed 10 of the control-plane mix): it stays off.
                    incident.released = f"confirmed_off {fenced} (before this suspect)"
                self.incidents[key] = incident
        elif event.kind == "alive" and service.startswith("heartbeat"):
            for incident in self._open(host):
                incident.closed = True
        elif event.kind == "confirmed_fenced":
            for incident in self._open(host):
                if not event.incident or event.incident == incident.incident:
                    incident.released = f"operator {event.by}"
        elif event.kind == "fenced" and service.startswith("arbiter"):
            self.given_up[host] = False
            runs = [r for r in self.world.runs
                    if r.host == host and r.outcome == "confirmed_off" and r.level is not None
                    and r.truly_off.get(r.level) and (not event.incident or r.incident == event.incident)]
            if not runs:
                self.violation("S2", f"the arbiter says {host} is fenced (incident {event.incident!r}) but no power "
                                     f"run of that incident confirmed it off", key=f"fenced {host} {event.incident}")
        elif event.kind == "cleared":
            self.cleared_at[host] = self.world.scheduler.now
        elif event.kind == "fence_failed" and service.startswith("arbiter"):
            if event.alert:
                self.given_up[host] = True
                self.given_up_with_watchdog[host] = self.watchdog_works(host)

    def watchdog_works(self, host: str) -> bool:
        """The host's watchdog level can fence it: it has a watchdog, and its slot (what the
        fencer's level reads) reports it armed. Its power devices may all be dead."""
        h = self.world.hosts.get(host)
        record = self.world.slot_records.get(host)
        return h is not None and h.watchdog and record is not None and record.armed and record.timeout_s > 0

    def _open(self, host: str) -> list[Incident]:
        return [i for i in self.incidents.values() if i.host == host and i.open]

    def _fence_result(self, result: FenceResult) -> None:
        if result.outcome != "confirmed_off":
            return
        runs = [r for r in self.world.runs if r.request_id == result.request_id and r.host == result.host]
        good = [r for r in runs if r.outcome == "confirmed_off" and r.level == result.level
                and r.truly_off.get(r.level or 0)]
        if not good:
            seen = "; ".join(f"run at {r.started:.3f}: {r.outcome or 'unfinished'} level {r.level} "
                             f"truly off {r.truly_off}" for r in runs) or "no power run at all"
            self.violation("S2", f"confirmed_off for {result.host} (request {result.request_id}, level "
                                 f"{result.level}) without a run that really turned that level off: {seen}",
                           key=f"result {result.request_id}")
        if good and result.boot_id:
            self._off_boots[(result.host, result.boot_id)] = result.request_id
        # The boot the truth shows gone when the level read back off: a result naming no
        # boot (a restarted monitor's "never seen" incident) still proved that one off,
        # and a replica may suspect it again later under its own name (seed 571).
        forged = bool(result.boot_id) and (result.host, result.boot_id) not in self.world.real_boots
        for run in good:
            if run.off_boot:
                self._gone_boots.setdefault((result.host, run.off_boot), result.request_id)
                if forged:
                    self._forged_gone.setdefault((result.host, run.off_boot), result.request_id)
        for incident in self._open(result.host):
            # Its own incident's result, or any confirmed_off of the boot it is about: two
            # monitor replicas may name one outage twice (a restarted agent's sequence).
            if incident.incident == result.incident or (result.boot_id and incident.boot == result.boot_id):
                incident.released = f"confirmed_off {result.request_id}"

    def _vm_start(self, service: str, subject: str, start: VmStart) -> None:
        tokens = subject.split(".")
        if len(tokens) < 3 or tokens[-1] != "cmd":
            return
        target, vm = tokens[-2], start.vm.name
        home = self.world.last_host.get(vm)
        if home is not None and home != target:
            boot = self.world.last_boot.get(vm, "")
            # The boot it ran in was confirmed off: no later incident of the host (one
            # naming no boot: a restarted monitor's "never seen", sim seed 80) can hold it.
            # Confirmed off by a result naming it, or by one naming a boot the host never
            # had (a boot id a compromised agent forged on its own heartbeats) whose run the
            # truth shows took this very boot down (its pill reset the real boot, seed 541).
            proven_off = bool(boot) and ((home, boot) in self._off_boots or (home, boot) in self._forged_gone)
            for incident in [] if proven_off else self._open(home):
                if incident.boot and boot and incident.boot != boot:
                    continue  # an incident of a later boot, which never ran it
                if not incident.stored:
                    # Decided by a monitor, not yet in the stream (it is cut off, its ack
                    # lost): no service can know of it. A new boot's report before it
                    # released the old boot's VMs (seed 219 with reboots, 0.75).
                    continue
                self.violation("S1", f"{service} starts {vm} on {target} while {home}, where it ran, is in incident "
                                     f"{incident.incident!r} (suspect since t={incident.opened:.3f}) with no "
                                     f"confirmed_off or operator confirmation",
                               key=f"{vm}->{target} {incident.incident}")
        elsewhere = [h for h in self.world.running_on(vm) if h != target]
        if elsewhere:
            self.violation("S1", f"{service} starts {vm} on {target} while it runs on powered host(s) "
                                 f"{', '.join(elsewhere)}", key=f"{vm}->{target} running {','.join(elsewhere)}")

    def _quarantined(self, host: str) -> bool:
        """Fenced, booted again since, and not cleared since that boot (S6)."""
        h = self.world.hosts[host]
        fenced = any(r.host == host and r.outcome == "confirmed_off" and r.started < h.booted_at
                     for r in self.world.runs)
        return fenced and self.cleared_at.get(host, -1.0) < h.booted_at

    # -- L1 -----------------------------------------------------------------------------------
    def _unavailable(self, host: str, smallest: int) -> str:
        """Why ``host`` takes no more VMs at the end (empty: it may): what a reader of an
        excuse needs to tell a cluster sized too tight from a cluster that lost hosts."""
        h = self.world.hosts[host]
        fenced = any(r.host == host and r.outcome == "confirmed_off" for r in self.world.runs)
        if not h.powered:
            return f"{host} off{' (fenced)' if fenced else ''}{'' if h.mains else ' (no mains)'}"
        if h.hung:
            return f"{host} hung"
        if self._quarantined(host):
            return f"{host} fenced and quarantined"
        if host in self.world.pills:
            return f"{host} has a poison pill in its slot (its agent starts nothing until an operator clears it)"
        free = h.memory_mb - h.used_memory()
        return f"{host} full ({free} MiB free)" if free < smallest else ""

    def check_recovery(self) -> list[str]:
        """After the heal phase: every HA VM runs on a live host. Returns the excuses
        taken (no room, a fence given up on), one line each; violations are raised/kept.
        ``excused`` says which VMs were excused and why (``no room``, ``given up``,
        ``compromised``): how much of the cluster L1 did not check."""
        w = self.world
        excuses: list[str] = []
        self.excused = {}
        live = [h for h in w.hosts.values() if h.answers]
        missing = [vm for vm, d in sorted(w.vms.items())
                   if d.spec.ha and not any(vm in h.running for h in live)]
        if not missing:
            return excuses
        # A host fenced through its poison pill takes no VM until an operator takes the
        # pill out (its agent refuses every start; the scheduler places nothing there),
        # and the simulation has no operator (seed 1082 with fences that reboot: four
        # of five hosts up and empty, each with a pill, the fifth full).
        usable = [h for h in live if not self._quarantined(h.name) and h.name not in w.pills]
        free = sum(h.memory_mb - h.used_memory() for h in usable)
        need = sum(w.vms[vm].spec.memory_mb for vm in missing)
        if need > free:
            smallest = min(w.vms[vm].spec.memory_mb for vm in missing)
            why = [r for r in (self._unavailable(h, smallest) for h in sorted(w.hosts)) if r]
            excuses.append(f"no room: {len(missing)} HA VM{'s' if len(missing) > 1 else ''} down ({need} MiB), "
                           f"{free} MiB free on live hosts that may take VMs; {', '.join(why)}")
            self.excused = dict.fromkeys(missing, "no room")
            return excuses
        lost: list[str] = []
        for vm in missing:
            host = w.last_host.get(vm, w.vms[vm].home)
            if vm in self.disputed:
                excuses.append(f"{vm}: a compromised agent claimed to run it")
                self.excused[vm] = "compromised"
                continue
            if host in self.compromised:
                excuses.append(f"{vm}: its host {host} has a compromised agent (it may hide its own VMs)")
                self.excused[vm] = "compromised"
                continue
            if self.given_up.get(host) and not self.given_up_with_watchdog.get(host):
                excuses.append(f"{vm}: the fence of {host} was given up on (an operator must confirm)")
                self.excused[vm] = "given up"
                continue
            state = w.hosts[host]
            watchdog = ", its fence given up with a working watchdog level" if self.given_up.get(host) else ""
            lost.append(f"{vm} (last on {host}: {'powered' if state.powered else 'off'}"
                        f"{', hung' if state.hung else ''}, boot {state.boots}{watchdog})")
        if lost:
            self.violation("L1", f"HA VM{'s' if len(lost) > 1 else ''} running nowhere at the end of the heal "
                                 f"phase: {'; '.join(lost)}", key="L1")
        return excuses


def _name(service: object) -> str:
    """A service's name: the driver hands its ``SimService``, tests a string."""
    return service if isinstance(service, str) else str(getattr(service, "name", service))
