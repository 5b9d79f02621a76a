"""A whole simulated cluster from a seed: world, NATS, every service's real core, checkers.

``SimCluster(seed, shape)`` builds, from one PRNG:

* a configuration through production's loader (``hafence.config.parse_config``):
  ``shape.hosts`` hosts, each fenced through its BMC and, for some, a PDU outlet
  as a second level; ``shape.vms_per_host`` HA VMs on each;
* the simulated NATS with what ``hafence deploy provision`` creates
  (``hafence.sim.provision``);
* the world (``hafence.sim.world``): the same hosts, devices and VMs;
* one ``SimService`` per replica of heartbeat, arbiter, scheduler (``shape.replicas``
  each, the lease picks the leader) and fencer (one: ``SoloReplicas``), each on
  its own control node, and one agent per host on the host's node, each driving
  the service's own core (``hafence.<svc>.core``) with ports bound to the world.
  Store ports (the fencer's journal, the scheduler's start history) are the
  services' in-memory bindings, kept here so they survive a crash of the service;
* the checkers (``hafence.sim.checkers``) watching every effect;
* with watchdog hosts (drawn per seed, ``watchdog_hosts``), the ``[storage]`` slots, a
  last watchdog level for each, every agent's ``watchdog`` port and the fencer's
  watchdog drivers (``hafence.sim.watchdog``), each made anew with its process.

Services are named uniquely (``arbiter-2``, ``agent-h3``: the checkers tell roles
apart by prefix); an agent runs on the node named after its host, and lives and
dies with it: the world tells the cluster when a host goes off (the agent
crashes), boots (a new agent process starts), hangs (the agent freezes) or resumes.

The PRNG is split into independent streams (network, world, ids, faults) so that
drawing one more fault does not change every latency after it.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from hafence.agent.core import AgentCore
from hafence.arbiter.core import ArbiterCore
from hafence.config import ClusterConfig, parse_config
from hafence.core.effects import Effect
from hafence.core.events import Event, Started
from hafence.core.machine import Core
from hafence.fencer.core import FencerCore
from hafence.fencer.ports import MemoryJournal, SoloReplicas
from hafence.heartbeat.core import HeartbeatCore, settings_of
from hafence.scheduler.core import SchedulerCore
from hafence.scheduler.ports import MemoryStartHistory
from hafence.sim.checkers import Checkers
from hafence.sim.clock import NodeClock, Scheduler
from hafence.sim.driver import SimService
from hafence.sim.provision import provision
from hafence.sim.transport import EventLog, Faults, SimNats
from hafence.sim.watchdog import AgentWatchdog, FencerWatchdog
from hafence.sim.world import World

ROLES = ("heartbeat", "arbiter", "scheduler", "fencer")
WALL_EPOCH = 1_700_000_000.0


@dataclass(frozen=True, slots=True)
class ClusterShape:
    hosts: int = 5
    vms_per_host: int = 2
    vm_memory_mb: int = 2048
    host_memory_mb: int = 16384
    replicas: int = 2  # of heartbeat, arbiter and scheduler (the fencer has one)
    pdu_share: float = 0.3  # hosts with a PDU outlet as a second fence level
    clock_skew_s: float = 0.05  # wall clocks differ by up to this (NTP)
    drift: float = 50e-6  # clock rates differ by up to this
    # Hosts with a hardware watchdog and a watchdog fence level (last); None: drawn per
    # seed (a quarter of the seeds none and no slots at all, else each host with 0.6).
    watchdog_share: float | None = None
    # What a confirmed fence leaves: "reboot" (production's [arbiter] action: the fencer
    # powers the confirmed level on again, and [scheduler] auto_clear lets the scheduler
    # clear the new boot once it reports clean: the host takes VMs again) or "off" (it
    # waits for an operator, and the simulation has none). With "off" only, the fault
    # phase fences every host in most seeds and L1 is excused by "no room" in 245 of
    # seeds 1-300; with reboots drawn at 0.75, in 74 (docs/simulation.md). None: drawn
    # per seed, "reboot" with ``reboot_share``. The default share is 0 (every seed as it
    # ran before reboots existed) until the services pass seeds 1-300 with reboots:
    # ``python -m hafence.sim --reboot-share 0.75`` runs them.
    fence_action: str | None = None
    reboot_share: float = 0.0


WATCHDOG_STORAGE = (
    '[storage]\nslot_dir = "/sim/slots"\nwatchdog_timeout_s = 10.0\nslot_interval_s = 1.0\nview_max_age_s = 3.0\n'
)


def watchdog_hosts(shape: ClusterShape, rng: random.Random) -> set[str]:
    """The hosts with a hardware watchdog, from the seed's own stream."""
    share = shape.watchdog_share
    if share is None:
        share = 0.0 if rng.random() < 0.25 else 0.6
    return {f"h{i}" for i in range(1, shape.hosts + 1) if rng.random() < share}


