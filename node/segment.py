"""Immutable segments: a batch of rows and its indexes, written once, then only read.

A segment is a directory ``seg-NNNNNNNN`` next to the catalog holding

- ``rows.sqlite``: the rows' metadata, one plain table in row-id order with
  no secondary index (appending to it never slows down with size);
- ``<algorithm>.<array>.npy``: that algorithm's index arrays (node.segment_index),
  each written to a temporary name, fsynced, renamed, with its checksum
  (XXH3-128) recorded in the catalog when the segment is published;
- ``<algorithm>.private-<key id>.<array>.npy``: for exact algorithms, when the
  node has OPRF keys, the rows' OPRF outputs under each key (node.private_arrays),
  written with the segment, or later by the serving node (node.private_builder).

A reader maps the arrays (``np.load(mmap_mode="r")``): a restart costs the
page cache, not a rebuild. Each file's checksum is verified when a segment is
mapped; a mismatch raises ``SegmentCorrupt`` naming the file. The checksum
guards against damage (a torn write, a truncated copy, bit rot), not against
someone who can write the store (they could rewrite the catalog too): XXH3
reads a mapped file at memory speed (>10 GB/s a core, about 8x SHA-256), so
checking 10 M + 10 M hashes' arrays costs a fraction of a second at start. While a segment
is being written its directory holds ``lock``, locked (flock) by the writing
process: a directory whose lock is free belongs to a writer that died.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import mmap
import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash

from federation import algorithms
from federation.algorithms import Algorithm, MatchKind
from node import db as sqlite_setup, private_arrays, segment_index
from node.index import ExactIndex, Index
from node.private_files import make_private_directory, open_private, open_private_append

Row = tuple  # (algorithm, digest, reference, category, victim_identified, series, date_added)
ROWS_FILE = "rows.sqlite"
LOCK_FILE = "lock"
ROWS_MMAP_BYTES = 1 << 31  # SQLite's default ceiling (SQLITE_MAX_MMAP_SIZE); a 2 M-row file is ~300 MB
ROW_COLUMNS = "algorithm, digest, reference, category, victim_identified, series, date_added"
# What a hit releases of its row (``node.hits``): not its algorithm and digest, which the request has
# (5,000 hits' rows read this way take about a fifth less than whole rows: no 32-byte blob each).
HIT_COLUMNS = "reference, category, victim_identified, series, date_added"
_SCHEMA = """CREATE TABLE rows (id INTEGER PRIMARY KEY, algorithm TEXT NOT NULL, digest BLOB NOT NULL,
    reference TEXT NOT NULL, category TEXT NOT NULL, victim_identified INTEGER, series TEXT NOT NULL,
    date_added TEXT NOT NULL)"""


@dataclass(frozen=True)
class Shape:
    """Which fields of a row (``HashRecord`` order) the tuples of a batch hold; every
    other field has one value for the whole batch (``same``: (field, value) pairs).
    Binding values is most of what appending a row costs, so a parser that knows a
    column is constant over a batch (one category, no dates...) leaves it out."""

    fields: tuple[int, ...]
    same: tuple[tuple[int, object], ...] = ()

    def expand(self, row: tuple) -> Row:
        """The whole row (tests, and readers of a batch that need every field)."""
        full: list[object] = [None] * 7
        for position, value in zip(self.fields, row, strict=True):
            full[position] = value
        for position, value in self.same:
            full[position] = value
        return tuple(full)


FULL = Shape(tuple(range(7)))


class SegmentCorrupt(Exception):
    """A segment file is missing or does not match its recorded checksum."""


def segments_root(store: Path) -> Path:
    return store.with_name(store.name + ".segments")


def directory_of(root: Path, segment_id: int) -> Path:
    return root / f"seg-{segment_id:08d}"


def _fsync_path(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


CHECKSUM = "xxh3-128"


def checksum(path: Path) -> str:
    """``xxh3-128:hex`` of the file's bytes, hashed from a read-only mapping (no copy)."""
    with path.open("rb") as handle:
        if not os.fstat(handle.fileno()).st_size:
            return f"{CHECKSUM}:{xxhash.xxh3_128(b'').hexdigest()}"
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return f"{CHECKSUM}:{xxhash.xxh3_128(data).hexdigest()}"


