from hypothesis import given
from hypothesis import strategies as st

from hafence.contracts import VmSpec
from hafence.scheduler.placement import Candidate, place


def vm(name: str, mem: int) -> VmSpec:
    return VmSpec(name=name, memory_mb=mem, vcpus=1, ha=True)


def test_spread_puts_each_vm_where_most_memory_is_free() -> None:
    hosts = [Candidate("a", 10000, 8, 0, 0), Candidate("b", 10000, 8, 5000, 0)]
    placed, pending = place([vm("v1", 3000), vm("v2", 3000)], hosts, "spread")
    assert [(p.vm.name, p.host) for p in placed] == [("v1", "a"), ("v2", "a")]
    assert pending == []


def test_best_fit_packs_the_fullest_host_that_fits() -> None:
    hosts = [Candidate("a", 10000, 8, 0, 0), Candidate("b", 10000, 8, 6000, 0)]
    placed, _ = place([vm("v1", 3000)], hosts, "best_fit")
    assert placed[0].host == "b"


def test_largest_vms_go_first_and_what_fits_nowhere_is_pending_with_reason() -> None:
    hosts = [Candidate("a", 4000, 8, 0, 0)]
    placed, pending = place([vm("small", 1000), vm("big", 3500), vm("huge", 9000)], hosts)
    assert [p.vm.name for p in placed] == ["big"]
    assert [(p.vm.name, p.reason) for p in pending] == [
        ("huge", "needs 9000 MiB; the most free on any candidate is 4000 MiB"),
        ("small", "needs 1000 MiB; the most free on any candidate is 500 MiB"),
    ]


def test_no_candidates_and_excluded_hosts_are_explained() -> None:
    _, pending = place([vm("v", 1)], [])
    assert pending[0].reason == "no surviving host is up"
    _, pending = place([vm("v", 1)], [Candidate("a", 10, 1, 0, 0)], exclude={"v": {"a"}})
    assert pending[0].reason == "start failed on every candidate host"


@given(
    st.lists(st.integers(1, 4000), max_size=40),
    st.lists(st.tuples(st.integers(1000, 16000), st.integers(0, 8000)), min_size=0, max_size=6),
    st.sampled_from(["spread", "best_fit"]),
)
def test_no_host_is_ever_over_capacity(sizes: list[int], hosts: list[tuple[int, int]], strategy: str) -> None:
    cands = [Candidate(f"h{i}", mem, 8, min(used, mem), 0) for i, (mem, used) in enumerate(hosts)]
    vms = [vm(f"v{i}", s) for i, s in enumerate(sizes)]
    placed, pending = place(vms, cands, strategy)  # type: ignore[arg-type]
    assert len(placed) + len(pending) == len(vms)
    for c in cands:
        load = c.used_memory_mb + sum(p.vm.memory_mb for p in placed if p.host == c.name)
        assert load <= c.memory_mb
