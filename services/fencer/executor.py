"""Carries out a host's fencing topology on real devices.

Per device: send the command, wait ``power_wait_s``, then read status on a
backing-off schedule until it reads the wanted state or ``power_timeout_s``
passes; retry the command up to ``retries`` times (never after an
authentication error). One operation at a time per physical device (a lock
keyed by its address, the driver's ``lock_key``: a PDU's SNMP agent, not its
outlet); different devices run in parallel. With fencer replicas, the same key
is also locked across replicas (``device_lock``, a KV lock: ``locks.KvLocks``),
so two replicas never drive one device at once either. Levels are tried in
order; a reboot is off for every device of the level, confirm, then on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from opentelemetry.trace import Status, StatusCode

from hafence.config import ClusterConfig, ConfigError, Device, HostConfig, LevelDevice
from hafence.contracts import DeviceEvidence
from hafence.fencer.drivers import DeviceAuthError, DeviceError, DeviceUnreachable, PowerDriver, make_driver
from hafence.fencer.locks import LockLost
from hafence.fencer.ports import FenceReport  # the power port's answer: the world returns the same
from hafence.fencer.protection import Protection, protection
from hafence.fencer.topology import StatusPollSchedule, level_confirmed, verdict
from hafence.telemetry import tracer

log = logging.getLogger("hafence.fencer")


def describe(err: BaseException) -> str:
    """An error as an operator should read it; drivers keep credentials out of it."""
    if isinstance(err, TimeoutError):
        return "device did not answer in time"
    if isinstance(err, DeviceAuthError):
        return f"authentication failed: {err}"
    if isinstance(err, DeviceUnreachable):
        return f"unreachable: {err}"
    if isinstance(err, DeviceError):
        return str(err)
    if isinstance(err, ConfigError):
        return f"configuration: {'; '.join(f'{i.key}: {i.message}' for i in err.issues)}"
    return f"{type(err).__name__}: {err}"


@dataclass(frozen=True, slots=True)
class Target:
    """One device entry of a level: the device, its settings, and the port on it."""

    name: str
    device: Device
    port: str


# A device's lock across fencer replicas, by its lock key (held for the block).
DeviceLock = Callable[[str], AbstractAsyncContextManager[object]]


class Executor:
    def __init__(
        self,
        config: ClusterConfig,
        driver_factory: Callable[[str, Device, str], PowerDriver] = make_driver,
        device_lock: DeviceLock | None = None,
    ) -> None:
        self.config = config
        self.driver_factory = driver_factory
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._drivers: dict[tuple[str, str], PowerDriver] = {}
        self.device_lock = device_lock

    @contextlib.asynccontextmanager
    async def locked(self, lock_key: str) -> AsyncIterator[None]:
        """One operation at a time on the physical device: in this process (coroutines
        of other hosts on the same PDU), then across replicas."""
        async with self._locks[lock_key]:
            if self.device_lock is None:
                yield
            else:
                async with self.device_lock(lock_key):
                    yield

    def targets(self, host: HostConfig) -> list[list[Target]]:
        def target(ref: LevelDevice) -> Target:
            return Target(ref.device, self.config.devices[ref.device], ref.port or host.name)

        return [[target(ref) for ref in level.devices] for level in host.levels]

    def driver(self, target: Target) -> PowerDriver:
        key = (target.name, target.port)
        if key not in self._drivers:
            self._drivers[key] = self.driver_factory(target.name, target.device, target.port)
        return self._drivers[key]

    async def close(self) -> None:
        for driver in self._drivers.values():
            await driver.close()
        self._drivers.clear()

    async def fence(self, host: HostConfig, action: str) -> FenceReport:
        """Run the topology: ``off`` or ``reboot`` (off, confirm, on)."""
        tried: list[list[DeviceEvidence]] = []
        levels = self.targets(host)
        for number, targets in enumerate(levels, start=1):
            with tracer().start_as_current_span(
                f"fence level {number}",
                attributes={"hafence.host": host.name, "hafence.level": number,
                            "hafence.devices": [t.name for t in targets]},
            ) as span:
                evidence = await self.run_level(number, targets, "off")
                tried.append(evidence)
                ok = level_confirmed(evidence)
                span.set_attribute("hafence.confirmed_off", ok)
                if not ok:
                    span.set_status(Status(StatusCode.ERROR, "level not confirmed off"))
                    continue
                powered_on = await self.run_level(number, targets, "on") if action == "reboot" else []
            flat = [e for level in tried for e in level] + powered_on
            return FenceReport(verdict(tried, len(levels)), flat)
        return FenceReport(verdict(tried, len(levels)), [e for level in tried for e in level])

    async def run_level(self, number: int, targets: list[Target], action: str) -> list[DeviceEvidence]:
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(self.operate(t, number, action)) for t in targets]
        return [t.result() for t in tasks]

    async def drop(self, target: Target) -> None:
        """Forget a target's driver and close it (an IPMI driver's worker process
        goes with it); the next use makes a fresh one. Call under the device's lock,
        so that nobody is in the middle of using it."""
        driver = self._drivers.pop((target.name, target.port), None)
        if driver is not None:
            try:
                await driver.close()
            except Exception as err:
                log.warning("closing driver of %s: %s", target.name, describe(err))

    async def check(self, target: Target, level: int) -> DeviceEvidence:
        """Log in and read status; power nothing (oVirt's "Test" button)."""
        started = time.monotonic()
        with tracer().start_as_current_span(f"check {target.name}", attributes={"hafence.device": target.name}):
            try:
                driver = self.driver(target)
            except Exception as err:
                state, error = "unknown", describe(err)
            else:
                try:
                    async with self.locked(driver.lock_key):
                        try:
                            driver = self.driver(target)  # a failed check may have replaced it while we waited
                            state = await asyncio.wait_for(driver.status(), timeout=target.device.power_timeout_s)
                            error = ""
                        except Exception as err:
                            state, error = "unknown", describe(err)
                            await self.drop(target)  # start afresh next time; closed, never leaked
                except LockLost as err:
                    state, error = "unknown", str(err)
        return DeviceEvidence(
            device=target.name, driver=_driver_name(target.device), level=level, action_sent="status",
            power_read=state, confirmed=not error and state != "unknown", status_reads=0 if error else 1,
            elapsed_s=round(time.monotonic() - started, 4), error=error,
        )

    async def check_host(self, host: HostConfig) -> Protection:
        """Check every device of every level; is the host protected, and is it on?"""
        levels = self.targets(host)
        checks: list[DeviceEvidence] = []
        for number, targets in enumerate(levels, start=1):
            checks += await asyncio.gather(*(self.check(t, number) for t in targets))
        return protection(host.name, checks, len(levels))

    async def operate(self, target: Target, level: int, action: str) -> DeviceEvidence:
        """Switch one device and read back until it reports the wanted state. A
        device lock lost across replicas stops it: no command after that."""
        started = time.monotonic()
        try:
            return await self._operate(target, level, action, started)
        except LockLost as err:
            log.error("stopped driving %s: %s", target.name, err)
            return DeviceEvidence(
                device=target.name, driver=_driver_name(target.device), level=level, action_sent=action,
                power_read="unknown", confirmed=False, status_reads=0,  # type: ignore[arg-type]
                elapsed_s=round(time.monotonic() - started, 4), error=str(err),
            )

    async def _operate(self, target: Target, level: int, action: str, started: float) -> DeviceEvidence:
        settings = target.device
        reads, last, error = 0, "unknown", ""
        with tracer().start_as_current_span(
            f"power {action} {target.name}",
            attributes={"hafence.device": target.name, "hafence.driver": _driver_name(settings),
                        "hafence.port": target.port, "hafence.level": level, "hafence.action": action},
        ) as span:
            try:
                driver = self.driver(target)
            except Exception as err:
                error = describe(err)
                driver = None
            if driver is not None:
                async with self.locked(driver.lock_key):
                    try:
                        # A failed health check may have closed and replaced it while we waited.
                        driver = self.driver(target)
                        attempts = 1 + settings.retries
                    except Exception as err:
                        error, attempts = describe(err), 0
                    for attempt in range(attempts):
                        attempt_started = time.monotonic()
                        command = driver.power_off if action == "off" else driver.power_on
                        try:
                            await asyncio.wait_for(command(), timeout=settings.power_timeout_s)
                        except Exception as err:
                            error = describe(err)
                            span.add_event("command failed", {"attempt": attempt + 1, "error": error})
                            if isinstance(err, DeviceAuthError):
                                break  # a wrong password does not get right by retrying
                            continue
                        await asyncio.sleep(settings.power_wait_s)
                        deadline = attempt_started + settings.power_timeout_s
                        schedule = StatusPollSchedule()
                        while (remaining := deadline - time.monotonic()) > 0:
                            try:
                                last = await asyncio.wait_for(driver.status(), timeout=remaining)
                                reads += 1
                            except Exception as err:
                                last, error = "unknown", describe(err)
                            if last == action:
                                span.set_attribute("hafence.power_read", last)
                                return DeviceEvidence(
                                    device=target.name, driver=_driver_name(settings), level=level,
                                    action_sent=action, power_read=last, confirmed=True,  # type: ignore[arg-type]
                                    status_reads=reads, elapsed_s=round(time.monotonic() - started, 4),
                                )
                            await asyncio.sleep(min(next(schedule), max(0.0, deadline - time.monotonic())))
                        if last != "unknown":
                            error = f"power still {last} after {settings.power_timeout_s:g}s"
            span.set_attribute("hafence.power_read", last)
            span.set_status(Status(StatusCode.ERROR, error))
            return DeviceEvidence(
                device=target.name, driver=_driver_name(settings), level=level, action_sent=action,
                power_read=last, confirmed=False, status_reads=reads,  # type: ignore[arg-type]
                elapsed_s=round(time.monotonic() - started, 4), error=error or "no answer",
            )


def _driver_name(device: Device) -> str:
    return type(device).__struct_config__.tag  # type: ignore[attr-defined, no-any-return]
