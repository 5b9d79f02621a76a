"""The ``libvirt`` hypervisor driver (libvirt-python).

A VM's hafence attributes live in its domain XML, in a metadata element of
their own, so they travel with the definition on shared storage:

    <metadata>
      <hafence:vm xmlns:hafence="https://hafence.dev/xmlns/vm/1" ha="true" priority="high"
                  affinity="web" anti-affinity="db-replicas" labels="ssd"/>
    </metadata>

A VM this host never ran is defined from ``VmSpec.definition`` (the XML itself,
or a path to it on shared storage; the agent lets only paths under the cluster's
definitions directory through) and started; a VM defined here but shut off is
started, and only a running one is "already running". S6: autostart is turned
off for every VM this driver defines and, at the agent's start, for every
domain carrying hafence metadata or known to the config. libvirt blocks, so
every call runs in a worker thread of the driver's own pool (sized for the
agent's parallel starts; the loop's default pool has cores + 4 threads). Tested
against libvirt's built-in ``test:///default``.

VM-level HA: a stopped domain's state reason says why it stopped (crashed,
destroyed = killed, shut down by its guest, migrated, saved...); a domain left
in the ``crashed`` state after a guest panic (``on_crash = preserve``) counts as
stopped, is destroyed before it is started again, and is reported ``panicked``.
Lifecycle events (``VIR_DOMAIN_EVENT_ID_LIFECYCLE``) wake the agent at once; they
need libvirt's default event loop, registered once per process before the first
connection and run in a daemon thread. Without it the agent's poll still sees
every stop, a heartbeat interval later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hafence.agent.hypervisor import HypervisorError
from hafence.contracts import VmInfo, VmSpec

NS = "https://hafence.dev/xmlns/vm/1"

log = logging.getLogger("hafence.agent")

# libvirt's (state, reason) numbers (libvirt-domain.h; stable ABI), so the mapping
# is plain data that tests can read without libvirt.
SHUTOFF, CRASHED = 5, 6
SHUTOFF_REASONS = {0: "other", 1: "guest_shutdown", 2: "killed", 3: "crashed", 4: "migrated", 5: "saved",
                   6: "crashed", 7: "other", 8: "killed"}
CRASHED_PANICKED = 1
# Lifecycle events: STARTED, STOPPED, CRASHED (detail PANICKED = 0).
EVENT_STARTED, EVENT_STOPPED, EVENT_CRASHED = 2, 5, 8


def stop_reason(state: int, reason: int) -> str:
    """Why a domain in ``state`` (not running) stopped, in hafence's words. Anything
    libvirt does not call a failure (migrated, saved, restored from a snapshot, unknown)
    is not one: a VM migrated away must never be started again here."""
    if state == CRASHED:
        return "panicked" if reason == CRASHED_PANICKED else "crashed"
    if state == SHUTOFF:
        return SHUTOFF_REASONS.get(reason, "other")
    return "other"


_events_lock = threading.Lock()
_events_started = False


def start_event_loop(libvirt: Any) -> bool:
    """libvirt's default event implementation, once per process, run by a daemon
    thread (it must be registered before a connection is opened to get its events)."""
    global _events_started
    with _events_lock:
        if _events_started:
            return True
        try:
            libvirt.virEventRegisterDefaultImpl()
        except Exception as err:  # an old or odd build: the poll still sees every stop
            log.warning("libvirt events unavailable (%s): VM stops are seen by polling", err)
            return False

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception as err:
                    log.warning("libvirt event loop: %s", err)
                    threading.Event().wait(1.0)

        threading.Thread(target=run, daemon=True, name="libvirt-events").start()
        _events_started = True
        return True


def _split(value: str | None) -> list[str]:
    return [v for v in (value or "").replace(",", " ").split() if v]


def spec_of(xml: str) -> VmSpec:
    root = ET.fromstring(xml)
    memory_kib = int(root.findtext("memory") or 0)
    unit = (root.find("memory").get("unit", "KiB") if root.find("memory") is not None else "KiB")  # type: ignore[union-attr]
    scale = {"KiB": 1 / 1024, "MiB": 1, "GiB": 1024, "b": 1 / 2**20}.get(unit, 1 / 1024)
    meta = root.find(f"metadata/{{{NS}}}vm")
    attrs = meta.attrib if meta is not None else {}
    priority = attrs.get("priority", "medium")
    return VmSpec(
        name=root.findtext("name") or "",
        uuid=root.findtext("uuid") or "",
        memory_mb=int(memory_kib * scale),
        vcpus=int(root.findtext("vcpu") or 1),
        ha=attrs.get("ha", "false").lower() == "true",
        priority=priority if priority in ("high", "medium", "low") else "medium",  # type: ignore[arg-type]
        affinity=_split(attrs.get("affinity")),
        anti_affinity=_split(attrs.get("anti-affinity")),
        labels=_split(attrs.get("labels")),
    )


def _managed(xml: str) -> bool:
    """The domain carries hafence's metadata element."""
    meta = ET.fromstring(xml).find(f"metadata/{{{NS}}}vm")
    return meta is not None


