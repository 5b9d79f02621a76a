"""``hafence fence test|status|off|on|reboot HOST``: a host's topology run directly.

The devices are driven from here, not through the fencer. A fence that
confirms off (``off``, or ``reboot``'s off) then counts as an operator's
confirmation: it is published as a ``confirmed_fenced`` host event (rule
``manual_fence``) with who (``--by``, default the login user), why
(``--reason``, required) and the evidence, so the host's HA VMs restart as the
runbook says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

import msgspec

from hafence.cli.common import EXIT_NOT_CONFIRMED, EXIT_OK, EXIT_USAGE, _load_for_host, operator
from hafence.config import ClusterConfig
from hafence.contracts import DeviceEvidence, HostEvent


def _evidence_rows(evidence: Sequence[DeviceEvidence]) -> list[str]:
    rows = [f"  {'level':<5} {'device':<20} {'driver':<9} {'sent':<7} {'read':<8} {'reads':>5} {'time':>8}  result"]
    for e in evidence:
        result = "ok" if e.confirmed else (e.error or "not confirmed")
        rows.append(
            f"  {e.level:<5} {e.device:<20} {e.driver:<9} {e.action_sent:<7} {e.power_read:<8} "
            f"{e.status_reads:>5} {e.elapsed_s:>7.3f}s  {result}"
        )
    return rows


def evidence_summary(evidence: Sequence[DeviceEvidence]) -> str:
    """One line of what each device said, for the audit trail."""
    return "; ".join(
        f"level {e.level} {e.device} ({e.driver}) sent {e.action_sent}, read {e.power_read}"
        + (f" after {e.status_reads} reads" if e.status_reads else "") + ("" if e.confirmed else f": {e.error}")
        for e in evidence
    )


async def _publish_manual_fence(config: ClusterConfig, host: str, action: str, why: str, by: str,
                                evidence: Sequence[DeviceEvidence]) -> str:
    """The operator's fence, on the bus as their confirmation. Returns the incident id."""
    from hafence.bus import Bus
    from hafence.cli.operator import new_incident

    event = HostEvent(
        host=host, kind="confirmed_fenced", at=time.time(), incident=new_incident(host, "manual"),
        rule="manual_fence", by=by,
        reason=f"{why} [hafence fence {action}: confirmed off: {evidence_summary(evidence)}]",
    )
    bus = await Bus.connect(config, "cli")
    try:
        await bus.publish(bus.subjects.host_event(host, "confirmed_fenced"), event)
    finally:
        await bus.close()
    return event.incident


async def _fence(config: ClusterConfig, host: str, action: str, as_json: bool, why: str = "", by: str = "") -> int:
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
        announced, error = "", ""
        if action in ("off", "reboot"):
            # Off first, even for a reboot: the confirmation must be on the bus before the
            # host can boot and report again, so the scheduler folds it against the boot
            # that was running (S6), not the new one.
            report = await executor.fence(hc, "off")
            evidence = report.evidence
            outcome, reason = report.verdict.outcome, report.verdict.reason
            ok = outcome == "confirmed_off"
            if ok:
                # Confirmed off: the VMs it ran are gone, so this counts as the operator's
                # confirmation, published with the evidence.
                try:
                    announced = await _publish_manual_fence(config, host, action, why, by, evidence)
                except Exception as err:
                    ok, error = False, str(err) or type(err).__name__
            if ok and action == "reboot" and report.verdict.level is not None:
                level = report.verdict.level
                powered_on = await executor.run_level(level, executor.targets(hc)[level - 1], "on")
                evidence = [*evidence, *powered_on]
                ok = all(e.confirmed for e in powered_on)
                reason += "; powered on again" if ok else "; NOT confirmed on again"
        if as_json:
            print(json.dumps({"host": host, "action": action, "outcome": outcome, "reason": reason,
                              "evidence": msgspec.to_builtins(evidence), "announced": announced,
                              "announce_error": error}))
        else:
            print(f"{action} {host}: {outcome}: {reason}")
            print("\n".join(_evidence_rows(evidence)))
            if announced:
                print(f"published: {host} confirmed fenced by {by} (incident {announced}); "
                      "its HA VMs restart elsewhere")
        if error:
            print(f"hafence: {host} is off but this was NOT published ({error}); its VMs stay down until you run\n"
                  f"  hafence confirm-fenced {host} --reason '...' --yes --config ...", file=sys.stderr)
        return EXIT_OK if ok else EXIT_NOT_CONFIRMED
    finally:
        await executor.close()


def cmd_fence(args: argparse.Namespace) -> int:
    config = _load_for_host(args.config, args.host)
    if config is None:
        return EXIT_USAGE
    why = (args.reason or "").strip()
    if args.action in ("off", "reboot") and not why:
        print(f"hafence: fence {args.action} needs --reason: a fence that confirms off is published as your\n"
              "confirmation that the host is off (its HA VMs restart elsewhere), audited with who and why",
              file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_fence(config, args.host, args.action, args.json, why, args.by or operator()))


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    fence = sub.add_parser("fence", help="run a host's fencing topology directly (no bus)")
    fence.add_argument("action", choices=["test", "status", "off", "on", "reboot"])
    fence.add_argument("host")
    fence.add_argument("--config", required=True)
    fence.add_argument("--json", action="store_true", help="machine-readable output")
    fence.add_argument("--reason", default="", help="off/reboot (required): why; published with the evidence")
    fence.add_argument("--by", default="", help="off/reboot: who fences (default: the login user)")
    fence.set_defaults(func=cmd_fence)
