"""``hafence``: the operator's command line.

    hafence config check FILE
    hafence fence test HOST --config FILE          log in to every device, read status, power nothing
    hafence fence status|off|on|reboot HOST --config FILE
    hafence confirm-fenced HOST --reason "…" --config FILE
    hafence maintenance HOST on|off [--reason "…"] --config FILE
    hafence status|hosts|vms [--json] --config FILE
    hafence events [--follow] [--json] --config FILE
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
from collections.abc import Callable, Sequence

import msgspec

from hafence.clusterview import ClusterView
from hafence.config import ClusterConfig, ConfigError, load_config
from hafence.contracts import DeviceEvidence, FenceResult, HostEvent, Inventory

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


async def _read_view(config: ClusterConfig, follow_events: bool = False,
                     printer: Callable[[float, object], None] | None = None) -> ClusterView:
    """Replay the events stream into a ClusterView (the way the services do);
    with ``follow_events``, keep printing events as they arrive until interrupted."""
    from nats.aio.msg import Msg

    from hafence.bus import Bus
    from hafence.contracts import Decoders

    bus = await Bus.connect(config, "cli")
    view = ClusterView.of(config)
    caught_up = asyncio.Event()
    heartbeats: dict[str, float] = {}

    async def on_event(event: object, msg: Msg) -> None:
        view.apply(event)
        if printer is not None:
            stamp = msg.metadata.timestamp.timestamp() if msg.metadata.timestamp else time.time()
            printer(stamp, event)

    async def on_heartbeat(msg: Msg) -> None:
        heartbeats[msg.subject.rsplit(".", 1)[1]] = time.time()

    class _Done(Exception):
        pass

    async def until_read() -> None:
        await caught_up.wait()
        # One heartbeat interval and a half: every live host has been heard.
        await asyncio.sleep(config.timings.heartbeat_interval_s * 1.5)
        if not follow_events:
            raise _Done

    try:
        hb_sub = await bus.nc.subscribe(bus.subjects.hb_all(), cb=on_heartbeat)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(bus.replay(bus.event_subjects(), Decoders.any, on_event, caught_up, dead_letters=False))
                tg.create_task(until_read())
        except* _Done:
            pass
        await hb_sub.unsubscribe()
    finally:
        await bus.close()
    for host, at in heartbeats.items():
        if host in view.hosts:
            view.hosts[host].last_heartbeat = at
    return view


def _ago(at: float | None) -> str:
    if not at:
        return "-"
    return f"{max(0.0, time.time() - at):.1f}s ago"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def cmd_view(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE
    try:
        view = asyncio.run(_read_view(config))
    except ConnectionError as err:
        print(f"hafence: {err}", file=sys.stderr)
        return EXIT_NOT_CONFIRMED
    hosts = [["HOST", "STATE", "LAST HEARTBEAT", "FENCING", "VMS", "MAINT"]] + [
        [h.name, h.state, _ago(h.last_heartbeat),
         {True: "protected", False: "NOT PROTECTED", None: "unknown"}[h.protected], str(h.vms),
         "yes" if h.maintenance else ""]
        for h in view.hosts.values()
    ]
    vms = [["VM", "HOST", "STATE", "HA", "MEMORY", "NOTE"]] + [
        [v.name, v.host, v.state, "yes" if v.ha else "no", f"{v.memory_mb} MiB", v.note]
        for v in sorted(view.vms.values(), key=lambda v: v.name)
    ]
    alerts = view.alerts()
    if args.json:
        payload = {"hosts": [vars(h) for h in view.hosts.values()], "vms": [vars(v) for v in view.vms.values()],
                   "alerts": alerts}
        print(json.dumps({k: payload[k] for k in ({"hosts": ["hosts"], "vms": ["vms"]}.get(
            args.command, ["hosts", "vms", "alerts"]))}, default=str))
    elif args.command == "hosts":
        print(_table(hosts))
    elif args.command == "vms":
        print(_table(vms))
    else:
        print(_table(hosts))
        pending = [v for v in view.vms.values() if v.state in ("pending", "down")]
        waiting = f": {', '.join(v.name for v in pending)}" if pending else ""
        print(f"\nVMs: {sum(v.state == 'running' for v in view.vms.values())} running, "
              f"{len(pending)} HA VMs waiting for a host{waiting}")
        print("\nalerts:" if alerts else "\nalerts: none")
        for alert in alerts:
            print(f"  ! {alert}")
    # For scripts: 0 healthy, 1 something needs a person.
    return EXIT_NOT_CONFIRMED if alerts and args.command == "status" else EXIT_OK


def describe_event(event: object) -> str:
    from hafence.contracts import VmEvent

    match event:
        case HostEvent():
            extra = f" [{event.rule}]" if event.rule else ""
            who = f" by {event.by}" if event.by else ""
            return f"host {event.host:<10} {event.kind}{extra}{who}: {event.reason}".rstrip(": ")
        case FenceResult():
            return f"host {event.host:<10} fence {event.outcome} (term {event.term}): {event.reason}"
        case VmEvent():
            where = f" on {event.target}" if event.target else ""
            return f"vm   {event.vm:<10} {event.kind}{where} {event.reason}".rstrip()
        case Inventory():
            running = sum(1 for v in event.vms if v.state == "running")
            return f"host {event.host:<10} inventory: {running} VMs running"
    return type(event).__name__


def cmd_events(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_USAGE

    def printer(at: float, event: object) -> None:
        if isinstance(event, Inventory) and not args.inventory:
            return
        if args.json:
            print(json.dumps({"at": at, "event": msgspec.to_builtins(event)}), flush=True)
        else:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
            print(f"{stamp}  {describe_event(event)}", flush=True)

    try:
        asyncio.run(_read_view(config, follow_events=args.follow, printer=printer))
    except KeyboardInterrupt:
        pass
    except ConnectionError as err:
        print(f"hafence: {err}", file=sys.stderr)
        return EXIT_NOT_CONFIRMED
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

    for name, text in (("status", "hosts, pending VMs and alerts"), ("hosts", "hosts and their state"),
                       ("vms", "VMs and where they run")):
        view = sub.add_parser(name, help=text)
        view.add_argument("--config", required=True)
        view.add_argument("--json", action="store_true")
        view.set_defaults(func=cmd_view)
    events = sub.add_parser("events", help="the incident events, readable (like nats sub, from the start)")
    events.add_argument("--config", required=True)
    events.add_argument("--follow", action="store_true", help="keep printing new events")
    events.add_argument("--inventory", action="store_true", help="include inventory reports")
    events.add_argument("--json", action="store_true")
    events.set_defaults(func=cmd_events)

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