def fence_action(shape: ClusterShape, rng: random.Random) -> str:
    """The cluster's fence action, from the seed's own stream (drawn even when the shape
    fixes it, so that the draw does not depend on the shape)."""
    drawn = "reboot" if rng.random() < shape.reboot_share else "off"
    return shape.fence_action or drawn


def cluster_toml(shape: ClusterShape, rng: random.Random, watchdogs: set[str] | frozenset[str] = frozenset(),
                 action: str = "off") -> str:
    """The cluster's configuration file, as an operator would write it. ``watchdogs``:
    the hosts with a watchdog device (``/dev/watchdog``) and a watchdog level, last;
    ``action``: "reboot" fences by a power cycle and clears a host that comes back clean."""
    lines = [
        "[timings]\nheartbeat_interval_s = 1.0\nmissed_heartbeats = 3\nlease_ttl_s = 6.0\n"
        "fence_ack_wait_s = 30.0\nagent_command_timeout_s = 10.0\ninventory_interval_s = 30.0\n",
    ]
    if action == "reboot":
        # Pacemaker's default stonith-action, with the hands-off policy that goes with it:
        # no operator needed for a host that comes back clean.
        lines.append('[arbiter]\naction = "reboot"\n\n[scheduler]\nauto_clear = true\n')
    if watchdogs:
        lines.append(WATCHDOG_STORAGE)
    for i in range(1, shape.hosts + 1):
        host = f"h{i}"
        lines.append(f'[devices.{host}-bmc]\ndriver = "ipmi"\naddress = "10.0.0.{i}"\nusername = "admin"\n'
                     f'password_env = "HAFENCE_SIM_NO_SECRET"\n')
        levels = [f'{{ devices = [{{ device = "{host}-bmc" }}] }}']
        if rng.random() < shape.pdu_share:
            lines.append(f'[devices.{host}-pdu1]\ndriver = "apc_snmp"\naddress = "10.0.1.{i}"\n'
                         f'community_env = "HAFENCE_SIM_NO_SECRET"\n')
            levels.append(f'{{ devices = [{{ device = "{host}-pdu1", port = "1" }}] }}')
        watchdog = ""
        if host in watchdogs:
            # msgwait is 2 x 10 s: the level's power timeout must see it pass.
            lines.append(f'[devices.{host}-wd]\ndriver = "watchdog"\npower_timeout_s = 30.0\nretries = 0\n')
            levels.append(f'{{ devices = [{{ device = "{host}-wd" }}] }}')
            watchdog = 'watchdog = "/dev/watchdog"\n'
        lines.append(f'[[hosts]]\nname = "{host}"\nmemory_mb = {shape.host_memory_mb}\nvcpus = 16\n{watchdog}'
                     f'levels = [{", ".join(levels)}]\n')
    for i in range(1, shape.hosts + 1):
        for j in range(1, shape.vms_per_host + 1):
            lines.append(f'[[vms]]\nname = "vm{i}-{j}"\nhost = "h{i}"\nmemory_mb = {shape.vm_memory_mb}\nha = true\n')
    return "\n".join(lines)


def _kind(device: str) -> str:
    """The world's kind of a configured device, by the name ``cluster_toml`` gave it."""
    return "bmc" if device.endswith("-bmc") else "watchdog" if device.endswith("-wd") else "pdu"


