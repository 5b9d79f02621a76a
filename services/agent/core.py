"""The host agent's decisions as a sans-I/O core: ``AgentCore.handle(event, now) -> [effects]``.

Everything the agent decides is here: when to heartbeat and with what boot id and
sequence number, when the host lost power or booted again (S6: quarantined, VMs of
the old boot gone, autostart off), when to renew the storage lease, when an
inventory is due and what it says (VM failures, ``vm_watch.VmWatch``), which VM
commands run, in which order and how many at once, and which starts are refused
(a definition from anywhere but the shared storage; the watchdog's refusal).

It never reads a clock (``now.wall`` stamps every message, ``now.mono`` times the
inventory), never touches a file, the hypervisor or NATS, and never mints an id:
the boot id comes from the ``host`` port. Ports it calls (docs/cores.md, "## agent"):

* ``host``: ``state() -> HostState`` (power and boot id of the machine under the agent);
* ``hypervisor``: the ``hafence.agent.hypervisor.Hypervisor`` operations, plus
  ``changed()``, a long poll that returns when a VM may have changed by itself;
* ``storage``: ``renew(host, boot_id)``;
* ``watchdog`` (only with ``[storage] slot_dir``): ``changed() -> WatchdogStatus``
  (long poll), ``start_refusal() -> str``, ``recheck() -> WatchdogStatus``, ``view(view)``.

* ``definitions``: ``resolve(path, directory) -> (real path, real directory)``,
  symlinks resolved, so that a link under the definitions directory cannot point
  elsewhere. A port, not a call in the core: the directory is on shared storage,
  and a hung NFS mount must stall one command, not the agent's heartbeats. An empty
  definition (the simulation's) or the config's own one asks nothing.
"""

from __future__ import annotations

import posixpath
from collections import deque
from dataclasses import dataclass
from typing import Literal

from hafence import metrics
from hafence.agent.vm_watch import Failure, VmWatch
from hafence.config import ClusterConfig
from hafence.contracts import (
    AgentReply,
    Decoders,
    Heartbeat,
    HostEvent,
    Inventory,
    MonitorView,
    VmInfo,
    VmSpec,
    VmStart,
    VmStop,
)
from hafence.core import (
    Asked,
    Call,
    CancelTimer,
    Delivered,
    Effect,
    Event,
    Inputs,
    Log,
    Now,
    Publish,
    Reply,
    Returned,
    Serve,
    SetTimer,
    Span,
    Started,
    Subscribe,
    TimerFired,
)
from hafence.slots import view_subject
from hafence.subjects import Subjects, check_name

# How long to wait before asking a failed port again (autostart, a long poll).
RETRY_S = 1.0
# A span parent with no valid traceparent: the span starts a new trace.
NEW_TRACE = {"traceparent": ""}
# The long polls (tag: port) that tell the core of changes it did not make.
LONG_POLLS = {"hv:changed": "hypervisor", "wd:changed": "watchdog"}


@dataclass(frozen=True, slots=True)
class HostState:
    """What the ``host`` port says about the machine: powered on, and which boot.
    A port mints a new ``boot_id`` each time the machine powers on again."""

    on: bool
    boot_id: str


@dataclass(frozen=True, slots=True)
class WatchdogStatus:
    """What the ``watchdog`` port says: a poison pill in the slot, the device armed and its timeout."""

    pill: bool = False
    armed: bool = False
    timeout_s: float = 0.0


# starting: autostart not yet off or power not yet read; up: powered, this boot;
# losing: power lost, the old boot's VMs being stopped; down: off; booting: powered
# on again, the hypervisor booting and autostart being turned off.
Phase = Literal["starting", "up", "losing", "down", "booting"]


@dataclass(slots=True)
class _Command:
    token: int
    cmd: VmStart | VmStop
    name: str
    headers: dict[str, str]


