"""Hypervisor drivers: what the agent needs from the host's VM runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Protocol

from hafence.contracts import VmInfo, VmSpec


class HypervisorError(Exception):
    pass


class Hypervisor(Protocol):
    async def list_vms(self) -> list[VmInfo]:
        """Every VM defined here. A stopped one carries the hypervisor's word on why in
        ``stop_reason`` (``VM_FAILURES``/``VM_STOPS``); the agent decides what it reports."""
        ...

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` (in the caller's event loop) when a VM's state may have
        changed by itself (libvirt lifecycle events): the agent looks at once instead
        of at its next poll. Drivers without events do nothing; the poll still sees it."""
        ...

    async def is_running(self, name: str) -> bool:
        """Running now: a VM that is defined but shut off is not."""
        ...

    async def start(self, spec: VmSpec) -> None: ...

    async def stop(self, name: str) -> None: ...

    async def stop_all(self) -> None: ...

    async def boot(self) -> None:
        """The host powered on (lab hosts): whatever starts at boot starts now."""
        ...

    async def disable_autostart(self, names: set[str]) -> list[str]:
        """S6: nothing of ours starts at boot on its own. ``names`` are the VMs the
        cluster config knows; drivers add the ones they can tell are hafence's.
        Returns the VMs whose autostart was turned off."""
        ...


class SimHypervisor:
    """VMs as entries in a dict: a lab host.

    Like libvirt, a VM stays defined when it stops (``list_vms`` reports it
    ``stopped``), and VMs marked autostart run again when the host boots. The
    VMs a host is created with run and are marked autostart, as a libvirt host's
    usually are. ``fail_starts`` makes every start fail; ``gate`` (tests) holds
    starts until set; ``max_starting`` records how many starts ran at once.
    ``crash`` stops a VM the way a failure does (the agent did not ask for it).
    """

    def __init__(self, vms: list[VmSpec] | None = None, fail_starts: bool = False, start_delay_s: float = 0.0) -> None:
        self._defined: dict[str, VmSpec] = {vm.name: vm for vm in vms or []}
        self._running: set[str] = set(self._defined)
        self.autostart: set[str] = set(self._defined)
        self.fail_starts = fail_starts
        self.start_delay_s = start_delay_s
        self.gate: asyncio.Event | None = None
        self.starting = 0
        self.max_starting = 0
        self.starts = 0
        # Why each stopped VM stopped, as a hypervisor would say (libvirt's state reason).
        self.reasons: dict[str, str] = {}
        self._listener: Callable[[], None] | None = None

    def on_change(self, callback: Callable[[], None]) -> None:
        self._listener = callback

    def crash(self, name: str, reason: str = "crashed") -> None:
        """A failure (``crashed``, ``killed``, ``panicked``, ``guest_shutdown``, or a
        stop that is none, such as ``migrated``): the VM stops and the agent is told, as
        by a libvirt lifecycle event."""
        if name not in self._running:
            raise HypervisorError(f"{name} is not running here")
        self._running.discard(name)
        self.reasons[name] = reason
        if self._listener is not None:
            self._listener()

    def define(self, spec: VmSpec, autostart: bool = False) -> None:
        """A VM defined on this host but not running (tests, and a stopped VM's state)."""
        self._defined[spec.name] = spec
        if autostart:
            self.autostart.add(spec.name)

    async def list_vms(self) -> list[VmInfo]:
        return [VmInfo(spec=spec, state="running") if name in self._running
                else VmInfo(spec=spec, state="stopped", stop_reason=self.reasons.get(name, "other"))
                for name, spec in self._defined.items()]

    async def is_running(self, name: str) -> bool:
        return name in self._running

    async def start(self, spec: VmSpec) -> None:
        if self.fail_starts:
            raise HypervisorError(f"simulated start failure for {spec.name}")
        self.starting += 1
        self.max_starting = max(self.max_starting, self.starting)
        try:
            if self.gate is not None:
                await self.gate.wait()
            await asyncio.sleep(self.start_delay_s)  # a slow boot: the answer may come too late
        finally:
            self.starting -= 1
        self._defined.setdefault(spec.name, spec)
        self._running.add(spec.name)
        self.reasons.pop(spec.name, None)
        self.starts += 1

    async def stop(self, name: str) -> None:
        if name in self._running:
            self.reasons[name] = "killed"  # libvirt's destroy: the agent knows it asked
        self._running.discard(name)

    async def stop_all(self) -> None:
        self.reasons.update((name, "other") for name in self._running)  # power lost
        self._running.clear()

    async def boot(self) -> None:
        booted = self.autostart & set(self._defined)
        self._running |= booted
        for name in booted:
            self.reasons.pop(name, None)

    async def disable_autostart(self, names: set[str]) -> list[str]:
        changed = sorted(self.autostart & (names | set(self._defined)))
        self.autostart.difference_update(changed)
        return changed
