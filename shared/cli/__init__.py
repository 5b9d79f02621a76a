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

from hafence.cli import config_check, deploy, fence, operator, view
from hafence.cli.view import describe_event

__all__ = ["build_parser", "describe_event", "main"]


def cmd_demo(args: argparse.Namespace) -> int:
    from hafence.lab.demo import main as demo_main

    return demo_main(args.rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hafence", description="fence-first HA for KVM virtual machines")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in (fence, config_check, operator, view, deploy):
        module.register(sub)
    demo = sub.add_parser("demo", help="run the simulated lab failover (make demo)")
    demo.add_argument("rest", nargs=argparse.REMAINDER)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
