"""The host agent: one per hypervisor host. Its decisions are a sans-I/O core
(``core.py``, ``AgentCore``) run by the generic driver; this module binds the ports
(``ports.py``) and the hypervisor driver. What the agent does:

Publishes a heartbeat every interval (core NATS) and its inventory (JetStream)
at boot, after every change it makes or sees (it polls its hypervisor every
heartbeat interval; the starts of a burst of commands are reported together, within
``[agent] inventory_coalesce_s``), and every ``inventory_interval_s``; serves VmStart/VmStop
on ``<prefix>.agent.<host>.cmd``, up to ``[agent] max_parallel_starts`` at once
(commands for one VM run one after the other, so a start asked again while the
first still boots answers "already running").

S6: the agent starts nothing on its own. At its start (and at every lab boot)
it turns libvirt autostart off for the VMs it manages, and it reports
``quarantined`` in its inventory from every boot until it hears a ``cleared``
event for its host on ``<prefix>.host.<host>.cleared`` (core subscription,
live only): the scheduler sends one at once for a host it does not hold in
quarantine, an operator (``hafence host clear``) for one that was fenced. The
scheduler's own fold decides where VMs go; the agent's flag tells people.

A VM definition reaches libvirt only as a path under ``[storage]
definitions_dir`` or the one the config gives that VM: inline XML or any other
path in a command is refused.

In the lab (``--sim-power DIR``) the host obeys a simulated power switch (the
port ``hafence.bindings.PowerSwitch``, bound as ``power_switch:sim`` by the lab,
read through the ``host`` port ``ports.SwitchedHost``; the simulated watchdog of
``--sim-watchdog`` likewise as ``watchdog:sim``): when it reads off (or was off
since the last look), the host is dead (VMs gone, no heartbeats, no answers);
when it reads on again, the host boots with a new boot id and runs what is
marked autostart (nothing, once the agent ran).
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Mapping

from hafence import bindings
from hafence.agent.core import AgentCore
from hafence.agent.definitions import DefinitionsDir
from hafence.agent.hypervisor import Hypervisor, SimHypervisor
from hafence.agent.ports import HypervisorPort, LeaseFile, SwitchedHost, ThisHost, WatchdogPort
from hafence.agent.watchdog import LinuxWatchdog, WatchdogDevice, WatchdogGuard
from hafence.core.driver import drive
from hafence.service import Runtime
from hafence.subjects import check_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, help="the host this agent runs on (as in the config)")
    parser.add_argument("--driver", choices=["sim", "libvirt"], default="sim", help="hypervisor driver")
    parser.add_argument("--libvirt-uri", default="qemu:///system", help="libvirt connection URI")
    parser.add_argument("--fail-starts", action="store_true", help="lab: every VM start on this host fails")
    parser.add_argument("--start-delay", type=float, default=0.0, help="lab: seconds every VM start takes")
    parser.add_argument("--sim-power", default="", help="lab: directory of the simulated power switch")
    parser.add_argument("--boot-vms", action="store_true", help="lab: start the host's configured VMs at boot")
    parser.add_argument("--sim-watchdog", default="", help="lab: directory of the simulated watchdog devices")


async def hypervisor_for(rt: Runtime, host: str) -> Hypervisor:
    if getattr(rt.args, "hypervisor", None) is not None:
        hypervisor: Hypervisor = rt.args.hypervisor  # tests: a hypervisor object of their own, in process
        return hypervisor
    if getattr(rt.args, "driver", "sim") == "libvirt":
        from hafence.agent.libvirt_driver import LibvirtHypervisor

        return await asyncio.to_thread(LibvirtHypervisor, rt.args.libvirt_uri, rt.config.agent.max_parallel_starts)
    boot = [vm.spec() for vm in rt.config.vms_of(host)] if getattr(rt.args, "boot_vms", False) else []
    return SimHypervisor(boot, fail_starts=getattr(rt.args, "fail_starts", False),
                         start_delay_s=getattr(rt.args, "start_delay", 0.0))


def watchdog_guard(rt: Runtime, host: str, machine: ThisHost | SwitchedHost) -> WatchdogGuard | None:
    """Watchdog self-fencing through a slot on shared storage (watchdog.py); its own loop."""
    if not rt.config.storage.slot_dir:
        return None
    device: WatchdogDevice | None = None
    if getattr(rt.args, "sim_watchdog", ""):
        device = bindings.resolve("watchdog", "sim")(rt.args.sim_watchdog, host)
    elif rt.config.host(host).watchdog:
        device = LinuxWatchdog(rt.config.host(host).watchdog)

    async def on_pill() -> None:
        pass  # the core powers the VMs off when the port reports the pill

    return WatchdogGuard(rt.config, host, device, machine.up, lambda: machine.boot_id, on_pill)


async def run(rt: Runtime) -> None:
    host = check_name("host", rt.args.host)
    try:
        rt.config.host(host)
    except KeyError as err:
        raise SystemExit(f"hafence agent: {err.args[0]}") from None
    sim_power = getattr(rt.args, "sim_power", "")
    machine = SwitchedHost(bindings.power_switch("sim", sim_power), host) if sim_power else ThisHost()
    ports: dict[str, object] = {"host": machine, "hypervisor": HypervisorPort(await hypervisor_for(rt, host)),
                                "definitions": DefinitionsDir()}
    if rt.config.storage.lease_dir:
        ports["storage"] = LeaseFile(rt.config.storage.lease_dir)
    guard = watchdog_guard(rt, host, machine)
    if guard is not None:
        ports["watchdog"] = WatchdogPort(guard)
    await run_core(rt, AgentCore(rt.config, host, watchdog=guard is not None), ports, guard)


async def run_core(rt: Runtime, core: AgentCore, ports: Mapping[str, object], guard: WatchdogGuard | None) -> None:
    async with asyncio.TaskGroup() as tg:
        if guard is not None:
            tg.create_task(guard.run())
        await drive(core, rt, ports)
