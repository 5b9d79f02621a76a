"""Pipeline overhead: from the suspect event to the last VmStart acknowledged,
minus the time the power device took, for a host with 50 HA VMs.

Real processes on a real nats-server (the lab). Each incident hangs the victim,
waits for all 50 VMs to run elsewhere, then puts the lab back: the VMs are
stopped on the survivors, the victim is powered on and boots with them again.

``HAFENCE_BENCH_INVENTORY_COALESCE_S`` sets the agents' ``[agent]
inventory_coalesce_s`` (A/B runs: 0 is one inventory per start); unset, the default.
``HAFENCE_BENCH_NATS_SYNC`` sets nats-server's JetStream ``sync_interval`` (``always``
is what a deployment's generated nats.conf sets); unset, the server's default.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from bench.nats_sync import synced_server
from bench.report import Table, percentile
from hafence.bus.names import StreamNames
from hafence.contracts import (
    AgentReply,
    FenceResult,
    HostEvent,
    Inventory,
    Placements,
    VmEvent,
    VmStart,
    VmStop,
    encode,
)
from hafence.lab import cluster
from hafence.lab.cluster import Lab, LabSpec
from hafence.lab.power import SimPowerSwitch

VMS = 50
EVENTS = StreamNames.for_prefix("hafence").events
COALESCE_ENV = "HAFENCE_BENCH_INVENTORY_COALESCE_S"
SYNC_ENV = "HAFENCE_BENCH_NATS_SYNC"


def cpu_ms(lab: Lab) -> dict[str, float]:
    """CPU time (ms) each lab process has run so far: every thread's schedstat."""
    procs = {name: svc.proc for name, svc in lab.services.items()}
    procs["nats-server"] = lab.nats.proc
    out: dict[str, float] = {}
    for name, proc in procs.items():
        if proc is None or proc.poll() is not None:
            continue
        total = 0
        for stat in Path(f"/proc/{proc.pid}/task").glob("*/schedstat"):
            with contextlib.suppress(OSError, ValueError):
                total += int(stat.read_text().split()[0])
        out[name] = total / 1e6
    return out


@contextlib.contextmanager
def agent_setting() -> Iterator[str]:
    """The lab's config with ``[agent] inventory_coalesce_s`` from the environment (the
    lab has no knob for it; only this process's rendering changes)."""
    value = os.environ.get(COALESCE_ENV, "")
    if not value:
        yield "default"
        return
    render = cluster.render_config

    def rendered(spec: LabSpec, nats_url: str, lab_dir: Path, ports: cluster.LabPorts | None = None) -> str:
        return render(spec, nats_url, lab_dir, ports) + f"\n[agent]\ninventory_coalesce_s = {float(value)}\n"

    cluster.render_config = rendered
    try:
        yield value
    finally:
        cluster.render_config = render


def nats_sync_setting(lab: Lab) -> str:
    """``HAFENCE_BENCH_NATS_SYNC`` (e.g. ``always``, the generated nats.conf's setting):
    the lab's nats-server runs with that JetStream ``sync_interval``; unset, the
    server's default (flush every 2 minutes)."""
    value = os.environ.get(SYNC_ENV, "")
    if not value:
        return "default"
    lab.nats = synced_server(lab.dir / "nats", lab.dir / "nats" / "js", value)
    return value


