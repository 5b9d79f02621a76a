"""The role lease in the simulation: production's ``LeaderLease``, over the simulated KV.

Nothing of the lease's logic is copied: ``hafence.lease.LeaderLease`` itself runs,
on a bucket handle that turns the simulated server's answers into the nats-py
exceptions it catches (a lost compare-and-set is ``KeyWrongLastSequenceError``, a
deleted bucket or an unreachable server a ``nats.errors.Error`` or a timeout), and on
the node's monotonic clock. So its semantics are the production ones by
construction: term = learned floor + KV revision, acquire by ``create``, renew by
``update(last=revision)``, ``valid_until = started + ttl * 0.75``, ``learn`` and
``raise_term``; a change of this module cannot drift from them.

Only the loop is the simulation's (production's ``run`` sleeps on asyncio):
``SimLease.run`` stands by learning terms from the bucket until its service's
replay has been read, then steps every ``ttl / 4`` of the node's time. The driver
reports ``LeaseChanged`` whenever ``state()`` differs from what it last reported.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import nats.errors
import nats.js.errors

from hafence.lease import LeaderLease
from hafence.sim.clock import NodeClock, SimFuture
from hafence.sim.streams import Entry, JetStreamError, KeyNotFound, WrongLastSequence
from hafence.sim.transport import KV, NotConnected

T = TypeVar("T")

# The production lease logs every renewal failure as a warning; in a simulation of
# thousands of faults that is noise on stderr (the event log has every KV operation).
logging.getLogger("hafence.lease").setLevel(logging.ERROR)


class NatsKV:
    """A simulated bucket handle with nats-py's ``KeyValue`` interface and exceptions."""

    def __init__(self, kv: KV) -> None:
        self.kv = kv

    async def get(self, key: str) -> Entry:
        return await _translated(self.kv.get(key))

    async def create(self, key: str, value: bytes) -> int:
        return await _translated(self.kv.create(key, value))

    async def update(self, key: str, value: bytes, last: int | None = None) -> int:
        return await _translated(self.kv.update(key, value, last=last))

    async def delete(self, key: str, last: int | None = None) -> int:
        return await _translated(self.kv.delete(key, last=last))


async def _translated(future: SimFuture[T]) -> T:
    try:
        return await future
    except WrongLastSequence as err:
        raise nats.js.errors.KeyWrongLastSequenceError(str(err)) from err
    except KeyNotFound as err:
        raise nats.js.errors.KeyNotFoundError(message=str(err)) from err
    except JetStreamError as err:  # the bucket is gone: no stream answers
        raise nats.js.errors.NoStreamResponseError(str(err)) from err
    except NotConnected as err:
        raise nats.errors.ConnectionClosedError() from err


class SimLease:
    """One replica's lease on ``role``: the port a core calls (``learn``, ``raise_term``)
    and the loop the driver runs (``run``)."""

    def __init__(self, kv: KV, role: str, holder: str, ttl: float, clock: NodeClock,
                 factory: type[LeaderLease] = LeaderLease) -> None:
        self.clock = clock
        self.ttl = ttl
        # ``factory``: another lease class, as production's ``lease_factory`` (the lab's
        # ``StaleLease``: a leader that never notices it lost its lease).
        self.lease = factory(NatsKV(kv), role, holder, ttl, clock=clock.monotonic)  # type: ignore[arg-type]

    # -- the port ----------------------------------------------------------------------
    def learn(self, term: int) -> None:
        self.lease.learn(term)

    def raise_term(self) -> Coroutine[Any, Any, bool]:
        return self.lease.raise_term()

    # -- what the driver reports -------------------------------------------------------------
    def state(self) -> tuple[bool, int, float]:
        """(held, term, valid_until on the node's monotonic clock), as production's driver reports it."""
        lease = self.lease
        return lease.held(), lease.term, lease.valid_until

    # -- the loop -----------------------------------------------------------------------------
    async def run(
        self,
        ready: SimFuture[None] | None,
        awake: Callable[[], SimFuture[None] | None],
        changed: Callable[[], None],
    ) -> None:
        """Stand by until ``ready`` is done (the service's replay caught up), learning
        the holder's term every ``ttl / 4``; then acquire or renew every ``ttl / 4``, as
        production's driver does. ``awake()`` is a future to wait for while the process
        is paused (None when it runs); ``changed()`` is called after every step."""
        while ready is not None and not ready.done():
            await self._awake(awake)
            await self.lease._learn_from_bucket()
            await self._first(ready, self.ttl / 4)
        while True:
            await self._awake(awake)
            await self.lease.step()
            changed()
            await self.clock.sleep(self.ttl / 4)

    async def _first(self, ready: SimFuture[None], seconds: float) -> None:
        """Until ``ready`` or ``seconds`` of the node's time, whichever comes first."""
        if ready.done():
            return
        scheduler = self.clock.scheduler
        either: SimFuture[None] = scheduler.future("lease standby")

        def wake(_: object = None) -> None:
            if not either.done():
                either.set_result(None)

        timer = self.clock.call_later(seconds, wake)
        ready.add_done_callback(wake)
        try:
            await either
        finally:
            timer.cancel()

    @staticmethod
    async def _awake(awake: Callable[[], SimFuture[None] | None]) -> None:
        while (paused := awake()) is not None:
            await paused
