"""Power drivers, one module per kind of device, and the factory that picks one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hafence.config import (
    ApcSnmpDevice,
    Device,
    FenceAgentDevice,
    IpmiDevice,
    RedfishDevice,
    SimDevice,
    WatchdogDevice,
)
from hafence.fencer.drivers.base import (
    DeviceAuthError,
    DeviceError,
    DeviceUnreachable,
    PowerDriver,
    PowerRead,
)

if TYPE_CHECKING:
    from hafence.fencer.drivers.watchdog import WatchdogContext

__all__ = [
    "DeviceAuthError",
    "DeviceError",
    "DeviceUnreachable",
    "PowerDriver",
    "PowerRead",
    "make_driver",
]


def make_driver(name: str, config: Device, port: str, watchdog: WatchdogContext | None = None) -> PowerDriver:
    """A driver for one device and one target on it (``port``: outlet, plug or host).
    ``watchdog``: the fencer's view of the monitor, which the watchdog driver needs."""
    match config:
        case SimDevice():
            from hafence.fencer.drivers.sim import SimDriver

            return SimDriver(name, config, port)
        case IpmiDevice():
            from hafence.fencer.drivers.ipmi import IpmiDriver

            return IpmiDriver(name, config, port)
        case ApcSnmpDevice():
            from hafence.fencer.drivers.apc_snmp import ApcSnmpDriver

            return ApcSnmpDriver(name, config, port)
        case RedfishDevice():
            from hafence.fencer.drivers.redfish import RedfishDriver

            return RedfishDriver(name, config, port)
        case FenceAgentDevice():
            from hafence.fencer.drivers.fence_agent import FenceAgentDriver

            return FenceAgentDriver(name, config, port)
        case WatchdogDevice():
            from hafence.fencer.drivers.watchdog import WatchdogDriver

            return WatchdogDriver(name, config, port, watchdog)
    raise ValueError(f"device {name!r}: no driver for {type(config).__name__}")