async def pipeline_overhead(table: Table, quick: bool = False) -> None:
    incidents = 3 if quick else 20
    spec = LabSpec(
        hosts=4, vms_per_host=0, extra_vms={"lab-1": VMS}, vm_memory_mb=1024,
        heartbeat_interval_s=0.2, missed_heartbeats=3, off_delay_s=0.1, lease_ttl_s=3.0,
    )
    victim = "lab-1"
    lab = Lab(spec)
    sync = nats_sync_setting(lab)
    overheads: list[float] = []
    # Each incident's stages, in ms (what the observer saw: its receive times).
    stages: dict[str, list[float]] = {}
    reports: list[int] = []
    # CPU per process, fence result seen -> last ack seen (ms): agents of the survivors together.
    cpu: dict[str, list[float]] = {}
    stack = contextlib.ExitStack()
    coalesce = stack.enter_context(agent_setting())
    try:
        await lab.start()
        stack.close()
        await lab.wait_ready()
        assert lab.config is not None and lab.observer.nc is not None
        names = {vm.name for vm in lab.config.vms_of(victim)}
        js = lab.observer.nc.jetstream()
        for n in range(incidents):
            mark = len(lab.observer.records)
            first_seq = (await js.stream_info(EVENTS)).state.last_seq + 1
            lab.crash(victim)

            started: set[str] = set()
            read = [mark]
            at_result: dict[str, float] = {}

            def done(started: set[str] = started, read: list[int] = read,
                     at_result: dict[str, float] = at_result) -> bool:
                # Only what came since the last look, and only started events decoded: the
                # observer shares the machine's two cores with what it measures (decoding every
                # record at every wake-up cost more CPU than an agent).
                records = lab.observer.records
                for r in records[read[0]:]:
                    if not at_result and ".fence.result." in r.subject:
                        at_result.update(cpu_ms(lab))  # at the observer's next wake-up after it
                    if r.subject.endswith(".started") and isinstance(m := r.decode(), VmEvent):
                        started.add(m.vm)
                read[0] = len(records)
                return names <= started

            if not await lab.observer.wait_for(done, 60):
                raise RuntimeError("failover did not complete:\n" + lab.diagnostics())
            after = cpu_ms(lab)
            spent: dict[str, float] = {}
            for name, value in after.items():
                if name in at_result and name != f"agent-{victim}":
                    key = "agents (3 survivors)" if name.startswith("agent-") else name
                    spent[key] = spent.get(key, 0.0) + value - at_result[name]
            for name, value in spent.items():
                cpu.setdefault(name, []).append(value)
            recs = [(r.at, r.decode()) for r in lab.observer.records[mark:]]
            t_suspect = next(t for t, m in recs if isinstance(m, HostEvent) and m.kind == "suspect")
            t_request = next(t for t, m in recs if isinstance(m, HostEvent) and m.kind == "fence_requested")
            t_result, result = next((t, m) for t, m in recs if isinstance(m, FenceResult))
            t_last = max(t for t, m in recs if isinstance(m, VmEvent) and m.kind == "started")
            # The wave's placement records (one per batch of commands in flight).
            placed = [t for t, m in recs if isinstance(m, Placements) and t >= t_result]
            commands = [t for t, m in recs if isinstance(m, VmStart) and t >= t_result]
            power = max(e.elapsed_s for e in result.evidence if e.level == result.level)
            # The survivors' reports from the fence result to the last ack (the agents'
            # inventories the scheduler and the arbiter decode on the critical path).
            reports.append(sum(1 for t, m in recs if isinstance(m, Inventory) and m.host != victim
                               and t_result <= t <= t_last))
            seen = {
                "device": power, "overhead": t_last - t_suspect - power,
                "decide": t_request - t_suspect, "fencer": t_result - t_request - power,
                "first_placed": min(placed) - t_result, "last_placed": max(placed) - t_result,
                "first_start": min(commands) - t_result, "last_start": max(commands) - t_result,
                "acks": t_last - max(commands), "restart": t_last - t_result,
            }
            # The same span from the server's store times: no observer's receipt at either end.
            stored = await stored_times(js, first_seq, [f"hafence.host.{victim}.suspect", "hafence.vm.*.started"])
            seen["stored"] = (max(t for subj, t in stored if subj.endswith(".started"))
                              - min(t for subj, t in stored if subj.endswith(".suspect")) - power)
            for name, value in seen.items():
                stages.setdefault(name, []).append(value * 1000)
            overheads.append(seen["overhead"] * 1000)
            print(f"incident {n + 1}: " + " ".join(f"{k} {v * 1000:.1f}" for k, v in seen.items())
                  + f" inventories {reports[-1]} cpu "
                  + " ".join(f"{k} {v:.1f}" for k, v in sorted(spent.items())), file=sys.stderr, flush=True)
            where = {m.vm: m.target for _, m in recs if isinstance(m, VmEvent) and m.kind == "started"}
            # How many started VMs the survivors' reports did not show yet when the last ack
            # was seen: what a reset reading the reports alone would have left running.
            shown = {(vm.spec.name, host) for host, inv in lab.latest_inventories().items()
                     for vm in inv.vms if vm.state == "running"}
            unreported = sum(1 for vm, host in where.items() if (vm, host) not in shown)
            print(f"  unreported at the last ack: {unreported}", file=sys.stderr, flush=True)
            await reset(lab, victim, names, where)
    finally:
        stack.close()
        await lab.stop()
    note = f"{VMS} HA VMs, 4 hosts, services as processes; inventory_coalesce_s {coalesce}; nats sync {sync}"
    table.add_distribution("pipeline overhead (suspect -> last VmStart ack, minus device)", overheads, "ms", note)
    table.add_distribution("  the same, from the stream's store times", stages["stored"], "ms",
                           "suspect stored -> last started stored, minus device")
    for name, figure in STAGES:
        values = stages[name]
        table.add(f"  {figure}", f"{percentile(values, 50):.1f}", "ms", f"p50; p99 {percentile(values, 99):.1f}")
    table.add("  survivors' inventories, fence result -> last ack", f"{percentile(reports, 50):.0f}", "",
              f"p50; max {max(reports)}")
    for name, values in sorted(cpu.items()):
        table.add(f"  CPU {name}, fence result -> last ack", f"{percentile(values, 50):.1f}", "ms",
                  f"p50; p99 {percentile(values, 99):.1f}")


