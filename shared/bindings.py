"""Ports that production code uses and other packages bind: a small plugin registry.

Production modules name the port they need and the binding the configuration or
the command line chose (``resolve("power_switch", "sim")``); they never import the
module that implements it. A binding comes from, in this order:

* ``register(kind, name, factory)`` in the same process (a test binding a fake);
* a Python entry point in the group ``hafence.bindings`` named ``<kind>:<name>``
  (``pyproject.toml`` declares the lab's: the simulated power switch and watchdog
  live in the lab package, which production code does not import).

An unknown binding is a configuration error that names the port and what is bound.

The ports themselves are Protocols: ``PowerSwitch`` here (the agent obeys one, the
fencer's ``sim`` driver switches one); the watchdog device is
``hafence.agent.watchdog.WatchdogDevice``; the hypervisor ``hafence.agent.hypervisor.Hypervisor``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any, Literal, Protocol

GROUP = "hafence.bindings"

Power = Literal["on", "off"]

_registry: dict[tuple[str, str], Callable[..., Any]] = {}


class PowerSwitch(Protocol):
    """The power of a set of ports (hosts, outlets) that something else can switch."""

    def read(self, port: str, now: float | None = None) -> Power: ...

    def power_cycles(self, port: str, now: float | None = None) -> int:
        """How many times the port has been switched off (so a poller learns of a
        cycle it was too slow to see)."""
        ...

    def switch(self, port: str, state: Power, delay_s: float = 0.0, now: float | None = None) -> None: ...


class UnknownBinding(LookupError):
    pass


def register(kind: str, name: str, factory: Callable[..., Any]) -> None:
    """Bind ``kind:name`` in this process (replaces an earlier binding)."""
    _registry[(kind, name)] = factory


def unregister(kind: str, name: str) -> None:
    _registry.pop((kind, name), None)


def resolve(kind: str, name: str) -> Callable[..., Any]:
    """The factory bound to ``kind:name``: registered in process, else an entry point."""
    factory = _registry.get((kind, name))
    if factory is not None:
        return factory
    found = entry_points(group=GROUP, name=f"{kind}:{name}")
    for ep in found:
        factory = ep.load()
        _registry[(kind, name)] = factory
        return factory
    known = sorted({f"{k}:{n}" for k, n in _registry} | {ep.name for ep in entry_points(group=GROUP)})
    raise UnknownBinding(f"no binding {kind}:{name!s} (bound: {', '.join(known) or 'none'}); "
                         f"is the package that provides it installed?")


def power_switch(name: str, *args: Any) -> PowerSwitch:
    """A power switch bound as ``power_switch:<name>``, built from ``args``."""
    switch: PowerSwitch = resolve("power_switch", name)(*args)
    return switch
