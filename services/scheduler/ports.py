"""The scheduler's store port: its start history (which host it asked to start
which VM, for which incident, and what came of it).

The core reaches it only through ``Call("store", op, args, tag)``:

* ``load(incidents) -> {incident: {vm: [(target, state), ...]}}``, oldest first:
  the history of the incidents it is about to act on (after a restart, the table
  is the truth about what was sent);
* ``record(rows, durable)``: upsert ``(vm, incident, target, state, error, at)``
  rows in one transaction. ``durable=True`` (a wave's "sending" records, written
  before any of its commands leaves) commits with ``synchronous=FULL``: the record
  must outlive a power cut of this machine, since the command it stands for may
  already have reached the agent. Results are written ``durable=False``: losing
  one costs a question asked again, never a wrong decision.

Two bindings: ``SqliteStartHistory`` (production, aiosqlite, the service's own
database) and ``MemoryStartHistory`` (unit tests and the simulation, where it
survives a crash of the service and is lost only with its node's disk).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import aiosqlite

from hafence.store import open_store, write_many

# (vm, incident, target, state, error, at): state is sending, started, failed, or withdrawn
# (its `placed` lost the compare-and-set: no command was sent).
StartRow = tuple[str, str, str, str, str, float]
History = dict[str, dict[str, list[tuple[str, str]]]]

MIGRATIONS = [
    """
    CREATE TABLE starts (
        vm TEXT NOT NULL,
        incident TEXT NOT NULL,
        target TEXT NOT NULL,
        state TEXT NOT NULL,          -- sending, started, failed
        error TEXT NOT NULL DEFAULT '',
        at REAL NOT NULL,
        PRIMARY KEY (vm, incident, target)
    );
    """,
    # A wave reads the history of its incidents in one query each.
    "CREATE INDEX starts_by_incident ON starts (incident, at);",
]
RECORD_START = """INSERT INTO starts (vm, incident, target, state, error, at) VALUES (?, ?, ?, ?, ?, ?)
    ON CONFLICT (vm, incident, target) DO UPDATE SET state = excluded.state, error = excluded.error, at = excluded.at"""


class StartHistory(Protocol):
    """What the core calls; a binding's methods may be async (production) or plain (memory)."""

    def load(self, incidents: Sequence[str]) -> object: ...

    def record(self, rows: Sequence[StartRow], durable: bool) -> object: ...


class SqliteStartHistory:
    """The driver runs each ``Call`` as a task of its own, so two records (a wave's
    durable "sending" rows and an earlier wave's results) can be under way at once on
    the one connection. Unserialised, they share a transaction: the results'
    ``synchronous=NORMAL`` would commit the durable rows without a full sync, and one
    write's rollback would take the other's rows with it. One operation at a time."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path) -> SqliteStartHistory:
        return cls(await open_store(path, MIGRATIONS))

    async def load(self, incidents: Sequence[str]) -> History:
        async with self._lock:  # never reads a write's rows before its commit
            return await self._load(incidents)

    async def _load(self, incidents: Sequence[str]) -> History:
        out: History = {}
        for incident in incidents:
            runs: dict[str, list[tuple[str, str]]] = {}
            async with self.db.execute("SELECT vm, target, state FROM starts WHERE incident = ? ORDER BY at",
                                       (incident,)) as cur:
                for vm, target, status in await cur.fetchall():
                    runs.setdefault(vm, []).append((target, status))
            out[incident] = runs
        return out

    async def record(self, rows: Sequence[StartRow], durable: bool) -> None:
        async with self._lock:
            await write_many(self.db, RECORD_START, rows, durable=durable)

    async def close(self) -> None:
        await self.db.close()


class MemoryStartHistory:
    """The same table in a dict: an upserted row moves to the end, as its ``at`` does."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, str], StartRow] = {}
        # Each record() call, in order (tests read what was written when).
        self.writes: list[tuple[list[StartRow], bool]] = []

    def load(self, incidents: Sequence[str]) -> History:
        out: History = {incident: {} for incident in incidents}
        for vm, incident, target, status, _, _ in sorted(self.rows.values(), key=lambda r: r[5]):
            if incident in out:
                out[incident].setdefault(vm, []).append((target, status))
        return out

    def record(self, rows: Sequence[StartRow], durable: bool) -> None:
        self.writes.append((list(rows), durable))
        for row in rows:
            key = (row[0], row[1], row[2])
            self.rows.pop(key, None)
            self.rows[key] = row