# The stages of an incident the table shows (p50, p99), each from the observer's receive times.
STAGES = (
    ("decide", "of which suspect -> fence requested (arbiter)"),
    ("fencer", "of which fence requested -> confirmed off, minus device (fencer)"),
    ("restart", "of which confirmed off -> last VmStart ack (scheduler, agents)"),
    ("first_placed", "  confirmed off -> first placement record (scheduler)"),
    ("last_placed", "  confirmed off -> last placement record"),
    ("first_start", "  confirmed off -> first VmStart sent"),
    ("last_start", "  confirmed off -> last VmStart sent"),
    ("acks", "  last VmStart sent -> last VmStart ack (agents, scheduler)"),
    ("device", "power device time (simulated IPMI BMC, excluded)"),
)


async def stored_times(js: JetStreamContext, first_seq: int, subjects: list[str]) -> list[tuple[str, float]]:
    """Each event on ``subjects`` stored since ``first_seq``, with the time the server
    stored it. Read after the incident, outside the measured span, through a pull
    consumer deleted at once (nothing of it stays to be pushed or kept)."""
    config = ConsumerConfig(filter_subjects=subjects, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                            opt_start_seq=first_seq, ack_policy=AckPolicy.NONE, inactive_threshold=10.0)
    info = await js.add_consumer(EVENTS, config)
    out: list[tuple[str, float]] = []
    try:
        sub = await js.pull_subscribe_bind(consumer=info.name, stream=EVENTS)
        try:
            while True:
                for msg in await sub.fetch(64, timeout=5):
                    out.append((msg.subject, msg.metadata.timestamp.timestamp()))
                    if msg.metadata.num_pending == 0:
                        return out
        finally:
            await sub.unsubscribe()
    finally:
        await js.delete_consumer(EVENTS, info.name)


async def reset(lab: Lab, victim: str, names: set[str], where: dict[str, str]) -> None:
    """Stop the victim's VMs on the survivors, power it on, boot it with them again.

    Where each VM runs is the scheduler's ``started`` events (``where``), not the
    survivors' inventories: the last report of a host may not be in yet when the last
    ack is (it follows the reply; with ``inventory_coalesce_s`` a burst's report goes
    out when the burst drains). Stopping only what the reports showed left a VM
    running on a survivor, the victim booted with it too, and the scheduler rightly
    stopped the victim's copy as a duplicate: the next incident then waited for a
    VM that was never lost. The victim boots only once the survivors' reports say
    every VM stopped, so its copies are never seen beside a stale "running".
    """
    nc = lab.observer.nc
    assert nc is not None
    stops = dict(where)
    for host, inv in lab.latest_inventories().items():
        for vm in inv.vms:
            if host != victim and vm.spec.name in names and vm.state == "running":
                stops.setdefault(vm.spec.name, host)
    for vm_name, host in sorted(stops.items()):
        reply = await nc.request(f"hafence.agent.{host}.cmd", encode(VmStop(vm=vm_name)), timeout=5)
        if not msgspec.json.decode(reply.data, type=AgentReply).ok:
            raise RuntimeError(f"could not stop {vm_name} on {host}: {reply.data!r}")

    def stopped() -> bool:
        return not any(vm.spec.name in names and vm.state == "running"
                       for host, inv in lab.latest_inventories().items() if host != victim for vm in inv.vms)

    if not await lab.observer.wait_for(stopped, 10):
        raise RuntimeError("the survivors still report the victim's VMs running:\n" + lab.diagnostics())
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
