"""The arbiter service: its core (``hafence.arbiter.core.ArbiterCore``, where every
rule lives) run by the generic driver, with its ports bound.

Ports: ``lease`` (the driver binds the arbiter lease; the lab's stale-lease
fault binds its own through ``rt.args.lease_factory``, which the driver reads)
and ``storage`` (which hosts still renew their storage lease: the lease files
under ``[storage] lease_dir``, read in a thread; not bound when none is
configured, and the core then never asks).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path

from hafence.arbiter.core import ArbiterCore
from hafence.core.driver import drive
from hafence.service import Runtime


def storage_leases(lease_dir: str, hosts: Sequence[str], live_window_s: float, now: float) -> dict[str, bool]:
    """Which hosts renewed ``<lease_dir>/<host>.lease`` within the window (wall clock, the storage's mtime)."""
    live = {}
    for host in hosts:
        try:
            live[host] = now - os.stat(Path(lease_dir) / f"{host}.lease").st_mtime <= live_window_s
        except OSError:
            live[host] = False
    return live


class StorageLeases:
    """The ``storage`` port over the lease files (a stat per host, off the event loop:
    shared storage can be slow to answer)."""

    def __init__(self, lease_dir: str) -> None:
        self.lease_dir = lease_dir

    async def live(self, hosts: Sequence[str], window_s: float) -> dict[str, bool]:
        return await asyncio.to_thread(storage_leases, self.lease_dir, list(hosts), window_s, time.time())


async def run(rt: Runtime) -> None:
    core = ArbiterCore(rt.config)
    ports: dict[str, object] = {}
    if rt.config.storage.lease_dir:
        ports["storage"] = StorageLeases(rt.config.storage.lease_dir)
    await drive(core, rt, ports)
