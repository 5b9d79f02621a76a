"""The fast placement gives exactly the results of the straightforward one.

``reference_place`` is the algorithm placement used before it kept its hosts
sorted (every filter over every host, for every VM): the specification the fast
path is held to, on random clusters with ties, labels, affinity, anti-affinity,
exclusions and overcommit."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

from hafence.contracts import VmSpec
from hafence.scheduler.placement import (
    Candidate,
    Pending,
    Placement,
    Strategy,
    _Host,
    largest_host_loss_absorbed,
    order,
    place,
)


def reference_place(vms: Iterable[VmSpec], candidates: Sequence[Candidate], strategy: Strategy = "spread",
                    memory_overcommit: float = 1.0, exclude: dict[str, set[str]] | None = None,
                    cpu_overcommit: float = 4.0) -> tuple[list[Placement], list[Pending]]:
    hosts = [
        _Host(c.name, int(c.memory_mb * memory_overcommit) - c.used_memory_mb,
              c.vcpus * cpu_overcommit - c.used_vcpus, c.labels, set(c.affinity), set(c.anti_affinity))
        for c in candidates
    ]
    placements: list[Placement] = []
    pending: list[Pending] = []
    exclude = exclude or {}
    for vm in order(vms):
        fits, reason = _reference_fitting(vm, hosts, exclude.get(vm.name, set()))
        if not fits:
            pending.append(Pending(vm, reason))
            continue
        if strategy == "best_fit":
            host = min(fits, key=lambda h: (h.free_mem, h.name))
        else:
            host = max(fits, key=lambda h: (h.free_mem, h.name))
        host.free_mem -= vm.memory_mb
        host.free_cpu -= vm.vcpus
        host.affinity.update(vm.affinity)
        host.anti.update(vm.anti_affinity)
        placements.append(Placement(vm, host.name))
    return placements, pending


def _reference_fitting(vm: VmSpec, hosts: list[_Host], banned: set[str]) -> tuple[list[_Host], str]:
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


GROUPS = ["g1", "g2", "g3", "g4"]
groups = st.lists(st.sampled_from(GROUPS), max_size=2, unique=True)
label_sets = st.lists(st.sampled_from(["ssd", "gpu"]), max_size=2, unique=True)

hosts_st = st.lists(
    st.tuples(st.sampled_from([4000, 8000, 16000]), st.sampled_from([0, 1000, 2000, 4000]), st.integers(1, 8),
              st.integers(0, 8), label_sets, groups, groups, st.integers(0, 9)),
    max_size=12,
)
vms_st = st.lists(
    st.tuples(st.sampled_from([500, 1000, 2000, 3000, 5000]), st.integers(1, 4), groups, groups, label_sets,
              st.sampled_from(["high", "medium", "low"])),
    max_size=40,
)


def build(hosts: list[tuple], vms: list[tuple]) -> tuple[list[Candidate], list[VmSpec]]:
    # Names repeat now and then (index 9 maps to an existing name): ties must break alike.
    cands = [Candidate("h0" if n == 9 else f"h{i}", mem, cpu, used, ucpu, frozenset(labels),
                       frozenset(aff), frozenset(anti))
             for i, (mem, used, cpu, ucpu, labels, aff, anti, n) in enumerate(hosts)]
    specs = [VmSpec(name=f"v{i}", memory_mb=m, vcpus=c, ha=True, affinity=a, anti_affinity=x, labels=lab,
                    priority=p)
             for i, (m, c, a, x, lab, p) in enumerate(vms)]
    return cands, specs


def as_data(result: tuple[list[Placement], list[Pending]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    placed, pending = result
    return [(p.vm.name, p.host) for p in placed], [(p.vm.name, p.reason) for p in pending]


@settings(max_examples=400, deadline=None)
@given(hosts_st, vms_st, st.sampled_from(["spread", "best_fit"]), st.sampled_from([1.0, 1.5]),
       st.sampled_from([1.0, 4.0]), st.dictionaries(st.sampled_from([f"v{i}" for i in range(10)]),
                                                     st.sets(st.sampled_from([f"h{i}" for i in range(6)])),
                                                     max_size=4))
def test_fast_placement_equals_the_reference(hosts: list[tuple], vms: list[tuple], strategy: str, mem_oc: float,
                                             cpu_oc: float, exclude: dict[str, set[str]]) -> None:
    cands, specs = build(hosts, vms)
    fast = place(specs, cands, strategy, mem_oc, exclude, cpu_oc)  # type: ignore[arg-type]
    ref = reference_place(specs, cands, strategy, mem_oc, exclude, cpu_oc)  # type: ignore[arg-type]
    assert as_data(fast) == as_data(ref)


def test_fast_placement_equals_the_reference_at_bench_scale() -> None:
    from bench.placement import workload

    vms, hosts = workload(seed=3)
    vms, hosts = vms[:2000], hosts[:200]
    for strategy in ("spread", "best_fit"):
        assert as_data(place(vms, hosts, strategy)) == as_data(reference_place(vms, hosts, strategy))  # type: ignore[arg-type]


def test_ha_reservation_check_is_unchanged() -> None:
    hosts = [Candidate("a", 10000, 8, 9000, 0), Candidate("b", 10000, 8, 9000, 0), Candidate("c", 10000, 8, 0, 0)]
    ok, host, reason = largest_host_loss_absorbed(hosts, {"a": [VmSpec(name="x", memory_mb=5000, ha=True)]})
    assert ok and host == "a" and "can be absorbed" in reason
