"""Placement: which surviving host each VM to restart goes to. Pure; no I/O.

Candidates for a VM: hosts that are up, not in maintenance, with the VM's
labels, enough free memory and vCPUs (with overcommit), none of the VM's
anti-affinity groups already there, and, when some member of one of its
affinity groups already runs somewhere, that host. VMs are placed by priority
(high, medium, low), then largest first (the hardest to fit go while there is
most room). ``spread`` puts each VM on the candidate with the most free memory
left; ``best_fit`` on the one with the least that still fits (packs hosts,
keeps big holes for big VMs). A VM that fits nowhere is pending, with the most
specific reason there is.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hafence.contracts import VmSpec

Strategy = Literal["spread", "best_fit"]
PRIORITY_ORDER = {"high": 0, "medium": 1, "low": 2}


@dataclass(frozen=True, slots=True)
class Candidate:
    name: str
    memory_mb: int
    vcpus: int
    used_memory_mb: int
    used_vcpus: int
    labels: frozenset[str] = frozenset()
    # Groups of the VMs already running there.
    affinity: frozenset[str] = frozenset()
    anti_affinity: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Placement:
    vm: VmSpec
    host: str


@dataclass(frozen=True, slots=True)
class Pending:
    vm: VmSpec
    reason: str


@dataclass(slots=True)
class _Host:
    name: str
    free_mem: int
    free_cpu: float
    labels: frozenset[str]
    affinity: set[str] = field(default_factory=set)
    anti: set[str] = field(default_factory=set)


def order(vms: Iterable[VmSpec]) -> list[VmSpec]:
    return sorted(vms, key=lambda v: (PRIORITY_ORDER[v.priority], -v.memory_mb, -v.vcpus, v.name))


def place(
    vms: Iterable[VmSpec],
    candidates: Sequence[Candidate],
    strategy: Strategy = "spread",
    memory_overcommit: float = 1.0,
    exclude: dict[str, set[str]] | None = None,
    cpu_overcommit: float = 4.0,
) -> tuple[list[Placement], list[Pending]]:
    """``exclude`` maps a VM name to hosts it must not go to (a start failed there).

    The hosts are kept sorted by (free memory, name), so the chosen host is the
    first one that passes the other filters when walking from the most free
    memory down (``spread``) or up from the least that fits (``best_fit``):
    usually a few steps, not a pass over every host per VM. A VM with an
    affinity group already placed looks only at the hosts of that group. What
    fits nowhere gets its reason from the filters in order (``_fitting``)."""
    hosts = [
        _Host(c.name, int(c.memory_mb * memory_overcommit) - c.used_memory_mb,
              c.vcpus * cpu_overcommit - c.used_vcpus, c.labels, set(c.affinity), set(c.anti_affinity))
        for c in candidates
    ]
    placements: list[Placement] = []
    pending: list[Pending] = []
    exclude = exclude or {}
    best_fit = strategy == "best_fit"
    # The ties of max() and min() go to the first host in the candidates' order:
    # the index breaks them the same way in both walking directions.
    sign = 1 if best_fit else -1
    ranked = sorted((h.free_mem, h.name, sign * i) for i, h in enumerate(hosts))
    # Which hosts run a member of each affinity group (only grows).
    by_group: dict[str, set[int]] = {}
    for i, h in enumerate(hosts):
        for g in h.affinity:
            by_group.setdefault(g, set()).add(i)
    for vm in order(vms):
        banned = exclude.get(vm.name, set())
        labels = set(vm.labels)
        anti = set(vm.anti_affinity)
        together = {g for g in vm.affinity if g in by_group}
        mem, cpu = vm.memory_mb, vm.vcpus

        def fits(h: _Host, cpu: int = cpu, banned: set[str] = banned, labels: set[str] = labels,
                 anti: set[str] = anti, together: set[str] = together) -> bool:
            return (h.free_cpu >= cpu and h.name not in banned and labels <= h.labels
                    and not (anti & h.anti) and together <= h.affinity)

        chosen = -1
        if together:
            group = set.intersection(*(by_group[g] for g in together))
            ok = [i for i in group if hosts[i].free_mem >= mem and fits(hosts[i])]
            if ok:
                pick = min if best_fit else max
                chosen = pick(ok, key=lambda i: (hosts[i].free_mem, hosts[i].name, sign * i))
        elif best_fit:
            for k in range(bisect_left(ranked, (mem,)), len(ranked)):
                i = ranked[k][2]
                if fits(hosts[i]):
                    chosen = i
                    break
        else:
            for k in range(len(ranked) - 1, -1, -1):
                free, _, j = ranked[k]
                if free < mem:
                    break
                if fits(hosts[-j]):
                    chosen = -j
                    break
        if chosen < 0:
            pending.append(Pending(vm, _fitting(vm, hosts, banned)[1] or "no candidate host can take it"))
            continue
        host = hosts[chosen]
        key = (host.free_mem, host.name, sign * chosen)
        del ranked[bisect_left(ranked, key)]
        host.free_mem -= vm.memory_mb
        host.free_cpu -= vm.vcpus
        insort(ranked, (host.free_mem, host.name, sign * chosen))
        host.affinity.update(vm.affinity)
        for g in vm.affinity:
            by_group.setdefault(g, set()).add(chosen)
        host.anti.update(vm.anti_affinity)
        placements.append(Placement(vm, host.name))
    return placements, pending


def _fitting(vm: VmSpec, hosts: list[_Host], banned: set[str]) -> tuple[list[_Host], str]:
    """The hosts that can take ``vm``, or the reason none can (the last filter that emptied the list)."""
    if not hosts:
        return [], "no surviving host is up"
    steps: list[tuple[str, list[_Host]]] = []
    left = [h for h in hosts if h.name not in banned]
    steps.append(("start failed on every candidate host", left))
    if vm.labels:
        left = [h for h in left if set(vm.labels) <= h.labels]
        steps.append((f"no candidate host has the labels {', '.join(sorted(vm.labels))}", left))
    together = {g for g in vm.affinity if any(g in h.affinity for h in hosts)}
    if together:
        left = [h for h in left if together <= h.affinity]
        steps.append((f"affinity {', '.join(sorted(together))}: the host of its group cannot take it", left))
    if vm.anti_affinity:
        left = [h for h in left if not (set(vm.anti_affinity) & h.anti)]
        steps.append((f"anti-affinity {', '.join(sorted(vm.anti_affinity))}: every candidate already runs "
                      "a member of its group", left))
    best_mem = max((h.free_mem for h in left), default=0)
    left_mem = [h for h in left if h.free_mem >= vm.memory_mb]
    steps.append((f"needs {vm.memory_mb} MiB; the most free on any candidate is {best_mem} MiB", left_mem))
    best_cpu = max((h.free_cpu for h in left_mem), default=0)
    left_cpu = [h for h in left_mem if h.free_cpu >= vm.vcpus]
    steps.append((f"needs {vm.vcpus} vCPUs; the most free on any candidate is {best_cpu:g}", left_cpu))
    for reason, remaining in steps:
        if not remaining:
            return [], reason
    return left_cpu, ""


def largest_host_loss_absorbed(
    candidates: Sequence[Candidate], ha_vms: dict[str, list[VmSpec]], strategy: Strategy = "spread",
    memory_overcommit: float = 1.0, cpu_overcommit: float = 4.0,
) -> tuple[bool, str, str]:
    """HA reservation (vSphere admission control, oVirt HA reservation): could the
    HA VMs of the host carrying the most HA memory restart on the others?
    Returns (ok, that host, reason)."""
    if not candidates:
        return True, "", "no hosts"
    largest = max(candidates, key=lambda c: (sum(v.memory_mb for v in ha_vms.get(c.name, [])), c.name))
    victims = ha_vms.get(largest.name, [])
    if not victims:
        return True, largest.name, "no HA VMs to protect"
    others = [c for c in candidates if c.name != largest.name]  # frozen: place() only reads them
    _, pending = place(victims, others, strategy, memory_overcommit, cpu_overcommit=cpu_overcommit)
    if pending:
        return False, largest.name, (
            f"if {largest.name} failed, {len(pending)} of its {len(victims)} HA VMs could not restart "
            f"({pending[0].vm.name}: {pending[0].reason})"
        )
    return True, largest.name, f"the loss of {largest.name} ({len(victims)} HA VMs) can be absorbed"