def save_array(directory: Path, name: str, array: np.ndarray) -> str:
    """Writes one array atomically (temporary file, fsync, rename); its checksum."""
    final, temporary = directory / name, directory / f".{name}.tmp"
    with open_private(temporary) as handle:
        np.save(handle, np.ascontiguousarray(array), allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, final)
    return checksum(final)


def lock_is_free(directory: Path) -> bool:
    """Whether no live process is writing this segment (its lock can be taken)."""
    try:
        with open_private_append(directory / LOCK_FILE) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            return True
    except FileNotFoundError:
        return True


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class Written:
    """A finished segment, ready to publish."""

    segment_id: int
    rows: int
    counts: dict[str, int]
    files: dict[str, str]  # file name -> checksum ("xxh3-128:hex")
    # When its rows were first published (node.catalog), set by a merge; empty: born at publication.
    born: tuple[tuple[int, int], ...] = ()


class SegmentWriter:
    """Writes one new segment. ``add`` streams rows in (deduplicated by the caller
    against other segments); ``finish`` drops repeats within the segment, builds
    each algorithm's index in bulk from sorted arrays and writes the files."""

    def __init__(self, directory: Path, segment_id: int, private: dict[str, bytes] | None = None):
        self.directory = directory
        self.segment_id = segment_id
        # OPRF keys (by key id) whose outputs the segment gets; outputs already known (a merge's).
        self._private = dict(private or {})
        self._known: dict[tuple[str, str], list[tuple[np.ndarray, np.ndarray]]] = {}
        make_private_directory(directory.parent)
        directory.mkdir(mode=0o700)  # every file of the segment is 0600 too
        self._lock = open_private(directory / LOCK_FILE, "w")
        fcntl.flock(self._lock, fcntl.LOCK_EX)
        # Written once before anyone reads it, fsynced at the end: no journal needed.
        self._db = sqlite_setup.connect_sync_unjournaled(directory / ROWS_FILE)
        self._db.execute(_SCHEMA)
        self._db.execute("BEGIN")
        self._next = 1
        self._keys: dict[str, list[np.ndarray]] = {}
        self._ids: dict[str, list[np.ndarray]] = {}
        self._videos: dict[str, list[bytes]] = {}
        # An empty date_added is the day of the import (an ISO date: safe as SQL text).
        self._today = dt.date.today().isoformat()
        self._inserts: dict[Shape, str] = {}

    def _insert(self, shape: Shape) -> str:
        """The INSERT for rows of this shape: a parameter per field held, and each
        constant as the literal SQLite's own ``quote()`` writes for it."""
        if shape not in self._inserts:
            values = []
            same = dict(shape.same)
            for field_number in range(7):
                if field_number in shape.fields:
                    place = f"?{shape.fields.index(field_number) + 1}"
                    value = f"IIF({place} = '', '{self._today}', {place})" if field_number == 6 else place
                else:
                    constant = same[field_number]
                    if field_number == 6 and constant == "":
                        constant = self._today
                    value = self._db.execute("SELECT quote(?)", (constant,)).fetchone()[0]
                values.append(value)
            self._inserts[shape] = f"INSERT INTO rows ({ROW_COLUMNS}) VALUES ({', '.join(values)})"
        return self._inserts[shape]

    @property
    def rows(self) -> int:
        return self._next - 1

    def add(self, algorithm: Algorithm, rows: Sequence[tuple], keys: np.ndarray, shape: Shape = FULL) -> None:
        """Appends rows of one algorithm (with their keys, ``segment_index.keys_of``),
        each holding the fields of ``shape`` (the digest among them).

        The rows go to SQLite as they are (no tuple rebuilt per row): the table is
        new and nothing is deleted before ``finish``, so SQLite numbers them
        first, first + 1, ... (rowid = largest + 1), checked once per call."""
        if not len(rows):
            return
        first = self._next
        self._next += len(rows)
        self._db.executemany(self._insert(shape), rows)
        last = self._db.execute("SELECT max(id) FROM rows").fetchone()[0]
        if last != self._next - 1:  # pragma: no cover - SQLite's documented rowid choice
            raise RuntimeError(f"segment {self.segment_id}: rows numbered up to {last}, expected {self._next - 1}")
        self._keys.setdefault(algorithm.name, []).append(keys)
        self._ids.setdefault(algorithm.name, []).append(np.arange(first, self._next, dtype=np.uint32))
        if algorithm.max_frames > 1:
            digest = shape.fields.index(1)
            self._videos.setdefault(algorithm.name, []).extend(row[digest] for row in rows)

    def finish(self) -> Written:
        counts: dict[str, int] = {}
        files: dict[str, str] = {}
        for name in sorted(self._keys):
            algorithm = algorithms.get(name)
            keys, ids = np.concatenate(self._keys.pop(name)), np.concatenate(self._ids.pop(name))
            keys, ids, videos = self._unique(keys, ids, self._videos.pop(name, None))
            counts[name] = len(keys)
            for array_name, array in segment_index.build_arrays(algorithm, ids, videos or [], keys).items():
                file_name = f"{name}.{array_name}.npy"
                files[file_name] = self._save(file_name, array)
            if algorithm.match_kind is MatchKind.EXACT:
                for key_id, secret in sorted(self._private.items()):
                    files.update(self.save_private(algorithm, key_id, secret, keys, ids))
        self._db.execute("COMMIT")
        self._db.close()
        _fsync_path(self.directory / ROWS_FILE)
        _fsync_path(self.directory)
        return Written(self.segment_id, sum(counts.values()), counts, files)

    def computes(self, key_id: str) -> bool:
        return key_id in self._private

    def carry(self, algorithm: str, key_id: str, keys: np.ndarray, outputs: np.ndarray) -> None:
        """Outputs already computed for these digest keys (a merge's inputs): not computed again."""
        self._known.setdefault((algorithm, key_id), []).append((keys, outputs))

    def save_private(self, algorithm: Algorithm, key_id: str, secret: bytes, keys: np.ndarray,
                     ids: np.ndarray) -> dict[str, str]:
        """Computes and writes one algorithm's OPRF arrays under one key; file name -> checksum."""
        known = self._known.pop((algorithm.name, key_id), None)
        arrays = private_arrays.build(algorithm, keys, ids, secret,
                                      private_arrays.Known.gather(known) if known else None)
        return {f"{algorithm.name}.{private_arrays.array_name(key_id, part)}.npy":
                self._save(f"{algorithm.name}.{private_arrays.array_name(key_id, part)}.npy", array)
                for part, array in arrays.items()}

    def _unique(self, keys: np.ndarray, ids: np.ndarray, videos: list[bytes] | None
                ) -> tuple[np.ndarray, np.ndarray, list[bytes] | None]:
        """Keeps the first row of each key; later repeats leave the row file too."""
        order = segment_index.key_order(keys)  # repeats adjacent, each run in input order
        ranked = keys[order]
        repeat = np.zeros(len(keys), dtype=bool)
        repeat[1:] = ranked[1:] == ranked[:-1]
        if not repeat.any():
            return keys, ids, videos
        keep = np.ones(len(keys), dtype=bool)
        keep[order[repeat]] = False
        self._db.executemany("DELETE FROM rows WHERE id = ?", [(int(i),) for i in ids[~keep]])
        kept_videos = [v for v, k in zip(videos, keep.tolist(), strict=True) if k] if videos is not None else None
        return keys[keep], ids[keep], kept_videos

    def _save(self, name: str, array: np.ndarray) -> str:
        return save_array(self.directory, name, array)

    def abandon(self) -> None:
        """Removes the unfinished segment (an import that failed or changed nothing)."""
        try:
            self._db.close()
        finally:
            remove(self.directory)
            self._lock.close()

    def close(self) -> None:
        """Releases the lock of a finished segment (once it is published, or abandoned)."""
        self._lock.close()


