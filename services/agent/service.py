"""The host agent: one per hypervisor host.

Publishes a heartbeat every interval (core NATS) and its inventory (JetStream)
at boot, after every change it makes or sees (it polls its hypervisor every
heartbeat interval), and every ``inventory_interval_s``; serves VmStart/VmStop
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
port ``hafence.bindings.PowerSwitch``, bound as ``power_switch:sim`` by the lab;
the simulated watchdog of ``--sim-watchdog`` likewise as ``watchdog:sim``): when
its port reads off (or was off since the last look), the host is dead (VMs
gone, no heartbeats, no answers); when it reads on again, the host boots with a
new boot id and runs what is marked autostart (nothing, once the agent ran).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from pathlib import Path

from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from hafence import bindings, metrics
from hafence.agent.hypervisor import Hypervisor, SimHypervisor
from hafence.agent.vm_watch import VmWatch, reported
from hafence.agent.watchdog import LinuxWatchdog, WatchdogDevice, WatchdogGuard
from hafence.bus import Reject
from hafence.contracts import AgentReply, Decoders, Heartbeat, HostEvent, Inventory, VmSpec, VmStart, VmStop, encode
from hafence.logs import fields
from hafence.service import Runtime, stop_if_cancelled
from hafence.slots import view_subject
from hafence.subjects import check_name
from hafence.telemetry import extract_context, tracer

log = logging.getLogger("hafence.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", required=True, help="the host this agent runs on (as in the config)")
    parser.add_argument("--driver", choices=["sim", "libvirt"], default="sim", help="hypervisor driver")
    parser.add_argument("--libvirt-uri", default="qemu:///system", help="libvirt connection URI")
    parser.add_argument("--fail-starts", action="store_true", help="lab: every VM start on this host fails")
    parser.add_argument("--start-delay", type=float, default=0.0, help="lab: seconds every VM start takes")
    parser.add_argument("--sim-power", default="", help="lab: directory of the simulated power switch")
    parser.add_argument("--boot-vms", action="store_true", help="lab: start the host's configured VMs at boot")
    parser.add_argument("--sim-watchdog", default="", help="lab: directory of the simulated watchdog devices")


class Agent:
    def __init__(self, rt: Runtime, host: str, hypervisor: Hypervisor, power: bindings.PowerSwitch | None) -> None:
        self.rt = rt
        self.bus = rt.bus
        self.host = check_name("host", host)
        self.config = rt.config.host(host)
        self.hypervisor = hypervisor
        self.power = power
        self.boot_id = uuid.uuid4().hex
        self.seq = 0
        self.powered = True
        self.power_cycles = power.power_cycles(host) if power else 0
        # Every boot starts quarantined; a "cleared" for this host (and boot) lifts it.
        self.quarantined = True
        self.changed = asyncio.Event()
        self.slots = asyncio.Semaphore(rt.config.agent.max_parallel_starts)
        self.vm_locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.managed = {vm.name for vm in rt.config.vms}
        self.published: list[tuple[str, str]] | None = None
        # VM-level HA: stops of VMs seen running that this agent did not order (vm_watch.py).
        self.watch = VmWatch()
        # Watchdog self-fencing through a slot on shared storage (watchdog.py).
        self.guard: WatchdogGuard | None = None
        if rt.config.storage.slot_dir:
            device: WatchdogDevice | None = None
            if getattr(rt.args, "sim_watchdog", ""):
                device = bindings.resolve("watchdog", "sim")(rt.args.sim_watchdog, self.host)
            elif self.config.watchdog:
                device = LinuxWatchdog(self.config.watchdog)
            self.guard = WatchdogGuard(rt.config, self.host, device, lambda: self.powered and self.power_is_on(),
                                       lambda: self.boot_id, self.on_pill)
            self.guard.changed = self.changed.set

    def power_is_on(self) -> bool:
        return self.power is None or self.power.read(self.host) == "on"

    async def publish_inventory(self) -> None:
        vms, failed = self.watch.observe(await self.hypervisor.list_vms(), time.time())
        inv = Inventory(
            host=self.host, boot_id=self.boot_id, memory_mb=self.config.memory_mb, vcpus=self.config.vcpus,
            labels=self.config.labels, vms=vms, sent_at=time.time(),
            quarantined=self.quarantined or bool(self.guard and self.guard.pill),
            watchdog_armed=bool(self.guard and self.guard.armed),
            watchdog_timeout_s=self.guard.timeout_s if self.guard and self.guard.armed else 0.0,
            pill=bool(self.guard and self.guard.pill),
        )
        with reported(self.host, self.boot_id, failed):  # a failure's report roots its restart's trace
            await self.bus.publish(self.bus.subjects.inventory(self.host), inv)
        self.published = self._summary(vms)

    @staticmethod
    def _summary(vms: list) -> list[tuple[str, str]]:  # type: ignore[type-arg]
        return sorted((vm.spec.name, vm.state) for vm in vms)

    async def no_autostart(self) -> None:
        """S6: a host that boots again (after a fence with action "reboot", or by
        hand) must not run VMs that were restarted elsewhere meanwhile."""
        changed = await self.hypervisor.disable_autostart(self.managed)
        if changed:
            log.warning("autostart turned off", extra=fields(host=self.host, vms=changed))

    async def heartbeats(self) -> None:
        interval = self.rt.config.timings.heartbeat_interval_s
        while True:
            stop_if_cancelled()
            on = self.power_is_on()
            cycles = self.power.power_cycles(self.host) if self.power else 0
            if self.powered and (not on or cycles != self.power_cycles):
                log.warning("power is off: host is down", extra=fields(host=self.host))
                await self.hypervisor.stop_all()
                self.powered = False
            self.power_cycles = cycles
            if not self.powered and on:
                self.boot_id, self.seq, self.quarantined = uuid.uuid4().hex, 0, True
                self.watch.reset()
                log.warning("power is on: host booted", extra=fields(host=self.host, boot_id=self.boot_id))
                await self.hypervisor.boot()
                await self.no_autostart()
                self.powered = True
                self.changed.set()
            metrics.AGENT_POWERED.labels(self.host).set(1 if on else 0)
            if on:
                await self.bus.publish_core(  # buffered by nats-py while reconnecting
                    self.bus.subjects.hb(self.host),
                    Heartbeat(host=self.host, boot_id=self.boot_id, seq=self.seq, sent_at=time.time()),
                )
                self.seq += 1
                metrics.AGENT_HEARTBEATS.labels(self.host).inc()
            await asyncio.sleep(interval)

    async def storage_lease(self) -> None:
        """Renew <lease_dir>/<host>.lease on the shared storage while the host is up.
        It goes on when the network is cut: that is how the arbiter tells an
        isolated host from a dead one."""
        settings = self.rt.config.storage
        path = Path(settings.lease_dir) / f"{self.host}.lease"
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            stop_if_cancelled()
            if self.powered and self.power_is_on():
                await asyncio.to_thread(path.write_text, f"{self.boot_id} {time.time():.3f}\n")
                metrics.STORAGE_LEASE.labels(self.host).set(time.time())
            await asyncio.sleep(settings.renew_interval_s)

    async def inventories(self) -> None:
        """Publish at boot, on every change (made here or seen in the hypervisor:
        a VM started by hand must reach the scheduler's duplicate check soon), and
        every ``inventory_interval_s``."""
        timings = self.rt.config.timings
        poll = min(timings.heartbeat_interval_s, timings.inventory_interval_s)
        last = 0.0
        self.changed.set()
        while True:
            stop_if_cancelled()
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that lands as its wait ends, and the service then never stops.
                async with asyncio.timeout(poll):
                    await self.changed.wait()
            except TimeoutError:
                pass
            due = self.changed.is_set() or time.monotonic() - last >= timings.inventory_interval_s
            self.changed.clear()
            if not self.powered:
                continue
            try:
                if not due and self._summary(await self.hypervisor.list_vms()) == self.published:
                    continue
                await self.publish_inventory()
                last = time.monotonic()
            except Exception as err:  # NATS away or the stream not there yet: next round
                log.warning("inventory not published: %s", err or type(err).__name__)
                self.changed.set()
                await asyncio.sleep(1.0)

    def definition_allowed(self, spec: VmSpec) -> str:
        """'' if the command's definition may reach libvirt, else why not. Only a
        path on the shared storage the operator configured: XML in a message could
        attach any disk of this host to a VM."""
        if not spec.definition:
            return ""
        configured = {vm.name: vm.definition for vm in self.rt.config.vms}.get(spec.name, "")
        if configured and spec.definition == configured:
            return ""
        directory = self.rt.config.storage.definitions_dir
        if directory and not spec.definition.lstrip().startswith("<"):
            root = os.path.realpath(directory)
            if os.path.realpath(spec.definition).startswith(root + os.sep):
                return ""
        return (f"definition for {spec.name} refused: only a path under [storage] definitions_dir "
                f"({directory or 'not set'}) or the config's own definition for the VM is used")

    async def on_command(self, cmd: VmStart | VmStop, msg: Msg) -> AgentReply | None:
        if not self.powered or not self.power_is_on():
            return None  # a powered-off host answers nothing
        name = cmd.vm.name if isinstance(cmd, VmStart) else cmd.vm
        lock, users = self.vm_locks.get(name, (asyncio.Lock(), 0))
        self.vm_locks[name] = (lock, users + 1)
        try:
            async with lock:  # one command per VM at a time: a start asked again waits, then "already"
                return await self._command(cmd, name)
        finally:
            lock, users = self.vm_locks[name]
            if users <= 1:
                del self.vm_locks[name]
            else:
                self.vm_locks[name] = (lock, users - 1)

    async def _command(self, cmd: VmStart | VmStop, name: str) -> AgentReply:
        with tracer().start_as_current_span(
            f"agent {'start' if isinstance(cmd, VmStart) else 'stop'} vm {name}",
            kind=SpanKind.SERVER,
            attributes={"hafence.vm": name, "hafence.host": self.host},
        ):
            try:
                if isinstance(cmd, VmStart):
                    # Only a running domain is "already running": a defined, shut-off one is started.
                    if await self.hypervisor.is_running(name):
                        metrics.AGENT_VM_STARTS.labels(self.host, "already").inc()
                        return AgentReply(host=self.host, vm=name, ok=True, state="running", already=True)
                    refused = self.definition_allowed(cmd.vm) or (self.guard.start_refusal() if self.guard else "")
                    if refused:
                        raise ValueError(refused)
                    await self.hypervisor.start(cmd.vm)
                    self.watch.started(name)
                    metrics.AGENT_VM_STARTS.labels(self.host, "started").inc()
                    state = "running"
                else:
                    log.warning("stopping VM", extra=fields(vm=name, reason=cmd.reason))
                    self.watch.stopping(name)
                    try:
                        await self.hypervisor.stop(name)
                    finally:
                        self.watch.stop_done(name, time.time())
                    state = "stopped"
            except Exception as err:
                if isinstance(cmd, VmStart):
                    metrics.AGENT_VM_STARTS.labels(self.host, "failed").inc()
                log.error("VM command failed", extra=fields(vm=name, error=str(err)))
                return AgentReply(host=self.host, vm=name, ok=False, state="unknown", error=str(err))
        self.changed.set()
        return AgentReply(host=self.host, vm=name, ok=True, state=state)  # type: ignore[arg-type]

    async def _run(self, cmd: VmStart | VmStop, msg: Msg) -> None:
        """One command, in its own task; the slot was taken by the receiver."""
        token = otel_context.attach(extract_context(msg.headers))
        try:
            reply = await self.on_command(cmd, msg)
            if reply is not None and msg.reply:
                await msg.respond(encode(reply))
        except Exception as err:  # the asker went away, NATS did: the next ask gets the truth
            log.warning("command on %s not answered: %r", msg.subject, err)
        finally:
            otel_context.detach(token)
            self.slots.release()

    async def serve(self) -> None:
        async with asyncio.TaskGroup() as tg:
            async def handler(cmd: VmStart | VmStop, msg: Msg) -> AgentReply | None:
                if msg.subject != self.bus.subjects.agent_cmd(self.host):
                    raise Reject(f"command for {self.host} on subject {msg.subject}")
                # Bounded: the receiver waits for a slot, so at most max_parallel_starts run
                # and the rest queue in the subscription, in order.
                await self.slots.acquire()
                tg.create_task(self._run(cmd, msg))
                return None  # answered by the task

            await self.bus.serve(self.bus.subjects.agent_cmd(self.host), Decoders.agent_command, handler)

    async def on_cleared(self, event: HostEvent, msg: Msg) -> None:
        if event.host != self.host or event.kind != "cleared":
            raise Reject(f"not a 'cleared' event for {self.host}")
        if event.boot_id and event.boot_id != self.boot_id:
            return None  # for another boot of this host: this one stays quarantined
        if self.guard is not None and self.guard.pill:
            await self.guard.recheck()  # `hafence host clear` removes the pill first, then sends this
            if self.guard.pill:
                return None  # the pill in its slot keeps it fenced
        if self.quarantined:
            log.warning("cleared: leaving quarantine",
                        extra=fields(host=self.host, by=event.by, rule=event.rule, reason=event.reason))
            self.quarantined = False
            self.changed.set()
        return None

    async def watch_cleared(self) -> None:
        await self.bus.serve(self.bus.subjects.host_event(self.host, "cleared"), Decoders.host_event,
                             self.on_cleared)  # type: ignore[arg-type]

    async def run(self) -> None:
        self.hypervisor.on_change(self.changed.set)  # a VM stopping by itself: report it now
        await self.no_autostart()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.watch_cleared())
            tg.create_task(self.heartbeats())
            tg.create_task(self.inventories())
            tg.create_task(self.serve())
            if self.rt.config.storage.lease_dir:
                tg.create_task(self.storage_lease())
            if self.guard is not None:
                tg.create_task(self.guard.run())
                tg.create_task(self.bus.serve(view_subject(self.bus.subjects, self.host), Decoders.monitor_view,
                                              self.guard.on_view))  # type: ignore[arg-type]

    async def on_pill(self) -> None:
        """A poison pill in the slot: power every VM off now (ordered stops, not
        crashes: nothing restarts them here); the watchdog resets the host."""
        running = [vm.spec.name for vm in await self.hypervisor.list_vms() if vm.state == "running"]
        for name in running:
            self.watch.stopping(name)
        try:
            await self.hypervisor.stop_all()
        finally:
            for name in running:
                self.watch.stop_done(name, time.time())
        self.changed.set()


async def run(rt: Runtime) -> None:
    host = rt.args.host
    try:
        rt.config.host(host)
    except KeyError as err:
        raise SystemExit(f"hafence agent: {err.args[0]}") from None
    sim_power = getattr(rt.args, "sim_power", "")
    power = bindings.power_switch("sim", sim_power) if sim_power else None
    hypervisor: Hypervisor
    if getattr(rt.args, "hypervisor", None) is not None:
        hypervisor = rt.args.hypervisor  # tests: a hypervisor object of their own, in process
    elif getattr(rt.args, "driver", "sim") == "libvirt":
        from hafence.agent.libvirt_driver import LibvirtHypervisor

        hypervisor = await asyncio.to_thread(LibvirtHypervisor, rt.args.libvirt_uri,
                                             rt.config.agent.max_parallel_starts)
    else:
        boot = [vm.spec() for vm in rt.config.vms_of(host)] if rt.args.boot_vms else []
        hypervisor = SimHypervisor(boot, fail_starts=getattr(rt.args, "fail_starts", False),
                                   start_delay_s=getattr(rt.args, "start_delay", 0.0))
    await Agent(rt, host, hypervisor, power).run()
