"""Property tests of the safety rules across the cores: random sequences of
inventories, suspicions, fence results of every outcome and term, operator
confirmations and returns; S1 and S3 must hold after every step."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hafence.contracts import FenceResult, HostEvent, Inventory, VmInfo, VmSpec
from hafence.fencer.admission import admit
from hafence.scheduler.placement import place
from hafence.scheduler.state import SchedulerState

HOSTS = ["a", "b", "c"]
step = st.one_of(
    st.tuples(st.just("inventory"), st.sampled_from(HOSTS), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("suspect"), st.sampled_from(HOSTS), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.just("alive"), st.sampled_from(HOSTS), st.integers(0, 3), st.integers(0, 2)),
    st.tuples(st.sampled_from(["confirmed_off", "failed", "refused"]), st.sampled_from(HOSTS),
              st.integers(1, 9), st.integers(0, 2)),
    st.tuples(st.just("confirmed_fenced"), st.sampled_from(HOSTS), st.integers(0, 3), st.integers(0, 2)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40))
def test_s1_only_a_confirmed_fence_releases_a_hosts_vms_and_placements_go_to_live_hosts(steps: list) -> None:  # type: ignore[type-arg]
    state = SchedulerState()
    boots = dict.fromkeys(HOSTS, 0)
    # Hosts with a confirmed_off or an operator's confirmation, or whose boot changed: a
    # new boot proves the old one gone, with the VMs it ran (docs/cores.md, scheduler).
    released: set[str] = set()
    reported: dict[str, int] = {}
    for kind, host, n, boot in steps:
        match kind:
            case "inventory":
                if reported.get(host, boot) != boot:
                    released.add(host)
                reported[host] = boot
                boots[host] = boot
                vms = [VmInfo(spec=VmSpec(name=f"{host}-vm{i}", memory_mb=512, ha=i % 2 == 0), state="running")
                       for i in range(n)]
                state.on_inventory(Inventory(host=host, boot_id=f"boot{boot}", memory_mb=8192, vcpus=8, vms=vms,
                                             sent_at=0.0))
            case "suspect" | "alive" | "confirmed_fenced":
                state.on_host_event(HostEvent(host=host, kind=kind, at=0.0, incident=f"{host}-{n}"))
                if kind == "confirmed_fenced":
                    released.add(host)
            case outcome:
                result = FenceResult(request_id=f"r{n}", incident=f"{host}-{n}", host=host, term=n,
                                     outcome=outcome, started_at=0.0, finished_at=1.0)
                state.on_fence_result(result)
                if outcome == "confirmed_off":
                    released.add(host)
        # S1: every VM waiting for a restart comes from a host whose fence was confirmed.
        assert all(lost.from_host in released for lost in state.lost.values())
        assert all(lost.spec.ha for lost in state.lost.values())
        # ...and is placed only on hosts that are up, never on a fenced or suspect one.
        placed, _ = place([lost.spec for lost in state.lost.values()], state.candidates())
        assert all(state.phases.get(p.host) == "up" for p in placed)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(1, 20), max_size=50))
def test_s3_the_fencer_never_runs_a_request_older_than_one_it_ran(terms: list[int]) -> None:
    highest = 0
    ran: list[int] = []
    for term in terms:
        verdict = admit(term, highest)
        if verdict.admitted:
            ran.append(term)
        else:
            assert term < highest and "stale leader term" in verdict.reason
        highest = verdict.highest
    assert ran == sorted(ran)  # once a newer leader acted, an older one never acts again
