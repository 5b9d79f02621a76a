"""The fence journal: what every request asked for and what came of it.

Written before a result is published, so a redelivered request gets the
recorded result instead of a second fence (S4), and the highest leader term
ever seen survives restarts (S3). Never holds a credential: evidence is
device names, commands and power readings.

``admit`` is one transaction: read the highest term and the request's entry,
decide (``admission.admit_request``), raise the term and record the request or
the refusal. It is called under the host's lock, and the journal's own lock
keeps the coroutines of other hosts from interleaving their statements on the
one connection: otherwise a term N request could read the highest term before
a term N+1 request raised it, and run after it (S3).
"""

from __future__ import annotations

import asyncio
import time

import aiosqlite
import msgspec

from hafence.contracts import Decoders, FenceRequest, FenceResult
from hafence.fencer.admission import Refuse, Seen, Verdict, admit_request
from hafence.store import open_store

MIGRATIONS = [
    """
    CREATE TABLE requests (
        request_id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        incident TEXT NOT NULL,
        term INTEGER NOT NULL,
        action TEXT NOT NULL,
        received_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 1,
        finished_at REAL,
        outcome TEXT,
        result BLOB
    );
    CREATE TABLE highest_term (id INTEGER PRIMARY KEY CHECK (id = 1), term INTEGER NOT NULL);
    INSERT INTO highest_term (id, term) VALUES (1, 0);
    """,
    """
    CREATE TABLE refusals (
        request_id TEXT NOT NULL,
        host TEXT NOT NULL,
        term INTEGER NOT NULL,
        reason TEXT NOT NULL,
        at REAL NOT NULL
    );
    """,
]



class FenceJournal:
    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str) -> FenceJournal:
        return cls(await open_store(path, MIGRATIONS))

    async def close(self) -> None:
        await self.db.close()

    async def highest_term(self) -> int:
        async with self.db.execute("SELECT term FROM highest_term WHERE id = 1") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def _seen(self, request_id: str) -> Seen | None:
        async with self.db.execute(
            "SELECT incident, host, attempts, result FROM requests WHERE request_id = ?", (request_id,)
        ) as cur:
            row = await cur.fetchone()
        if row is None:
            return None
        result = Decoders.fence_result.decode(row[3]) if row[3] is not None else None
        return Seen(incident=row[0], host=row[1], attempts=int(row[2]), result=result)

    async def admit(self, request: FenceRequest) -> Verdict:
        """Check the term, raise it, and check and record the request, atomically."""
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                highest = await self.highest_term()
                seen = await self._seen(request.request_id)
                verdict = admit_request(request.request_id, request.incident, request.host, request.term,
                                        highest, seen)
                if isinstance(verdict, Refuse):
                    await self.db.execute(
                        "INSERT INTO refusals (request_id, host, term, reason, at) VALUES (?, ?, ?, ?, ?)",
                        (request.request_id, request.host, request.term, verdict.reason, time.time()),
                    )
                else:
                    await self.db.execute("UPDATE highest_term SET term = ? WHERE id = 1", (verdict.highest,))
                    if seen is None:
                        await self.db.execute(
                            """INSERT INTO requests (request_id, host, incident, term, action, received_at)
                               VALUES (?, ?, ?, ?, ?, ?)""",
                            (request.request_id, request.host, request.incident, request.term, request.action,
                             time.time()),
                        )
                    elif seen.result is None:
                        await self.db.execute(
                            "UPDATE requests SET attempts = attempts + 1 WHERE request_id = ?", (request.request_id,)
                        )
                await self.db.commit()
            except BaseException:
                await self.db.rollback()
                raise
        return verdict

    async def record(self, request: FenceRequest, result: FenceResult) -> None:
        async with self._lock:
            await self.db.execute(
                """UPDATE requests SET finished_at = ?, outcome = ?, result = ?
                   WHERE request_id = ? AND incident = ? AND host = ?""",
                (result.finished_at, result.outcome, msgspec.json.encode(result),
                 request.request_id, request.incident, request.host),
            )
            await self.db.commit()
