"""The arbiter's policy end to end: separate processes, a real nats-server,
simulated hosts hung, partitioned or stormed. The decision events asserted here
are what an operator sees with ``nats sub 'hafence.host.>'``."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from hafence.contracts import FenceResult, HostEvent
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.netns import netns_available
from tests.conftest import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


async def test_storm_of_three_of_four_hosts_fences_nobody_and_alerts() -> None:
    lab = Lab(LabSpec(heartbeat_interval_s=0.3))
    try:
        await lab.start()
        await lab.wait_ready()
        for host in ("lab-1", "lab-2", "lab-3"):
            lab.crash(host)
        storm = lambda: {e.host for e in lab.events("fence_skipped") if e.rule == "storm"}  # noqa: E731
        assert await lab.observer.wait_for(lambda: storm() == {"lab-1", "lab-2", "lab-3"}, 20), lab.diagnostics()
        skipped = [e for e in lab.events("fence_skipped") if isinstance(e, HostEvent)]
        assert all(e.alert and "3 of 4 hosts lost within 60s" in e.reason for e in skipped)
        # Give a wrong decision every chance to happen before looking for it.
        await asyncio.sleep(2.0)
        assert lab.events("fence_requested") == []
        assert lab.fence_results() == []
        # The storm passes: two hosts come back, the one still dead is fenced.
        lab.resume("lab-1")
        lab.resume("lab-2")
        fenced = lambda: [r for r in lab.fence_results("lab-3") if r.outcome == "confirmed_off"]  # noqa: E731
        assert await lab.observer.wait_for(lambda: bool(fenced()), 30), lab.diagnostics()
        assert {e.host for e in lab.events("fence_requested")} == {"lab-3"}
    finally:
        await lab.stop()


async def test_an_isolated_host_with_a_live_storage_lease_is_not_fenced() -> None:
    if not netns_available():
        if os.environ.get("HAFENCE_REQUIRE_PEERS") == "1":
            pytest.fail("network namespaces are required (HAFENCE_REQUIRE_PEERS=1) but cannot be made here")
        pytest.skip("cannot make network namespaces here (needs root and iproute2)")
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, netns_host="lab-3", storage_lease=True))
    try:
        await lab.start()
        await lab.wait_ready()
        lab.partition("lab-3")
        isolated = lambda: [e for e in lab.events("fence_skipped", "lab-3") if e.rule == "isolated"]  # noqa: E731
        assert await lab.observer.wait_for(lambda: bool(isolated()), 20), lab.diagnostics()
        [event] = isolated()
        assert event.alert and "storage lease" in event.reason
        assert lab.events("suspect", "lab-3"), "the partition must have been noticed"
        await asyncio.sleep(2.0)
        assert lab.events("fence_requested", "lab-3") == []
        assert lab.services["agent-lab-3"].alive()  # still running, just cut off
    finally:
        await lab.stop()


async def test_s3_a_stale_arbiter_is_refused_and_nothing_is_fenced_twice() -> None:
    """Two arbiters. The leader is frozen past its lease and the other takes over
    and fences a host. The old one resumes believing it still leads (a fault
    injected on purpose: the lab binds a lease whose check is broken,
    hafence.lab.stale_arbiter) and fences too: the
    fencer refuses it by its term."""
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, lease_ttl_s=2.0))
    try:
        await lab.start(services=("heartbeat", "fencer", "scheduler"))
        stale = lab.start_service("arbiter", "arbiter-a", module="hafence.lab.stale_arbiter")
        await eventually(lambda: _leads(lab, "arbiter-a"))
        lab.start_service("arbiter", "arbiter-b")
        await lab.wait_ready()

        stale.signal(signal.SIGSTOP)
        await eventually(lambda: _leads(lab, "arbiter-b"), timeout=15)
        lab.crash("lab-2")
        done = lambda h: [r for r in lab.fence_results(h) if r.outcome == "confirmed_off"]  # noqa: E731
        assert await lab.observer.wait_for(lambda: bool(done("lab-2")), 20), lab.diagnostics()
        new_term = done("lab-2")[0].term

        # The old leader wakes up while the new one happens to be paused (so that the old
        # one certainly acts first), and another host dies.
        leader = lab.services["arbiter-b"]
        leader.signal(signal.SIGSTOP)
        stale.signal(signal.SIGCONT)
        lab.crash("lab-3")
        # Its first request is refused, whichever host it is for: on waking it may act on
        # lab-2 (its backlog not read yet) or on lab-3. Once refused it sends nothing more
        # under that term.
        refused = lambda: [r for h in ("lab-2", "lab-3") for r in lab.fence_results(h)  # noqa: E731
                           if r.outcome == "refused"]
        assert await lab.observer.wait_for(lambda: bool(refused()), 20), lab.diagnostics()
        assert done("lab-3") == []
        leader.signal(signal.SIGCONT)  # it takes its lease back, with a newer term, and fences
        assert await lab.observer.wait_for(lambda: bool(done("lab-3")), 20), lab.diagnostics()
        for stale_result in refused():
            assert isinstance(stale_result, FenceResult)
            assert stale_result.term < new_term
            assert f"stale leader term {stale_result.term}" in stale_result.reason
        # Nothing fenced twice: one confirmation per host, and both from the new leader's term.
        await asyncio.sleep(1.0)
        for host in ("lab-2", "lab-3"):
            [confirmed] = done(host)
            assert confirmed.term >= new_term
    finally:
        await lab.stop()


async def test_a_failed_fence_keeps_vms_down_until_an_operator_confirms() -> None:
    """The host's only fence device leaves it on: two attempts fail, the host is
    escalated (alert), and none of its VMs start anywhere (S1) until an operator
    confirms by hand that it is off; then they do."""
    import subprocess
    import sys

    victim = "lab-3"
    lab = Lab(LabSpec(heartbeat_interval_s=0.3, stuck_bmcs=(victim,), pdu_hosts=(), fence_attempts=2,
                      fence_retry_backoff_s=0.5))
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.config is not None
        expected = {vm.name for vm in lab.config.vms_of(victim) if vm.ha}
        lab.crash(victim)
        escalated = lambda: [e for e in lab.events("fence_skipped", victim) if e.rule == "escalated"]  # noqa: E731
        assert await lab.observer.wait_for(lambda: bool(escalated()), 60), lab.diagnostics()
        failed = [r for r in lab.fence_results(victim) if r.outcome == "failed"]
        assert len(failed) == 2 and all("power still on" in r.reason for r in failed)
        assert {r.request_id for r in failed} == {f"fence-{failed[0].incident}", f"fence-{failed[0].incident}-a2"}
        assert escalated()[0].alert and f"hafence confirm-fenced {victim}" in escalated()[0].reason
        assert lab.events("fence_failed", victim) and all(e.alert for e in lab.events("fence_failed", victim))
        started = lambda: {r.decode().vm for r in lab.observer.matching(".vm.")  # noqa: E731
                           if r.subject.endswith(".started")}
        await asyncio.sleep(1.0)
        assert started() == set()  # S1: no confirmed fence, no restart

        refused = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "hafence.cli", "confirm-fenced", victim, "--reason", "checked",
             "--config", str(lab.config_path)], capture_output=True, text=True, timeout=30)
        assert refused.returncode == 2 and "--yes" in refused.stderr
        confirm = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "hafence.cli", "confirm-fenced", victim, "--yes", "--by", "alice",
             "--reason", "pulled both power cords, checked the PSU LEDs", "--config", str(lab.config_path)],
            capture_output=True, text=True, timeout=30)
        assert confirm.returncode == 0, confirm.stderr
        assert await lab.observer.wait_for(lambda: expected <= started(), 30), lab.diagnostics()
        [audit] = lab.events("confirmed_fenced", victim)
        assert audit.by == "alice" and "power cords" in audit.reason
    finally:
        await lab.stop()


async def test_status_hosts_vms_and_events_show_an_incident() -> None:
    """The operator's read commands during a storm: hosts, alerts and the decision events."""
    import json
    import subprocess
    import sys

    lab = Lab(LabSpec(heartbeat_interval_s=0.3))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hafence.cli", *args, "--config", str(lab.config_path)],
                              capture_output=True, text=True, timeout=60)

    try:
        await lab.start()
        await lab.wait_ready()
        for host in ("lab-1", "lab-2", "lab-3"):
            lab.crash(host)
        storm = lambda: {e.host for e in lab.events("fence_skipped") if e.rule == "storm"}  # noqa: E731
        assert await lab.observer.wait_for(lambda: len(storm()) == 3, 20), lab.diagnostics()
        status = await asyncio.to_thread(cli, "status")
        assert status.returncode == 1, status.stderr  # alerts: a person must look
        assert "lab-1: not fenced (storm): storm guard: 3 of 4 hosts lost within 60s" in status.stdout
        lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.startswith("lab-")}
        assert lines["lab-4"].split()[1] == "up" and "ago" in lines["lab-4"]
        assert lines["lab-2"].split()[1] == "suspect" and lines["lab-2"].split()[2] == "-"
        hosts = json.loads((await asyncio.to_thread(cli, "hosts", "--json")).stdout)["hosts"]
        assert {h["name"]: h["protected"] for h in hosts} == {f"lab-{i}": True for i in range(1, 5)}
        vms = json.loads((await asyncio.to_thread(cli, "vms", "--json")).stdout)["vms"]
        assert {v["name"] for v in vms if v["state"] == "running"} == {vm.name for vm in lab.config.vms}  # type: ignore[union-attr]
        events = await asyncio.to_thread(cli, "events")
        assert events.returncode == 0
        assert "host lab-2      suspect: no heartbeat for" in events.stdout
        assert "host lab-2      fence_skipped [storm]: storm guard" in events.stdout
    finally:
        await lab.stop()


async def _leads(lab: Lab, instance: str) -> bool:
    return await lab.lease_holder("arbiter") == instance
