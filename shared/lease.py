"""Leader lease in a JetStream KV bucket, with a term that only grows.

The bucket has a TTL: a leader that stops renewing loses the key when it
expires. Acquiring is ``create`` (succeeds only if nobody holds the key);
renewing is ``update(last=revision)`` (compare-and-set, fails if somebody else
took over). The fencer refuses requests stamped with an older term (S3).

The **term** never goes back, even when the bucket is deleted or recreated and
its revisions start again at 1. It is ``floor + revision``, where ``revision``
is the KV revision of the write that took the lease (a stream sequence: a later
holder in the same bucket has a higher one) and ``floor`` is the highest term
this replica knows the cluster has used: learned from the terms in the bucket's
values while it stands by, from the service's replay of the events stream
(``learn``), and from a fencer's refusal (``highest_term``). A holder that
learns of a term at or above its own raises its term (``raise_term``: a
compare-and-set write, so only the holder can). The term is written into the
key's value, where standbys and operators read it.

A holder also checks its own monotonic clock: after a pause longer than the
lease (SIGSTOP, a long GC, a VM migration) it stops acting before its next
renewal attempt has even been answered.

Fault injection is no business of this module: the lab's S3 test binds a lease
that never notices it lost its lease (the lab's ``stale_arbiter``, a subclass
passed to the arbiter as its ``lease_factory``), so production code reads no
fault switch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable

import nats.js.errors
from nats.js.kv import KeyValue

from hafence import metrics

log = logging.getLogger("hafence.lease")

# A term learned beyond this is corrupt or hostile, and ignored: terms (floor plus
# a revision) stay far inside 64 bits and exact in every JSON reader.
MAX_TERM = 2**52
# NATS down or reconnecting, the bucket deleted (no stream answers), a timeout: the
# lease is simply not held until the next step; never a reason to stop the service.
_BUCKET_TROUBLE = (nats.errors.Error, TimeoutError)


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
        # The highest term this replica knows was used by anyone (its own included).
        self.floor = 0
        self._revision = 0
        self._valid_until = 0.0
        self.acquired = asyncio.Event()

    def held(self) -> bool:
        return self.term > 0 and self.clock() < self._valid_until

    @property
    def valid_until(self) -> float:
        """Until when (on ``clock``) this replica may act as the holder; 0 when it is not."""
        return self._valid_until if self.term else 0.0

    def _value(self) -> bytes:
        return json.dumps({"holder": self.holder, "term": self.term}).encode()

    def learn(self, term: int) -> None:
        """Somebody used ``term`` (an event, a result, a refusal, a bucket value)."""
        if isinstance(term, int) and 0 < term <= MAX_TERM and term > self.floor:
            self.floor = term

    def needs_raise(self) -> bool:
        """A term at or above ours is known to have been used by somebody else."""
        return bool(self.term) and self.floor > self.term

    async def _learn_from_bucket(self) -> None:
        try:
            entry = await self.kv.get(self.role)
        except Exception:
            return  # expired or deleted meanwhile; the next step creates it
        term = current_holder(entry.value).get("term")
        if isinstance(term, int):
            self.learn(term)

    async def _take(self, last: int, started: float) -> None:
        """Write the key (create when ``last`` is 0) and take the term that write
        gives: above every term known; then record the term in the value."""
        value = json.dumps({"holder": self.holder}).encode()
        revision = await (self.kv.create(self.role, value) if last == 0
                          else self.kv.update(self.role, value, last=last))
        term = self.floor + revision
        self.learn(term)
        self._set(term, revision, started)
        revision = await self.kv.update(self.role, self._value(), last=revision)
        self._set(self.term, revision, started)

    async def raise_term(self) -> bool:
        """Take a term above every known one while holding the lease (a fencer
        refused ours). False if the lease is lost or the bucket did not answer."""
        if not self.held():
            return False
        if not self.needs_raise():
            return True
        started, was = self.clock(), self.term
        try:
            await self._take(self._revision, started)
        except nats.js.errors.KeyWrongLastSequenceError:
            self._set(0, 0, started)
            return False
        except _BUCKET_TROUBLE as err:
            log.warning("lease %s: raising the term: %s", self.role, err or type(err).__name__)
            return False
        log.warning("term raised", extra={"fields": {"role": self.role, "was": was, "term": self.term}})
        return True

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
        started = self.clock()
        if self.term and started >= self._valid_until:
            self._set(0, 0, started)
        try:
            if self.term:
                revision = await self.kv.update(self.role, self._value(), last=self._revision)
                self._set(self.term, revision, started)
            else:
                await self._take(0, started)
        except nats.js.errors.KeyWrongLastSequenceError:
            if self.term:
                self._set(0, 0, started)
            else:
                await self._learn_from_bucket()  # somebody holds it: remember their term
        except _BUCKET_TROUBLE as err:
            log.warning("lease %s: %s", self.role, err or type(err).__name__)

    async def run(self, ready: asyncio.Event | None = None,
                  on_step: Callable[[], None] | None = None) -> None:
        """Keep acquiring or renewing until cancelled; release on the way out.
        With ``ready``, stand by (learning terms) until it is set: a service that
        learns its floor from a replay takes the lease only once it has read it."""
        try:
            while ready is not None and not ready.is_set():
                try:
                    await self._learn_from_bucket()
                except Exception:
                    pass
                try:
                    await asyncio.wait_for(ready.wait(), timeout=self.ttl / 4)
                except TimeoutError:
                    pass
            while True:
                await self.step()
                if on_step is not None:
                    on_step()  # the driver reports every renewal to its core
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
