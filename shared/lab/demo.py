"""``make demo``: a simulated lab fails over one host, end to end, and prints
what happened.

Starts a real nats-server and every hafence service as its own process, a lab
of 4 hosts and 12 VMs (9 HA), hangs one host, and waits until every HA VM of
that host runs elsewhere. Exit 0 only if they all do.

With ``--nats-cluster 3`` it runs on three routed nats-servers (the streams and
the lease bucket at 3 replicas) and, right after the host is declared suspect,
kills (SIGKILL) the NATS node leading the events stream; the timeline shows
the kill, and the node is restarted and rejoins after the failover.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from hafence.bus.names import StreamNames
from hafence.contracts import FenceResult, HostEvent, VmEvent
from hafence.lab.cluster import Lab, LabSpec, Record
from hafence.lab.natscluster import stream_leader
from hafence.telemetry import JSONL_FLUSH_MS, trace_id_of


def _fmt(t: float, t0: float) -> str:
    return f"{t - t0:+7.3f}s"


def failover_done(lab: Lab, victim: str, expected: set[str]) -> bool:
    started = {r.decode().vm for r in lab.observer.matching(".vm.") if isinstance(r.decode(), VmEvent)
               and r.decode().kind == "started"}  # type: ignore[union-attr]
    return expected <= started


def timeline(records: list[Record], victim: str, t0: float,
             extra: tuple[tuple[float, str], ...] = ()) -> list[str]:
    """The incident as the bus saw it; ``extra``: (time, what) lines of the lab's own acts."""
    lines: list[tuple[float, str]] = [(t, f"  {_fmt(t, t0)}  {what}") for t, what in extra]
    last_hb = max((r.at for r in records if r.subject.endswith(f".hb.{victim}")), default=None)
    if last_hb is not None:
        lines.append((last_hb, f"  {_fmt(last_hb, t0)}  last heartbeat from {victim}"))
    seen_ids: set[str] = set()
    for r in records:
        msg = r.decode()
        # A publisher whose ack did not come (a NATS node lost) publishes again under the
        # same id; subscribers see both, the stream stores one.
        msg_id = r.headers.get("Nats-Msg-Id", "")
        again = " (published again, same Nats-Msg-Id: the stream keeps one)" if msg_id in seen_ids else ""
        if msg_id:
            seen_ids.add(msg_id)
        if isinstance(msg, HostEvent) and msg.host == victim and msg.kind != "alive":
            lines.append((r.at, f"  {_fmt(r.at, t0)}  host {msg.kind:<16} {msg.reason}{again}"))
        elif isinstance(msg, FenceResult) and msg.host == victim:
            lines.append((r.at, f"  {_fmt(r.at, t0)}  fence result     {msg.outcome}: {msg.reason}{again}"))
            for e in msg.evidence:
                lines.append((r.at, (
                    f"  {'':9}    level {e.level} device {e.device} ({e.driver}): sent {e.action_sent}, read back "
                    f"{e.power_read} after {e.status_reads} status reads, {e.elapsed_s:.3f}s"
                    + (f" — {e.error}" if e.error else "")
                )))
        elif isinstance(msg, VmEvent) and msg.from_host == victim and msg.kind in ("started", "failed", "pending"):
            where = f"on {msg.target}" if msg.target else ""
            lines.append((r.at, f"  {_fmt(r.at, t0)}  vm {msg.vm} {msg.kind} {where} {msg.reason}".rstrip()))
    return [line for _, line in sorted(lines, key=lambda tl: tl[0])]


async def kill_events_leader(lab: Lab, victim: str, timeout: float) -> tuple[float, str, str]:
    """Right after the suspect, SIGKILL the NATS node leading the events stream:
    (when, the node, its timeline line); the node is "" if the moment never came."""
    assert lab.config is not None and lab.nats_cluster is not None and lab.observer.nc is not None
    events = StreamNames.for_prefix(lab.config.cluster.subject_prefix).events
    if not await lab.observer.wait_for(lambda: bool(lab.events("suspect", victim)), timeout):
        return time.time(), "", "no suspect event: no NATS node killed"
    leader = await stream_leader(lab.observer.nc.jetstream(), events)
    if not leader:
        return time.time(), "", f"{events} has no leader: no NATS node killed"
    lab.nats_cluster.kill(leader)
    return time.time(), leader, f"NATS node {leader} killed (SIGKILL): it led the {events} stream"


