"""One simulation run: seed → cluster and fault plan → fault phase, heal phase → verdict.

``run_seed(seed)`` builds the cluster (``hafence.sim.cluster``), draws the run's
fault plan from the same seed (``hafence.sim.faults.draw_plan``: swarm testing),
and advances the scheduler one step at a time until ``minutes`` of simulated time
have passed, running the checkers (``hafence.sim.checkers``) after every step.
The fault phase ends with one ``heal`` (70% into the run by default); at the end
the cluster must have recovered (L1). Besides S0-S4 and L1, a run fails when a
core raised (``L3``: no input may stop a service; production logs it and goes on,
the simulation calls it the bug it is) or a simulated task failed unobserved.

Everything comes from the seed: the same seed gives the same event log, byte for
byte, and ``RunResult.summary()`` the same line. No real clock is read.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

from hafence.sim.checkers import SafetyViolation, Violation
from hafence.sim.cluster import ClusterShape, SimCluster
from hafence.sim.faults import KINDS, FaultInjector, FaultPlan, draw_for_cluster
from hafence.sim.permissions import publish_grants

DEFAULT_MINUTES = 10.0
# Plan actions that undo a fault (not counted as faults).
UNDO = frozenset({"heal", "heal_all", "start", "unhang", "heal_storage", "heal_both", "power_restore", "bucket_create"})


@dataclass
class RunResult:
    seed: int
    minutes: float
    hosts: int
    steps: int = 0
    faults: int = 0
    fences: int = 0
    vm_starts: int = 0
    events: int = 0
    rule: str = ""  # empty: the run passed
    what: str = ""
    at: float = 0.0
    plan: str = ""
    excuses: list[str] = field(default_factory=list)
    # L1's excuses counted: why -> how many VMs ("no room", "given up", "compromised"); a
    # reader sees how much of the cluster L1 did not check
    excused: dict[str, int] = field(default_factory=dict)
    reboot_share: float | None = None  # as asked (None: the shape's default), for the replay line
    log: str = ""  # the event log (kept only when asked for)

    @property
    def ok(self) -> bool:
        return not self.rule

    def summary(self) -> str:
        verdict = "ok" if self.ok else f"VIOLATED {self.rule} at t={self.at:.3f}"
        excused = f"; L1 excused {excused_text(self.excused)}" if self.excused else ""
        return (f"seed {self.seed}: {self.minutes:g} simulated min, {self.hosts} hosts, {self.steps} steps, "
                f"{self.faults} faults, {self.fences} fences, {self.vm_starts} VM starts: {verdict}{excused}")


def excused_text(excused: dict[str, int]) -> str:
    """``3 VMs (no room)``, ``3 VMs (2 no room, 1 given up)``."""
    total = sum(excused.values())
    if len(excused) == 1:
        why = next(iter(excused))
    else:
        why = ", ".join(f"{n} {reason}" for reason, n in sorted(excused.items()))
    return f"{total} VM{'s' if total != 1 else ''} ({why})"


def build(seed: int, minutes: float = DEFAULT_MINUTES, hosts: int = 5, keep_log: bool = True,
          kinds: tuple[str, ...] = KINDS, reboot_share: float | None = None) -> tuple[SimCluster, FaultPlan]:
    """The cluster of ``seed`` with its fault plan installed, not yet started.
    ``reboot_share``: the share of seeds whose fences reboot (``ClusterShape.reboot_share``;
    None: the shape's default). The draw has its own stream: a seed drawn "off" runs as
    it would with no reboots at all."""
    shape = ClusterShape(hosts=hosts) if reboot_share is None else ClusterShape(hosts=hosts, reboot_share=reboot_share)
    cluster = SimCluster(seed, shape, keep_log=keep_log)
    # Before anything connects: every node publishes under its production identity's grants.
    cluster.net.publish_grants = publish_grants(cluster.config, {svc.node for svc in cluster.services})
    plan = draw_for_cluster(cluster, minutes * 60.0, kinds=kinds)
    FaultInjector.for_cluster(cluster, plan).install()
    return cluster, plan


def run_seed(seed: int, minutes: float = DEFAULT_MINUTES, hosts: int = 5, keep_log: bool = True,
             kinds: tuple[str, ...] = KINDS, reboot_share: float | None = None) -> RunResult:
    cluster, plan = build(seed, minutes, hosts, keep_log, kinds, reboot_share)
    result = RunResult(seed, minutes, hosts, plan=plan.describe(), reboot_share=reboot_share)
    result.faults = sum(1 for a in plan.actions if a.kind not in UNDO and not (a.kind == "device" and a.arg == "ok"))
    result.faults += 1 if plan.compromised else 0
    cluster.log("sim", f"seed {seed}: {plan.describe()}")
    s, checkers, failures = cluster.scheduler, cluster.checkers, cluster.failures
    unhandled = s.unhandled
    end = minutes * 60.0
    after_step = checkers.after_step

    violations = checkers.violations
    denied = cluster.net.denied
    denials_seen = [0]  # the liar's refusals pile up: each step reads only the new ones

    def check() -> None:
        after_step()
        if len(denied) > denials_seen[0]:
            new, denials_seen[0] = denied[denials_seen[0]:], len(denied)
            for at, node, subject in new:
                if node != plan.compromised:
                    # Production's nats.conf would refuse a service what the simulation saw
                    # it need: a permission table too tight for the services is a failover
                    # that breaks only in production.
                    raise SafetyViolation(Violation("E1", s.steps, at, f"{node} may not publish on {subject} "
                                                                       "(hafence.natsconf permissions)"))
        if violations:
            # Raised inside a callback that caught it (a task's step, a port's outcome): the
            # checkers kept it all the same.
            raise SafetyViolation(violations[0])
        if failures:
            at, what = failures[0]
            raise SafetyViolation(Violation("L3", s.steps, at, f"a core raised: {what}"))
        if unhandled:
            name, exc = unhandled[0]
            if isinstance(exc, SafetyViolation):
                raise exc
            raise SafetyViolation(Violation("E0", s.steps, s.now, f"task {name} failed: {exc!r}"))

    cluster.start()
    try:
        s.run(until=end, after_step=check)
        result.excuses = checkers.check_recovery()
        for why in checkers.excused.values():
            result.excused[why] = result.excused.get(why, 0) + 1
    except SafetyViolation as err:
        v = err.violation
        result.rule, result.what, result.at = v.rule, v.what, v.time
        if v.rule in ("L3", "E0", "E1"):  # the run's own rules (the checkers log theirs)
            cluster.log("sim", str(v))
    except Exception as err:  # a bug of the simulator or of code it runs outside a core: report, with the seed
        result.rule, result.what, result.at = "E0", "".join(traceback.format_exception(err)), s.now
        cluster.log("sim", f"run failed: {err!r}")
    cluster.close()
    result.steps = s.steps
    result.fences = cluster.fences()
    result.vm_starts = cluster.vm_starts()
    result.events = cluster.counts["events"]
    if keep_log:
        result.log = cluster.log.text()
    return result