@dataclass
class MappedSegment:
    """A published segment, its arrays mapped read-only."""

    segment_id: int
    directory: Path
    counts: dict[str, int]
    keys: dict[str, tuple[np.ndarray, np.ndarray]]  # algorithm -> (sorted keys, row ids)
    indexes: dict[str, Index]
    _rows: sqlite3.Connection = field(repr=False)
    # OPRF outputs: algorithm -> key id -> arrays (node.private_arrays).
    private: dict[str, dict[str, private_arrays.PrivatePart]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # file name -> checksum, as published
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @classmethod
    def open(cls, root: Path, segment_id: int, counts: dict[str, int], files: dict[str, str]) -> MappedSegment:
        """Maps a published segment, checking every array file's checksum (two at a time)."""
        directory = directory_of(root, segment_id)
        paths = {name: directory / name for name in files}
        for path in paths.values():
            if not path.is_file():
                raise SegmentCorrupt(f"{path}: file of segment {segment_id} is missing; the node will not "
                                     "serve a partial hash set (restore the store from a backup)")
        with ThreadPoolExecutor(2) as pool:
            found = dict(zip(paths, pool.map(checksum, paths.values()), strict=True))
        for name, expected in files.items():
            if found[name] != expected:
                raise SegmentCorrupt(
                    f"{paths[name]}: checksum mismatch (recorded {expected[:26]}..., file has "
                    f"{found[name][:26]}...): segment {segment_id} is damaged; the node will not serve a "
                    "partial hash set (restore the store from a backup)")
        arrays: dict[str, dict[str, np.ndarray]] = {}
        private: dict[str, dict[str, dict[str, np.ndarray]]] = {}
        for name, path in paths.items():
            algorithm, array_name = name.removesuffix(".npy").split(".", 1)
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
            split = private_arrays.split_name(array_name)
            if split is None:
                arrays.setdefault(algorithm, {})[array_name] = mapped
            else:
                private.setdefault(algorithm, {}).setdefault(split[0], {})[split[1]] = mapped
        indexes = {name: segment_index.load_index(algorithms.get(name), parts) for name, parts in arrays.items()}
        keys = {name: (parts["keys"], parts["ids"]) for name, parts in arrays.items()}
        parts = {name: {key_id: private_arrays.PrivatePart.from_arrays(found) for key_id, found in by_key.items()}
                 for name, by_key in private.items()}
        rows = sqlite_setup.open_immutable(directory / ROWS_FILE)
        # Hits' rows read through a mapping of the file (the page cache), not a read() per page.
        rows.execute(f"PRAGMA mmap_size={ROWS_MMAP_BYTES}")
        return cls(segment_id, directory, dict(counts), keys, indexes, rows, parts, dict(files))

    def find(self, algorithm: str, wanted: np.ndarray) -> np.ndarray:
        """Row id of each wanted key (``segment_index.keys_of``), -1 where absent."""
        if algorithm not in self.keys:
            return np.full(len(wanted), -1, dtype=np.int64)
        index = self.indexes.get(algorithm)
        if isinstance(index, ExactIndex):  # its prefixes and their sample, made when it was mapped
            return segment_index.find(*self.keys[algorithm], wanted, index.prefix, index.sample)
        return segment_index.find(*self.keys[algorithm], wanted)

    def query(self, sql: str, parameters: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._rows.execute(sql, parameters).fetchall()

    def rows(self, ids: Sequence[int]) -> list[tuple]:
        """(id, algorithm, digest, ...) of these row ids, in one query."""
        return self.query(f"SELECT id, {ROW_COLUMNS} FROM rows WHERE id IN (SELECT value FROM json_each(?))",
                          (json.dumps(sorted(set(ids))),))

    def rows_in_order(self, ids: Sequence[int], columns: str) -> list[tuple]:
        """(id, ``columns``...) of these row ids, in their order (the ids' loop is the outer one:
        ``CROSS JOIN``), without the IN list's temporary index: a fifth faster for 5,000 rows."""
        return self.query(f"SELECT r.id, {', '.join('r.' + c.strip() for c in columns.split(','))}"
                          " FROM json_each(?) AS j CROSS JOIN rows AS r ON r.id = j.value", (json.dumps(ids),))

    def iter_rows(self, order: str, chunk: int) -> Iterator[list[tuple]]:
        """(id, algorithm, digest, ...) of every row, in chunks, on a connection of its own."""
        rows = sqlite_setup.open_immutable(self.directory / ROWS_FILE)
        try:
            cursor = rows.execute(f"SELECT id, {ROW_COLUMNS} FROM rows ORDER BY {order}")
            while batch := cursor.fetchmany(chunk):
                yield batch
        finally:
            rows.close()

    def close(self) -> None:
        with self._lock:
            self._rows.close()
