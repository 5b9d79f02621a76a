"""Watchdog self-fencing end to end (docs/watchdog.md): separate processes, a real
nats-server, simulated hosts with simulated watchdogs (hafence.lab.watchdogsim)
and slots in a lab directory standing for the shared storage."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

import pytest

from hafence.contracts import FenceResult, Inventory
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.netns import netns_available
from hafence.lab.watchdogsim import resets
from hafence.slots import Slots

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(150)]

WD = ("lab-1", "lab-2", "lab-3")


def ha_vms(lab: Lab, host: str) -> set[str]:
    assert lab.config is not None
    return {vm.name for vm in lab.config.vms_of(host) if vm.ha}


def running_on(lab: Lab) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for host, inv in lab.latest_inventories().items():
        for vm in inv.vms:
            if vm.state == "running":
                out.setdefault(vm.spec.name, set()).add(host)
    return out


async def armed(lab: Lab, hosts: tuple[str, ...]) -> None:
    def ok() -> bool:
        inv = lab.latest_inventories()
        return all(h in inv and inv[h].watchdog_armed for h in hosts)

    assert await lab.observer.wait_for(ok, 20), lab.diagnostics()


async def test_bmc_dead_with_its_host_the_watchdog_level_confirms_after_msgwait_and_vms_restart() -> None:
    """The host loses power and its BMC with it: level 1 (IPMI) fails unreachable;
    level 2 (watchdog) writes the pill and confirms only after msgwait; the HA VMs
    run again elsewhere. Before this level, the fence failed and the VMs stayed
    down until someone ran confirm-fenced."""
    lab = Lab(LabSpec(heartbeat_interval_s=0.5, watchdog_hosts=WD, dead_bmcs=("lab-1",), pdu_hosts=(),
                      fence_attempts=1))
    try:
        await lab.start()
        await lab.wait_ready()
        await armed(lab, WD)
        lost = time.time()
        lab.power_loss("lab-1")
        want = ha_vms(lab, "lab-1")

        def restarted() -> bool:
            where = running_on(lab)  # lab-1's last inventory still lists them: it died
            return all(where.get(vm, set()) - {"lab-1"} for vm in want)

        assert await lab.observer.wait_for(restarted, 60), lab.diagnostics()
        back = time.time()
        [result] = [r for r in lab.fence_results("lab-1") if isinstance(r, FenceResult)]
        assert result.outcome == "confirmed_off" and result.level == 2, result
        level1 = [e for e in result.evidence if e.level == 1]
        assert level1 and all(not e.confirmed for e in level1), result.evidence
        [wd] = [e for e in result.evidence if e.level == 2]
        assert wd.driver == "watchdog" and wd.power_read == "off"
        # msgwait (2 x the reported 1 s timeout) passed on the fencer's clock after the pill.
        assert wd.elapsed_s >= 2.0, wd
        assert Slots(lab.dir / "storage" / "slots").pill("lab-1") is not None
        print(f"\nBMC dead with its host: power lost -> HA VMs running again in {back - lost:.1f}s "
              f"(fence {result.finished_at - result.started_at:.1f}s, of which the watchdog level "
              f"{wd.elapsed_s:.1f}s)")
    finally:
        await lab.stop()


async def test_storage_lost_by_every_host_while_nats_is_fine_resets_nobody() -> None:
    """The slot directory disappears for everyone: every agent falls back to the
    monitor's view, which lists them all, and keeps feeding."""
    lab = Lab(LabSpec(heartbeat_interval_s=0.5, watchdog_hosts=WD, pdu_hosts=()))
    try:
        await lab.start()
        await lab.wait_ready()
        await armed(lab, WD)
        slots = lab.dir / "storage" / "slots"
        shutil.move(slots, lab.dir / "storage" / "slots-away")
        # Ten watchdog timeouts without storage.
        await asyncio.sleep(10 * lab.spec.watchdog_timeout_s)
        assert resets(lab.watchdog_dir) == []
        assert lab.events("suspect") == [] and lab.fence_results() == []
        inv = lab.latest_inventories()
        assert all(inv[h].watchdog_armed and not inv[h].pill for h in WD)
    finally:
        await lab.stop()


