"""The catalog: which segments are live, what was retracted, and the generation.

It is the file the configuration names as ``store`` (SQLite, WAL). Its
transactions are all short — allocate a segment id, publish finished
segments, swap merged ones in, add tombstones — so a writer holds the lock for
milliseconds, never for the length of an import; readers are never blocked.

A tombstone (algorithm, key, before) hides that key in every segment whose id
is below ``before``: the segments that existed (or were being written) when
it was retracted. A later import of the same hash lands in a newer segment
and is visible again, as it was when retracting deleted a row.

Each segment records when its rows were first published (``born``): pairs
``[first_row_id, generation]``, row ``r`` being born at the generation of the
last pair whose first row is ``<= r``. A new segment's rows are all born at
the generation its publication creates; a merged segment carries its inputs'
births over, so a merge never makes old rows new to a ``Match`` restricted to
rows published after a generation (PROTOCOL.md, "Match since a generation").
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from node import db as sqlite_setup

SCHEMA_VERSION = 3
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS segments (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('building', 'published', 'retired')),
    rows INTEGER NOT NULL DEFAULT 0,
    counts TEXT NOT NULL DEFAULT '{{}}',
    files TEXT NOT NULL DEFAULT '{{}}',
    created TEXT NOT NULL,
    born TEXT NOT NULL DEFAULT '[]'
);
CREATE TABLE IF NOT EXISTS tombstones (
    algorithm TEXT NOT NULL,
    key BLOB NOT NULL,
    before INTEGER NOT NULL,
    PRIMARY KEY (algorithm, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0), ('schema_version', {SCHEMA_VERSION});
"""
# Schema 2 recorded no births: its published rows are taken as born at the generation the
# store had when it was opened by this version (a restricted Match may see them once more,
# never miss them).
UPGRADE_TO_3 = f"""
ALTER TABLE segments ADD COLUMN born TEXT NOT NULL DEFAULT '[]';
UPDATE segments SET born = json_array(json_array(1, (SELECT value FROM meta WHERE key = 'generation')))
    WHERE state = 'published';
UPDATE meta SET value = {SCHEMA_VERSION} WHERE key = 'schema_version';
"""
Births = tuple[tuple[int, int], ...]  # ((first_row_id, generation), ...), first rows increasing


@dataclass(frozen=True)
class SegmentEntry:
    segment_id: int
    rows: int
    counts: dict[str, int]
    files: dict[str, str]
    # When the rows were first published; empty in an entry to publish: born now.
    born: Births = ()


@dataclass(frozen=True)
class Tombstone:
    algorithm: str
    key: bytes
    before: int


@dataclass(frozen=True)
class Snapshot:
    """What was live at one generation, read in one transaction."""

    generation: int
    segments: tuple[SegmentEntry, ...]
    tombstones: tuple[Tombstone, ...]


