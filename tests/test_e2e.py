"""End to end: every service and every simulated host a separate process, a real
nats-server, one host hangs. What the demo shows, asserted."""

from __future__ import annotations

import pytest

from hafence.contracts import FenceResult, HostEvent, Placements, VmEvent
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.demo import failover_done
from hafence.telemetry import trace_id_of

pytestmark = pytest.mark.e2e


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


async def test_a_hung_host_is_fenced_then_its_ha_vms_restart_elsewhere_in_one_trace() -> None:
    lab = Lab(LabSpec(heartbeat_interval_s=0.3))
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.config is not None
        victim = "lab-2"
        expected = {vm.name for vm in lab.config.vms_of(victim) if vm.ha}
        non_ha = {vm.name for vm in lab.config.vms_of(victim) if not vm.ha}
        assert expected and non_ha
        lab.crash(victim)
        assert await lab.observer.wait_for(lambda: failover_done(lab, victim, expected), 30), lab.diagnostics()

        records = list(lab.observer.records)
        decoded = [(r, r.decode()) for r in records]

        # L1: every HA VM of the victim started on a survivor; non-HA VMs were left alone.
        started = [m for _, m in decoded if isinstance(m, VmEvent) and m.kind == "started"]
        assert {m.vm for m in started} == expected
        assert all(m.target != victim and m.from_host == victim for m in started)

        # S1, from the recorded order of events: the confirmed fence came before any start
        # command reached an agent, and before any placement (the placement record first).
        fence_at = next(i for i, (_, m) in enumerate(decoded)
                        if isinstance(m, FenceResult) and m.host == victim and m.outcome == "confirmed_off")
        first_cmd = next(i for i, (r, _) in enumerate(decoded) if r.subject.endswith(".cmd"))
        first_vm_event = next(i for i, (_, m) in enumerate(decoded) if isinstance(m, VmEvent | Placements))
        assert fence_at < first_vm_event < first_cmd
        [result] = [m for _, m in decoded if isinstance(m, FenceResult)]
        assert result.evidence and all(e.power_read == "off" for e in result.evidence)

        # One trace: the suspect event is its root, and spans of all five services share it.
        suspect = next(r for r, m in decoded if isinstance(m, HostEvent) and m.kind == "suspect")
        trace_id = trace_id_of(suspect.headers)
        assert trace_id
        for r, m in decoded:
            if isinstance(m, FenceResult | VmEvent | Placements) or r.subject.endswith(".cmd"):
                assert trace_id_of(r.headers) == trace_id, r.subject
        five = {"hafence-heartbeat", "hafence-arbiter", "hafence-fencer", "hafence-scheduler", "hafence-agent"}

        def trace_spans() -> list[dict]:  # type: ignore[type-arg]
            return [s for s in lab.spans() if s["trace_id"] == trace_id]

        # A span is written when it ends, just after the event it wraps: wait for the files.
        await lab.observer.wait_for(lambda: {s["service"] for s in trace_spans()} >= five, 10)
        spans = trace_spans()
        assert {s["service"] for s in spans} == five
        roots = [s for s in spans if s["parent_id"] is None]
        assert [s["name"] for s in roots] == [f"host suspect {victim}"]
        assert any(s["name"] == f"power off bmc-{victim}" and s["attributes"]["hafence.power_read"] == "off"
                   and s["attributes"]["hafence.driver"] == "ipmi" for s in spans)
        # Every service exposes Prometheus metrics; the incident shows in them (the hung
        # host's agent is frozen and cannot answer a scrape).
        scraped = {name: _scrape(port) for name, port in lab.metrics_ports.items() if name != f"agent-{victim}"}
        assert 'hafence_fence_operations_total{host="lab-2",outcome="confirmed_off"} 1.0' in scraped["fencer"]
        assert 'hafence_host_protected{host="lab-1"} 1.0' in scraped["fencer"]
        assert 'hafence_heartbeats_received_total{host="lab-1"}' in scraped["heartbeat"]
        assert 'hafence_leader{role="heartbeat"} 1.0' in scraped["heartbeat"]
        # The arbiter's gauges follow its state at its next decision tick.
        await lab.observer.wait_for(
            lambda: 'hafence_hosts{state="fenced"} 1.0' in _scrape(lab.metrics_ports["arbiter"]), 5
        )
        assert 'hafence_hosts{state="fenced"} 1.0' in _scrape(lab.metrics_ports["arbiter"])
        assert 'hafence_arbiter_decisions_total{decision="RequestFence",rule="fence"} 1.0' in scraped["arbiter"]
        assert f'hafence_vm_starts_total{{result="started"}} {len(expected)}.0' in scraped["scheduler"]
        assert "hafence_failover_duration_seconds_count 1.0" in scraped["scheduler"]
        assert 'hafence_leader_term{role="scheduler"}' in scraped["scheduler"]
    finally:
        codes = await lab.stop()
    # Every service stopped cleanly on SIGTERM (the hung agent too, once resumed).
    assert all(code == 0 for code in codes.values()), codes
