"""The scheduler service: its core (``core.py``) run by the generic driver, with
its start history in its own SQLite database (``ports.py``).

Every decision is the core's: which VMs a fence releases (S1,
``state.host_released``), waves by priority, placement, retries and moves, S6's
quarantine and duplicates, VM-level HA, the HA reservation warning. This module
only binds what the core needs: the store port and the reservation check.
"""

from __future__ import annotations

import asyncio
from typing import Any

from hafence.core.driver import drive
from hafence.scheduler.core import SchedulerCore, vm_event_id
from hafence.scheduler.placement import largest_host_loss_absorbed
from hafence.scheduler.ports import MIGRATIONS, RECORD_START, SqliteStartHistory
from hafence.service import Runtime

__all__ = ["MIGRATIONS", "RECORD_START", "run", "vm_event_id"]


def _reservation(*args: Any, **kwargs: Any) -> tuple[bool, str, str]:
    # Looked up here at each call, so a test can count the checks by replacing it.
    return largest_host_loss_absorbed(*args, **kwargs)


async def run(rt: Runtime) -> None:
    store = await SqliteStartHistory.open(rt.db_path("scheduler.db"))
    try:
        await drive(SchedulerCore(rt.config, reservation_check=_reservation), rt, {"store": store})
    finally:
        await asyncio.shield(store.close())