async def _upgrade(db: aiosqlite.Connection) -> None:
    """Schema 2 -> 3 (births), once, in one transaction (another process may be doing it too)."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        columns = [row[1] for row in await db.execute_fetchall("PRAGMA table_info(segments)")]
        if columns and "born" not in columns:
            for statement in filter(None, (part.strip() for part in UPGRADE_TO_3.split(";"))):
                await db.execute(statement)
    except BaseException:
        await db.execute("ROLLBACK")
        raise
    await db.execute("COMMIT")


class Catalog:
    def __init__(self, db: aiosqlite.Connection, path: Path):
        self._db = db
        self.path = path
        self._transaction = asyncio.Lock()  # one transaction at a time on this connection

    @classmethod
    async def open(cls, path: Path) -> Catalog:
        db = await sqlite_setup.connect(path)
        try:
            legacy = await db.execute_fetchall("SELECT 1 FROM sqlite_master WHERE name = 'hashes'")
            if legacy:
                raise ValueError(f"{path}: a store of the single-table format (schema 1); export it with the "
                                 "previous version (icse-node export) and import the file into a new store")
            await _upgrade(db)
            await db.executescript(SCHEMA)
        except BaseException:
            await db.close()
            raise
        return cls(db, path)

    async def close(self) -> None:
        await self._db.close()

    async def generation(self) -> int:
        """One indexed read: what a query pays to learn whether anything changed."""
        async with self._db.execute("SELECT value FROM meta WHERE key = 'generation'") as cursor:
            row = await cursor.fetchone()
        if row is None:  # the schema inserts it: only a damaged catalog lacks it
            raise sqlite3.DatabaseError("catalog has no generation (meta row 'generation' is missing)")
        return int(row[0])

    async def snapshot(self) -> Snapshot:
        async with self._transaction:
            await self._db.execute("BEGIN")  # one read transaction: one consistent view
            try:
                generation = await self.generation()
                segments = tuple(
                    SegmentEntry(row[0], row[1], json.loads(row[2]), json.loads(row[3]),
                                 tuple((int(first), int(born)) for first, born in json.loads(row[4])))
                    for row in await self._db.execute_fetchall(
                        "SELECT id, rows, counts, files, born FROM segments WHERE state = 'published' ORDER BY id"))
                tombstones = tuple(Tombstone(a, bytes(k), b) for a, k, b in await self._db.execute_fetchall(
                    "SELECT algorithm, key, before FROM tombstones"))
            finally:
                await self._db.execute("COMMIT")
        return Snapshot(generation, segments, tombstones)

    async def segment_ids(self, state: str) -> list[int]:
        return [row[0] for row in await self._db.execute_fetchall(
            "SELECT id FROM segments WHERE state = ? ORDER BY id", (state,))]

    async def allocate(self) -> int:
        """A new segment id, recorded as being written (so retractions made meanwhile cover it)."""
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        async with self._write():
            cursor = await self._db.execute(
                "INSERT INTO segments (state, created) VALUES ('building', ?)", (created,))
            if cursor.lastrowid is None:  # an INSERT that succeeded always sets it
                raise sqlite3.DatabaseError("catalog did not number the new segment")
            return cursor.lastrowid

    async def publish(self, written: Sequence[SegmentEntry], retire: Iterable[int] = ()) -> None:
        """Makes finished segments live, and retires merged ones, in one transaction.

        An entry without births is new: its rows are born at the generation this
        publication creates."""
        retire = list(retire)
        async with self._write():
            now = await self.generation() + 1
            for entry in written:
                born = entry.born or ((1, now),)
                await self._db.execute(
                    "UPDATE segments SET state = 'published', rows = ?, counts = ?, files = ?, born = ? WHERE id = ?",
                    (entry.rows, json.dumps(entry.counts), json.dumps(entry.files),
                     json.dumps([list(pair) for pair in born]), entry.segment_id))
            await self._db.executemany("UPDATE segments SET state = 'retired' WHERE id = ?",
                                       [(i,) for i in retire])
            # A tombstone below every live segment hides nothing any more.
            await self._db.execute(
                "DELETE FROM tombstones WHERE before <= (SELECT COALESCE(MIN(id), 1 << 62) FROM segments "
                "WHERE state IN ('published', 'building'))")
            await self._bump()

    async def set_files(self, segment_id: int, files: dict[str, str]) -> bool:
        """Replaces a published segment's file list (OPRF outputs added or dropped by the
        serving node); False, changing nothing, if the segment is no longer published."""
        async with self._write():
            cursor = await self._db.execute("UPDATE segments SET files = ? WHERE id = ? AND state = 'published'",
                                            (json.dumps(files), segment_id))
            if cursor.rowcount != 1:
                return False
            await self._bump()
        return True

    async def forget(self, segment_ids: Iterable[int]) -> None:
        """Drops the records of abandoned or retired segments (their directories are gone)."""
        async with self._write():
            await self._db.executemany("DELETE FROM segments WHERE id = ? AND state != 'published'",
                                       [(i,) for i in segment_ids])

    async def retract(self, keys: Sequence[tuple[str, bytes]]) -> None:
        """Hides these keys in every segment there is now (or is being written)."""
        if not keys:
            return
        async with self._write():
            async with self._db.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM segments") as cursor:
                row = await cursor.fetchone()
            if row is None:  # an aggregate always gives one row
                raise sqlite3.DatabaseError("catalog gave no next segment id")
            before = row[0]
            await self._db.executemany(
                "INSERT INTO tombstones (algorithm, key, before) VALUES (?, ?, ?) "
                "ON CONFLICT (algorithm, key) DO UPDATE SET before = excluded.before",
                [(a, k, before) for a, k in keys])
            await self._bump()

    async def _bump(self) -> None:
        await self._db.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE .. COMMIT, rolled back on any error."""
        async with self._transaction:
            await self._db.execute("BEGIN IMMEDIATE")
            try:
                yield
            except BaseException:
                await self._db.execute("ROLLBACK")
                raise
            await self._db.execute("COMMIT")
