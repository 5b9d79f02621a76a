"""``hafence fence test|status|off|on|reboot HOST``: a host's topology run directly (no bus)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence

import msgspec

from hafence.cli.common import EXIT_NOT_CONFIRMED, EXIT_OK, EXIT_USAGE, _load
from hafence.config import ClusterConfig
from hafence.contracts import DeviceEvidence


def _evidence_rows(evidence: Sequence[DeviceEvidence]) -> list[str]:
    rows = [f"  {'level':<5} {'device':<20} {'driver':<9} {'sent':<7} {'read':<8} {'reads':>5} {'time':>8}  result"]
    for e in evidence:
        result = "ok" if e.confirmed else (e.error or "not confirmed")
        rows.append(
            f"  {e.level:<5} {e.device:<20} {e.driver:<9} {e.action_sent:<7} {e.power_read:<8} "
            f"{e.status_reads:>5} {e.elapsed_s:>7.3f}s  {result}"
        )
    return rows


async def _fence(config: ClusterConfig, host: str, action: str, as_json: bool) -> int:
    from hafence.fencer.executor import Executor

    executor = Executor(config)
    try:
        hc = config.host(host)
        if action in ("test", "status"):
            verdict = await executor.check_host(hc)
            evidence = verdict.checks
            if as_json:
                print(json.dumps({"host": host, "action": action, "protected": verdict.protected,
                                  "working_levels": verdict.working_levels, "reason": verdict.reason,
                                  "power": verdict.power, "evidence": msgspec.to_builtins(evidence)}))
            else:
                print(f"{action} {host}: {verdict.reason}")
                print("\n".join(_evidence_rows(evidence)))
                if action == "status":
                    print(f"power: {verdict.power}")
            if action == "status":
                return EXIT_OK if verdict.power in ("on", "off") else EXIT_NOT_CONFIRMED
            return EXIT_OK if verdict.protected else EXIT_NOT_CONFIRMED
        if action == "on":
            evidence = []
            for number, targets in enumerate(executor.targets(hc), start=1):
                evidence = await executor.run_level(number, targets, "on")
                if all(e.confirmed for e in evidence):
                    break
            ok = bool(evidence) and all(e.confirmed for e in evidence)
            outcome, reason = ("confirmed_on" if ok else "failed"), ("powered on" if ok else "not confirmed on")
        else:
            report = await executor.fence(hc, action)
            evidence = report.evidence
            ok = report.verdict.outcome == "confirmed_off" and (
                action != "reboot" or all(e.confirmed for e in evidence if e.action_sent == "on")
            )
            outcome, reason = report.verdict.outcome, report.verdict.reason
        if as_json:
            print(json.dumps({"host": host, "action": action, "outcome": outcome, "reason": reason,
                              "evidence": msgspec.to_builtins(evidence)}))
        else:
            print(f"{action} {host}: {outcome}: {reason}")
            print("\n".join(_evidence_rows(evidence)))
        return EXIT_OK if ok else EXIT_NOT_CONFIRMED
    finally:
        await executor.close()


def cmd_fence(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    try:
        config.host(args.host)
    except KeyError as err:
        print(f"hafence: {err.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_fence(config, args.host, args.action, args.json))


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fence = sub.add_parser("fence", help="run a host's fencing topology directly (no bus)")
    fence.add_argument("action", choices=["test", "status", "off", "on", "reboot"])
    fence.add_argument("host")
    fence.add_argument("--config", required=True)
    fence.add_argument("--json", action="store_true", help="machine-readable output")
    fence.set_defaults(func=cmd_fence)
