"""S3 and S4 across fencer replicas: what every replica must see of the others.

Each replica keeps its own journal (SQLite); these keys make the journal's two
promises hold across replicas:

* ``term`` in the state bucket (``<PREFIX>_fencer``, no TTL): the highest
  term any replica admitted. Admitting a request writes ``max(term, highest)``
  with compare-and-set (``update(last=revision)``, ``create`` for the first), so
  two replicas admitting at once are serialized by the bucket, and a request
  older than a term another replica admitted is refused (S3).
* ``req.<request id>`` in the state bucket: the request's incident and host,
  written once with ``create`` when it is first admitted, and its result once
  recorded. Another replica answers from it (S4), and a request id used for
  another incident or host is refused, as the journal does.
* ``req.<request id>`` in the locks bucket (TTL): the **claim** of the replica
  running the request (``locks.KvLocks``). A redelivery that reaches another
  replica while the claim is live waits (the message kept in progress) until
  the result is recorded; it takes over only once the claim has expired, and
  then reads the power state again like any fence.

The decision itself is ``admission.admit_request`` (pure), fed with the shared
highest term and the shared record.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import msgspec
import nats.js.errors
from nats.js.kv import KeyValue

from hafence.contracts import Decoders, FenceRequest, FenceResult
from hafence.fencer.admission import Answer, Refuse, Seen, Verdict, admit_request
from hafence.fencer.locks import KvLocks, Token, kv_key
from hafence.logs import fields

log = logging.getLogger("hafence.fencer")

TERM_KEY = "term"
# Terms learned beyond this are corrupt or hostile (as in the lease).
MAX_TERM = 2**52


class SharedStateError(Exception):
    """The state bucket holds something no fencer wrote: never acted on."""


@dataclass(frozen=True, slots=True)
class Record:
    request_id: str
    incident: str
    host: str
    result: FenceResult | None
    revision: int


def _decode_term(value: bytes | None) -> int:
    try:
        term = json.loads(value or b"{}").get("term")
    except (ValueError, AttributeError):
        raise SharedStateError(f"key {TERM_KEY!r} of the fencer's state bucket is not a term") from None
    if not isinstance(term, int) or not 0 <= term <= MAX_TERM:
        raise SharedStateError(f"key {TERM_KEY!r} of the fencer's state bucket holds {term!r}, not a term")
    return term


def _decode_record(value: bytes | None, revision: int) -> Record:
    try:
        data = json.loads(value or b"{}")
        result = data.get("result")
        return Record(str(data["request_id"]), str(data["incident"]), str(data["host"]),
                      Decoders.fence_result.decode(json.dumps(result)) if result is not None else None, revision)
    except (ValueError, KeyError, TypeError, AttributeError, msgspec.ValidationError) as err:
        raise SharedStateError(f"a request record in the fencer's state bucket does not decode: {err}") from None


class SharedRequests:
    def __init__(self, state: KeyValue, locks: KvLocks) -> None:
        self.state = state
        self.locks = locks

    async def _term(self) -> tuple[int, int]:
        """The shared highest term and its revision (0, 0 if never written)."""
        try:
            entry = await self.state.get(TERM_KEY)
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return 0, 0
        return _decode_term(entry.value), entry.revision or 0

    async def _record(self, request_id: str) -> Record | None:
        try:
            entry = await self.state.get(kv_key("req", request_id))
        except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
            return None
        record = _decode_record(entry.value, entry.revision or 0)
        if record.request_id != request_id:
            raise SharedStateError(f"the record under request {request_id!r}'s key is for {record.request_id!r}")
        return record

    async def _write_term(self, term: int, revision: int) -> bool:
        """Compare-and-set; False if another replica wrote in between."""
        value = json.dumps({"term": term}).encode()
        try:
            if revision:
                await self.state.update(TERM_KEY, value, last=revision)
            else:
                await self.state.create(TERM_KEY, value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def raise_term(self, term: int) -> None:
        """The shared term is at least ``term`` (a replica's journal knew a higher one)."""
        while True:
            highest, revision = await self._term()
            if highest >= term or await self._write_term(term, revision):
                return

    async def admit(self, request: FenceRequest) -> Verdict:
        """S3 and S4 against what every replica wrote. Run means: the request is
        recorded as this incident's and host's, and the shared term is at least its
        term; the caller must still claim it (``claim``) before touching a device."""
        while True:
            highest, term_revision = await self._term()
            record = await self._record(request.request_id)
            seen = None if record is None else Seen(record.incident, record.host, 0, record.result)
            verdict = admit_request(request.request_id, request.incident, request.host, request.term, highest, seen)
            if isinstance(verdict, Refuse):
                return verdict
            # Written even when unchanged: the compare-and-set orders this admission
            # after every term admitted before it was read.
            if not await self._write_term(verdict.highest, term_revision):
                continue
            if record is None and not await self._create_record(request):
                continue  # another replica recorded this id meanwhile: decide again with it
            return verdict

    async def _create_record(self, request: FenceRequest) -> bool:
        value = json.dumps({"request_id": request.request_id, "incident": request.incident,
                            "host": request.host, "term": request.term, "result": None}).encode()
        try:
            await self.state.create(kv_key("req", request.request_id), value)
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        return True

    async def record(self, request: FenceRequest, result: FenceResult) -> None:
        """The result, for any replica a redelivery reaches (written under the claim)."""
        record = await self._record(request.request_id)
        value = json.dumps({"request_id": request.request_id, "incident": request.incident, "host": request.host,
                            "term": request.term, "result": msgspec.to_builtins(result)}).encode()
        key = kv_key("req", request.request_id)
        if record is None:
            await self.state.create(key, value)
        else:
            await self.state.update(key, value, last=record.revision)

    async def acquire_claim(self, request: FenceRequest, highest: int) -> Answer | Token:
        """Claim the request for this replica, waiting while another replica's claim is
        live: the token (the caller holds it, ``locks.hold(key, what, token)``, while it
        runs the request), or the result another replica recorded meanwhile (``Answer``:
        run nothing; no claim is kept)."""
        key = kv_key("req", request.request_id)
        delay, waited = 0.05, False
        while True:
            token = await self.locks.try_acquire(key, f"request {request.request_id}")
            # Read after the claim: a holder records its result before it releases.
            record = await self._record(request.request_id)
            if record is not None and record.result is not None:
                if token is not None:
                    await self.locks.release(token)
                return Answer(record.result, highest)
            if token is not None:
                return token
            if not waited:
                waited = True
                log.warning("request claimed by another fencer replica: waiting for its result or for its claim "
                            "to expire", extra=fields(request_id=request.request_id,
                                                      holder=await self.locks.holder_of(key)))
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.locks.ttl / 8)

    @asynccontextmanager
    async def claim(self, request: FenceRequest, highest: int) -> AsyncIterator[Answer | Token]:
        """``acquire_claim``, held for the block: run the request inside it (a claim not
        renewed in time cancels the block with ``LockLost``)."""
        claim = await self.acquire_claim(request, highest)
        if isinstance(claim, Answer):
            yield claim
            return
        async with self.locks.hold(claim.key, claim.what, claim) as held:
            yield held
