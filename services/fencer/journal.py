"""The fence journal: what every request asked for and what came of it.

Written before a result is published, so a redelivered request gets the
recorded result instead of a second fence (S4), and the highest leader term
ever seen survives restarts (S3). Never holds a credential: evidence is
device names, commands and power readings.
"""

from __future__ import annotations

import time

import aiosqlite
import msgspec

from hafence.contracts import Decoders, FenceRequest, FenceResult
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

    @classmethod
    async def open(cls, path: str) -> FenceJournal:
        return cls(await open_store(path, MIGRATIONS))

    async def close(self) -> None:
        await self.db.close()

    async def recorded(self, request_id: str) -> FenceResult | None:
        async with self.db.execute("SELECT result FROM requests WHERE request_id = ?", (request_id,)) as cur:
            row = await cur.fetchone()
        return Decoders.fence_result.decode(row[0]) if row and row[0] is not None else None

    async def highest_term(self) -> int:
        async with self.db.execute("SELECT term FROM highest_term WHERE id = 1") as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def admit(self, request: FenceRequest) -> int:
        """Record the request and raise the highest term. Returns how many times
        this request has been started (more than 1: a fencer died mid-request)."""
        await self.db.execute(
            "UPDATE highest_term SET term = MAX(term, ?) WHERE id = 1", (request.term,)
        )
        await self.db.execute(
            """INSERT INTO requests (request_id, host, incident, term, action, received_at)
               VALUES (?, ?, ?, ?, ?, ?)
               ON CONFLICT (request_id) DO UPDATE SET attempts = attempts + 1""",
            (request.request_id, request.host, request.incident, request.term, request.action, time.time()),
        )
        await self.db.commit()
        async with self.db.execute(
            "SELECT attempts FROM requests WHERE request_id = ?", (request.request_id,)
        ) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 1

    async def record_refusal(self, request: FenceRequest, reason: str) -> None:
        await self.db.execute(
            "INSERT INTO refusals (request_id, host, term, reason, at) VALUES (?, ?, ?, ?, ?)",
            (request.request_id, request.host, request.term, reason, time.time()),
        )
        await self.db.commit()

    async def record(self, request: FenceRequest, result: FenceResult) -> None:
        await self.db.execute(
            """INSERT INTO requests (request_id, host, incident, term, action, received_at,
                                     finished_at, outcome, result)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT (request_id) DO UPDATE SET
                   finished_at = excluded.finished_at, outcome = excluded.outcome, result = excluded.result""",
            (request.request_id, request.host, request.incident, request.term, request.action,
             time.time(), result.finished_at, result.outcome, msgspec.json.encode(result)),
        )
        await self.db.commit()
