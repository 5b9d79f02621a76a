"""``hafence status|hosts|vms|events``: the cluster as the events stream tells it."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable

import msgspec

from hafence.cli.common import EXIT_NOT_CONFIRMED, EXIT_OK, EXIT_USAGE, _load
from hafence.clusterview import ClusterView
from hafence.config import ClusterConfig
from hafence.contracts import Alert, FenceResult, HostEvent, Inventory


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
    hosts = [["HOST", "STATE", "LAST HEARTBEAT", "FENCING", "VMS", "MAINT", "QUARANTINE"]] + [
        [h.name, h.state, _ago(h.last_heartbeat),
         {True: "protected", False: "NOT PROTECTED", None: "unknown"}[h.protected], str(h.vms),
         "yes" if h.maintenance else "",
         # S6: fenced and back, not cleared; or only the agent's own flag (cleared soon by the scheduler).
         "yes" if h.quarantined else ("agent" if h.agent_quarantined else "")]
        for h in view.hosts.values()
    ]
    vms = [["VM", "HOST", "STATE", "HA", "MEMORY", "NOTE"]] + [
        [v.name, v.host, v.state, "yes" if v.ha else "no", f"{v.memory_mb} MiB", v.note]
        for v in sorted(view.vms.values(), key=lambda v: v.name)
    ]
    alerts = view.alerts(time.time())
    if args.json:
        payload = {"hosts": [vars(h) for h in view.hosts.values()], "vms": [vars(v) for v in view.vms.values()],
                   "alerts": alerts,
                   # Host events the phase table (hafence.host_phase) calls illegal: counted, never dropped.
                   "illegal_events": {"counts": view.illegal, "recent": view.illegal_recent}}
        print(json.dumps({k: payload[k] for k in ({"hosts": ["hosts"], "vms": ["vms"]}.get(
            args.command, ["hosts", "vms", "alerts", "illegal_events"]))}, default=str))
    elif args.command == "hosts":
        print(_table(hosts))
    elif args.command == "vms":
        print(_table(vms))
    else:
        print(_table(hosts))
        pending = [v for v in view.vms.values() if v.state in ("pending", "down")]
        waiting = f": {', '.join(v.name for v in pending)}" if pending else ""
        duplicates = [v.name for v in view.vms.values() if v.state == "duplicate"]
        twice = f", {len(duplicates)} RUNNING TWICE: {', '.join(duplicates)}" if duplicates else ""
        # VM-level HA: failed on a live host, being restarted or past its restart limit.
        failed = [v.name for v in view.failed()]
        down = f", {len(failed)} failed: {', '.join(failed)}" if failed else ""
        print(f"\nVMs: {sum(v.state == 'running' for v in view.vms.values())} running, "
              f"{len(pending)} HA VMs waiting for a host{waiting}{twice}{down}")
        print("\nalerts:" if alerts else "\nalerts: none")
        for alert in alerts:
            print(f"  ! {alert}")
    # For scripts: 0 healthy, 1 something needs a person.
    return EXIT_NOT_CONFIRMED if alerts and args.command == "status" else EXIT_OK


def describe_event(event: object) -> str:
    from hafence.contracts import Placements, VmEvent

    match event:
        case Placements():
            # One line per VM, as the per-VM ``placed`` events of before read.
            return "\n".join(describe_event(placed) for placed in event.placed)
        case HostEvent():
            extra = f" [{event.rule}]" if event.rule else ""
            who = f" by {event.by}" if event.by else ""
            return f"host {event.host:<10} {event.kind}{extra}{who}: {event.reason}".rstrip(": ")
        case FenceResult():
            return f"host {event.host:<10} fence {event.outcome} (term {event.term}): {event.reason}"
        case Alert():
            where = " ".join(x for x in (event.host, f"vm {event.vm}" if event.vm else "") if x)
            return f"alert {event.kind} {where}: {event.reason}".replace("  ", " ")
        case VmEvent():
            where = f" on {event.target}" if event.target else ""
            return f"vm   {event.vm:<10} {event.kind}{where} {event.reason}".rstrip()
        case Inventory():
            running = sum(1 for v in event.vms if v.state == "running")
            quarantined = " (quarantined)" if event.quarantined else ""
            return f"host {event.host:<10} inventory: {running} VMs running{quarantined}"
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
            for line in describe_event(event).splitlines():
                print(f"{stamp}  {line}", flush=True)

    try:
        asyncio.run(_read_view(config, follow_events=args.follow, printer=printer))
    except KeyboardInterrupt:
        pass
    except ConnectionError as err:
        print(f"hafence: {err}", file=sys.stderr)
        return EXIT_NOT_CONFIRMED
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
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
