"""Power drivers: one small async interface over every kind of power device.

A driver only talks to its device; the rules about what counts as confirmed
live in ``topology`` and the retry/poll loop in ``executor``.
"""

from __future__ import annotations

import asyncio
from typing import Literal, Protocol

from hafence.config import Device, SimDevice
from hafence.lab.power import SimPowerSwitch

PowerRead = Literal["on", "off", "unknown"]


class DeviceError(Exception):
    """The device answered, but not with what we asked for."""


class DeviceUnreachable(DeviceError):
    pass


class DeviceAuthError(DeviceError):
    pass


class PowerDriver(Protocol):
    name: str
    driver: str
    # Operations on one physical device are serialized on this key (its address).
    lock_key: str

    async def power_off(self) -> None: ...

    async def power_on(self) -> None: ...

    async def status(self) -> PowerRead: ...


class SimDriver:
    driver = "sim"

    def __init__(self, name: str, config: SimDevice, port: str) -> None:
        self.name = name
        self.config = config
        self.port = port
        self.switch = SimPowerSwitch(config.state_dir)
        self.lock_key = f"sim:{config.state_dir}"

    async def power_off(self) -> None:
        if self.config.stuck_on:
            return  # a relay welded shut: the command is accepted, nothing happens
        await asyncio.to_thread(self.switch.switch, self.port, "off", self.config.off_delay_s)

    async def power_on(self) -> None:
        await asyncio.to_thread(self.switch.switch, self.port, "on", 0.0)

    async def status(self) -> PowerRead:
        return await asyncio.to_thread(self.switch.read, self.port)


def make_driver(name: str, config: Device, port: str) -> PowerDriver:
    match config:
        case SimDevice():
            return SimDriver(name, config, port)
    raise ValueError(f"device {name!r}: no driver for {type(config).__name__}")