async def run_demo(victim: str, timeout: float, keep: bool, stuck_bmc: bool = False, nats_cluster: int = 1) -> int:
    spec = LabSpec(stuck_bmcs=(victim,) if stuck_bmc else (), pdu_hosts=("lab-2", victim), nats_cluster=nats_cluster)
    lab = Lab(spec, keep=keep)
    try:
        await lab.start()
        assert lab.config is not None
        print(f"hafence demo: {spec.hosts} hosts, {len(lab.config.vms)} VMs "
              f"({sum(vm.ha for vm in lab.config.vms)} HA); heartbeat every {spec.heartbeat_interval_s}s, "
              f"suspect after {spec.missed_heartbeats} missed")
        if lab.nats_cluster is not None:
            nodes = ", ".join(f"{name} {node.url}" for name, node in zip(lab.nats_cluster.names,
                                                                       lab.nats_cluster.nodes, strict=True))
            print(f"  NATS cluster of {nats_cluster} nodes ({nodes}); streams and the lease bucket at "
                  f"{nats_cluster} replicas; services and agents given every URL (logs in {lab.log_dir})")
        else:
            print(f"  nats-server on {lab.nats.url}; services and agents starting (logs in {lab.log_dir})")
        await lab.wait_ready()
        assert lab.config is not None
        expected = {vm.name for vm in lab.config.vms_of(victim) if vm.ha}
        print(f"  cluster ready; hanging host {victim} (its agent is frozen with SIGSTOP) "
              f"with HA VMs {', '.join(sorted(expected))}")
        t_crash = time.time()
        lab.crash(victim)
        acts: tuple[tuple[float, str], ...] = ()
        killed = ""
        if lab.nats_cluster is not None:
            t_kill, killed, what = await kill_events_leader(lab, victim, timeout)
            acts = ((t_kill, what),)
        ok = await lab.observer.wait_for(lambda: failover_done(lab, victim, expected), timeout)
        records = list(lab.observer.records)
        print("\ntimeline (t=0: host hung)")
        for line in timeline(records, victim, t_crash, acts):
            print(line)
        if killed and lab.nats_cluster is not None and lab.observer.nc is not None:
            events = StreamNames.for_prefix(lab.config.cluster.subject_prefix).events
            now_led = await stream_leader(lab.observer.nc.jetstream(), events)
            lab.nats_cluster.restart(killed)
            await lab.nats_cluster.wait_meta_leader()
            await lab.wait_stream_leaders()
            print(f"\n  {events} led by {now_led or '(none)'} after the kill; {killed} restarted and rejoined "
                  f"(every stream's {nats_cluster} replicas current again)")
        suspect = next((r for r in records if r.subject.endswith(f".host.{victim}.suspect")), None)
        trace = trace_id_of(suspect.headers) if suspect else ""
        started = [r.decode() for r in records if isinstance(r.decode(), VmEvent)]
        started = [m for m in started if m.kind == "started" and m.from_host == victim]  # type: ignore[union-attr]
        targets = sorted({m.target for m in started})  # type: ignore[union-attr]
        last_start = max((r.at for r in records if r.subject.endswith(".started")), default=t_crash)
        if suspect:
            first = next((r.at for r in records if ".fence.result." in r.subject), None)
            print("\nstages")
            last_hb = max((r.at for r in records if r.subject.endswith(f".hb.{victim}")), default=t_crash)
            print(f"  detection (last heartbeat -> suspect): {suspect.at - last_hb:.3f}s")
            if first:
                print(f"  fencing   (suspect -> confirmed off):  {first - suspect.at:.3f}s")
                print(f"  restart   (confirmed off -> last VM):  {last_start - first:.3f}s")
        await asyncio.sleep(3 * JSONL_FLUSH_MS / 1000)  # the services write spans in batches
        print(f"  trace id: {trace or '(none)'}  ({len([s for s in lab.spans() if s['trace_id'] == trace])} spans)")
        running_elsewhere = {vm.spec.name for h, inv in lab.latest_inventories().items() if h != victim
                             for vm in inv.vms if vm.state == "running"}
        missing = expected - running_elsewhere
        if ok and not missing:
            print(f"\nfailover complete: host {victim}, {len(expected)}/{len(expected)} HA VMs restarted on "
                  f"{', '.join(targets)} in {last_start - t_crash:.1f} s (trace {trace[:4]}…)")
            return 0
        print(f"\nfailover FAILED: host {victim}: {len(expected - missing)}/{len(expected)} HA VMs running "
              f"elsewhere after {timeout:.0f}s; missing {', '.join(sorted(missing))}")
        print(lab.diagnostics())
        return 1
    finally:
        codes = await lab.stop()
        bad = {k: v for k, v in codes.items() if v not in (0, None, -9, -15)}
        if bad:
            print(f"  note: services exited with {bad}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hafence demo", description=__doc__)
    parser.add_argument("--host", default="lab-2", help="the host to hang")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--keep", action="store_true", help="keep the lab directory (logs, spans)")
    parser.add_argument("--stuck-bmc", action="store_true",
                        help="the host's BMC accepts 'off' but the host stays on: level 2 (the PDU) must fence it")
    parser.add_argument("--nats-cluster", type=int, default=1, choices=[1, 3, 5], metavar="N",
                        help="run on N routed nats-servers (3 or 5; streams at N replicas) and kill the node "
                             "leading the events stream right after the host is declared suspect")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_demo(args.host, args.timeout, args.keep, args.stuck_bmc, args.nats_cluster))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
