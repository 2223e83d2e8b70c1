"""The node's own SQLite store, the record of truth for its hash set.

WAL mode, one transaction per import batch (all-or-nothing, so a crash mid-way
leaves the store as it was), and a ``generation`` counter bumped in the same
transaction so the in-memory indexes know when to reload.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from node.records import HashRecord, StoredRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS hashes (
    id INTEGER PRIMARY KEY,
    algorithm TEXT NOT NULL,
    digest BLOB NOT NULL,
    reference TEXT NOT NULL,
    category TEXT NOT NULL DEFAULT '',
    victim_identified INTEGER,
    series TEXT NOT NULL DEFAULT '',
    date_added TEXT NOT NULL,
    UNIQUE (algorithm, digest)
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0), ('schema_version', 1);
"""

_COLUMNS = "id, algorithm, digest, reference, category, victim_identified, series, date_added"


@dataclass(frozen=True)
class ImportCounts:
    added: int
    already_present: int


def _flag_in(value: bool | None) -> int | None:
    return None if value is None else int(value)


def _row_to_record(row: Sequence) -> StoredRecord:
    return StoredRecord(
        id=row[0],
        record=HashRecord(
            algorithm=row[1],
            digest=bytes(row[2]),
            reference=row[3],
            category=row[4],
            victim_identified=None if row[5] is None else bool(row[5]),
            series=row[6],
            date_added=row[7],
        ),
    )


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path):
        self._db = db
        self.path = path

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        db = await aiosqlite.connect(path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=10000")
        await db.executescript(SCHEMA)
        return cls(db, path)

    @property
    def connection(self) -> aiosqlite.Connection:
        """For the audit log, which keeps its tables in the same file."""
        return self._db

    async def close(self) -> None:
        await self._db.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generation(self) -> int:
        async with self._db.execute("SELECT value FROM meta WHERE key = 'generation'") as cursor:
            row = await cursor.fetchone()
        return int(row[0])

    async def counts(self) -> dict[str, int]:
        async with self._db.execute(
            "SELECT algorithm, COUNT(*) FROM hashes GROUP BY algorithm ORDER BY algorithm"
        ) as cursor:
            return {algorithm: count async for algorithm, count in cursor}

    async def digests(self, algorithm: str) -> tuple[list[int], list[bytes]]:
        """All (id, digest) pairs of one algorithm, for building an index."""
        async with self._db.execute(
            "SELECT id, digest FROM hashes WHERE algorithm = ?", (algorithm,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [r[0] for r in rows], [bytes(r[1]) for r in rows]

    async def records(self, ids: Iterable[int]) -> dict[int, StoredRecord]:
        """The rows for a batch of hits in one SQL query, never one per digest."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        rows = await self._db.execute_fetchall(
            f"SELECT {_COLUMNS} FROM hashes WHERE id IN (SELECT value FROM json_each(?))",
            (json.dumps(wanted),),
        )
        return {row[0]: _row_to_record(row) for row in rows}

    async def add(self, batches: AsyncIterator[list[HashRecord]] | Iterable[list[HashRecord]]) -> ImportCounts:
        """Adds every batch in one transaction: all of it lands, or none does.

        Rows already present (same algorithm and digest) are left untouched, so
        importing the same file twice changes nothing.
        """
        today = dt.date.today().isoformat()
        offered = 0
        before = self._db.total_changes
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            if hasattr(batches, "__aiter__"):
                async for batch in batches:  # type: ignore[union-attr]
                    offered += await self._insert(batch, today)
            else:
                for batch in batches:  # type: ignore[union-attr]
                    offered += await self._insert(batch, today)
            added = self._db.total_changes - before
            if added:
                await self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise
        return ImportCounts(added=added, already_present=offered - added)

    async def _insert(self, batch: list[HashRecord], today: str) -> int:
        await self._db.executemany(
            "INSERT OR IGNORE INTO hashes (algorithm, digest, reference, category, "
            "victim_identified, series, date_added) VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (r.algorithm, r.digest, r.reference, r.category, _flag_in(r.victim_identified),
                 r.series, r.date_added or today)
                for r in batch
            ],
        )
        return len(batch)
