"""The scheduler end to end: priorities, a failing start, exactly-once starts."""

from __future__ import annotations

import pytest

from hafence.contracts import VmEvent
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.demo import failover_done

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_high_priority_vms_start_first_and_a_failed_start_moves_on() -> None:
    victim = "lab-2"
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, extra_vms={victim: 6}, mixed_priorities=True,
                      fail_start_hosts=("lab-4",)))
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.config is not None
        ha = {vm.name: vm.priority for vm in lab.config.vms_of(victim) if vm.ha}
        assert set(ha.values()) == {"high", "medium", "low"}
        lab.crash(victim)
        assert await lab.observer.wait_for(lambda: failover_done(lab, victim, set(ha)), 60), lab.diagnostics()
        events = [m for r in lab.observer.records if isinstance(m := r.decode(), VmEvent)]
        started = [e for e in events if e.kind == "started"]
        assert {e.vm for e in started} == set(ha) and len(started) == len(ha)  # each exactly once
        ranks = [("high", "medium", "low").index(ha[e.vm]) for e in started]
        assert ranks == sorted(ranks), [(e.vm, ha[e.vm]) for e in started]
        failed = [e for e in events if e.kind == "failed"]
        assert failed and all(e.target == "lab-4" and "simulated start failure" in e.reason for e in failed)
        assert all(e.target in ("lab-1", "lab-3") for e in started)
        reservation = lab.events("ha_reservation_ok") + lab.events("ha_reservation_lost")
        assert reservation, "the scheduler announces the HA reservation state"
    finally:
        await lab.stop()


async def test_a_start_answered_too_late_is_asked_again_on_the_same_host_never_moved() -> None:
    """lab-4 boots VMs slower than the scheduler waits for an answer. Moving such a
    VM to another host would run it twice (lab-4 does start it, late); the
    scheduler asks lab-4 again and gets "already running"."""
    victim = "lab-2"
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, slow_start_hosts={"lab-4": 1.5}, agent_command_timeout_s=1.0))
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.config is not None
        ha = {vm.name for vm in lab.config.vms_of(victim) if vm.ha}
        lab.crash(victim)
        assert await lab.observer.wait_for(lambda: failover_done(lab, victim, ha), 60), lab.diagnostics()
        events = [m for r in lab.observer.records if isinstance(m := r.decode(), VmEvent)]
        unanswered = [e for e in events if e.kind == "failed" and "will ask it again" in e.reason]
        assert unanswered and all(e.target == "lab-4" for e in unanswered)
        for e in unanswered:
            [started] = [s for s in events if s.kind == "started" and s.vm == e.vm]
            assert started.target == "lab-4"  # the same host, never another

        def running_once() -> bool:
            counts: dict[str, int] = {}
            for host, inv in lab.latest_inventories().items():
                if host != victim:
                    for vm in inv.vms:
                        counts[vm.spec.name] = counts.get(vm.spec.name, 0) + (vm.state == "running")
            return all(counts.get(vm) == 1 for vm in ha)

        assert await lab.observer.wait_for(running_once, 10)
    finally:
        await lab.stop()
