"""Each service's own SQLite database: WAL, numbered schema migrations.

Migrations are a list of SQL scripts; ``PRAGMA user_version`` records how many
have been applied, so opening an old database brings it up to date and opening
a current one changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import aiosqlite


class StoreError(Exception):
    pass


async def open_store(path: str | Path, migrations: Sequence[str]) -> aiosqlite.Connection:
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreError(f"cannot create the directory of database {p}: {err.strerror}") from None
    db = await aiosqlite.connect(p)
    try:
        await db.execute("PRAGMA journal_mode=WAL")
        # FULL: a fence outcome that was reported must survive a power cut of our own.
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA foreign_keys=ON")
        async with db.execute("PRAGMA user_version") as cur:
            row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > len(migrations):
            raise StoreError(
                f"database {p} has schema version {version}, newer than this hafence "
                f"knows ({len(migrations)}): refusing to run an older release on it"
            )
        for number, script in enumerate(migrations[version:], start=version + 1):
            await db.executescript(f"BEGIN;\n{script}\nPRAGMA user_version={number};\nCOMMIT;")
        db.row_factory = aiosqlite.Row
    except BaseException:
        await db.close()
        raise
    return db


async def write_many(
    db: aiosqlite.Connection, sql: str, rows: Iterable[Sequence[object]], *, durable: bool = True
) -> None:
    """Run one statement for many rows in one transaction: one commit, and so one
    fsync of the WAL, however many rows.

    ``durable=False`` commits with ``synchronous=NORMAL`` (the connection is put back
    to FULL afterwards): the rows survive a crash of the process but may be lost
    in a power cut of this machine until the next durable commit or checkpoint.
    Only for records whose loss costs a retry, never a wrong decision."""
    if not durable:
        await db.execute("PRAGMA synchronous=NORMAL")
    try:
        await db.executemany(sql, rows)
        await db.commit()
    except BaseException:
        try:
            await db.rollback()
        except Exception:  # the first error is the one to report
            pass
        raise
    finally:
        if not durable:
            await db.execute("PRAGMA synchronous=FULL")
