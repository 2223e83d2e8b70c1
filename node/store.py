"""The node's own SQLite store, the record of truth for its hash set.

WAL mode, one transaction per import batch (all-or-nothing, so a crash mid-way
leaves the store as it was), and a ``generation`` counter bumped in the same
transaction so the in-memory indexes know when to reload.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import aiosqlite

from node.private_files import make_private
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

# (algorithm, digest, reference, category, victim_identified, series, date_added): HashRecord's order.
Row = tuple
T = TypeVar("T")
_INSERT = (
    "INSERT OR IGNORE INTO hashes (algorithm, digest, reference, category, victim_identified, series, "
    "date_added) VALUES (?, ?, ?, ?, ?, ?, COALESCE(NULLIF(?, ''), date('now', 'localtime')))"
)
_DIGEST = operator.itemgetter(1)

_COLUMNS = "id, algorithm, digest, reference, category, victim_identified, series, date_added"


@dataclass(frozen=True)
class ImportCounts:
    added: int
    already_present: int


@dataclass(frozen=True)
class RemoveCounts:
    removed: int
    not_present: int


@dataclass(frozen=True)
class ReferenceRemoval:
    removed: int  # rows
    references_found: int
    references_missing: tuple[str, ...]


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


@dataclass
class _Changes:
    """Rows a write transaction changed; known once its block has run."""

    before: int
    count: int = 0


class Store:
    def __init__(self, db: aiosqlite.Connection, path: Path):
        self._db = db
        self.path = path

    @classmethod
    async def open(cls, path: Path) -> Store:
        path.parent.mkdir(parents=True, exist_ok=True)
        make_private(path)  # 0600 for the database, and so for its -wal and -shm
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
        async def rows() -> AsyncIterator[list[Row]]:
            async for batch in _aiter(batches):
                yield [(r.algorithm, r.digest, r.reference, r.category, r.victim_identified, r.series,
                        r.date_added) for r in batch]

        return await self.add_rows(rows())

    async def add_rows(self, batches: AsyncIterator[list[Row]] | Iterable[list[Row]]) -> ImportCounts:
        """``add`` for rows as tuples in ``HashRecord`` field order (the importer's fast path).

        One transaction. Each batch is inserted in index order (algorithm, digest),
        on the database thread while the next batch is being parsed (SQLite
        releases the GIL while it steps). An empty ``date_added`` is today.
        """
        offered = 0
        pending: asyncio.Future[int] | None = None
        async with self._changing() as changes:
            try:
                async for batch in _aiter(batches):
                    batch = _in_index_order(batch)
                    if pending is not None:
                        offered += await pending
                    pending = asyncio.ensure_future(self._insert_rows(batch))
                    await asyncio.sleep(0)  # hands the batch to the database thread before parsing on
                if pending is not None:
                    offered += await pending
                    pending = None
            except BaseException:
                await self._settle(pending)
                raise
        added = changes.count
        return ImportCounts(added=added, already_present=offered - added)

    @contextlib.asynccontextmanager
    async def _changing(self) -> AsyncIterator[_Changes]:
        """One write transaction, all or nothing, that moves the generation
        (in the same transaction) when it changed any row."""
        changes = _Changes(self._db.total_changes)
        await self._db.execute("BEGIN IMMEDIATE")
        try:
            yield changes
            changes.count = self._db.total_changes - changes.before
            if changes.count:
                await self._bump_generation()
            await self._db.execute("COMMIT")
        except BaseException:
            await self._db.execute("ROLLBACK")
            raise

    async def _insert_rows(self, batch: list[Row]) -> int:
        await self._db.executemany(_INSERT, batch)
        return len(batch)

    @staticmethod
    async def _settle(pending: asyncio.Future[int] | None) -> None:
        """Waits for an insert still running before rolling back (its error, if any, is moot)."""
        if pending is not None:
            with contextlib.suppress(BaseException):
                await pending

    async def _bump_generation(self) -> None:
        await self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    async def remove(self, batches: AsyncIterator[list[tuple[str, bytes]]] | Iterable[list[tuple[str, bytes]]]
                     ) -> RemoveCounts:
        """Removes the rows with these (algorithm, digest) pairs, in one transaction.

        Bumps the generation when anything was removed, so a running node stops
        matching them on its next query.
        """
        offered = 0
        async with self._changing() as changes:
            async for batch in _aiter(batches):
                await self._db.executemany("DELETE FROM hashes WHERE algorithm = ? AND digest = ?", batch)
                offered += len(batch)
        removed = changes.count
        return RemoveCounts(removed=removed, not_present=offered - removed)

    async def remove_references(self, references: Iterable[str]) -> ReferenceRemoval:
        """Removes every row holding one of these references, in one transaction."""
        wanted = json.dumps(sorted(set(references)))
        async with self._changing() as changes:
            found = {row[0] for row in await self._db.execute_fetchall(
                "SELECT DISTINCT reference FROM hashes WHERE reference IN (SELECT value FROM json_each(?))",
                (wanted,),
            )}
            await self._db.execute(
                "DELETE FROM hashes WHERE reference IN (SELECT value FROM json_each(?))", (wanted,))
        removed = changes.count
        missing = tuple(r for r in json.loads(wanted) if r not in found)
        return ReferenceRemoval(removed=removed, references_found=len(found), references_missing=missing)

    async def iter_rows(self, *, by_reference: bool = False, chunk: int = 5000
                        ) -> AsyncGenerator[list[Row], None]:
        """Every row, in chunks, streamed from one consistent snapshot (one SELECT).

        In insertion order, or grouped by reference and metadata (for writers that
        gather an item's hashes); never the whole set in memory.
        """
        order = "reference, category, victim_identified, series, date_added, id" if by_reference else "id"
        async with self._db.execute(
            f"SELECT algorithm, digest, reference, category, victim_identified, series, date_added "
            f"FROM hashes ORDER BY {order}"
        ) as cursor:
            while rows := await cursor.fetchmany(chunk):
                yield [(r[0], bytes(r[1]), r[2], r[3], None if r[4] is None else bool(r[4]), r[5], r[6])
                       for r in rows]


def _in_index_order(batch: list[Row]) -> list[Row]:
    """The batch sorted by (algorithm, digest), the UNIQUE index's order: inserting in
    index order touches each B-tree page once per batch instead of at random (about
    1.5x faster inserts than file order for random digests). Buckets by algorithm,
    then sorts each by digest: cheaper than a tuple key."""
    buckets: dict[str, list[Row]] = {}
    for row in batch:
        bucket = buckets.get(row[0])
        if bucket is None:
            bucket = buckets[row[0]] = []
        bucket.append(row)
    ordered: list[Row] = []
    for name in sorted(buckets):
        bucket = buckets[name]
        bucket.sort(key=_DIGEST)
        ordered += bucket
    return ordered


async def _aiter(batches: AsyncIterator[T] | Iterable[T]) -> AsyncIterator[T]:
    if hasattr(batches, "__aiter__"):
        async for batch in batches:  # type: ignore[union-attr]
            yield batch
    else:
        for batch in batches:  # type: ignore[union-attr]
            yield batch
