"""An operator's word on the bus: confirm-fenced, maintenance and host clear,
audited with who and why."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import uuid

from hafence.cli.common import EXIT_NOT_CONFIRMED, EXIT_OK, EXIT_USAGE, _load_for_host, operator
from hafence.config import ClusterConfig
from hafence.contracts import HostEvent


def new_incident(host: str, what: str = "operator") -> str:
    """Unique: an incident id is never reused (S4)."""
    return f"{what}-{host}-{int(time.time())}-{uuid.uuid4().hex[:8]}"


async def _announce(config: ClusterConfig, event: HostEvent) -> None:
    from hafence.bus import Bus

    bus = await Bus.connect(config, "cli")
    try:
        await bus.publish(bus.subjects.host_event(event.host, event.kind), event)
    finally:
        await bus.close()


def _host_event(args: argparse.Namespace, kind: str, reason: str) -> int:
    config = _load_for_host(args.config, args.host)
    if config is None:
        return EXIT_USAGE
    now = time.time()
    event = HostEvent(host=args.host, kind=kind, at=now, reason=reason, by=args.by or operator(),  # type: ignore[arg-type]
                      incident=new_incident(args.host) if kind == "confirmed_fenced" else "")
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


def cmd_host_clear(args: argparse.Namespace) -> int:
    if not args.reason.strip():
        print("hafence: --reason must say why the host may take VMs again", file=sys.stderr)
        return EXIT_USAGE
    reason = args.reason.strip()
    config = _load_for_host(args.config, args.host)
    if config is None:
        return EXIT_USAGE
    if config.storage.slot_dir:
        # Watchdog self-fencing: the poison pill goes first (the agent stays fenced
        # while it is there, whatever the bus says). docs/watchdog.md
        from hafence.slots import Slots, SlotUnreachable
        from hafence.subjects import InvalidName

        try:
            if Slots(config.storage.slot_dir).clear_pill(args.host):
                print(f"poison pill of {args.host} removed from {config.storage.slot_dir}")
                reason += " (poison pill removed)"
        except (SlotUnreachable, InvalidName) as err:
            print(f"hafence: cannot clear the poison pill of {args.host}: {err}; host not cleared", file=sys.stderr)
            return EXIT_NOT_CONFIRMED
    return _host_event(args, "cleared", reason)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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

    host = sub.add_parser("host", help="host commands")
    host_sub = host.add_subparsers(dest="host_command", required=True)
    clear = host_sub.add_parser(
        "clear", help="a host that was fenced may take VMs again, once it reports clean (S6)")
    clear.add_argument("host")
    clear.add_argument("--reason", required=True, help="why (what you checked on the host)")
    clear.add_argument("--by", default="", help="who clears (default: the login user)")
    clear.add_argument("--config", required=True)
    clear.set_defaults(func=cmd_host_clear)
