"""``hafence``: the operator's command line.

    hafence config check FILE
    hafence fence test HOST --config FILE          log in to every device, read status, power nothing
    hafence fence status|off|on|reboot HOST --config FILE
    hafence confirm-fenced HOST --reason "…" --config FILE
    hafence maintenance HOST on|off [--reason "…"] --config FILE
    hafence demo

Fence commands run the host's topology directly (no bus), like Pacemaker's
``stonith_admin``, and print per-device evidence. Exit codes: 0 done/confirmed,
1 not confirmed (or not protected), 2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence

import msgspec

from hafence.config import ClusterConfig, ConfigError, load_config
from hafence.contracts import DeviceEvidence, HostEvent

EXIT_OK, EXIT_NOT_CONFIRMED, EXIT_USAGE = 0, 1, 2


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
    from hafence.fencer.protection import protection

    executor = Executor(config)
    try:
        hc = config.host(host)
        if action in ("test", "status"):
            levels = executor.targets(hc)
            evidence = []
            for number, targets in enumerate(levels, start=1):
                evidence += await asyncio.gather(*(executor.check(t, number) for t in targets))
            verdict = protection(hc.name, evidence, len(levels))
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


def _load(path: str) -> ClusterConfig | None:
    try:
        return load_config(path)
    except ConfigError as err:
        print(err, file=sys.stderr)
        return None


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


def operator() -> str:
    import getpass
    import os

    return os.environ.get("SUDO_USER") or getpass.getuser()


async def _announce(config: ClusterConfig, event: HostEvent) -> None:
    from hafence.bus import Bus

    bus = await Bus.connect(config, "cli")
    try:
        await bus.publish(bus.subjects.host_event(event.host, event.kind), event)
    finally:
        await bus.close()


def _host_event(args: argparse.Namespace, kind: str, reason: str) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    try:
        config.host(args.host)
    except KeyError as err:
        print(f"hafence: {err.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    now = time.time()
    event = HostEvent(host=args.host, kind=kind, at=now, reason=reason, by=args.by or operator(),  # type: ignore[arg-type]
                      incident=f"operator-{args.host}-{int(now)}" if kind == "confirmed_fenced" else "")
    try:
        asyncio.run(_announce(config, event))
    except ConnectionError as err:
        print(f"hafence: {err}", file=sys.stderr)
        return EXIT_NOT_CONFIRMED
    print(f"{kind} {args.host} by {event.by}: {reason}")
    return EXIT_OK


def cmd_confirm_fenced(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        print("hafence: --reason must say how you made sure the host is off", file=sys.stderr)
        return EXIT_USAGE
    if not args.yes:
        print(f"This tells hafence that {args.host} is powered off, so its HA VMs will be started elsewhere.\n"
              "If the host is in fact running, its VMs will run twice and their disks will be corrupted.\n"
              "Re-run with --yes once you have checked the host is off.", file=sys.stderr)
        return EXIT_USAGE
    return _host_event(args, "confirmed_fenced", args.reason.strip())


def cmd_maintenance(args: argparse.Namespace) -> int:
    kind = "maintenance_on" if args.state == "on" else "maintenance_off"
    return _host_event(args, kind, args.reason or f"maintenance {args.state}")


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    if config is None:
        return EXIT_USAGE
    levels = sum(len(h.levels) for h in config.hosts)
    unprotected = [h.name for h in config.hosts if not h.levels]
    print(f"{args.file}: ok — {len(config.hosts)} hosts, {len(config.devices)} power devices, {levels} fence levels, "
          f"{len(config.vms)} VMs ({sum(vm.ha for vm in config.vms)} HA)")
    if unprotected:
        print(f"warning: hosts without fence levels (they cannot fail over): {', '.join(unprotected)}")
    return EXIT_OK


def cmd_nats_conf(args: argparse.Namespace) -> int:
    from hafence import natsconf

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    text = natsconf.render(config)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        users = natsconf.permissions(config)
        print(f"wrote {args.out}: {len(users)} users; set these in the NATS server's environment:")
        for user in users:
            print(f"  {natsconf.password_env(user)}")
    else:
        print(text, end="")
    return EXIT_OK


def cmd_secrets(args: argparse.Namespace) -> int:
    """Random passwords for every NATS user and the lab's devices: the files the
    services read, and the env file the NATS server reads. Existing ones are kept."""
    import os
    import secrets
    from pathlib import Path

    from hafence import natsconf

    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    env_lines = []
    names = [*natsconf.permissions(config)]
    for name in [*(f"nats_{u.replace('-', '_')}" for u in names), "bmc_password", "pdu_community"]:
        path = directory / name
        if not path.exists():
            path.write_text(secrets.token_urlsafe(18) + "\n")
            os.chmod(path, 0o600)
    for user in names:
        value = (directory / f"nats_{user.replace('-', '_')}").read_text().strip()
        env_lines.append(f"{natsconf.password_env(user)}={value}")
    Path(args.env).write_text("\n".join(env_lines) + "\n")
    os.chmod(args.env, 0o600)
    print(f"secrets in {directory}/, NATS server environment in {args.env}")
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from hafence.lab.demo import main as demo_main

    return demo_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hafence", description="fence-first HA for KVM virtual machines")
    sub = parser.add_subparsers(dest="command", required=True)

    fence = sub.add_parser("fence", help="run a host's fencing topology directly (no bus)")
    fence.add_argument("action", choices=["test", "status", "off", "on", "reboot"])
    fence.add_argument("host")
    fence.add_argument("--config", required=True)
    fence.add_argument("--json", action="store_true", help="machine-readable output")
    fence.set_defaults(func=cmd_fence)

    config = sub.add_parser("config", help="configuration commands")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file, reporting every error")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)

    confirm = sub.add_parser("confirm-fenced", help="an operator confirms a host is off (its VMs restart)")
    confirm.add_argument("host")
    confirm.add_argument("--reason", required=True, help="how you made sure the host is off")
    confirm.add_argument("--yes", action="store_true", help="I have checked: the host is powered off")
    confirm.add_argument("--by", default="", help="who confirms (default: the login user)")
    confirm.add_argument("--config", required=True)
    confirm.set_defaults(func=cmd_confirm_fenced)

    maint = sub.add_parser("maintenance", help="put a host in or out of maintenance (never fenced, VMs not moved)")
    maint.add_argument("host")
    maint.add_argument("state", choices=["on", "off"])
    maint.add_argument("--reason", default="")
    maint.add_argument("--by", default="")
    maint.add_argument("--config", required=True)
    maint.set_defaults(func=cmd_maintenance)

    deploy = sub.add_parser("deploy", help="deployment helpers")
    deploy_sub = deploy.add_subparsers(dest="deploy_command", required=True)
    nats_conf = deploy_sub.add_parser("nats-conf", help="NATS server config with a user and permissions per service")
    nats_conf.add_argument("--config", required=True)
    nats_conf.add_argument("--out", default="", help="write here instead of stdout")
    nats_conf.set_defaults(func=cmd_nats_conf)
    secrets_cmd = deploy_sub.add_parser("secrets", help="generate the compose stack's passwords (kept if present)")
    secrets_cmd.add_argument("--config", required=True)
    secrets_cmd.add_argument("--dir", default="deploy/secrets")
    secrets_cmd.add_argument("--env", default="deploy/secrets.env")
    secrets_cmd.set_defaults(func=cmd_secrets)

    demo = sub.add_parser("demo", help="run the simulated lab failover (make demo)")
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
