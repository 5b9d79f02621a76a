"""The fencer service: the fencer core (``hafence.fencer.core``) run by the generic
driver, with its ports bound to production: the SQLite journal, the power devices
through the ``Executor``, and the other replicas through the KV buckets.

Every decision (per-host order, S3 and S4, write-ahead, refusals, health) is the
core's; this shell only opens what the ports need, and follows the monitor's
views for the watchdog level (docs/watchdog.md), which the power port reads.

Any number of replicas may run (docs/fencer-replicas.md): requests are admitted
against the state every replica shares, claimed across replicas before this
replica's journal admits them, and every device operation holds the device's
lock across replicas (``locks.KvLocks``).
"""

from __future__ import annotations

import asyncio
from contextlib import AbstractAsyncContextManager

from hafence.bus.provision import fencer_locks_bucket, fencer_state_bucket
from hafence.core.driver import drive
from hafence.fencer.core import FencerCore
from hafence.fencer.drivers import make_driver
from hafence.fencer.drivers.watchdog import fencer_context, uses_watchdog, watch_views
from hafence.fencer.executor import Executor
from hafence.fencer.journal import FenceJournal
from hafence.fencer.live_ports import ExecutorPower, KvReplicas
from hafence.fencer.locks import KvLocks, Token, kv_key
from hafence.fencer.replicas import SharedRequests
from hafence.service import Runtime


async def run(rt: Runtime) -> None:
    bus, config = rt.bus, rt.config
    locks_kv = await bus.js.key_value(fencer_locks_bucket(bus.streams))
    ttl = (await locks_kv.status()).ttl
    if not ttl:
        raise RuntimeError(f"bucket {fencer_locks_bucket(bus.streams)} has no TTL: a dead replica's locks would "
                           "never expire; run `hafence deploy provision --config FILE`")
    # The bucket's TTL, not the config's: the server expires keys by it.
    locks = KvLocks(locks_kv, rt.instance, ttl)
    shared = SharedRequests(await bus.js.key_value(fencer_state_bucket(bus.streams)), locks)

    def device_lock(lock_key: str) -> AbstractAsyncContextManager[Token]:
        return locks.hold(kv_key("dev", lock_key), f"device {lock_key}")

    # The watchdog level watches the monitor's views (docs/watchdog.md).
    watchdog = fencer_context(config, lambda: int(bus.nc.stats["reconnects"]))
    executor = Executor(config, device_lock=device_lock,
                        driver_factory=lambda name, device, port: make_driver(name, device, port, watchdog))
    journal = await FenceJournal.open(rt.db_path("fencer.db"))
    try:
        async with asyncio.TaskGroup() as tg:
            replicas = KvReplicas(shared, locks, tg)
            ports = {"journal": journal, "replicas": replicas, "power": ExecutorPower(config, executor, replicas)}
            if uses_watchdog(config):
                tg.create_task(watch_views(bus, watchdog.views))
            tg.create_task(drive(FencerCore(config), rt, ports))
    finally:
        await asyncio.shield(executor.close())
        await asyncio.shield(journal.close())
