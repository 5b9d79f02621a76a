"""The power driver interface and the errors every driver raises.

A driver only talks to its device; the rules about what counts as confirmed
live in ``topology`` and the retry/poll loop in ``executor``. Error messages
name the device and the problem and never contain a credential.
"""

from __future__ import annotations

from typing import Literal, Protocol

PowerRead = Literal["on", "off", "unknown"]


class DeviceError(Exception):
    """The device answered, but not with what we asked for."""


class DeviceUnreachable(DeviceError):
    """Nothing answered: wrong address, device down, network cut."""


class DeviceAuthError(DeviceError):
    """The device refused our credentials (retrying will not help)."""


class PowerDriver(Protocol):
    name: str
    driver: str
    # Operations on one physical device are serialized on this key (its address).
    lock_key: str

    async def power_off(self) -> None: ...

    async def power_on(self) -> None: ...

    async def status(self) -> PowerRead: ...

    async def close(self) -> None: ...