class SimFeed:
    """The heartbeat monitor's feed as its load guard sees it: the connection's state."""

    def __init__(self) -> None:
        self.service: SimService | None = None

    def connected(self) -> bool:
        s = self.service
        return s is not None and s.conn is not None and s.conn.connected

    def pending(self) -> int:
        return 0


class _Observe:
    """Hands every effect to the checkers, by service name (``fencer``, ``arbiter``...)."""

    def __init__(self, checkers: Checkers, counts: dict[str, int]) -> None:
        self.checkers = checkers
        self.counts = counts
        # service name -> what must know of each new process of it (the watchdog bindings)
        self.on_start: dict[str, Callable[[SimService], None]] = {}

    def on_event(self, service: SimService, event: Event) -> None:
        self.counts["events"] += 1
        if isinstance(event, Started) and service.name in self.on_start:
            self.on_start[service.name](service)
        self.checkers.on_event(service, event)

    def on_effect(self, service: SimService, effect: Effect) -> None:
        self.counts["effects"] += 1
        self.checkers.on_effect(service, effect)


class SimCluster:
    def __init__(self, seed: int, shape: ClusterShape | None = None, keep_log: bool = True,
                 log_level: str = "info", faults: Faults | None = None) -> None:
        self.seed = seed
        self.shape = shape = shape or ClusterShape()
        master = random.Random(seed)
        self.rng_net = random.Random(master.getrandbits(64))
        self.rng_world = random.Random(master.getrandbits(64))
        self.rng_ids = random.Random(master.getrandbits(64))
        self.rng_faults = random.Random(master.getrandbits(64))
        rng_shape = random.Random(master.getrandbits(64))
        rng_watchdog = random.Random(master.getrandbits(64))  # drawn late: the streams above stay as they were
        rng_action = random.Random(master.getrandbits(64))  # drawn last, likewise
        self.scheduler = Scheduler()
        self.log = EventLog(self.scheduler, keep=keep_log)
        self.net = SimNats(self.scheduler, self.rng_net, faults or Faults(), log=self.log)
        self.watchdog_hosts = watchdog_hosts(shape, rng_watchdog)
        self.fence_action = fence_action(shape, rng_action)
        self.config: ClusterConfig = parse_config(cluster_toml(shape, rng_shape, self.watchdog_hosts,
                                                               self.fence_action),
                                                  f"sim-seed-{seed}.toml")
        self.names = provision(self.net, self.config)
        self.world = World(self.scheduler, self.rng_world, log=self.log)
        for host in self.config.hosts:
            kinds: list[list[str]] = [[_kind(level.devices[0].device)] for level in host.levels]
            self.world.add_host(host.name, host.memory_mb, host.vcpus, levels=kinds)  # type: ignore[arg-type]
        for vm in self.config.vms:
            self.world.add_vm(vm.name, vm.host, ha=vm.ha, memory_mb=vm.memory_mb)
        self.checkers = Checkers(self.world, log=self.log)
        self.net.on_stored.append(self.checkers.on_stored)
        self.counts = {"events": 0, "effects": 0}
        self.observer = _Observe(self.checkers, self.counts)
        self.log_level = log_level
        self.clocks: dict[str, NodeClock] = {}
        self.services: list[SimService] = []
        self.by_role: dict[str, list[SimService]] = {role: [] for role in ROLES}
        self.agents: dict[str, SimService] = {}
        self.journals: list[MemoryJournal] = []
        self.histories: list[MemoryStartHistory] = []
        self.failures: list[tuple[float, str]] = []  # what any core raised: a bug, reported by the run
        self._build_services()
        self.world.listeners.append(self._host_changed)

    # -- building ---------------------------------------------------------------------------
    def clock(self, node: str) -> NodeClock:
        if node not in self.clocks:
            rng, shape = self.rng_world, self.shape
            self.clocks[node] = NodeClock(
                self.scheduler, node,
                monotonic_offset=rng.uniform(100.0, 100_000.0),  # since that node booted
                wall_epoch=WALL_EPOCH + rng.uniform(-shape.clock_skew_s, shape.clock_skew_s),
                drift=rng.uniform(-shape.drift, shape.drift),
            )
        return self.clocks[node]

    def _service(self, name: str, node: str, factory: Callable[[], Core], ports: dict[str, object],
                 dlq_name: str) -> SimService:
        """``name``: unique (``arbiter-2``, ``agent-h3``), what the checkers and faults call it."""
        clock = self.clock(node)
        svc = SimService(name, node, factory, ports, None, clock, self.net, prefix=self.config.cluster.subject_prefix,
                         bucket=self.names.leases, observer=self.observer, dlq_name=dlq_name,
                         log_level=self.log_level, failures=self.failures)
        self.services.append(svc)
        return svc

    def _build_services(self) -> None:
        config, world = self.config, self.world
        for i in range(1, self.shape.replicas + 1):
            feed = SimFeed()
            instance = f"heartbeat-{i}"

            def heartbeat(feed: SimFeed = feed, instance: str = instance) -> Core:
                return HeartbeatCore(settings_of(config, instance), nonce=f"{self.rng_ids.getrandbits(32):08x}",
                                     feed=feed)

            svc = self._service(instance, f"ctl-heartbeat-{i}", heartbeat, {}, "heartbeat")
            feed.service = svc
            self.by_role["heartbeat"].append(svc)
        for i in range(1, self.shape.replicas + 1):
            svc = self._service(f"arbiter-{i}", f"ctl-arbiter-{i}", lambda: ArbiterCore(config),
                                {"storage": world.storage}, "arbiter")
            self.by_role["arbiter"].append(svc)
        for i in range(1, self.shape.replicas + 1):
            history = MemoryStartHistory()
            self.histories.append(history)
            svc = self._service(f"scheduler-{i}", f"ctl-scheduler-{i}", lambda: SchedulerCore(config),
                                {"store": history}, "scheduler")
            self.by_role["scheduler"].append(svc)
        self.agent_watchdogs: dict[str, AgentWatchdog] = {}
        self.fencer_watchdog: FencerWatchdog | None = None
        journal = MemoryJournal()
        self.journals.append(journal)
        fencer = self._service("fencer-1", "ctl-fencer-1", lambda: FencerCore(config),
                               {"journal": journal, "replicas": SoloReplicas(), "power": world.power}, "fencer")
        self.by_role["fencer"].append(fencer)
        if config.storage.slot_dir:
            self.fencer_watchdog = FencerWatchdog(world, config, fencer.clock)
            world.power.watchdog = self.fencer_watchdog
            self.observer.on_start[fencer.name] = self.fencer_watchdog.process_started
        for host in config.hosts:
            name = host.name
            ports: dict[str, object] = {
                "host": world.host_port(name),
                "hypervisor": world.hypervisor(name),
                "storage": world.storage,
            }
            guard = None
            if config.storage.slot_dir:
                # Every agent checks its slot (and refuses starts until its first clean
                # check); only a host with a watchdog device arms one.
                guard = ports["watchdog"] = AgentWatchdog(world, config, name, self.clock(name))
                self.agent_watchdogs[name] = guard
            self.agents[name] = self._service(f"agent-{name}", name, lambda name=name: AgentCore(config, name),  # type: ignore[misc]
                                              ports, f"agent-{name}")
            if guard is not None:
                self.observer.on_start[f"agent-{name}"] = guard.process_started

    # -- running ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every process; an agent only if its host runs (it starts when the host boots)."""
        for svc in self.services:
            if svc not in self.agents.values() or self.world.hosts[svc.node].answers:
                svc.start()

    def close(self) -> None:
        for svc in self.services:
            svc.close()

    def _host_changed(self, what: str, host: str) -> None:
        """An agent lives and dies with its host: off kills it, a boot starts a new
        process, a hang freezes it until the host resumes."""
        agent = self.agents.get(host)
        if agent is None:
            return
        if what == "off":
            agent.crash()
        elif what == "boot":
            agent.crash()
            agent.start()
        elif what == "hang":
            agent.freeze()
        elif what == "unhang":
            agent.thaw()

    # -- figures ------------------------------------------------------------------------------
    def fences(self) -> int:
        return sum(1 for r in self.world.runs if r.outcome == "confirmed_off")

    def vm_starts(self) -> int:
        return sum(self.world.hypervisor(h).starts for h in self.world.hosts)

