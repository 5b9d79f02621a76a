"""Fault plans (swarm testing from the seed) and their injection (hafence.sim.faults)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

from hafence.contracts import FenceRequest
from hafence.sim.clock import NodeClock, Scheduler
from hafence.sim.faults import (
    HEALTHY,
    KINDS,
    SLOWEST_CLOCK,
    WATCHDOG_KINDS,
    Action,
    FaultInjector,
    FaultPlan,
    draw_plan,
)
from hafence.sim.run import run_seed
from hafence.sim.transport import Faults, SimNats
from hafence.sim.world import World

HOSTS = ["h1", "h2", "h3"]


def plan(seed: int, **kw: object) -> FaultPlan:
    return draw_plan(random.Random(seed), hosts=HOSTS, services=["arbiter", "fencer"],
                     devices=["h1-bmc", "h2-bmc"], nodes=["h1", "svc"], duration=600.0, **kw)  # type: ignore[arg-type]


def test_a_plan_is_a_function_of_the_seed_and_seeds_differ_in_their_mix() -> None:
    assert [str(a) for a in plan(7).actions] == [str(a) for a in plan(7).actions]
    mixes = {tuple(sorted(plan(seed).enabled)) for seed in range(30)}
    assert len(mixes) > 20  # swarm testing: almost every run a different mix
    every = set().union(*(plan(seed).enabled for seed in range(60)))
    assert every == set(KINDS) - set(WATCHDOG_KINDS)  # no watchdog host, no watchdog fault
    every = set().union(*(plan(seed, watchdog_hosts=["h2"]).enabled for seed in range(60)))
    assert every == set(KINDS)


def test_watchdog_faults_hit_watchdog_hosts_and_leave_the_rest_of_the_plan_as_it_was() -> None:
    for seed in range(30):
        before = [str(a) for a in plan(seed, enable_p=0.6).actions]
        after = plan(seed, enable_p=0.6, watchdog_hosts=["h2"])
        assert set(before) <= {str(a) for a in after.actions}
        for a in after.actions:
            if a.kind == "slot_delay":
                assert a.target == "h2" and 0.0 < a.arg[0] < a.arg[1] <= 15.0
            elif a.kind == "clock_drift" and a.target == "h2" and str(a) not in before:
                assert SLOWEST_CLOCK <= a.arg <= 0.0  # a slow clock, never below 3/4 speed


def test_slot_delay_slows_a_hosts_slot_operations_until_undone_or_healed() -> None:
    s = Scheduler()
    net = SimNats(s, random.Random(1))
    w = World(s, random.Random(2))
    w.add_host("h1")
    p = FaultPlan({"slot_delay": 1.0}, HEALTHY, [Action(1.0, "slot_delay", "h1", (0.5, 2.0)),
                                                  Action(2.0, "heal_all")], 2.0, 2.0)
    FaultInjector(p, w, net, {}, {}, "leases").install()
    s.run(until=1.5)
    assert w.slot_delay == {"h1": (0.5, 2.0)}
    s.run(until=3.0)
    assert w.slot_delay == {}


def test_faults_stay_in_the_fault_phase_which_ends_with_one_heal() -> None:
    for seed in range(20):
        p = plan(seed, enable_p=1.0)
        assert p.actions[-1].kind == "heal_all" and p.actions[-1].at == p.heal_at == 420.0
        assert all(20.0 <= a.at < 420.0 for a in p.actions[:-1])
        assert [a.at for a in p.actions] == sorted(a.at for a in p.actions)


@dataclass
class FakeService:
    name: str
    node: str
    alive: bool = True
    paused_for: float = 0.0
    crashes: int = 0

    def crash(self) -> None:
        self.alive = False
        self.crashes += 1

    def start(self) -> None:
        self.alive = True

    def pause(self, seconds: float) -> None:
        self.paused_for = seconds


def cluster(seed: int = 1) -> tuple[Scheduler, World, SimNats, dict[str, FakeService], dict[str, NodeClock]]:
    s = Scheduler()
    net = SimNats(s, random.Random(seed))
    w = World(s, random.Random(seed), log=net.log)
    for h in HOSTS:
        w.add_host(h, levels=[["bmc"], ["pdu"]])
        w.add_vm(f"vm-{h}", h)
    services = {"arbiter": FakeService("arbiter", "svc"), **{f"agent-{h}": FakeService(f"agent-{h}", h)
                                                               for h in HOSTS}}
    clocks = {n: NodeClock(s, n) for n in ["svc", *HOSTS]}
    net.create_bucket("leases", ttl=6.0)
    return s, w, net, services, clocks


def test_the_heal_undoes_every_fault_still_in_force() -> None:
    s, w, net, services, clocks = cluster()
    p = FaultPlan({"network": 1.0}, Faults(core_loss=0.5), [], 100.0, 100.0)
    inj = FaultInjector(p, w, net, services, clocks, "leases")
    inj.wire_agents()
    s.run(until=1)
    for a in [Action(1, "cut_both", "h1"), Action(1, "hang", "h2", 500.0), Action(1, "power_loss", "h3"),
              Action(1, "device", "h1-bmc", "stuck_on"), Action(1, "clock_jump", "svc", 120.0),
              Action(1, "clock_drift", "h1", 0.005), Action(1, "crash", "arbiter"), Action(1, "bucket_delete")]:
        inj.apply(a)
    inj._set_network(p.network)
    assert services["agent-h2"].paused_for == 99.0  # frozen with its host, but never past the heal
    assert not services["agent-h3"].alive  # died with its host's power
    assert not services["arbiter"].alive and "leases" not in net.buckets
    s.run(until=100)
    inj.apply(Action(100, "heal_all"))
    s.run(until=110)
    assert net.faults == HEALTHY and not net._cut_nodes
    assert all(h.storage_ok and not h.hung and h.powered for h in w.hosts.values())
    assert w.hosts["h3"].boots == 2 and services["agent-h3"].alive  # booted, its agent with it
    assert all(d.behaviour == "ok" for d in w.devices.values())
    assert clocks["svc"].wall() == clocks["h2"].wall() and clocks["h1"].drift == 0.0
    assert services["arbiter"].alive and "leases" in net.buckets


def test_a_host_comes_back_only_when_it_is_off() -> None:
    s, w, net, services, clocks = cluster()
    inj = FaultInjector(FaultPlan({}, HEALTHY, [], 100.0, 100.0), w, net, services, clocks, "leases")
    inj.apply(Action(0, "power_on", "h1"))
    assert w.hosts["h1"].boots == 1
    s.run_until_complete(w.power.fence(FenceRequest(request_id="r", incident="i", host="h1", term=1,
                                                    requested_at=0.0)))
    inj.apply(Action(0, "power_on", "h1"))
    assert w.hosts["h1"].powered and w.hosts["h1"].boots == 2 and w.running_on("vm-h1") == []


def test_the_compromised_agent_publishes_only_on_its_own_subjects() -> None:
    """It tries the others too; the server's grants (production's, as the simulated
    cluster installs them: test_sim_permissions.py) refuse those."""
    s, w, net, services, clocks = cluster()
    net.publish_grants = {"h2": ("hafence.hb.h2", "hafence.inventory.h2", "hafence.dlq.agent-h2")}
    seen: list[str] = []
    watcher = net.connect("watcher")
    watcher.subscribe("hafence.>", lambda m: seen.append(m.subject))
    p = FaultPlan({"compromised_agent": 1.0}, HEALTHY, [], 60.0, 60.0, compromised="h2")
    inj = FaultInjector(p, w, net, services, clocks, "leases",
                        open_incidents=lambda: [("h1", "h1-abc-3")])
    s.call_at(0.0, inj._lie)
    s.run(until=120)
    lies = [line for line in net.log.lines if "liar h2" in line]
    assert len(lies) > 10
    assert seen and set(seen) <= {"hafence.hb.h2"}  # core publishes; stored ones have no stream here
    assert any("js pub hafence.inventory.h2" in line for line in net.log.lines)
    forbidden = [line for line in lies if "forbidden lie" in line]
    assert forbidden and net.denied and {node for _, node, _ in net.denied} == {"h2"}
    assert {subject.split(".")[1] for _, _, subject in net.denied} <= {"fence", "host"}
    assert all(float(line.split()[0]) < 60.0 for line in lies)


def test_a_clock_stall_freezes_the_nodes_services_and_its_monotonic_clock_misses_the_stall() -> None:
    s, w, net, services, clocks = cluster()
    inj = FaultInjector(FaultPlan({}, HEALTHY, [], 100.0, 100.0), w, net, services, clocks, "leases")
    s.run(until=10)
    before = clocks["svc"].monotonic()
    inj.apply(Action(10, "clock_stall", "svc", 20.0))
    assert services["arbiter"].paused_for == 20.0 and services["agent-h1"].paused_for == 0.0
    s.run(until=30)
    assert abs(clocks["svc"].monotonic() - before) < 1e-9  # it believes no time passed
    assert clocks["h1"].monotonic() - clocks["svc"].monotonic() > 19.0


def test_the_compromised_agent_is_silent_while_its_host_is_off() -> None:
    s, w, net, services, clocks = cluster()
    p = FaultPlan({"compromised_agent": 1.0}, HEALTHY, [], 60.0, 60.0, compromised="h2")
    inj = FaultInjector(p, w, net, services, clocks, "leases")
    w.lose_power("h2")
    s.call_at(0.0, inj._lie)
    s.run(until=60)
    assert not [line for line in net.log.lines if "liar h2" in line]


def test_stale_leader_faults_are_one_at_a_time_in_the_cluster_and_end_before_the_heal() -> None:
    drawn = 0
    for seed in range(20):
        p = plan(seed, enable_p=1.0, kinds=("stale_leader",))
        times = [a.at for a in p.actions if a.kind == "stale_leader"]
        assert all(b - a >= 90.0 for a, b in itertools.pairwise(times))
        assert all(t + 60.0 <= p.fault_until for t in times)
        drawn += len(times)
    assert drawn >= 20


def test_a_stale_leader_fault_gets_a_stale_request_to_the_fencer_which_refuses_it() -> None:
    # The fault is there to reach the fencer's term check: a suspended leader that wakes
    # and fences under its old term after the other replica's newer term was admitted.
    result = run_seed(1, minutes=5.0, keep_log=True, kinds=("stale_leader",))
    assert result.ok, f"{result.rule}: {result.what}"
    assert "stale_leader: arbiter-" in result.log
    refusals = [line for line in result.log.splitlines() if "refusing fence request" in line]
    assert any("stale leader term" in line for line in refusals), refusals
