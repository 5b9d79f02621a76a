"""The host agent: one per hypervisor host.

Publishes a heartbeat every interval (core NATS) and its inventory (JetStream)
at boot, after every change, and every ``inventory_interval_s``; serves
VmStart/VmStop on ``<prefix>.agent.<host>.cmd``.

In the lab (``--sim-power DIR``) the host obeys a simulated power switch: when
its port reads off, the host is dead (VMs gone, no heartbeats, no answers);
when it reads on again, the host boots fresh with a new boot id and no VMs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from pathlib import Path

from nats.aio.msg import Msg
from opentelemetry import context as otel_context
from opentelemetry.trace import SpanKind

from hafence import metrics
from hafence.agent.hypervisor import Hypervisor, SimHypervisor
from hafence.bus import Reject
from hafence.contracts import AgentReply, Decoders, Heartbeat, Inventory, VmStart, VmStop
from hafence.lab.power import SimPowerSwitch
from hafence.logs import fields
from hafence.service import Runtime
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


class Agent:
    def __init__(self, rt: Runtime, host: str, hypervisor: Hypervisor, power: SimPowerSwitch | None) -> None:
        self.rt = rt
        self.bus = rt.bus
        self.host = check_name("host", host)
        self.config = rt.config.host(host)
        self.hypervisor = hypervisor
        self.power = power
        self.boot_id = uuid.uuid4().hex
        self.seq = 0
        self.powered = True
        self.changed = asyncio.Event()

    def power_is_on(self) -> bool:
        return self.power is None or self.power.read(self.host) == "on"

    async def publish_inventory(self) -> None:
        inv = Inventory(
            host=self.host, boot_id=self.boot_id, memory_mb=self.config.memory_mb, vcpus=self.config.vcpus,
            labels=self.config.labels, vms=await self.hypervisor.list_vms(), sent_at=time.time(),
        )
        await self.bus.publish(self.bus.subjects.inventory(self.host), inv)

    async def heartbeats(self) -> None:
        interval = self.rt.config.timings.heartbeat_interval_s
        while True:
            on = self.power_is_on()
            if self.powered and not on:
                log.warning("power is off: host is down", extra=fields(host=self.host))
                await self.hypervisor.stop_all()
            elif not self.powered and on:
                self.boot_id, self.seq = uuid.uuid4().hex, 0
                log.warning("power is on: host booted", extra=fields(host=self.host, boot_id=self.boot_id))
                self.changed.set()
            self.powered = on
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
            if self.powered and self.power_is_on():
                await asyncio.to_thread(path.write_text, f"{self.boot_id} {time.time():.3f}\n")
                metrics.STORAGE_LEASE.labels(self.host).set(time.time())
            await asyncio.sleep(settings.renew_interval_s)

    async def inventories(self) -> None:
        self.changed.set()
        while True:
            try:
                await asyncio.wait_for(self.changed.wait(), timeout=self.rt.config.timings.inventory_interval_s)
            except TimeoutError:
                pass
            self.changed.clear()
            if self.powered:
                try:
                    await self.publish_inventory()
                except Exception as err:  # NATS away or the stream not there yet: next round
                    log.warning("inventory not published: %s", err or type(err).__name__)
                    self.changed.set()
                    await asyncio.sleep(1.0)

    async def on_command(self, cmd: VmStart | VmStop, msg: Msg) -> AgentReply | None:
        if not self.powered or not self.power_is_on():
            return None  # a powered-off host answers nothing
        name = cmd.vm.name if isinstance(cmd, VmStart) else cmd.vm
        running = {vm.spec.name for vm in await self.hypervisor.list_vms()}
        with tracer().start_as_current_span(
            f"agent {'start' if isinstance(cmd, VmStart) else 'stop'} vm {name}",
            kind=SpanKind.SERVER,
            attributes={"hafence.vm": name, "hafence.host": self.host},
        ):
            try:
                if isinstance(cmd, VmStart):
                    if name in running:
                        metrics.AGENT_VM_STARTS.labels(self.host, "already").inc()
                        return AgentReply(host=self.host, vm=name, ok=True, state="running", already=True)
                    await self.hypervisor.start(cmd.vm)
                    metrics.AGENT_VM_STARTS.labels(self.host, "started").inc()
                    state = "running"
                else:
                    await self.hypervisor.stop(name)
                    state = "stopped"
            except Exception as err:
                if isinstance(cmd, VmStart):
                    metrics.AGENT_VM_STARTS.labels(self.host, "failed").inc()
                log.error("VM command failed", extra=fields(vm=name, error=str(err)))
                return AgentReply(host=self.host, vm=name, ok=False, state="unknown", error=str(err))
        self.changed.set()
        return AgentReply(host=self.host, vm=name, ok=True, state=state)  # type: ignore[arg-type]

    async def serve(self) -> None:
        async def handler(cmd: VmStart | VmStop, msg: Msg) -> AgentReply | None:
            if msg.subject != self.bus.subjects.agent_cmd(self.host):
                raise Reject(f"command for {self.host} on subject {msg.subject}")


            token = otel_context.attach(extract_context(msg.headers))
            try:
                return await self.on_command(cmd, msg)
            finally:
                otel_context.detach(token)

        await self.bus.serve(self.bus.subjects.agent_cmd(self.host), Decoders.agent_command, handler)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.heartbeats())
            tg.create_task(self.inventories())
            tg.create_task(self.serve())
            if self.rt.config.storage.lease_dir:
                tg.create_task(self.storage_lease())


async def run(rt: Runtime) -> None:
    host = rt.args.host
    try:
        rt.config.host(host)
    except KeyError as err:
        raise SystemExit(f"hafence agent: {err.args[0]}") from None
    power = SimPowerSwitch(rt.args.sim_power) if rt.args.sim_power else None
    hypervisor: Hypervisor
    if getattr(rt.args, "driver", "sim") == "libvirt":
        from hafence.agent.libvirt_driver import LibvirtHypervisor

        hypervisor = await asyncio.to_thread(LibvirtHypervisor, rt.args.libvirt_uri)
    else:
        boot = [vm.spec() for vm in rt.config.vms_of(host)] if rt.args.boot_vms else []
        hypervisor = SimHypervisor(boot, fail_starts=getattr(rt.args, "fail_starts", False),
                                   start_delay_s=getattr(rt.args, "start_delay", 0.0))
    await Agent(rt, host, hypervisor, power).run()
