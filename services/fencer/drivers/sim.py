"""The ``sim`` driver: a simulated power switch shared through files with the lab's hosts.

The switch is the port ``hafence.bindings.PowerSwitch`` bound as ``power_switch:sim``
(the lab's ``SimPowerSwitch``); this module does not import the lab."""

from __future__ import annotations

import asyncio

from hafence import bindings
from hafence.config import SimDevice
from hafence.fencer.drivers.base import PowerRead


class SimDriver:
    driver = "sim"

    def __init__(self, name: str, config: SimDevice, port: str) -> None:
        self.name = name
        self.config = config
        self.port = port
        self.switch = bindings.power_switch("sim", config.state_dir)
        self.lock_key = f"sim:{config.state_dir}:{port}"

    async def power_off(self) -> None:
        if self.config.stuck_on:
            return  # a relay welded shut: the command is accepted, nothing happens
        await asyncio.to_thread(self.switch.switch, self.port, "off", self.config.off_delay_s)

    async def power_on(self) -> None:
        await asyncio.to_thread(self.switch.switch, self.port, "on", 0.0)

    async def status(self) -> PowerRead:
        return await asyncio.to_thread(self.switch.read, self.port)

    async def close(self) -> None:
        pass
