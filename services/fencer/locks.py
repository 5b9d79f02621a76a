"""Locks that hold across fencer replicas: JetStream KV keys with a TTL.

A lock is a key in the fencer's locks bucket (``<PREFIX>_fencer_locks``, whose
TTL the provisioner sets from ``[fencer] lock_ttl_s``):

* **acquire** is ``create``: it succeeds only if nobody holds the key. The KV
  revision of that write is the lock's **fencing token** (a later holder always
  has a higher one); it is logged and put on the span.
* **renew** is ``update(last=revision)``, every ``ttl / 4``: it fails if the key
  expired and somebody else took it.
* **release** is ``delete(last=revision)``: it never deletes a successor's key.

The holder believes in the lock only until ``validity`` (3/4 of the TTL) after
the start of its last successful write, on its own monotonic clock (the event
loop's). The body runs inside ``asyncio.timeout_at(valid_until)``, rescheduled
at each renewal: when a renewal cannot be made in time (NATS down, the process
was paused past the TTL), the body is cancelled there and then and the holder
stops driving the device; the server frees the key no earlier than a quarter
TTL later. A power device cannot check a token, so this margin, not the token,
is what keeps two replicas from driving one device (docs/fencer-replicas.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

log = logging.getLogger("hafence.fencer")

# The holder stops at this share of the TTL after its last write was sent.
VALIDITY = 0.75
# NATS down or reconnecting, the bucket missing, a timeout: the lock is not
# acquired (or renewed) this time; the next attempt may succeed.
BUCKET_TROUBLE = (nats.errors.Error, TimeoutError)
_KEY_SAFE = re.compile(r"[A-Za-z0-9_=-]{1,128}")


class LockLost(Exception):
    """The holder could not renew a lock before its validity ended: it stopped."""


def kv_key(kind: str, name: str) -> str:
    """A KV key for ``name``: the name itself where the key alphabet allows it (an
    operator reads it with `nats kv ls`), else its readable part and a hash, so two
    names never share a key."""
    if _KEY_SAFE.fullmatch(name):
        return f"{kind}.{name}"
    readable = re.sub(r"[^A-Za-z0-9_=-]+", "_", name)[:64].strip("_") or "x"
    return f"{kind}.{readable}.{hashlib.sha256(name.encode()).hexdigest()[:16]}"


@dataclass
class Token:
    key: str
    what: str
    fence: int  # the revision of the acquiring write: the fencing token
    revision: int  # the revision of the latest write (for compare-and-set)
    valid_until: float


class KvLocks:
    def __init__(self, kv: KeyValue, holder: str, ttl: float) -> None:
        self.kv = kv
        self.holder = holder
        self.ttl = ttl
        self.validity = ttl * VALIDITY

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def _value(self, what: str) -> bytes:
        return json.dumps({"holder": self.holder, "what": what, "at": time.time()}).encode()

    async def try_acquire(self, key: str, what: str) -> Token | None:
        """One ``create``; None if somebody holds the key (or the bucket did not answer)."""
        started = self.now()
        try:
            revision = await self.kv.create(key, self._value(what))
        except nats.js.errors.KeyWrongLastSequenceError:
            return None
        except BUCKET_TROUBLE as err:
            log.warning("lock %s: %s", key, err or type(err).__name__)
            return None
        return Token(key, what, revision, revision, started + self.validity)

    async def holder_of(self, key: str) -> str:
        """Who holds a key, for logs ("" if free or unreadable)."""
        try:
            entry = await self.kv.get(key)
            data = json.loads(entry.value or b"{}")
        except (*BUCKET_TROUBLE, ValueError):
            return ""
        return str(data.get("holder", "")) if isinstance(data, dict) else ""

    async def acquire(self, key: str, what: str) -> Token:
        """Wait until the key is ours. A holder that died frees it within a TTL."""
        delay = 0.02
        while (token := await self.try_acquire(key, what)) is None:
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.ttl / 8)
        return token

    async def renew(self, token: Token) -> bool:
        started = self.now()
        try:
            token.revision = await self.kv.update(token.key, self._value(token.what), last=token.revision)
        except nats.js.errors.KeyWrongLastSequenceError:
            log.error("lock %s (%s) was taken by another holder", token.key, token.what)
            token.valid_until = started  # lost for certain: stop now
            return False
        except BUCKET_TROUBLE as err:
            log.warning("lock %s: renewing: %s", token.key, err or type(err).__name__)
            return False
        token.valid_until = started + self.validity
        return True

    async def release(self, token: Token) -> None:
        try:
            await asyncio.wait_for(self.kv.delete(token.key, last=token.revision), timeout=2.0)
        except Exception:
            pass  # taken by a successor (the revision check spared its key), or it expires by itself

    @asynccontextmanager
    async def hold(self, key: str, what: str, token: Token | None = None) -> AsyncIterator[Token]:
        """Hold ``key`` (acquired here, or the ``token`` already acquired) while the
        body runs, renewing it; if it cannot be renewed within its validity, the
        body is cancelled and ``LockLost`` raised. Released at the end."""
        token = token or await self.acquire(key, what)
        try:
            async with asyncio.timeout_at(token.valid_until) as deadline:
                # Told to stop as well as cancelled: a cancellation that arrives as a KV
                # reply does is lost in ``wait_for`` (Python < 3.12), and a renewer that
                # renews on would hold the lock, and this block, for ever.
                stop = asyncio.Event()
                renewer = asyncio.create_task(self._keep(token, deadline, stop), name=f"renew {key}")
                try:
                    yield token
                finally:
                    stop.set()
                    renewer.cancel()
                    await asyncio.gather(renewer, return_exceptions=True)
        except TimeoutError:
            if deadline.expired():
                raise LockLost(f"lock on {what} lost: not renewed within {self.validity:g}s "
                               f"(token {token.fence}); stopped") from None
            raise
        finally:
            await asyncio.shield(self.release(token))

    async def _keep(self, token: Token, deadline: asyncio.Timeout, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.ttl / 4)
            if stop.is_set() or self.now() >= token.valid_until:
                return  # the deadline fires (a pause ate the validity); renewing now is too late
            await self.renew(token)
            if stop.is_set():
                return
            deadline.reschedule(token.valid_until)
