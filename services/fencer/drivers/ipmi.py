"""The ``ipmi`` driver: IPMI 2.0 over LAN (RMCP+) through pyghmi.

pyghmi blocks and keeps global session state, so a BMC that never answers can
wedge every other session in the same process. Each BMC therefore gets its own
small worker process (``ipmi_worker``), shared by all drivers that name the
same BMC with the same credentials. Calls to one BMC are serialized, calls to
different BMCs run in parallel, each call is bounded by the device's timeout,
and a call that times out kills the worker: the next call starts a fresh one.
The worker is started on first use; the fencer's health check warms it up.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from dataclasses import dataclass, field

from hafence.config import IpmiDevice, read_secret
from hafence.fencer.drivers.base import DeviceAuthError, DeviceError, DeviceUnreachable, PowerRead

_PRIVILEGE = {"administrator": 4, "operator": 3}


@dataclass
class _Worker:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    proc: asyncio.subprocess.Process | None = None
    users: int = 0


_WORKERS: dict[tuple[str, int, str, str], _Worker] = {}


class IpmiDriver:
    driver = "ipmi"

    def __init__(self, name: str, config: IpmiDevice, port: str) -> None:
        self.name = name
        self.config = config
        self.lock_key = f"ipmi:{config.address}:{config.port}"
        self._password = read_secret(config.password_file, config.password_env, f"devices.{name}.password")
        # The credentials are part of the key: a driver with another password must
        # never borrow a session somebody else logged in.
        secret_id = hashlib.sha256(self._password.encode()).hexdigest()
        self._key = (config.address, config.port, config.username, secret_id)
        worker = _WORKERS.setdefault(self._key, _Worker())
        worker.users += 1
        self._worker: _Worker | None = worker

    async def _spawn(self, worker: _Worker) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hafence.fencer.drivers.ipmi_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        hello = {"address": self.config.address, "port": self.config.port, "username": self.config.username,
                 "password": self._password, "privilege": _PRIVILEGE[self.config.privilege]}
        assert proc.stdin is not None
        proc.stdin.write((json.dumps(hello) + "\n").encode())
        worker.proc = proc
        return proc

    @staticmethod
    async def _kill(worker: _Worker) -> None:
        proc, worker.proc = worker.proc, None
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()

    async def _call(self, op: str, what: str) -> dict[str, object]:
        worker = self._worker
        if worker is None:
            raise DeviceError(f"{self.name}: driver is closed")
        async with worker.lock:
            proc = worker.proc if worker.proc and worker.proc.returncode is None else await self._spawn(worker)
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write((json.dumps({"op": op}) + "\n").encode())
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), timeout=self.config.timeout_s)
            except TimeoutError:
                await self._kill(worker)
                raise DeviceUnreachable(
                    f"{self.name}: no IPMI answer from {self.config.address}:{self.config.port} "
                    f"within {self.config.timeout_s:g}s ({what})"
                ) from None
            except (ConnectionError, BrokenPipeError):
                await self._kill(worker)
                raise DeviceError(f"{self.name}: IPMI worker died ({what})") from None
            except BaseException:
                await self._kill(worker)  # cancelled mid-call: the worker's state is unknown
                raise
        if not line:
            await self._kill(worker)
            raise DeviceError(f"{self.name}: IPMI worker exited ({what})")
        reply: dict[str, object] = json.loads(line)
        if reply.get("ok"):
            return reply
        message = str(reply.get("message", ""))
        match reply.get("kind"):
            case "auth":
                raise DeviceAuthError(f"{self.name}: BMC refused user {self.config.username!r}: {message}")
            case "unreachable":
                raise DeviceUnreachable(
                    f"{self.name}: {message} with {self.config.address}:{self.config.port} ({what})"
                )
        raise DeviceError(f"{self.name}: {what}: {message}")

    async def power_off(self) -> None:
        await self._call("off", "chassis power off")

    async def power_on(self) -> None:
        await self._call("on", "chassis power on")

    async def status(self) -> PowerRead:
        state = (await self._call("status", "chassis power status")).get("power")
        return state if state in ("on", "off") else "unknown"  # type: ignore[return-value]

    async def close(self) -> None:
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.users -= 1
        if worker.users == 0:
            _WORKERS.pop(self._key, None)
            await self._kill(worker)
