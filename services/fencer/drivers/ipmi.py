"""The ``ipmi`` driver: IPMI 2.0 over LAN (RMCP+) through pyghmi.

pyghmi blocks, so every call runs in a worker thread, bounded by the device's
timeout. The session is kept between calls (a fence is off plus several status
reads; logging in for each would double the latency) and dropped on any error.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pyghmi.exceptions import IpmiException

from hafence.config import IpmiDevice, read_secret
from hafence.fencer.drivers.base import DeviceAuthError, DeviceError, DeviceUnreachable, PowerRead

_PRIVILEGE = {"administrator": 4, "operator": 3}
_AUTH_WORDS = ("password", "unauthorized", "privilege", "user", "authentication", "rakp")


class IpmiDriver:
    driver = "ipmi"

    def __init__(self, name: str, config: IpmiDevice, port: str) -> None:
        self.name = name
        self.config = config
        self.lock_key = f"ipmi:{config.address}:{config.port}"
        self._password = read_secret(config.password_file, config.password_env, f"devices.{name}.password")
        self._command: Any = None

    def _connect(self) -> Any:
        from pyghmi.ipmi.command import Command

        if self._command is None:
            self._command = Command(
                bmc=self.config.address, userid=self.config.username, password=self._password,
                port=self.config.port, privlevel=_PRIVILEGE[self.config.privilege], keepalive=False,
            )
        return self._command

    async def _call(self, what: str, fn: Any) -> Any:
        def run() -> Any:
            return fn(self._connect())

        try:
            return await asyncio.wait_for(asyncio.to_thread(run), timeout=self.config.timeout_s)
        except TimeoutError:
            self._command = None
            raise DeviceUnreachable(
                f"{self.name}: no IPMI answer from {self.config.address}:{self.config.port} "
                f"within {self.config.timeout_s:g}s ({what})"
            ) from None
        except IpmiException as err:
            self._command = None
            text = str(err) if err.args and err.args[0] else ""
            if not text:
                raise DeviceUnreachable(
                    f"{self.name}: no IPMI session with {self.config.address}:{self.config.port} ({what})"
                ) from None
            if any(word in text.lower() for word in _AUTH_WORDS):
                raise DeviceAuthError(f"{self.name}: BMC refused user {self.config.username!r}: {text}") from None
            raise DeviceError(f"{self.name}: {what}: {text}") from None
        except OSError as err:
            self._command = None
            raise DeviceUnreachable(f"{self.name}: {what}: {err.strerror or err}") from None

    async def power_off(self) -> None:
        await self._call("chassis power off", lambda c: c.set_power("off", wait=False))

    async def power_on(self) -> None:
        await self._call("chassis power on", lambda c: c.set_power("on", wait=False))

    async def status(self) -> PowerRead:
        reply = await self._call("chassis power status", lambda c: c.get_power())
        state = reply.get("powerstate") if isinstance(reply, dict) else None
        return state if state in ("on", "off") else "unknown"

    async def close(self) -> None:
        self._command = None
