"""The scheduler's SQLite start history: records under way at once never share a
transaction (a durable wave record must not be committed under a results write's
``synchronous=NORMAL``, nor rolled back by its failure)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hafence.scheduler.ports import SqliteStartHistory


async def test_concurrent_records_are_serialised_each_in_its_own_transaction(tmp_path: Path) -> None:
    store = await SqliteStartHistory.open(tmp_path / "scheduler.db")
    statements: list[str] = []
    try:
        await store.db.set_trace_callback(statements.append)
        results = [("vm-a", "inc-1", "h2", "started", "", 1.0)]
        wave = [("vm-b", "inc-2", "h3", "sending", "", 2.0)]
        # As the driver runs them: two Call tasks started in the same turn of the loop.
        await asyncio.gather(store.record(results, durable=False), store.record(wave, durable=True))
        await store.db.set_trace_callback(None)
        relaxed = statements.index("PRAGMA synchronous=NORMAL")
        restored = statements.index("PRAGMA synchronous=FULL")
        inside = statements[relaxed:restored]
        assert not any("vm-b" in s for s in inside), statements
        assert sum(1 for s in statements if s.upper().startswith("COMMIT")) == 2, statements
        history = await store.load(["inc-1", "inc-2"])
        assert history == {"inc-1": {"vm-a": [("h2", "started")]}, "inc-2": {"vm-b": [("h3", "sending")]}}
    finally:
        await store.close()