class AgentCore:
    name = "agent"

    def __init__(self, config: ClusterConfig, host: str, *, watchdog: bool | None = None,
                 storage_lease: bool | None = None) -> None:
        self.host = check_name("host", host)
        self.host_config = config.host(host)
        self.subjects = Subjects(config.cluster.subject_prefix)
        timings = config.timings
        self.heartbeat_s = timings.heartbeat_interval_s
        self.inventory_s = timings.inventory_interval_s
        self.poll_s = min(timings.heartbeat_interval_s, timings.inventory_interval_s)
        self.renew_s = config.storage.renew_interval_s
        self.storage_lease = bool(config.storage.lease_dir) if storage_lease is None else storage_lease
        self.watchdog = bool(config.storage.slot_dir) if watchdog is None else watchdog
        self.max_parallel = config.agent.max_parallel_starts
        self.coalesce_s = config.agent.inventory_coalesce_s
        self.managed = {vm.name for vm in config.vms}
        self.definitions = {vm.name: vm.definition for vm in config.vms}
        self.definitions_dir = config.storage.definitions_dir

        self.phase: Phase = "starting"
        self.autostart_off = False
        self.boot_id = ""
        self.seq = 0
        self.last_state: HostState | None = None
        self.hb_asking = False
        # Every boot starts quarantined; a "cleared" for this host (and boot) lifts it.
        self.quarantined = True
        self.wd = WatchdogStatus()
        self.watch = VmWatch()
        # Inventory: a change to report (dirty), a listing under way (and one more wanted).
        self.dirty = True
        self.listing = False
        self.relist = False
        self.last_inventory: float | None = None
        self.published: list[tuple[str, str]] | None = None
        self.publishing: dict[str, list[tuple[str, str]]] = {}
        self.publishes = 0
        # Coalescing (``[agent] inventory_coalesce_s``): changes held back while a burst of
        # commands runs. ``held_gen`` counts them, ``listing_gen`` is the count a listing under
        # way covers, ``reported_gen`` the count the last published inventory covers;
        # ``held`` is set while some held change is not yet in a published inventory.
        self.held = False
        self.held_gen = 0
        self.listing_gen = 0
        self.reported_gen = 0
        # Commands: waiting in arrival order, and running (one per VM at a time).
        self.waiting: deque[_Command] = deque()
        self.running: dict[int, _Command] = {}
        self.busy: set[str] = set()
        self.pill_stops: list[str] = []
        self.clears = 0
        self.cleared_asks: dict[str, HostEvent] = {}

    def inputs(self) -> Inputs:
        subscriptions = [Subscribe("cleared", self.subjects.host_event(self.host, "cleared"), Decoders.host_event)]
        if self.watchdog:
            subscriptions.append(Subscribe("view", view_subject(self.subjects, self.host), Decoders.monitor_view))
        return Inputs(serves=[Serve("cmd", self.subjects.agent_cmd(self.host), Decoders.agent_command)],
                      subscriptions=subscriptions)

    # --- dispatch ---------------------------------------------------------------

    def handle(self, event: Event, now: Now) -> list[Effect]:
        out: list[Effect] = []
        match event:
            case Started():
                out.append(self._disable_autostart("autostart"))
                out.append(Call("hypervisor", "changed", (), "hv:changed"))
                if self.watchdog:
                    out.append(Call("watchdog", "changed", (), "wd:changed"))
            case TimerFired(key=key):
                out += self._timer(key, now)
            case Returned():
                out += self._returned(event, now)
            case Asked(subject=subject, message=VmStart() | VmStop() as cmd, token=token, headers=headers):
                if subject != self.subjects.agent_cmd(self.host):
                    out += [Log("warning", "command on another host's subject", {"subject": subject}),
                            Reply(token, None)]
                else:
                    name = cmd.vm.name if isinstance(cmd, VmStart) else cmd.vm
                    # The asker's trace: a command may run in a later handle, when a slot frees.
                    self.waiting.append(_Command(token, cmd, name, dict(headers)))
            case Asked(token=token):
                out.append(Reply(token, None))
            case Delivered(message=HostEvent() as host_event):
                out += self._cleared(host_event)
            case Delivered(message=MonitorView() as view):
                if view.host == self.host and self.watchdog:
                    out.append(Call("watchdog", "view", (view,)))
            case _:
                pass
        out += self._dispatch()
        if self.held and not self.running and not self.waiting:
            out += self._flush()  # the burst drained: report what it did now
        return out

    def _timer(self, key: str, now: Now) -> list[Effect]:
        if key == "hb":
            out: list[Effect] = [SetTimer("hb", self.heartbeat_s)]
            if not self.hb_asking:  # a port slower than the interval: one question at a time
                self.hb_asking = True
                out.append(Call("host", "state", (), "hb"))
            return out
        if key == "inv":
            return [SetTimer("inv", self.poll_s), *self._list()]
        if key == "inv:flush":
            return self._flush() if self.held else []
        if key == "lease":
            return [SetTimer("lease", self.renew_s), *self._renew()]
        if key == "autostart":
            return [self._disable_autostart("autostart")]
        if key in LONG_POLLS:
            return [Call(LONG_POLLS[key], "changed", (), key)]
        return []

    def _returned(self, r: Returned, now: Now) -> list[Effect]:
        tag = r.tag
        if tag.startswith("cmd:"):
            _, token, step = tag.split(":", 2)
            command = self.running.get(int(token))
            return self._command_step(command, step, r, now) if command is not None else []
        if tag == "hb":
            self.hb_asking = False
            if not r.ok:
                return [Log("warning", "host port failed: no heartbeat", {"host": self.host, "error": r.error})]
            state: HostState = r.value
            out = self._host_state(state)
            if state.on and self.phase == "up":
                out.append(Publish(self.subjects.hb(self.host),
                                   Heartbeat(host=self.host, boot_id=self.boot_id, seq=self.seq, sent_at=now.wall),
                                   core=True))
                self.seq += 1
                metrics.AGENT_HEARTBEATS.labels(self.host).inc()
            return out
        if tag == "autostart":
            if not r.ok:
                return [Log("error", "autostart not turned off; retrying", {"host": self.host, "error": r.error}),
                        SetTimer("autostart", RETRY_S)]
            self.autostart_off = True
            out = self._autostart_logged(r.value)
            # Now the agent lives: heartbeats (power first), inventories, the storage lease.
            self.hb_asking = True
            out += [Call("host", "state", (), "hb"), SetTimer("hb", self.heartbeat_s), SetTimer("inv", self.poll_s)]
            if self.storage_lease:
                out.append(SetTimer("lease", self.renew_s))
            return out
        if tag == "poweroff":
            self.phase = "down"
            out = [] if r.ok else [Log("error", "VMs not stopped at power loss", {"host": self.host, "error": r.error})]
            if self.last_state is not None and self.last_state.on:
                out += self._boot(self.last_state)
            return out
        if tag == "boot":
            out = [] if r.ok else [Log("error", "hypervisor boot failed", {"host": self.host, "error": r.error})]
            return [*out, self._disable_autostart("boot:autostart")]
        if tag == "boot:autostart":
            out = (self._autostart_logged(r.value) if r.ok else
                   [Log("error", "autostart not turned off at boot", {"host": self.host, "error": r.error})])
            self.phase = "up"
            return out + self._changed()
        if tag == "inv":
            return self._listed(r, now)
        if tag.startswith("inv:pub:"):
            summary = self.publishing.pop(tag, None)
            if not r.ok:
                self.dirty = True  # the next poll tries again
                return [Log("warning", "inventory not published", {"host": self.host, "error": r.error})]
            self.published = summary
            self.last_inventory = now.mono
            return []
        if tag == "lease":
            if r.ok:
                metrics.STORAGE_LEASE.labels(self.host).set(now.wall)
                return []
            return [Log("warning", "storage lease not renewed", {"host": self.host, "error": r.error})]
        if tag == "hv:changed":
            if not r.ok:
                return [SetTimer("hv:changed", RETRY_S)]
            # Libvirt wakes the agent for its own starts too: during a burst, coalesced.
            return [*self._changed(coalesce=True), Call("hypervisor", "changed", (), "hv:changed")]
        if tag == "wd:changed":
            if not r.ok:
                return [Log("warning", "watchdog port failed", {"host": self.host, "error": r.error}),
                        SetTimer("wd:changed", RETRY_S)]
            return [*self._watchdog_status(r.value), Call("watchdog", "changed", (), "wd:changed")]
        if tag == "pill:list":
            self.pill_stops = [vm.spec.name for vm in (r.value or []) if vm.state == "running"] if r.ok else []
            for name in self.pill_stops:
                self.watch.stopping(name, "pill")
            return [Call("hypervisor", "stop_all", (), "pill:stop")]
        if tag == "pill:stop":
            for name in self.pill_stops:
                self.watch.stop_done(name, now.wall)
            self.pill_stops = []
            out = [] if r.ok else [Log("error", "VMs not stopped for the pill", {"host": self.host, "error": r.error})]
            return out + self._changed()
        if tag.startswith("cleared:"):
            event = self.cleared_asks.pop(tag, None)
            if event is None:
                return []
            if r.ok:
                self.wd = r.value
            return [] if self.wd.pill or not r.ok else self._lift(event)
        return []

    # --- power and boots --------------------------------------------------------

    def _host_state(self, state: HostState) -> list[Effect]:
        """Every answer of the ``host`` port goes through here: a power loss or a new
        boot is acted on whichever question brought it."""
        metrics.AGENT_POWERED.labels(self.host).set(1 if state.on else 0)
        self.last_state = state
        out: list[Effect] = []
        first = self.phase == "starting"
        if first:
            self.boot_id = state.boot_id
            self.phase = "up"
        if self.phase == "up" and (not state.on or state.boot_id != self.boot_id):
            # Off now, or off and on again since the last look (a new boot id): the
            # old boot's VMs died with the power.
            self.phase = "losing"
            out += [Log("warning", "power is off: host is down", {"host": self.host}),
                    Call("hypervisor", "stop_all", (), "poweroff")]
        elif self.phase == "down" and state.on:
            out += self._boot(state)
        elif first:
            out += self._changed() + self._renew()  # the first inventory and renewal of this agent
        return out

    def _boot(self, state: HostState) -> list[Effect]:
        self.boot_id, self.seq, self.quarantined = state.boot_id, 0, True
        self.watch.reset()
        self.phase = "booting"
        self.published = None
        return [Log("warning", "power is on: host booted", {"host": self.host, "boot_id": self.boot_id}),
                Call("hypervisor", "boot", (), "boot")]

    def _disable_autostart(self, tag: str) -> Call:
        """S6: a host that boots again (after a fence with action "reboot", or by
        hand) must not run VMs that were restarted elsewhere meanwhile."""
        return Call("hypervisor", "disable_autostart", (set(self.managed),), tag)

    def _autostart_logged(self, changed: list[str] | None) -> list[Effect]:
        if not changed:
            return []
        return [Log("warning", "autostart turned off", {"host": self.host, "vms": list(changed)})]

    def _renew(self) -> list[Effect]:
        """The storage lease goes on when the network is cut: that is how the arbiter
        tells an isolated host from a dead one."""
        if not self.storage_lease or self.phase != "up":
            return []
        return [Call("storage", "renew", (self.host, self.boot_id), "lease")]

    # --- inventories ------------------------------------------------------------

    def _changed(self, coalesce: bool = False) -> list[Effect]:
        """Something changed (made here or seen): report it now, not at the next poll.

        ``coalesce`` (a start done, a hypervisor wake-up): while other commands of a
        burst still run or wait, the report is held until the burst drains or
        ``inventory_coalesce_s`` after the first held change, whichever comes first
        (a 50-VM failover sent one inventory per start: 50 reports, each stored and
        decoded by the scheduler and the arbiter). The reply to each command is never
        held, and neither is any other change (a stop, a power loss, a boot, the
        quarantine, the watchdog): docs/cores.md, "## agent", says why a report late by
        at most the bound changes no decision."""
        self.dirty = True
        if coalesce and self.coalesce_s > 0 and (self.running or self.waiting):
            self.held_gen += 1
            if self.held:
                return []  # the bound runs from the first held change: never pushed back
            self.held = True
            return [SetTimer("inv:flush", self.coalesce_s)]
        out = self._list()
        if self.held:
            # The listing asked now (or the one asked again after the listing under way)
            # is taken after every held change: it reports them.
            self.held = False
            out.append(CancelTimer("inv:flush"))
        return out

    def _flush(self) -> list[Effect]:
        """The held changes go out: a listing, unless a published one covers them already."""
        if self.reported_gen < self.held_gen:
            return self._changed()
        self.held = False
        return [CancelTimer("inv:flush")]

    def _list(self) -> list[Effect]:
        if self.phase != "up":
            return []
        if self.listing:
            self.relist = True  # the listing under way may predate the change
            return []
        self.listing = True
        self.listing_gen = self.held_gen
        return [Call("hypervisor", "list_vms", (), "inv")]

    def _listed(self, r: Returned, now: Now) -> list[Effect]:
        self.listing = False
        out: list[Effect] = []
        if not r.ok:
            out.append(Log("warning", "VMs not listed", {"host": self.host, "error": r.error}))
        elif self.phase == "up":
            vms, failures = self.watch.observe(list(r.value), now.wall)
            summary = sorted((vm.spec.name, vm.state) for vm in vms)
            due = (self.dirty or self.last_inventory is None
                   or now.mono - self.last_inventory >= self.inventory_s)
            if due or summary != self.published:
                self.dirty = False
                self.reported_gen = max(self.reported_gen, self.listing_gen)
                if self.held and self.reported_gen >= self.held_gen:
                    # Published with every held change in it (a poll, a stop's report):
                    # nothing left to flush.
                    self.held = False
                    out.append(CancelTimer("inv:flush"))
                if self.relist:
                    self.relist = False
                    out += self._list()
                out += self._failures(failures)
                self.publishes += 1
                tag = f"inv:pub:{self.publishes}"
                self.publishing[tag] = summary
                out.append(Publish(self.subjects.inventory(self.host), self._inventory(vms, now), tag=tag))
        if self.relist:
            self.relist = False
            out += self._list()
        return out

    def _failures(self, failures: list[Failure]) -> list[Effect]:
        """Log and count new failures and open the span their report is published in:
        a new trace, because the failure is where the story of each restart begins."""
        if not failures:
            return []
        out: list[Effect] = []
        for failure in failures:
            out.append(Log("error", "VM failed", {"host": self.host, "vm": failure.vm, "reason": failure.reason}))
            metrics.AGENT_VM_FAILURES.labels(self.host, failure.reason).inc()
        names = ", ".join(f"{f.vm} ({f.reason})" for f in failures)
        out.append(Span(f"vm failed on {self.host}: {names}", NEW_TRACE,
                        {"hafence.host": self.host, "hafence.boot_id": self.boot_id,
                         "hafence.vms": [f.vm for f in failures], "hafence.reasons": [f.reason for f in failures]}))
        return out

    def _inventory(self, vms: list[VmInfo], now: Now) -> Inventory:
        c = self.host_config
        return Inventory(
            host=self.host, boot_id=self.boot_id, memory_mb=c.memory_mb, vcpus=c.vcpus, labels=c.labels,
            vms=vms, sent_at=now.wall, quarantined=self.quarantined or self.wd.pill,
            watchdog_armed=self.wd.armed, watchdog_timeout_s=self.wd.timeout_s if self.wd.armed else 0.0,
            pill=self.wd.pill, listed_at=now.mono,  # one listing at a time: listed by now, after the last
        )

    # --- quarantine and the watchdog ---------------------------------------------

    def _cleared(self, event: HostEvent) -> list[Effect]:
        if event.host != self.host or event.kind != "cleared":
            return [Log("warning", "not a 'cleared' event for this host", {"host": self.host, "event": event.host})]
        if event.boot_id and event.boot_id != self.boot_id:
            return []  # for another boot of this host: this one stays quarantined
        if self.wd.pill:
            # `hafence host clear` removes the pill first, then sends this: look again.
            self.clears += 1
            tag = f"cleared:{self.clears}"
            self.cleared_asks[tag] = event
            return [Call("watchdog", "recheck", (), tag)]
        return self._lift(event)

    def _lift(self, event: HostEvent) -> list[Effect]:
        if not self.quarantined:
            return []
        self.quarantined = False
        return [Log("warning", "cleared: leaving quarantine",
                    {"host": self.host, "by": event.by, "rule": event.rule, "reason": event.reason}),
                *self._changed()]

    def _watchdog_status(self, status: WatchdogStatus) -> list[Effect]:
        pill = status.pill and not self.wd.pill
        self.wd = status
        out = self._changed()
        if pill and self.phase == "up":
            # A poison pill: power every VM off now (ordered stops, not crashes:
            # nothing restarts them here); the watchdog resets the host.
            out.append(Call("hypervisor", "list_vms", (), "pill:list"))
        return out

    # --- VM commands ------------------------------------------------------------

    def _dispatch(self) -> list[Effect]:
        """Start waiting commands, in order, up to ``max_parallel_starts`` at once and
        one per VM (a start asked again while the first boots waits, then is "already")."""
        if self.phase == "starting" or not self.autostart_off:
            return []
        out: list[Effect] = []
        skipped: deque[_Command] = deque()
        while self.waiting and len(self.running) < self.max_parallel:
            command = self.waiting.popleft()
            if command.name in self.busy:
                skipped.append(command)
                continue
            self.busy.add(command.name)
            self.running[command.token] = command
            verb = "start" if isinstance(command.cmd, VmStart) else "stop"
            # Power first: a powered-off host answers nothing. The calls that follow
            # inherit the span, so the whole command sits under the asker's trace.
            out += [Span(f"agent {verb} vm {command.name}", command.headers,
                         {"hafence.vm": command.name, "hafence.host": self.host}),
                    Call("host", "state", (), f"cmd:{command.token}:power")]
        skipped.extend(self.waiting)
        self.waiting = skipped
        return out

    def _command_step(self, c: _Command, step: str, r: Returned, now: Now) -> list[Effect]:
        start = c.cmd if isinstance(c.cmd, VmStart) else None
        if not r.ok:
            if step == "stop":
                self.watch.stop_done(c.name, now.wall)
            return self._failed(c, r.error)
        if step == "power":
            out = self._host_state(r.value)
            if not r.value.on or self.phase != "up":
                return out + self._finish(c, None)
            if start is None:
                self.watch.stopping(c.name)
                reason = c.cmd.reason if isinstance(c.cmd, VmStop) else ""
                return [*out, Log("warning", "stopping VM", {"vm": c.name, "reason": reason}),
                        Call("hypervisor", "stop", (c.name,), f"cmd:{c.token}:stop")]
            # Only a running domain is "already running": a defined, shut-off one is started.
            return [*out, Call("hypervisor", "is_running", (c.name,), f"cmd:{c.token}:running")]
        if step == "running" and start is not None:
            if r.value:
                metrics.AGENT_VM_STARTS.labels(self.host, "already").inc()
                return self._finish(c, AgentReply(host=self.host, vm=c.name, ok=True, state="running", already=True))
            verdict = definition_verdict(start.vm, self.definitions.get(c.name, ""), self.definitions_dir)
            if verdict == RESOLVE:
                return [Call("definitions", "resolve", (start.vm.definition, self.definitions_dir),
                             f"cmd:{c.token}:resolved")]
            if verdict:
                return self._failed(c, verdict)
            return self._start(c, start)
        if step == "resolved" and start is not None:
            real, root = r.value
            if not under(real, root):
                return self._failed(c, refusal(start.vm, self.definitions_dir))
            return self._start(c, start)
        if step == "guard" and start is not None:
            if r.value:
                return self._failed(c, str(r.value))
            return [Call("hypervisor", "start", (start.vm,), f"cmd:{c.token}:start")]
        if step == "start":
            self.watch.started(c.name)
            metrics.AGENT_VM_STARTS.labels(self.host, "started").inc()
            # The reply goes at once (the scheduler's wave waits on it); the report may wait
            # for the burst (``_changed``). ``_finish`` first: this command no longer runs.
            out = self._finish(c, AgentReply(host=self.host, vm=c.name, ok=True, state="running"))
            return out + self._changed(coalesce=True)
        if step == "stop":
            self.watch.stop_done(c.name, now.wall)
            return self._finish(c, AgentReply(host=self.host, vm=c.name, ok=True, state="stopped")) + self._changed()
        return []

    def _start(self, c: _Command, start: VmStart) -> list[Effect]:
        if self.watchdog:
            return [Call("watchdog", "start_refusal", (), f"cmd:{c.token}:guard")]
        return [Call("hypervisor", "start", (start.vm,), f"cmd:{c.token}:start")]

    def _failed(self, c: _Command, error: str) -> list[Effect]:
        if isinstance(c.cmd, VmStart):
            metrics.AGENT_VM_STARTS.labels(self.host, "failed").inc()
        return [Log("error", "VM command failed", {"vm": c.name, "error": error}),
                *self._finish(c, AgentReply(host=self.host, vm=c.name, ok=False, state="unknown", error=error))]

    def _finish(self, c: _Command, reply: AgentReply | None) -> list[Effect]:
        self.running.pop(c.token, None)
        self.busy.discard(c.name)
        return [Reply(c.token, reply)]


# ``definition_verdict``: the path must be resolved (through the port) before it is judged.
RESOLVE = "resolve"


def definition_verdict(spec: VmSpec, configured: str, directory: str) -> str:
    """'' if the command's definition may reach libvirt, ``RESOLVE`` if it is a path
    to check under ``directory`` once its symlinks are resolved, else why not. Only a
    path on the shared storage the operator configured (or the config's own
    definition for the VM): XML in a message could attach any disk of this host to a VM."""
    if not spec.definition:
        return ""
    if configured and spec.definition == configured:
        return ""
    if directory and not spec.definition.lstrip().startswith("<"):
        return RESOLVE
    return refusal(spec, directory)


def under(real_path: str, real_directory: str) -> bool:
    """Is a resolved path inside a resolved directory (not the directory itself)?"""
    root = real_directory.rstrip(posixpath.sep) or posixpath.sep
    return real_path.startswith(root.rstrip(posixpath.sep) + posixpath.sep) and real_path != root


def refusal(spec: VmSpec, directory: str) -> str:
    return (f"definition for {spec.name} refused: only a path under [storage] definitions_dir "
            f"({directory or 'not set'}) or the config's own definition for the VM is used")