class LibvirtHypervisor:
    def __init__(self, uri: str, workers: int = 8) -> None:
        import libvirt

        self._libvirt = libvirt
        self.uri = uri
        self._events = start_event_loop(libvirt)
        self._listener: Callable[[], None] | None = None
        self._callback_id: int | None = None
        # A guest panic seen as an event, for the stop that follows (on_crash = destroy
        # leaves the domain shut off with reason "crashed").
        self._panicked: set[str] = set()
        try:
            self.conn: Any = libvirt.open(uri)
        except libvirt.libvirtError as err:
            raise HypervisorError(f"cannot connect to libvirt at {uri}: {err}") from None
        # libvirt connections are thread-safe; each start blocks a thread for its whole boot.
        self._pool = ThreadPoolExecutor(max_workers=workers + 2, thread_name_prefix="libvirt")

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _domain(self, name: str) -> Any | None:
        try:
            return self.conn.lookupByName(name)
        except self._libvirt.libvirtError:
            return None

    def on_change(self, callback: Callable[[], None]) -> None:
        """Lifecycle events call ``callback`` in the caller's loop (from libvirt's thread)."""
        loop = asyncio.get_running_loop()
        self._listener = lambda: loop.call_soon_threadsafe(callback)
        if self._events and self._callback_id is None:
            try:
                self._callback_id = self.conn.domainEventRegisterAny(
                    None, self._libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, self._on_event, None)
            except self._libvirt.libvirtError as err:
                log.warning("libvirt lifecycle events not delivered (%s): VM stops are seen by polling", err)

    def _on_event(self, _conn: Any, dom: Any, event: int, detail: int, _opaque: Any) -> None:
        """libvirt's event thread: note a panic, wake the agent. Never raises into libvirt."""
        try:
            name = dom.name()
            if event == EVENT_CRASHED:
                self._panicked.add(name)
            elif event == EVENT_STARTED:
                self._panicked.discard(name)
            if self._listener is not None:
                self._listener()
        except Exception as err:  # the loop may be closed at shutdown
            log.debug("libvirt event not handled: %s", err)

    def close(self) -> None:
        if self._callback_id is not None:
            try:
                self.conn.domainEventDeregisterAny(self._callback_id)
            except self._libvirt.libvirtError:
                pass
            self._callback_id = None
        self._listener = None

    @staticmethod
    def _state(dom: Any) -> tuple[int, int]:
        state, reason = dom.state()
        return int(state), int(reason)

    def _running(self, dom: Any) -> bool:
        """Running: active and not left crashed after a panic (on_crash = preserve)."""
        return bool(dom.isActive()) and self._state(dom)[0] != CRASHED

    def _list(self) -> list[VmInfo]:
        out = []
        for dom in self.conn.listAllDomains():
            spec = spec_of(dom.XMLDesc(0))
            state, reason = self._state(dom)
            if dom.isActive() and state != CRASHED:
                out.append(VmInfo(spec=spec, state="running"))
                continue
            why = stop_reason(state, reason)
            if why == "crashed" and spec.name in self._panicked:
                why = "panicked"
            out.append(VmInfo(spec=spec, state="stopped", stop_reason=why))
        return out

    def _start(self, spec: VmSpec) -> None:
        dom = self._domain(spec.name)
        if dom is None:
            xml = spec.definition
            if xml and not xml.lstrip().startswith("<") and os.path.exists(xml):
                with open(xml) as f:
                    xml = f.read()
            if not xml:
                raise HypervisorError(f"{spec.name} is not defined here and has no definition to define it from")
            try:
                dom = self.conn.defineXML(xml)
                dom.setAutostart(0)  # S6: it starts on command only, never at the host's next boot
            except self._libvirt.libvirtError as err:
                raise HypervisorError(f"cannot define {spec.name}: {err}") from None
        if dom.isActive() and self._state(dom)[0] == CRASHED:
            dom.destroy()  # kept after a panic (on_crash = preserve): it must go before it boots again
        if dom.isActive():
            return  # started meanwhile (the agent serializes starts of one VM; this is belt and braces)
        try:
            self._panicked.discard(spec.name)
            dom.create()
        except self._libvirt.libvirtError as err:
            raise HypervisorError(f"cannot start {spec.name}: {err}") from None

    def _stop(self, name: str) -> None:
        dom = self._domain(name)
        if dom is not None and dom.isActive():
            dom.destroy()

    def _stop_all(self) -> None:
        for dom in self.conn.listAllDomains():
            if dom.isActive():
                dom.destroy()

    def _is_running(self, name: str) -> bool:
        dom = self._domain(name)
        return dom is not None and self._running(dom)

    def _disable_autostart(self, names: set[str]) -> list[str]:
        changed = []
        for dom in self.conn.listAllDomains():
            if dom.autostart() and (dom.name() in names or _managed(dom.XMLDesc(0))):
                dom.setAutostart(0)
                changed.append(dom.name())
        return sorted(changed)

    async def list_vms(self) -> list[VmInfo]:
        return await self._call(self._list)  # type: ignore[no-any-return]

    async def is_running(self, name: str) -> bool:
        return await self._call(self._is_running, name)  # type: ignore[no-any-return]

    async def start(self, spec: VmSpec) -> None:
        await self._call(self._start, spec)

    async def stop(self, name: str) -> None:
        await self._call(self._stop, name)

    async def stop_all(self) -> None:
        await self._call(self._stop_all)

    async def boot(self) -> None:
        """A real host boots by itself; libvirtd runs autostart before the agent starts."""

    async def disable_autostart(self, names: set[str]) -> list[str]:
        return await self._call(self._disable_autostart, names)  # type: ignore[no-any-return]
