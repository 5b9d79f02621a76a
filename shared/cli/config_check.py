"""``hafence config check FILE``."""

from __future__ import annotations

import argparse

from hafence.cli.common import EXIT_OK, EXIT_USAGE, _load
from hafence.config import worst_fence_s


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
    deadline = config.timings.fence_deadline_s
    slow = {h.name: worst for h in config.hosts if (worst := worst_fence_s(config, h)) > deadline}
    if slow:
        hosts = ", ".join(f"{name} ({worst:g}s)" for name, worst in slow.items())
        print(f"warning: timings.fence_deadline_s = {deadline:g}s is shorter than the slowest fence of: {hosts}; "
              "the arbiter will fail those fences before the fencer has tried every level")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    config = sub.add_parser("config", help="configuration commands")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser("check", help="validate a configuration file, reporting every error")
    check.add_argument("file")
    check.set_defaults(func=cmd_config_check)
