"""``make demo``: a simulated lab fails over one host, end to end, and prints
what happened.

Starts a real nats-server and every hafence service as its own process, a lab
of 4 hosts and 12 VMs (9 HA), hangs one host, and waits until every HA VM of
that host runs elsewhere. Exit 0 only if they all do.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from hafence.contracts import FenceResult, HostEvent, VmEvent
from hafence.lab.cluster import Lab, LabSpec, Record
from hafence.telemetry import trace_id_of


def _fmt(t: float, t0: float) -> str:
    return f"{t - t0:+7.3f}s"


def failover_done(lab: Lab, victim: str, expected: set[str]) -> bool:
    started = {r.decode().vm for r in lab.observer.matching(".vm.") if isinstance(r.decode(), VmEvent)
               and r.decode().kind == "started"}  # type: ignore[union-attr]
    return expected <= started


def timeline(records: list[Record], victim: str, t0: float) -> list[str]:
    lines: list[tuple[float, str]] = []
    last_hb = max((r.at for r in records if r.subject.endswith(f".hb.{victim}")), default=None)
    if last_hb is not None:
        lines.append((last_hb, f"  {_fmt(last_hb, t0)}  last heartbeat from {victim}"))
    for r in records:
        msg = r.decode()
        if isinstance(msg, HostEvent) and msg.host == victim and msg.kind != "alive":
            lines.append((r.at, f"  {_fmt(r.at, t0)}  host {msg.kind:<16} {msg.reason}"))
        elif isinstance(msg, FenceResult) and msg.host == victim:
            lines.append((r.at, f"  {_fmt(r.at, t0)}  fence result     {msg.outcome}: {msg.reason}"))
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


async def run_demo(victim: str, timeout: float, keep: bool, stuck_bmc: bool = False) -> int:
    spec = LabSpec(stuck_bmcs=(victim,) if stuck_bmc else (), pdu_hosts=("lab-2", victim))
    lab = Lab(spec, keep=keep)
    try:
        await lab.start()
        assert lab.config is not None
        print(f"hafence demo: {spec.hosts} hosts, {len(lab.config.vms)} VMs "
              f"({sum(vm.ha for vm in lab.config.vms)} HA); heartbeat every {spec.heartbeat_interval_s}s, "
              f"suspect after {spec.missed_heartbeats} missed")
        print(f"  nats-server on {lab.nats.url}; services and agents starting (logs in {lab.log_dir})")
        await lab.wait_ready()
        assert lab.config is not None
        expected = {vm.name for vm in lab.config.vms_of(victim) if vm.ha}
        print(f"  cluster ready; hanging host {victim} (its agent is frozen with SIGSTOP) "
              f"with HA VMs {', '.join(sorted(expected))}")
        t_crash = time.time()
        lab.crash(victim)
        ok = await lab.observer.wait_for(lambda: failover_done(lab, victim, expected), timeout)
        records = list(lab.observer.records)
        print("\ntimeline (t=0: host hung)")
        for line in timeline(records, victim, t_crash):
            print(line)
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
    args = parser.parse_args(argv)
    try:
        return asyncio.run(run_demo(args.host, args.timeout, args.keep, args.stuck_bmc))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
