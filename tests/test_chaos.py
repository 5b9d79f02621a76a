"""L2: killing any one service (SIGKILL, no goodbye) or restarting NATS in the
middle of an incident loses nothing: the work resumes from JetStream and the
service's own database, and every HA VM ends up running exactly once."""

from __future__ import annotations

import pytest

from hafence.contracts import FenceResult, HostEvent
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.demo import failover_done

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

# Which moment of the incident each victim is killed at.
MOMENTS = {
    "heartbeat": "suspect",  # right after it declared the host suspect
    "arbiter": "suspect",  # before or while it decides
    "fencer": "fence_requested",  # while it fences
    "scheduler": "fence_result",  # as the VMs are being placed
    "nats": "fence_requested",  # the bus itself, mid-incident
}


@pytest.mark.parametrize("victim", list(MOMENTS))
async def test_killing_a_service_mid_incident_loses_nothing(victim: str) -> None:
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, lease_ttl_s=2.0))
    host = "lab-2"
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.config is not None
        expected = {vm.name for vm in lab.config.vms_of(host) if vm.ha}
        lab.crash(host)

        def reached() -> bool:
            if MOMENTS[victim] == "fence_result":
                return bool(lab.fence_results(host))
            return bool(lab.events(MOMENTS[victim], host))

        assert await lab.observer.wait_for(reached, 30), lab.diagnostics()
        if victim == "nats":
            lab.nats.restart()
        else:
            lab.services[victim].kill()
            lab.start_service(victim)
        assert await lab.observer.wait_for(lambda: failover_done(lab, host, expected), 60), lab.diagnostics()

        # Exactly once: every HA VM of the host runs on exactly one survivor.
        assert await lab.observer.wait_for(lambda: _running_once(lab, host, expected), 15), _where(lab)
        confirmed = [r for r in lab.fence_results(host) if isinstance(r, FenceResult) and r.outcome == "confirmed_off"]
        # S2: every device of the level that confirmed read back off (on a loaded machine
        # level 1's BMC may time out and the PDU level confirm instead).
        assert confirmed and all(
            r.level is not None and [e for e in r.evidence if e.level == r.level]
            and all(e.power_read == "off" for e in r.evidence if e.level == r.level)
            for r in confirmed
        )
        suspects = [e for e in lab.events("suspect", host) if isinstance(e, HostEvent)]
        assert suspects
    finally:
        await lab.stop()


def _running_once(lab: Lab, dead: str, expected: set[str]) -> bool:
    counts: dict[str, int] = {}
    for host, inv in lab.latest_inventories().items():
        if host == dead:
            continue
        for vm in inv.vms:
            if vm.state == "running":
                counts[vm.spec.name] = counts.get(vm.spec.name, 0) + 1
    return all(counts.get(vm) == 1 for vm in expected) and all(n == 1 for n in counts.values())


def _where(lab: Lab) -> dict[str, list[str]]:
    return {h: [v.spec.name for v in inv.vms] for h, inv in lab.latest_inventories().items()}
