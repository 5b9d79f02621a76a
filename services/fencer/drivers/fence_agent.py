"""The ``agent`` driver: any ClusterLabs fence agent (fence-agents package).

Arguments go on the agent's stdin as ``key=value`` lines (the protocol
Pacemaker uses), so secrets never appear on a command line. Exit codes: for
``status``, 0 means on and 2 means off; for ``on``/``off``, 0 means the agent
itself confirmed the action. Anything else is an error carrying the agent's
last output lines (with the password scrubbed).
"""

from __future__ import annotations

import asyncio
import os
import shutil

from hafence.config import FenceAgentDevice, read_secret
from hafence.fencer.drivers.base import DeviceAuthError, DeviceError, DeviceUnreachable, PowerRead

_AUTH_HINTS = ("unable to connect/login", "authentication", "password", "login failed", "unauthorized")


class FenceAgentDriver:
    driver = "agent"

    def __init__(self, name: str, config: FenceAgentDevice, port: str) -> None:
        self.name = name
        self.config = config
        self.port = port
        path = config.agent if os.path.isabs(config.agent) else shutil.which(config.agent)
        if not path or not os.access(path, os.X_OK):
            raise DeviceError(f"{name}: fence agent {config.agent!r} not found or not executable")
        self.path = path
        address = config.options.get("ip") or config.options.get("ipaddr") or config.agent
        self.lock_key = f"agent:{address}:{config.options.get('ipport', '')}"
        self._password = read_secret(config.password_file, config.password_env, f"devices.{name}.password")

    def _stdin(self, action: str) -> bytes:
        lines = [f"{k}={v}" for k, v in self.config.options.items()]
        if self.config.port_option and self.port:
            lines.append(f"{self.config.port_option}={self.port}")
        if self._password:
            lines.append(f"password={self._password}")
        lines.append(f"action={action}")
        return ("\n".join(lines) + "\n").encode()

    def _scrub(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text

    async def _run(self, action: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            self.path, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            out, err = await asyncio.wait_for(proc.communicate(self._stdin(action)), timeout=self.config.timeout_s)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise DeviceUnreachable(
                f"{self.name}: {os.path.basename(self.path)} {action} took longer than {self.config.timeout_s:g}s"
            ) from None
        self._last_output = self._scrub((out + err).decode(errors="replace"))
        return proc.returncode if proc.returncode is not None else -1

    def _failure(self, action: str, code: int) -> DeviceError:
        lines = [ln for ln in self._last_output.splitlines() if ln.strip() and "DeprecationWarning" not in ln
                 and "from pipes import" not in ln]
        detail = "; ".join(lines[-3:]) or "no output"
        text = f"{self.name}: {os.path.basename(self.path)} {action} exited {code}: {detail}"
        if any(hint in detail.lower() for hint in _AUTH_HINTS):
            return DeviceAuthError(text)
        if "timed out" in detail.lower() or "unable to connect" in detail.lower():
            return DeviceUnreachable(text)
        return DeviceError(text)

    async def power_off(self) -> None:
        code = await self._run("off")
        if code != 0:
            raise self._failure("off", code)

    async def power_on(self) -> None:
        code = await self._run("on")
        if code != 0:
            raise self._failure("on", code)

    async def status(self) -> PowerRead:
        code = await self._run("status")
        if code == 0:
            return "on"
        if code == 2:
            return "off"
        raise self._failure("status", code)

    async def close(self) -> None:
        pass
