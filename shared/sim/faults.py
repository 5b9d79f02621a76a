"""Fault plans drawn from the seed (swarm testing), and their injection.

``draw_plan(rng, ...)`` decides, from the run's PRNG alone, which kinds of fault
this run has (each kind is switched on with probability ``enable_p``: every run
stresses a different mix, the point of swarm testing) and at what rate, then
draws a timed list of ``Action``s for the *fault phase* (the first ``fault_share``
of the run): each fault is paired with its undo a few seconds to minutes later,
and at ``heal_at`` one ``heal_all`` action undoes whatever is left — the network
becomes a healthy LAN, every node reaches NATS and storage, hung hosts resume,
devices work, lost mains come back, crashed services are started, clocks are
stepped back and their drift stopped, the compromised agent goes quiet, the lease
bucket exists. The cluster must then converge (L1).

The kinds (``KINDS``), as ../shared/SIMULATION.md lists them:

* ``service_crash`` (store survives, memory does not; restarted seconds later),
  ``service_pause`` (past its lease: GC, SIGSTOP);
* ``nats_restart``, ``bucket_loss`` (the lease bucket is deleted and re-created:
  revisions, hence lease terms, start again at 1);
* ``network``: the ``SimNats`` ``Faults`` of the fault phase (latency, spikes,
  core loss, lost acks, lost replies), drawn once;
* ``host_cut_nats``, ``host_cut_storage``, ``host_cut_both``;
* ``host_hang``, ``host_crash`` (VMs die; the host may reset itself),
  ``host_power_loss`` (with its BMC);
* ``device_fault``: a device slow, stuck on, unreachable or refusing credentials;
* ``clock_jump``, ``clock_drift`` (a node's wall clock stepped; its rate changed);
  ``clock_stall``: a control node is suspended (a VM paused and resumed): its
  processes freeze and its monotonic clock does not count the stall, so on waking
  a lease holder there believes its lease still valid after the KV expired it and
  acts on its backlog — the stale leader the fencing token (S3) is for (pausing
  the clock with a drift would stretch the timers set during the stall, an
  artefact of ``NodeClock``);
* ``stale_leader``: the fencing token's own test (S3). Arbiter leader A's node is
  suspended (its monotonic clock misses it, as ``clock_stall``); the other replica B
  takes the lease with a newer term; a host crashes with power devices that refuse
  the fencer's credentials, so B's first fence of it fails at once (the fencer has
  now admitted B's term); B's node is suspended in turn and the devices work again;
  A wakes once the retry is due by the wall clock. Its backlog shows B's failed
  fence, its clock says its lease is still valid, so it fences again under its old
  term. The fencer must refuse it; without its term check it answers the request
  from its journal (no power run: S3 judges the admission). ``clock_stall`` alone
  rarely gets a stale request through: a stale leader's decisions are those of the
  new one (same incident, same request id), and it reads the new one's
  ``fence_requested`` before its retry is due on its stalled clock. One at a time
  in the cluster, 90 s apart, on a host no other host fault holds then, at least
  60 s before the heal (which would reset the crashed host mid-fence); the drawn
  host, or the next that still runs;
* ``host_comes_back``: a host that is off (fenced) is powered on again;
* ``compromised_agent``: one host's agent credentials publish well-formed lies on
  every subject an agent may publish on (``hafence.natsconf``: its own
  ``hb.<host>``, ``inventory.<host>`` and ``dlq.agent-<host>``), and try the
  subjects it may not (a fence result, an operator's confirmation, its own
  ``cleared``, a fence request with a huge term, each on its proper subject), which
  the simulated server refuses by production's permissions: heartbeats with
  forged boot ids, inventories claiming VMs that run elsewhere, dead letters, and
  messages of other types on those subjects (a ``FenceResult`` saying another host
  is ``confirmed_off``, a ``HostEvent``) that S5 (``hafence.routes``) must refuse.
  The liar knows every incident id (the checkers' open incidents): the worst case.
  It never lies about its own VMs stopping (a compromised host is root on its own
  hypervisor: no cluster can defend the VMs it runs).

Two kinds hit watchdog hosts only and are drawn only in a cluster with one, after every
other draw (``WATCHDOG_KINDS``; a cluster without watchdog hosts gets the plan it had
before they existed): ``slot_delay`` (each slot operation of the host takes up to
0.2-15 s: a slow or hung NFS) and ``clock_slow`` (the host's clock at 75-98% of real
speed: docs/watchdog.md's margin). What the watchdog's assumptions exclude (a watchdog
that does not fire, a slot read through a cache, a slower clock) is not drawn: a
violation it caused would be the assumption's, not the code's.

``FaultInjector`` applies a plan to the world, the ``SimNats`` and the services
(``hafence.sim.driver.SimService``: ``crash``/``start``/``pause``), and tells the
checkers of each crash. Nodes are named as the cluster names them: a host's agent
runs on the node named after the host.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hafence.contracts import (
    DeadLetter,
    FenceRequest,
    FenceResult,
    Heartbeat,
    HostEvent,
    Inventory,
    VmInfo,
    encode,
)
from hafence.sim.clock import NodeClock
from hafence.sim.transport import Connection, Faults, NotConnected, SimNats
from hafence.sim.world import World

KINDS: tuple[str, ...] = (
    "service_crash", "service_pause", "nats_restart", "bucket_loss", "network",
    "host_cut_nats", "host_cut_storage", "host_cut_both", "host_hang", "host_crash", "host_power_loss",
    "device_fault", "clock_jump", "clock_drift", "host_comes_back", "compromised_agent", "clock_stall",
    "stale_leader", "slot_delay", "clock_slow",
)
# Faults of watchdog self-fencing that docs/watchdog.md's assumptions allow (host hangs,
# agent crashes and pauses, lost storage are the kinds above): drawn after every other
# fault, and only in a cluster with watchdog hosts, so that a cluster without one gets
# the very plan it had before they existed.
WATCHDOG_KINDS: tuple[str, ...] = ("slot_delay", "clock_slow")
HEALTHY = Faults()
# A watchdog host's clock may run slow down to 3/4 of real speed (assumption 4).
SLOWEST_CLOCK = -0.25


@dataclass(frozen=True, slots=True)
class Action:
    """One timed step of a plan: ``kind`` on ``target`` (a service, host, node or
    device name), ``arg`` its size (seconds, a drift, a behaviour)."""

    at: float
    kind: str
    target: str = ""
    arg: Any = None

    def __str__(self) -> str:
        arg = "" if self.arg is None else f" {self.arg:g}" if isinstance(self.arg, float) else f" {self.arg}"
        return f"t={self.at:.3f} {self.kind} {self.target}{arg}".rstrip()


@dataclass
class FaultPlan:
    enabled: dict[str, float]  # kind -> rate (faults per simulated minute; network: 1)
    network: Faults
    actions: list[Action]
    fault_until: float
    heal_at: float
    compromised: str = ""

    def describe(self) -> str:
        kinds = ", ".join(f"{k} {r:.2g}/min" for k, r in sorted(self.enabled.items())) or "none"
        lines = [f"fault kinds: {kinds}; fault phase until t={self.fault_until:g}, heal at t={self.heal_at:g}"]
        if "network" in self.enabled:
            n = self.network
            lines.append(f"network: latency {n.latency_min:g}-{n.latency_max:g}s spikes {n.spike_probability:.2g}"
                         f"x{n.spike_max:g}s core_loss {n.core_loss:.2g} ack_loss {n.ack_loss:.2g} "
                         f"reply_loss {n.reply_loss:.2g}")
        return "\n".join(lines)


def draw_plan(
    rng: random.Random,
    *,
    hosts: list[str],
    services: list[str],
    devices: list[str],
    nodes: list[str],
    duration: float,
    fault_share: float = 0.7,
    start_after: float = 20.0,
    lease_ttl: float = 6.0,
    enable_p: float = 0.4,
    kinds: tuple[str, ...] = KINDS,
    watchdog_hosts: list[str] | None = None,
) -> FaultPlan:
    """A plan for one run. ``services``: the names of the services that may crash or
    pause; ``nodes``: every node whose clock may be faulted; ``start_after``: the
    cluster's settling time (leases taken, first inventories); ``watchdog_hosts``: the
    hosts with a hardware watchdog (the ``WATCHDOG_KINDS`` in ``kinds`` hit them)."""
    fault_until = duration * fault_share
    enabled = {k: round(rng.uniform(0.2, 2.0), 3) for k in kinds
               if k not in WATCHDOG_KINDS and rng.random() < enable_p}
    network = HEALTHY
    if "network" in enabled:
        enabled["network"] = 1.0
        lo = rng.uniform(0.0002, 0.005)
        network = Faults(latency_min=lo, latency_max=lo + rng.uniform(0.0, 0.05),
                         spike_probability=rng.choice([0.0, 0.01, 0.05]), spike_max=rng.uniform(0.1, 3.0),
                         core_loss=rng.choice([0.0, 0.01, 0.1]), ack_loss=rng.choice([0.0, 0.01, 0.1]),
                         reply_loss=rng.choice([0.0, 0.01, 0.05]))
    compromised = rng.choice(hosts) if "compromised_agent" in enabled and hosts else ""
    actions: list[Action] = []
    busy: dict[str, float] = {}  # one fault at a time per host (its undo must not overlap another's)

    def times(rate_per_min: float) -> list[float]:
        out, t = [], start_after
        while True:
            t += rng.expovariate(rate_per_min / 60.0)
            if t >= fault_until:
                return out
            out.append(t)

    def host_free(t: float, host: str, until: float) -> bool:
        if busy.get(host, -1.0) > t:
            return False
        busy[host] = until
        return True

    for kind in sorted(enabled):
        if kind in ("network", "compromised_agent"):
            continue
        for t in times(enabled[kind]):
            if kind == "service_crash" and services:
                svc = rng.choice(services)
                actions += [Action(t, "crash", svc), Action(t + rng.uniform(0.5, 20.0), "start", svc)]
            elif kind == "service_pause" and services:
                actions.append(Action(t, "pause", rng.choice(services), rng.uniform(0.5, 3.0) * lease_ttl))
            elif kind == "nats_restart":
                actions.append(Action(t, "nats_restart", "", rng.uniform(0.5, 10.0)))
            elif kind == "bucket_loss":
                actions += [Action(t, "bucket_delete"), Action(t + rng.uniform(0.0, 5.0), "bucket_create")]
            elif kind in ("host_cut_nats", "host_cut_storage", "host_cut_both", "host_hang") and hosts:
                host, length = rng.choice(hosts), rng.uniform(2.0, 60.0)
                if not host_free(t, host, t + length):
                    continue
                do, undo = {"host_cut_nats": ("cut", "heal"), "host_cut_storage": ("cut_storage", "heal_storage"),
                            "host_cut_both": ("cut_both", "heal_both"), "host_hang": ("hang", "unhang")}[kind]
                actions += [Action(t, do, host, length), Action(t + length, undo, host)]
            elif kind == "host_crash" and hosts:
                host = rng.choice(hosts)
                reset = rng.choice([None, rng.uniform(10.0, 120.0)])
                if host_free(t, host, t + (reset or fault_until)):
                    actions.append(Action(t, "host_crash", host, reset))
            elif kind == "host_power_loss" and hosts:
                host, length = rng.choice(hosts), rng.uniform(20.0, 180.0)
                if host_free(t, host, t + length):
                    actions += [Action(t, "power_loss", host), Action(t + length, "power_restore", host)]
            elif kind == "device_fault" and devices:
                device = rng.choice(devices)
                behaviour = rng.choice(["slow", "stuck_on", "unreachable", "bad_credentials"])
                actions += [Action(t, "device", device, behaviour),
                            Action(t + rng.uniform(10.0, 150.0), "device", device, "ok")]
            elif kind == "clock_jump" and nodes:
                actions.append(Action(t, "clock_jump", rng.choice(nodes), rng.choice([-1.0, 1.0]) *
                                      rng.uniform(1.0, 300.0)))
            elif kind == "clock_stall" and nodes:
                node = rng.choice([n for n in nodes if n.startswith("ctl-")] or nodes)
                actions.append(Action(t, "clock_stall", node, rng.uniform(0.5, 3.0) * lease_ttl))
            elif kind == "clock_drift" and nodes:
                actions.append(Action(t, "clock_drift", rng.choice(nodes), rng.uniform(-0.01, 0.01)))
            elif kind == "stale_leader" and hosts:
                host = rng.choice(hosts)
                # (the host fails this long after leader A is suspended, B is suspended this
                # long after its fence failed, A wakes this long after B's retry was due)
                when = (rng.uniform(1.5, 3.0) * lease_ttl, rng.uniform(0.2, 2.0), rng.uniform(0.5, 6.0))
                # One at a time in the cluster (it is about the leader, not a storm of hosts,
                # which the storm guard would rightly hold), on a host free for its span.
                # Its scenario (~45 s to play out) ends before the heal, which would reset the
                # crashed host in the middle of its fence.
                if t + 60.0 <= fault_until and busy.get(" stale_leader", -1.0) <= t and busy.get(host, -1.0) <= t:
                    busy[" stale_leader"] = busy[host] = t + 90.0
                    actions.append(Action(t, "stale_leader", host, when))
            elif kind == "host_comes_back" and hosts:
                actions.append(Action(t, "power_on", rng.choice(hosts)))
    if watchdog_hosts:
        wd_kinds = [k for k in WATCHDOG_KINDS if k in kinds]
        wd_enabled = {k: round(rng.uniform(0.2, 2.0), 3) for k in wd_kinds if rng.random() < enable_p}
        enabled.update(wd_enabled)
        for kind in sorted(wd_enabled):
            for t in times(wd_enabled[kind]):
                host, length = rng.choice(watchdog_hosts), rng.uniform(5.0, 90.0)
                if not host_free(t, host, t + length):
                    continue
                if kind == "slot_delay":
                    # A slow or hung NFS: each slot operation of the host takes this long
                    # (past half the watchdog timeout its checks are stale: views feed it).
                    most = rng.uniform(0.2, 15.0)
                    actions += [Action(t, "slot_delay", host, (most / 4, most)), Action(t + length, "slot_fast", host)]
                elif kind == "clock_slow":
                    actions += [Action(t, "clock_drift", host, rng.uniform(SLOWEST_CLOCK, -0.02)),
                                Action(t + length, "clock_drift", host, 0.0)]
    # An undo that would fall after the fault phase is left to the heal.
    actions = [a for a in actions if a.at < fault_until] + [Action(fault_until, "heal_all")]
    actions.sort(key=lambda a: a.at)  # stable: equal times keep their drawing order
    return FaultPlan(enabled, network, actions, fault_until, fault_until, compromised)


@dataclass
class FaultInjector:
    """Carries a plan out. ``services``: key (``SimService.who``, ``name@node``) ->
    ``SimService``; ``clocks``: node ->
    ``NodeClock``; ``lease_bucket``: the KV bucket of the role leases;
    ``on_crash(service_name)``: the checkers' ``service_crashed``;
    ``open_incidents()``: (host, incident) pairs the liar may forge results for."""

    plan: FaultPlan
    world: World
    net: SimNats
    services: dict[str, Any]
    clocks: dict[str, NodeClock]
    lease_bucket: str
    lease_ttl: float = 6.0
    prefix: str = "hafence"
    on_crash: Callable[[str], None] | None = None
    open_incidents: Callable[[], list[tuple[str, str]]] = lambda: []
    on_claim: Callable[[list[str]], None] | None = None  # VMs the liar claimed to run
    liar_interval: tuple[float, float] = (1.0, 5.0)
    retry_backoff: float = 15.0  # the arbiter's fence_retry_backoff_s (stale_leader times A's wake by it)
    applied: list[str] = field(default_factory=list)
    _jumps: dict[str, float] = field(default_factory=dict)
    _liar: Connection | None = None
    _liar_seq: int = 0

    def install(self) -> None:
        s = self.net.scheduler
        if "network" in self.plan.enabled:
            s.call_at(self.plan.actions[0].at if self.plan.actions else 0.0, self._set_network, self.plan.network)
        for action in self.plan.actions:
            s.call_at(action.at, self.apply, action)
        if self.plan.compromised:
            first = min((a.at for a in self.plan.actions), default=0.0)
            s.call_at(first, self._lie)

    def _set_network(self, faults: Faults) -> None:
        self.net.faults = faults
        self.net.log("fault", f"network faults {faults}")

    # -- one action -------------------------------------------------------------------------
    def apply(self, action: Action) -> None:
        self.applied.append(str(action))
        self.net.log("fault", str(action))
        w, net, k, target = self.world, self.net, action.kind, action.target
        if k == "crash":
            self._crash(target)
        elif k == "start":
            self._start(target)
        elif k == "pause":
            svc = self.services.get(target)
            if svc is not None:
                svc.pause(self._until_heal(action.arg))
        elif k == "nats_restart":
            net.restart(action.arg)
        elif k == "bucket_delete":
            net.delete_bucket(self.lease_bucket)
        elif k == "bucket_create":
            self._bucket()
        elif k in ("cut", "cut_both"):
            net.cut(target)
            if k == "cut_both":
                w.cut_storage(target)
        elif k in ("heal", "heal_both"):
            net.heal(target)
            if k == "heal_both":
                w.heal_storage(target)
        elif k == "cut_storage":
            w.cut_storage(target)
        elif k == "heal_storage":
            w.heal_storage(target)
        elif k == "hang":
            w.hang(target)
        elif k == "unhang":
            w.unhang(target)
        elif k == "host_crash":
            w.crash(target, reboot_after=action.arg)
        elif k == "power_loss":
            w.lose_power(target)
        elif k == "power_restore":
            w.restore_power(target)
        elif k == "device":
            w.set_behaviour(target, action.arg)
        elif k == "clock_jump":
            clock = self.clocks.get(target)
            if clock is not None:
                clock.jump(action.arg)
                self._jumps[target] = self._jumps.get(target, 0.0) + action.arg
        elif k == "clock_stall":
            self._stall(target, action.arg)
        elif k == "stale_leader":
            self._stale_leader(action)
        elif k == "clock_drift":
            clock = self.clocks.get(target)
            if clock is not None:
                clock.set_drift(action.arg)
        elif k == "slot_delay":
            w.slot_delay[target] = action.arg
            w.log(f"{target}'s slot operations take {action.arg[0]:.2f}-{action.arg[1]:.2f}s")
        elif k == "slot_fast":
            if w.slot_delay.pop(target, None) is not None:
                w.log(f"{target}'s slot operations are fast again")
        elif k == "power_on":
            host = w.hosts[target]
            if not host.powered and host.mains:
                w.power_on(target, "comes back after a fence")
        elif k == "heal_all":
            self.heal()
        else:
            raise ValueError(f"unknown fault action {action}")

    def _stall(self, node: str, seconds: float) -> None:
        """The node is suspended: its processes freeze and its monotonic clock stops, so
        on waking they believe only an instant passed (the stale leader)."""
        length = self._until_heal(seconds)
        for svc in self.services.values():
            if getattr(svc, "node", None) == node and svc.alive:
                svc.pause(length)
        clock = self.clocks.get(node)
        if clock is not None:
            clock.monotonic_offset -= length

    def _stale_leader(self, action: Action) -> None:
        """Leader A is suspended; B takes the lease; a host fails and B's first fence of it
        fails (refused credentials); B is suspended in turn, the devices work again, and A
        wakes once the retry is due by the wall clock: its backlog shows B's failed fence,
        its monotonic clock says its lease is valid, so it retries under its old term."""
        host, (hold, delay, wake) = action.target, action.arg
        w, s = self.world, self.net.scheduler
        first = self._arbiter_leader()
        # The drawn host, or the next one that still runs (a fence or another fault took it).
        names = sorted(w.hosts)
        at = names.index(host)
        # A host with a watchdog level is fenced through its pill once its BMC refuses:
        # B's fence would not fail, and there would be no stale retry to refuse.
        host = next((h for h in names[at:] + names[:at] if w.hosts[h].answers and not w.hosts[h].watchdog), "")
        if first is None or not host:
            return
        frozen = [svc for svc in self.services.values() if svc.node == first.node and svc.alive]
        since = s.now
        self.net.log("fault", f"stale_leader: {first.who} suspended (its monotonic clock stops)")
        for svc in frozen:
            svc.freeze()
        devices = [d.name for d in w.hosts[host].devices]
        thawed = False

        def thaw() -> None:
            nonlocal thawed
            if thawed:
                return
            thawed = True
            self.net.log("fault", f"stale_leader: {first.who} wakes after {s.now - since:g}s")
            clock = self.clocks.get(first.node)
            if clock is not None:
                clock.monotonic_offset -= s.now - since
            for svc in frozen:
                svc.thaw()

        def fail_host() -> None:
            if not w.hosts[host].answers:
                thaw()
                return
            for device in devices:
                w.set_behaviour(device, "bad_credentials")
            w.crash(host)
            ran_before = len(w.runs)

            def watch() -> None:
                if s.now >= self.plan.heal_at:
                    return
                if not any(r.host == host and r.finished is not None and r.outcome != "confirmed_off"
                           for r in w.runs[ran_before:]):
                    s.call_later(0.1, watch)
                    return
                s.call_later(delay, stall_second)

            s.call_later(0.1, watch)

        def stall_second() -> None:
            for device in devices:
                w.set_behaviour(device, "ok")
            second = self._arbiter_leader()
            if second is not None and second.node != first.node:
                self._stall(second.node, self.retry_backoff + wake + 10.0)
            s.call_later(self.retry_backoff + wake - delay, thaw)

        s.call_later(hold, fail_host)
        s.call_at(self.plan.heal_at, thaw)

    def _arbiter_leader(self) -> Any:
        """The arbiter replica that holds the lease with the newest term, as its core knows."""
        held = [svc for _, svc in sorted(self.services.items())
                if getattr(svc, "name", "").startswith("arbiter") and svc.alive
                and getattr(svc.core, "lease_held", False)]
        return max(held, key=lambda svc: getattr(svc.core, "term", 0), default=None)

    def _agent(self, host: str) -> Any:
        for svc in self.services.values():
            if getattr(svc, "node", None) == host and getattr(svc, "name", "").startswith("agent"):
                return svc
        return None

    @classmethod
    def for_cluster(cls, cluster: Any, plan: FaultPlan) -> FaultInjector:
        """On a ``hafence.sim.cluster.SimCluster`` (which wires agents to their hosts itself)."""
        if plan.compromised:
            cluster.checkers.compromised.add(plan.compromised)
        return cls(plan, cluster.world, cluster.net, {svc.who: svc for svc in cluster.services},
                   cluster.clocks, cluster.names.leases, lease_ttl=cluster.config.timings.lease_ttl_s,
                   prefix=cluster.config.cluster.subject_prefix, on_crash=cluster.checkers.service_crashed,
                   open_incidents=cluster.checkers.open_incidents, on_claim=cluster.checkers.disputed.update,
                   retry_backoff=cluster.config.arbiter.fence_retry_backoff_s)

    def _crash(self, name: str) -> None:
        svc = self.services.get(name)
        if svc is not None and svc.alive:
            svc.crash()
            if self.on_crash is not None:
                self.on_crash(name)

    def _start(self, name: str) -> None:
        svc = self.services.get(name)
        if svc is None or svc.alive:
            return
        host = self.world.hosts.get(svc.node)
        if host is not None and not host.answers:
            return  # an agent starts with its host, not before
        svc.start()

    def _bucket(self) -> None:
        if self.lease_bucket not in self.net.buckets:
            self.net.create_bucket(self.lease_bucket, ttl=self.lease_ttl)

    def _until_heal(self, seconds: float | None) -> float:
        """A freeze lasts ``seconds`` but never past the heal."""
        left = self.plan.heal_at - self.net.scheduler.now
        return max(0.0, left if seconds is None else min(seconds, left))

    def wire_agents(self) -> None:
        """Without a cluster that does it: an agent dies with its host's power, starts
        when the host boots, and is frozen while its host hangs (never past the heal)."""
        def on_host(what: str, host: str) -> None:
            key = next((k for k, svc in self.services.items() if svc is self._agent(host)), "")
            if not key:
                return
            if what == "off":
                self._crash(key)
            elif what == "boot":
                self._start(key)
            elif what == "hang":
                self.services[key].pause(self._until_heal(None))

        self.world.listeners.append(on_host)

    # -- heal -------------------------------------------------------------------------------
    def heal(self) -> None:
        """Undo every fault still in force: the heal phase begins."""
        w, net = self.world, self.net
        net.faults = HEALTHY
        for node in sorted(net._cut_nodes):
            net.heal(node)
        self._bucket()
        for name, host in sorted(w.hosts.items()):
            if not host.storage_ok:
                w.heal_storage(name)
            if host.crashed:
                w.reset(name)
            elif host.hung:
                w.unhang(name)
            if not host.mains:
                w.restore_power(name)
        for name in sorted(w.slot_delay):
            self.apply(Action(self.net.scheduler.now, "slot_fast", name))
        for device in w.devices.values():
            if device.behaviour != "ok":
                w.set_behaviour(device.name, "ok")
        for node, jumped in sorted(self._jumps.items()):
            self.clocks[node].jump(-jumped)
        self._jumps.clear()
        for clock in self.clocks.values():
            if clock.drift != 0.0:
                clock.set_drift(0.0)
        self._liar = None
        # Pauses were drawn to end by now (``_until_heal``); crashed services start.
        for name in sorted(self.services):
            if not self.services[name].alive:
                self._start(name)

    # -- the compromised agent ------------------------------------------------------------
    def _lie(self) -> None:
        s = self.net.scheduler
        if s.now >= self.plan.heal_at:
            return
        host = self.plan.compromised
        if not self.world.hosts[host].answers:  # a host that is off or frozen says nothing
            s.call_later(self.net.rng.uniform(*self.liar_interval), self._lie)
            return
        if self._liar is None or self._liar.closed:
            self._liar = self.net.connect(host, self.clocks.get(host))
        try:
            self._publish_lie(self._liar, host)
        except NotConnected:
            self._liar = None
        s.call_later(self.net.rng.uniform(*self.liar_interval), self._lie)

    def _publish_lie(self, conn: Connection, host: str) -> None:
        rng, w, p = self.net.rng, self.world, self.prefix
        now = conn.clock.wall()
        self._liar_seq += 1
        hb, inv, dlq = f"{p}.hb.{host}", f"{p}.inventory.{host}", f"{p}.dlq.agent-{host}"
        others = [h for h in sorted(w.hosts) if h != host]
        victim = rng.choice(others) if others else host
        incidents = [i for h, i in self.open_incidents() if h != host]
        incident = rng.choice(incidents) if incidents and rng.random() < 0.7 else ""
        victim_of = {i: h for h, i in self.open_incidents()}
        if incident:
            victim = victim_of.get(incident, victim)
        lie = rng.randrange(6)
        if lie == 0:  # its own heartbeat from a boot that does not exist
            boot = f"forged-{rng.getrandbits(32):08x}"
            conn.publish(hb, encode(Heartbeat(host=host, boot_id=boot, seq=self._liar_seq, sent_at=now)))
        elif lie == 1:  # it runs VMs that run elsewhere
            vms = [VmInfo(spec=d.spec, state="running") for n, d in sorted(w.vms.items()) if d.home != host][:3]
            if self.on_claim is not None:
                self.on_claim([v.spec.name for v in vms])
            conn.js_publish(inv, encode(Inventory(host=host, boot_id=w.hosts[host].boot_id, memory_mb=1 << 20,
                                                  vcpus=1024, vms=vms, sent_at=now)))
        elif lie == 2:  # another host confirmed off, on each of its subjects
            forged = encode(FenceResult(request_id=f"forged-{self._liar_seq}", incident=incident, host=victim,
                                        term=1 << 40, outcome="confirmed_off", level=1, started_at=now,
                                        finished_at=now))
            conn.js_publish(inv, forged)
            conn.publish(hb, forged)
        elif lie == 3:  # host events about another host
            event = encode(HostEvent(host=victim, kind="confirmed_fenced", at=now, incident=incident, by="liar"))
            conn.js_publish(inv, event)
            conn.publish(hb, event)
        elif lie == 4:  # a dead letter claiming to be another service's
            conn.js_publish(dlq, encode(DeadLetter(service="fencer", subject=f"{p}.fence.result.{victim}",
                                                   error="forged", raw=b"{}", at=now)))
        else:  # another host's heartbeat and inventory on its own subjects
            conn.publish(hb, encode(Heartbeat(host=victim, boot_id="forged", seq=self._liar_seq, sent_at=now)))
            conn.js_publish(inv, encode(Inventory(host=victim, boot_id="forged", memory_mb=1, vcpus=1,
                                                  sent_at=now)))
        self.net.log("fault", f"liar {host} lie #{lie} (victim {victim}, incident {incident or '-'})")
        if rng.random() < 0.5:
            self._publish_forbidden(conn, host, victim, incident, now)

    def _publish_forbidden(self, conn: Connection, host: str, victim: str, incident: str, now: float) -> None:
        """A lie on a subject its identity may not publish on, each well formed and on
        the subject its type belongs to: only the server's permissions (production's,
        ``hafence.sim.permissions``) stand between it and the services (S5)."""
        p, rng = self.prefix, self.net.rng
        lie = rng.randrange(4)
        if lie == 0:  # the fencer's word: another host confirmed off
            conn.js_publish(f"{p}.fence.result.{victim}", encode(FenceResult(
                request_id=f"forged-{self._liar_seq}", incident=incident, host=victim, term=1 << 40,
                outcome="confirmed_off", level=1, started_at=now, finished_at=now)))
        elif lie == 1:  # an operator's word: another host confirmed fenced by hand
            conn.js_publish(f"{p}.host.{victim}.confirmed_fenced", encode(HostEvent(
                host=victim, kind="confirmed_fenced", at=now, incident=incident, by="liar")))
        elif lie == 2:  # its own quarantine lifted (S6)
            conn.js_publish(f"{p}.host.{host}.cleared", encode(HostEvent(
                host=host, kind="cleared", at=now, boot_id=self.world.hosts[host].boot_id, by="liar")))
        else:  # the arbiter's word: fence a live host, with a term that would refuse every real one
            conn.js_publish(f"{p}.fence.request.{victim}", encode(FenceRequest(
                request_id=f"forged-{self._liar_seq}", incident=f"forged-{self._liar_seq}", host=victim,
                term=1 << 40, requested_at=now)))
        self.net.log("fault", f"liar {host} forbidden lie #{lie} (victim {victim})")


def draw_for_cluster(cluster: Any, duration: float, fault_share: float = 0.7, **kw: Any) -> FaultPlan:
    """A plan for a ``SimCluster``, from its fault PRNG: every service (agents too) may
    crash or pause, every host and device may fail, every node's clock may."""
    return draw_plan(
        cluster.rng_faults,
        hosts=sorted(cluster.world.hosts),
        services=[svc.who for svc in cluster.services],
        # A watchdog level's faults are its storage's and its host's, not a device's.
        devices=sorted(name for name, d in cluster.world.devices.items() if d.kind != "watchdog"),
        nodes=sorted(cluster.clocks),
        duration=duration,
        fault_share=fault_share,
        lease_ttl=cluster.config.timings.lease_ttl_s,
        watchdog_hosts=sorted(h for h, state in cluster.world.hosts.items() if state.watchdog),
        **kw,
    )
