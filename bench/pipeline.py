"""Pipeline overhead: from the suspect event to the last VmStart acknowledged,
minus the time the power device took, for a host with 50 HA VMs.

Real processes on a real nats-server (the lab). Each incident hangs the victim,
waits for all 50 VMs to run elsewhere, then puts the lab back: the VMs are
stopped on the survivors, the victim is powered on and boots with them again.
"""

from __future__ import annotations

import asyncio
import time

import msgspec

from bench.report import Table, percentile
from hafence.contracts import AgentReply, FenceResult, HostEvent, Inventory, VmEvent, VmStop, encode
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.power import SimPowerSwitch

VMS = 50


async def pipeline_overhead(table: Table, quick: bool = False) -> None:
    incidents = 3 if quick else 20
    spec = LabSpec(
        hosts=4, vms_per_host=0, extra_vms={"lab-1": VMS}, vm_memory_mb=1024,
        heartbeat_interval_s=0.2, missed_heartbeats=3, off_delay_s=0.1, lease_ttl_s=3.0,
    )
    victim = "lab-1"
    lab = Lab(spec)
    overheads: list[float] = []
    device: list[float] = []
    decide: list[float] = []
    fencer: list[float] = []
    schedule: list[float] = []
    restart: list[float] = []
    try:
        await lab.start()
        await lab.wait_ready()
        assert lab.config is not None and lab.observer.nc is not None
        names = {vm.name for vm in lab.config.vms_of(victim)}
        for _ in range(incidents):
            mark = len(lab.observer.records)
            lab.crash(victim)

            def done(mark: int = mark) -> bool:
                started = {m.vm for r in lab.observer.records[mark:] if isinstance(m := r.decode(), VmEvent)
                           and m.kind == "started"}
                return names <= started

            if not await lab.observer.wait_for(done, 60):
                raise RuntimeError("failover did not complete:\n" + lab.diagnostics())
            recs = [(r.at, r.decode()) for r in lab.observer.records[mark:]]
            t_suspect = next(t for t, m in recs if isinstance(m, HostEvent) and m.kind == "suspect")
            t_request = next(t for t, m in recs if isinstance(m, HostEvent) and m.kind == "fence_requested")
            t_result, result = next((t, m) for t, m in recs if isinstance(m, FenceResult))
            t_last = max(t for t, m in recs if isinstance(m, VmEvent) and m.kind == "started")
            t_placed = min(t for t, m in recs if isinstance(m, VmEvent) and m.kind == "placed" and t >= t_result)
            power = max(e.elapsed_s for e in result.evidence if e.level == result.level)
            device.append(power * 1000)
            overheads.append((t_last - t_suspect - power) * 1000)
            decide.append((t_request - t_suspect) * 1000)
            fencer.append((t_result - t_request - power) * 1000)
            schedule.append((t_placed - t_result) * 1000)
            restart.append((t_last - t_result) * 1000)
            await reset(lab, victim, names)
    finally:
        await lab.stop()
    note = f"{VMS} HA VMs, 4 hosts, services as processes"
    table.add_distribution("pipeline overhead (suspect -> last VmStart ack, minus device)", overheads, "ms", note)
    table.add(
        "  of which suspect -> fence requested (arbiter)",
        f"{percentile(decide, 50):.1f}", "ms", f"p50; p99 {percentile(decide, 99):.1f}",
    )
    table.add("  of which fence requested -> confirmed off, minus device (fencer)", f"{percentile(fencer, 50):.1f}",
              "ms", f"p50; p99 {percentile(fencer, 99):.1f}")
    table.add("  of which confirmed off -> first VM placed (scheduler)", f"{percentile(schedule, 50):.1f}", "ms",
              f"p50; p99 {percentile(schedule, 99):.1f}")
    table.add("  of which confirmed off -> last VmStart ack", f"{percentile(restart, 50):.1f}", "ms", "p50")
    table.add("  power device time (simulated IPMI BMC, excluded)", f"{percentile(device, 50):.1f}", "ms", "p50")


async def reset(lab: Lab, victim: str, names: set[str]) -> None:
    """Stop the victim's VMs on the survivors, power it on, boot it with them again."""
    nc = lab.observer.nc
    assert nc is not None
    for host, inv in lab.latest_inventories().items():
        if host == victim:
            continue
        for vm in inv.vms:
            if vm.spec.name in names:
                reply = await nc.request(f"hafence.agent.{host}.cmd", encode(VmStop(vm=vm.spec.name)), timeout=5)
                if not msgspec.json.decode(reply.data, type=AgentReply).ok:
                    raise RuntimeError(f"could not stop {vm.spec.name} on {host}: {reply.data!r}")
    lab.services[f"agent-{victim}"].kill()
    assert lab.config is not None
    SimPowerSwitch(lab.dir / "power").switch(victim, "on")
    mark = len(lab.observer.records)
    lab.start_agent(victim)

    def back() -> bool:
        for r in lab.observer.records[mark:]:
            m = r.decode()
            if isinstance(m, HostEvent) and m.kind == "alive" and m.host == victim:
                return True
        return False

    if not await lab.observer.wait_for(back, 30):
        raise RuntimeError("victim did not come back:\n" + lab.diagnostics())
    # A fenced host back as a new boot is quarantined, and the arbiter does not fence it
    # again on a suspicion until someone clears it (S6): the operator's `hafence host clear`.
    mark = len(lab.observer.records)
    cleared = HostEvent(host=victim, kind="cleared", at=time.time(), reason="bench: its VMs were stopped elsewhere",
                        by="bench")
    await nc.jetstream().publish(f"hafence.host.{victim}.cleared", encode(cleared))

    def unquarantined() -> bool:
        return any(isinstance(m := r.decode(), Inventory) and m.host == victim and not m.quarantined
                   for r in lab.observer.records[mark:])

    if not await lab.observer.wait_for(unquarantined, 30):
        raise RuntimeError("victim not cleared:\n" + lab.diagnostics())
    # Let the scheduler read the new inventories before the next incident.
    await asyncio.sleep(0.5)
