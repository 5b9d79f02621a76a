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


def spec(name: str, mem: int, **kw: object) -> VmSpec:
    return VmSpec(name=name, memory_mb=mem, vcpus=int(kw.pop("vcpus", 1)), ha=True, **kw)  # type: ignore[arg-type]


def test_high_priority_vms_are_placed_first_when_room_is_short() -> None:
    hosts = [Candidate("a", 4000, 8, 0, 0)]
    placed, pending = place([spec("low-big", 3000, priority="low"), spec("high-small", 2000, priority="high")],
                            hosts)
    assert [p.vm.name for p in placed] == ["high-small"]
    assert [p.vm.name for p in pending] == ["low-big"]


def test_labels_are_required() -> None:
    hosts = [Candidate("plain", 9000, 8, 0, 0), Candidate("fast", 9000, 8, 0, 0, labels=frozenset({"ssd"}))]
    placed, _ = place([spec("db", 1000, labels=["ssd"])], hosts)
    assert placed[0].host == "fast"
    _, pending = place([spec("gpu-job", 1000, labels=["gpu"])], hosts)
    assert pending[0].reason == "no candidate host has the labels gpu"


def test_anti_affinity_keeps_group_members_apart_and_affinity_keeps_them_together() -> None:
    hosts = [Candidate("a", 9000, 8, 0, 0, anti_affinity=frozenset({"db"})), Candidate("b", 9000, 8, 5000, 0)]
    placed, _ = place([spec("db-2", 1000, anti_affinity=["db"])], hosts)
    assert placed[0].host == "b"  # although a has more room
    placed, pending = place([spec("db-3", 1000, anti_affinity=["db"]), spec("db-4", 1000, anti_affinity=["db"])],
                            hosts)
    assert [p.host for p in placed] == ["b"] and "anti-affinity db" in pending[0].reason
    hosts = [Candidate("a", 9000, 8, 0, 0), Candidate("b", 9000, 8, 5000, 0, affinity=frozenset({"web"}))]
    placed, _ = place([spec("web-2", 1000, affinity=["web"])], hosts)
    assert placed[0].host == "b"


def test_vcpus_count_with_overcommit() -> None:
    hosts = [Candidate("a", 90000, 4, 0, 6)]
    placed, pending = place([spec("v1", 100, vcpus=2), spec("v2", 100, vcpus=2)], hosts, cpu_overcommit=2.0)
    assert len(placed) == 1 and "needs 2 vCPUs" in pending[0].reason


def test_ha_reservation_reports_when_the_largest_host_could_not_be_absorbed() -> None:
    from hafence.scheduler.placement import largest_host_loss_absorbed

    hosts = [Candidate("a", 10000, 8, 6000, 0), Candidate("b", 10000, 8, 2000, 0), Candidate("c", 10000, 8, 0, 0)]
    ha = {"a": [spec("x", 3000), spec("y", 3000)], "b": [spec("z", 2000)]}
    ok, host, reason = largest_host_loss_absorbed(hosts, ha)
    assert ok and host == "a"
    tight = [Candidate("a", 10000, 8, 9000, 0), Candidate("b", 10000, 8, 9000, 0)]
    ok, host, reason = largest_host_loss_absorbed(tight, {"a": [spec("x", 5000), spec("y", 4000)]})
    assert not ok and host == "a" and "if a failed, 2 of its 2 HA VMs could not restart" in reason


groups = st.lists(st.sampled_from(["g1", "g2", "g3"]), max_size=2, unique=True)


@given(
    st.lists(st.tuples(st.integers(1, 4000), st.integers(1, 4), groups, st.sampled_from(["high", "medium", "low"])),
             max_size=30),
    st.lists(st.tuples(st.integers(1000, 16000), st.integers(1, 16)), min_size=1, max_size=6),
    st.sampled_from(["spread", "best_fit"]),
)
def test_placement_never_overfills_a_host_nor_joins_anti_affinity_members(
    vms: list[tuple[int, int, list[str], str]], hosts: list[tuple[int, int]], strategy: str
) -> None:
    cands = [Candidate(f"h{i}", mem, cpu, 0, 0) for i, (mem, cpu) in enumerate(hosts)]
    specs = [spec(f"v{i}", m, vcpus=c, anti_affinity=g, priority=p) for i, (m, c, g, p) in enumerate(vms)]
    placed, pending = place(specs, cands, strategy, cpu_overcommit=1.0)  # type: ignore[arg-type]
    assert len(placed) + len(pending) == len(specs)
    for c in cands:
        mine = [p.vm for p in placed if p.host == c.name]
        assert sum(v.memory_mb for v in mine) <= c.memory_mb
        assert sum(v.vcpus for v in mine) <= c.vcpus
        seen: set[str] = set()
        for v in mine:
            assert not (set(v.anti_affinity) & seen)
            seen |= set(v.anti_affinity)
    assert all(p.vm.ha for p in placed)
    # Priority: nothing of lower priority was placed while a higher one, as small or smaller, was left pending.
    rank = {"high": 0, "medium": 1, "low": 2}
    for p in pending:
        if not p.vm.anti_affinity:
            assert not any(rank[q.vm.priority] > rank[p.vm.priority] and q.vm.memory_mb >= p.vm.memory_mb
                           and q.vm.vcpus >= p.vm.vcpus and not q.vm.anti_affinity for q in placed)
