"""Leader lease in a JetStream KV bucket, with a term that only grows.

The bucket has a TTL: a leader that stops renewing loses the key when it
expires. Acquiring is ``create`` (succeeds only if nobody holds the key);
renewing is ``update(last=revision)`` (compare-and-set, fails if somebody else
took over). The **term** is the KV revision at which the key was created: a
stream sequence, so a later holder always has a higher term, across server
restarts too. The fencer refuses requests stamped with an older term (S3).

A holder also checks its own monotonic clock: after a pause longer than the
lease (SIGSTOP, a long GC, a VM migration) it stops acting before its next
renewal attempt has even been answered.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Callable

import nats.js.errors
from nats.js.kv import KeyValue

from hafence import metrics

log = logging.getLogger("hafence.lease")


class LeaderLease:
    def __init__(
        self,
        kv: KeyValue,
        role: str,
        holder: str,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[bool, int], None] | None = None,
    ) -> None:
        self.kv = kv
        self.role = role
        self.holder = holder
        self.ttl = ttl
        self.clock = clock
        self.on_change = on_change
        self.term = 0
        self._revision = 0
        self._valid_until = 0.0
        self.acquired = asyncio.Event()

    # Fault injection for the S3 test: a leader that never notices it lost its lease
    # (a partitioned leader with a frozen clock). The fencer's term check must stop it.
    stale_on_purpose = os.environ.get("HAFENCE_FAULT_STALE_LEASE") == "1"

    def held(self) -> bool:
        if self.stale_on_purpose and self.term:
            return True
        return self.term > 0 and self.clock() < self._valid_until

    def _value(self) -> bytes:
        return json.dumps({"holder": self.holder, "term": self.term}).encode()

    def _set(self, term: int, revision: int, started: float) -> None:
        was = self.term
        self.term, self._revision = term, revision
        # Count from before the request was sent, and keep a margin, so we stop
        # believing in the lease before the server lets it expire.
        self._valid_until = started + self.ttl * 0.75 if term else 0.0
        if term and not was:
            self.acquired.set()
            log.info("leadership acquired", extra={"fields": {"role": self.role, "term": term}})
        if was and not term:
            self.acquired.clear()
            log.warning("leadership lost", extra={"fields": {"role": self.role, "term": was}})
        metrics.LEADER.labels(self.role).set(1 if term else 0)
        metrics.TERM.labels(self.role).set(term)
        if bool(was) != bool(term) and self.on_change:
            self.on_change(bool(term), term)

    async def step(self) -> None:
        """One acquire-or-renew attempt."""
        if self.stale_on_purpose and self.term:
            return
        started = self.clock()
        if self.term and started >= self._valid_until:
            self._set(0, 0, started)
        try:
            if self.term:
                revision = await self.kv.update(self.role, self._value(), last=self._revision)
                self._set(self.term, revision, started)
            else:
                revision = await self.kv.create(self.role, json.dumps({"holder": self.holder}).encode())
                self._set(revision, revision, started)
                # Record the term in the value too, for operators reading the bucket.
                revision = await self.kv.update(self.role, self._value(), last=revision)
                self._set(self.term, revision, started)
        except nats.js.errors.KeyWrongLastSequenceError:
            if self.term:
                self._set(0, 0, started)
        except (nats.errors.TimeoutError, TimeoutError, nats.errors.ConnectionClosedError,
                nats.errors.NoRespondersError, nats.js.errors.APIError) as err:
            log.warning("lease %s: %s", self.role, err or type(err).__name__)

    async def run(self) -> None:
        """Keep acquiring or renewing until cancelled; release on the way out."""
        try:
            while True:
                await self.step()
                await asyncio.sleep(self.ttl / 4)
        finally:
            await asyncio.shield(self.release())

    async def release(self) -> None:
        if not self.term:
            return
        revision, self.term = self._revision, 0
        self.acquired.clear()
        try:
            await asyncio.wait_for(self.kv.delete(self.role, last=revision), timeout=2.0)
        except Exception:
            pass  # it expires by itself


def current_holder(value: bytes | None) -> dict[str, object]:
    if not value:
        return {}
    try:
        data = json.loads(value)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
