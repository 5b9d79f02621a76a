"""The agent core's production ports (docs/cores.md, "## agent").

The core (``core.py``) names what it needs; these objects do it on a real host or
a lab one. The simulation binds its world's host, hypervisor, storage and
watchdog instead, with the same operations.

* ``host``: ``ThisHost`` (an agent runs on its machine: powered while it runs) or,
  in the lab, ``SwitchedHost`` (the host obeys a simulated power switch, the port
  ``hafence.bindings.PowerSwitch``). Either mints the boot id: one per boot.
* ``hypervisor``: ``HypervisorPort`` over any ``Hypervisor`` (libvirt, the lab's
  dict), adding the ``changed()`` long poll built on ``on_change``.
* ``storage``: ``LeaseFile``, ``<lease_dir>/<host>.lease`` on the shared storage
  (the arbiter reads its mtime).
* ``watchdog``: ``WatchdogPort`` over ``WatchdogGuard`` (watchdog.py), which keeps
  its own loop of slot checks and feeding.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

from hafence import bindings
from hafence.agent.core import HostState, WatchdogStatus
from hafence.agent.hypervisor import Hypervisor
from hafence.agent.watchdog import WatchdogGuard
from hafence.contracts import MonitorView, VmInfo, VmSpec


def new_boot_id() -> str:
    return uuid.uuid4().hex


class ThisHost:
    """The machine the agent runs on: on while the agent runs. One boot id per agent
    process, as before the core: a restarted agent reports a new boot and waits to be
    cleared (the scheduler clears at once a host it does not hold in quarantine)."""

    def __init__(self) -> None:
        self.boot_id = new_boot_id()

    def state(self) -> HostState:
        return HostState(on=True, boot_id=self.boot_id)

    def up(self) -> bool:
        return True


class SwitchedHost:
    """A lab host powered through a simulated switch: when the switch reads off (or
    was switched off since the last look, however briefly) the host is down; when it
    reads on again, the host boots with a new boot id."""

    def __init__(self, switch: bindings.PowerSwitch, host: str) -> None:
        self.switch, self.host = switch, host
        self.cycles = switch.power_cycles(host)
        self.boot_id = new_boot_id()
        self.powered = True

    def state(self) -> HostState:
        on = self.switch.read(self.host) == "on"
        cycles = self.switch.power_cycles(self.host)
        if self.powered and (not on or cycles != self.cycles):
            self.powered = False
        self.cycles = cycles
        if not self.powered and on:
            self.boot_id, self.powered = new_boot_id(), True
        return HostState(on=on, boot_id=self.boot_id)

    def up(self) -> bool:
        """For the watchdog guard: a powered-off lab host does nothing."""
        return self.powered and self.switch.read(self.host) == "on"


class LeaseFile:
    """``<lease_dir>/<host>.lease``: renewed while the host is up, also when the network is cut."""

    def __init__(self, lease_dir: str) -> None:
        self.dir = Path(lease_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    async def renew(self, host: str, boot_id: str) -> None:
        path = self.dir / f"{host}.lease"
        await asyncio.to_thread(path.write_text, f"{boot_id} {time.time():.3f}\n")


class HypervisorPort:
    """The ``Hypervisor`` operations, and ``changed()``: returns once a VM's state may
    have changed by itself (a lifecycle event), so the core looks at once."""

    def __init__(self, hypervisor: Hypervisor) -> None:
        self.hypervisor = hypervisor
        self._changed = asyncio.Event()
        hypervisor.on_change(self._changed.set)

    async def changed(self) -> None:
        await self._changed.wait()
        self._changed.clear()

    async def list_vms(self) -> list[VmInfo]:
        return await self.hypervisor.list_vms()

    async def is_running(self, name: str) -> bool:
        return await self.hypervisor.is_running(name)

    async def start(self, spec: VmSpec) -> None:
        await self.hypervisor.start(spec)

    async def stop(self, name: str) -> None:
        await self.hypervisor.stop(name)

    async def stop_all(self) -> None:
        await self.hypervisor.stop_all()

    async def boot(self) -> None:
        await self.hypervisor.boot()

    async def disable_autostart(self, names: set[str]) -> list[str]:
        return await self.hypervisor.disable_autostart(names)


class WatchdogPort:
    """The guard as the core sees it: its status (through a long poll), its start
    refusal, a recheck of the slot, and the monitor's views."""

    def __init__(self, guard: WatchdogGuard) -> None:
        self.guard = guard
        self._version, self._seen = 1, 0  # the first changed() answers at once
        self._event = asyncio.Event()
        guard.changed = self._bump

    def _bump(self) -> None:
        self._version += 1
        self._event.set()

    def status(self) -> WatchdogStatus:
        g = self.guard
        return WatchdogStatus(pill=g.pill, armed=g.armed, timeout_s=g.timeout_s)

    async def changed(self) -> WatchdogStatus:
        while self._seen == self._version:
            self._event.clear()
            await self._event.wait()
        self._seen = self._version
        return self.status()

    def start_refusal(self) -> str:
        return self.guard.start_refusal()

    async def recheck(self) -> WatchdogStatus:
        await self.guard.recheck()
        return self.status()

    async def view(self, view: MonitorView) -> None:
        await self.guard.on_view(view)
