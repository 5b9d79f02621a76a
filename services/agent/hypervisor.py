"""Hypervisor drivers: what the agent needs from the host's VM runtime."""

from __future__ import annotations

import asyncio
from typing import Protocol

from hafence.contracts import VmInfo, VmSpec


class HypervisorError(Exception):
    pass


class Hypervisor(Protocol):
    async def list_vms(self) -> list[VmInfo]: ...

    async def start(self, spec: VmSpec) -> None: ...

    async def stop(self, name: str) -> None: ...

    async def stop_all(self) -> None: ...


class SimHypervisor:
    """VMs as entries in a dict: a lab host. ``fail_starts`` makes every start fail."""

    def __init__(self, vms: list[VmSpec] | None = None, fail_starts: bool = False, start_delay_s: float = 0.0) -> None:
        self._vms: dict[str, VmSpec] = {vm.name: vm for vm in vms or []}
        self.fail_starts = fail_starts
        self.start_delay_s = start_delay_s

    async def list_vms(self) -> list[VmInfo]:
        return [VmInfo(spec=spec, state="running") for spec in self._vms.values()]

    async def start(self, spec: VmSpec) -> None:
        if self.fail_starts:
            raise HypervisorError(f"simulated start failure for {spec.name}")
        await asyncio.sleep(self.start_delay_s)  # a slow boot: the answer may come too late
        self._vms[spec.name] = spec

    async def stop(self, name: str) -> None:
        self._vms.pop(name, None)

    async def stop_all(self) -> None:
        self._vms.clear()