async def test_a_host_cut_off_from_nats_with_the_pill_policy_resets_itself_and_its_vms_restart_once() -> None:
    """lab-3 loses its network but not the storage (it still renews its storage
    lease): with isolated_host_action = "pill" the arbiter fences it through its
    watchdog level only; it sees the pill, powers its VMs off, stops feeding, is
    reset by its watchdog and comes back quarantined with the pill. Its HA VMs run
    once, elsewhere."""
    if not netns_available():
        if os.environ.get("HAFENCE_REQUIRE_PEERS") == "1":
            pytest.fail("network namespaces are required (HAFENCE_REQUIRE_PEERS=1) but cannot be made here")
        pytest.skip("cannot make network namespaces here (needs root and iproute2)")
    lab = Lab(LabSpec(heartbeat_interval_s=0.5, watchdog_hosts=WD, pdu_hosts=(), netns_host="lab-3",
                      storage_lease=True, isolated_host_action="pill", fence_attempts=1))
    try:
        await lab.start()
        await lab.wait_ready()
        await armed(lab, WD)
        lab.partition("lab-3")
        want = ha_vms(lab, "lab-3")

        def restarted() -> bool:
            where = running_on(lab)
            return all(where.get(vm, set()) - {"lab-3"} for vm in want)

        assert await lab.observer.wait_for(restarted, 60), lab.diagnostics()
        [request] = lab.events("fence_requested", "lab-3")
        assert "poison pill" in request.reason
        [result] = [r for r in lab.fence_results("lab-3") if isinstance(r, FenceResult)]
        assert result.outcome == "confirmed_off" and {e.driver for e in result.evidence} == {"watchdog"}
        # It reset itself (no power device was touched for it).
        assert [r["host"] for r in resets(lab.watchdog_dir)] == ["lab-3"]
        await asyncio.sleep(2.0)
        # Once: one start per HA VM, on one other host (lab-3's last inventory, from
        # before the cut, still lists them).
        where = running_on(lab)
        assert all(len(where[vm] - {"lab-3"}) == 1 for vm in want), where
        assert all(len(lab.observer.matching(f".vm.{vm}.started")) == 1 for vm in want)
        assert lab.services["agent-lab-3"].alive()
    finally:
        await lab.stop()


async def test_the_host_boots_with_the_pill_quarantined_and_host_clear_removes_it() -> None:
    """After the reset the host reports the pill and quarantine and starts nothing;
    `hafence host clear` removes the pill and clears it."""
    import sys

    lab = Lab(LabSpec(heartbeat_interval_s=0.5, watchdog_hosts=WD, pdu_hosts=()))
    try:
        await lab.start()
        await lab.wait_ready()
        await armed(lab, WD)
        slots = Slots(lab.dir / "storage" / "slots")
        slots.write_pill("lab-2", by="test", reason="by hand")
        assert await lab.observer.wait_for(lambda: [r["host"] for r in resets(lab.watchdog_dir)] == ["lab-2"], 20)

        def fenced_boot() -> Inventory | None:
            inv = lab.latest_inventories().get("lab-2")
            return inv if inv and inv.pill and inv.quarantined and not inv.watchdog_armed else None

        assert await lab.observer.wait_for(lambda: fenced_boot() is not None
                                           and len({i.boot_id for i in _inventories(lab, "lab-2")}) >= 2, 20)
        assert all(vm.state != "running" for vm in fenced_boot().vms)  # type: ignore[union-attr]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hafence.cli", "host", "clear", "lab-2", "--reason", "checked", "--by", "test",
            "--config", str(lab.config_path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        out, _ = await proc.communicate()
        assert proc.returncode == 0, out
        assert slots.pill("lab-2") is None
        assert await lab.observer.wait_for(lambda: (i := lab.latest_inventories().get("lab-2")) is not None
                                           and not i.pill and not i.quarantined and i.watchdog_armed, 20)
    finally:
        await lab.stop()


def _inventories(lab: Lab, host: str) -> list[Inventory]:
    return [m for r in lab.observer.records if r.subject.endswith(f".inventory.{host}")
            and isinstance(m := r.decode(), Inventory)]
