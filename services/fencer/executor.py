"""Carries out a host's fencing topology on real devices.

Per device: send the command, wait ``power_wait_s``, then read status on a
backing-off schedule until it reads off or ``power_timeout_s`` passes; retry
the command up to ``retries`` times. One operation at a time per physical
device (a lock keyed by its address); different devices run in parallel.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.trace import Status, StatusCode

from hafence.config import ClusterConfig, HostConfig
from hafence.contracts import DeviceEvidence
from hafence.fencer.drivers import DeviceAuthError, DeviceUnreachable, PowerDriver, PowerRead, make_driver
from hafence.fencer.topology import StatusPollSchedule, Verdict, level_confirmed, verdict
from hafence.telemetry import tracer


def describe(err: BaseException) -> str:
    """An error as an operator should read it; never includes credentials."""
    if isinstance(err, TimeoutError):
        return "device did not answer in time"
    if isinstance(err, DeviceAuthError):
        return f"authentication failed: {err}"
    if isinstance(err, DeviceUnreachable):
        return f"unreachable: {err}"
    return f"{type(err).__name__}: {err}"


@dataclass(frozen=True, slots=True)
class FenceReport:
    verdict: Verdict
    evidence: list[DeviceEvidence]


class Executor:
    def __init__(
        self,
        config: ClusterConfig,
        driver_factory: Callable[..., PowerDriver] = make_driver,
    ) -> None:
        self.config = config
        self.driver_factory = driver_factory
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def drivers_for(self, host: HostConfig) -> list[list[tuple[PowerDriver, float, float, int]]]:
        levels = []
        for level in host.levels:
            drivers = []
            for ref in level.devices:
                device = self.config.devices[ref.device]
                driver = self.driver_factory(ref.device, device, ref.port or host.name)
                drivers.append((driver, device.power_wait_s, device.power_timeout_s, device.retries))
            levels.append(drivers)
        return levels

    async def fence(self, host: HostConfig, action: str) -> FenceReport:
        tried: list[list[DeviceEvidence]] = []
        levels = self.drivers_for(host)
        for number, drivers in enumerate(levels, start=1):
            with tracer().start_as_current_span(
                f"fence level {number}",
                attributes={"hafence.host": host.name, "hafence.level": number,
                            "hafence.devices": [d.name for d, *_ in drivers]},
            ) as span:
                evidence = await self._run_level(number, drivers, "off")
                ok = level_confirmed(evidence)
                span.set_attribute("hafence.confirmed_off", ok)
                if ok and action == "reboot":
                    evidence += await self._run_level(number, drivers, "on")
                if not ok:
                    span.set_status(Status(StatusCode.ERROR, "level not confirmed off"))
            tried.append([e for e in evidence if e.action_sent == "off"])
            if ok:
                return FenceReport(verdict(tried, len(levels)), [e for lvl in tried for e in lvl] + [
                    e for e in evidence if e.action_sent == "on"
                ])
        return FenceReport(verdict(tried, len(levels)), [e for lvl in tried for e in lvl])

    async def _run_level(
        self, number: int, drivers: list[tuple[PowerDriver, float, float, int]], action: str
    ) -> list[DeviceEvidence]:
        async with asyncio.TaskGroup() as tg:
            tasks = [
                tg.create_task(self.operate(d, number, action, wait, timeout, retries))
                for d, wait, timeout, retries in drivers
            ]
        return [t.result() for t in tasks]

    async def operate(
        self, driver: PowerDriver, level: int, action: str, power_wait: float, power_timeout: float, retries: int
    ) -> DeviceEvidence:
        """Switch one device and read back until it reports the wanted state."""
        want = action
        started = time.monotonic()
        reads, last, error = 0, "unknown", ""
        with tracer().start_as_current_span(
            f"power {action} {driver.name}",
            attributes={"hafence.device": driver.name, "hafence.driver": driver.driver,
                        "hafence.level": level, "hafence.action": action},
        ) as span:
            async with self._locks[driver.lock_key]:
                for attempt in range(1 + retries):
                    attempt_started = time.monotonic()
                    try:
                        command = driver.power_off if action == "off" else driver.power_on
                        await asyncio.wait_for(command(), timeout=power_timeout)
                    except Exception as err:
                        error = describe(err)
                        span.add_event("command failed", {"attempt": attempt + 1, "error": error})
                        if isinstance(err, DeviceAuthError):
                            break  # a wrong password does not get right by retrying
                        continue
                    await asyncio.sleep(power_wait)
                    deadline = attempt_started + power_timeout
                    schedule = StatusPollSchedule()
                    while True:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        try:
                            last = await asyncio.wait_for(driver.status(), timeout=remaining)
                            reads += 1
                        except Exception as err:
                            last, error = "unknown", describe(err)
                        if last == want:
                            evidence = DeviceEvidence(
                                device=driver.name, driver=driver.driver, level=level, action_sent=action,
                                power_read=_read(last), confirmed=True, status_reads=reads,
                                elapsed_s=round(time.monotonic() - started, 4),
                            )
                            span.set_attribute("hafence.power_read", last)
                            return evidence
                        await asyncio.sleep(min(next(schedule), max(0.0, deadline - time.monotonic())))
                    error = error or f"power still {last} after {power_timeout:g}s"
                    if last != "unknown":
                        error = f"power still {last} after {power_timeout:g}s"
            span.set_attribute("hafence.power_read", last)
            span.set_status(Status(StatusCode.ERROR, error))
            return DeviceEvidence(
                device=driver.name, driver=driver.driver, level=level, action_sent=action,
                power_read=_read(last), confirmed=False, status_reads=reads,
                elapsed_s=round(time.monotonic() - started, 4), error=error,
            )


def _read(value: str) -> PowerRead:
    return value if value in ("on", "off") else "unknown"  # type: ignore[return-value]
