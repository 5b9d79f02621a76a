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
