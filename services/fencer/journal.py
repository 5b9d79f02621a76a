"""The fence journal: what every request asked for and what came of it.

Written before a result is published, so a redelivered request gets the
recorded result instead of a second fence (S4), and the highest leader term
ever seen survives restarts (S3). Never holds a credential: evidence is
device names, commands and power readings.

This is the production binding of the fencer core's ``journal`` port
(``hafence.fencer.ports.JournalPort``): the core loads the whole journal once
(``load``), decides every admission against it in memory
(``admission.admit_request``) and writes each decision here (``admit``) before
it acts on it. The journal's own lock keeps the writes of requests of other
hosts from interleaving their statements on the one connection; a term is only
ever raised (``MAX``), whatever order the writes of two hosts arrive in.
"""

from __future__ import annotations

import asyncio

import aiosqlite
import msgspec

from hafence.contracts import Decoders, FenceRequest, FenceResult
from hafence.fencer.admission import Refuse, Run, Seen, Verdict
from hafence.fencer.ports import JournalState
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

    async def load(self) -> JournalState:
        """The highest term and every request seen, as the core holds them."""
        async with self._lock:
            highest = await self.highest_term()
            requests: dict[str, Seen] = {}
            async with self.db.execute("SELECT request_id, incident, host, attempts, result FROM requests") as cur:
                async for row in cur:
                    result = Decoders.fence_result.decode(row[4]) if row[4] is not None else None
                    requests[row[0]] = Seen(incident=row[1], host=row[2], attempts=int(row[3]), result=result)
        return JournalState(highest, requests)

    async def admit(self, request: FenceRequest, verdict: Verdict, at: float) -> None:
        """Write an admission the core decided, in one transaction: a refusal is kept;
        otherwise the term is raised, and a request to run is recorded with its attempt."""
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                if isinstance(verdict, Refuse):
                    await self.db.execute(
                        "INSERT INTO refusals (request_id, host, term, reason, at) VALUES (?, ?, ?, ?, ?)",
                        (request.request_id, request.host, request.term, verdict.reason, at),
                    )
                else:
                    await self.db.execute("UPDATE highest_term SET term = MAX(term, ?) WHERE id = 1",
                                          (verdict.highest,))
                if isinstance(verdict, Run):
                    await self.db.execute(
                        """INSERT INTO requests (request_id, host, incident, term, action, received_at, attempts)
                           VALUES (?, ?, ?, ?, ?, ?, ?)
                           ON CONFLICT (request_id) DO UPDATE SET attempts = excluded.attempts
                           WHERE requests.result IS NULL""",
                        (request.request_id, request.host, request.incident, request.term, request.action, at,
                         verdict.attempts),
                    )
                await self.db.commit()
            except BaseException:
                await self.db.rollback()
                raise

    async def record(self, request: FenceRequest, result: FenceResult) -> None:
        async with self._lock:
            await self.db.execute(
                """UPDATE requests SET finished_at = ?, outcome = ?, result = ?
                   WHERE request_id = ? AND incident = ? AND host = ?""",
                (result.finished_at, result.outcome, msgspec.json.encode(result),
                 request.request_id, request.incident, request.host),
            )
            await self.db.commit()
