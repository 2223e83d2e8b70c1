"""The resume cache: hashes already computed, so an interrupted run keeps its work.

A SQLite database keyed by (real absolute path, size, mtime_ns) and what was
computed; entries are committed as files are hashed, so the next run re-hashes
only what changed.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from gateway import filehash
from gateway.triage.model import Done, Hashed, Task

# Bumped when what hash_file computes changes: older cache entries are ignored.
HASH_VERSION = 2
# Paths looked up per query (SQLite allows 999 parameters in older builds).
_PER_QUERY = 500


def default_cache_path() -> Path:
    """Where the cache lives unless ``--cache`` says otherwise."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "icse-gateway" / "triage-cache.sqlite"


class HashCache:
    """Hashes already computed, keyed by (absolute path, size, mtime_ns) and what was computed.

    Holds digests of the investigator's files and their paths: the directory is
    created private (0700) and the database file 0600.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not path.exists()
        self._db = sqlite3.connect(path, timeout=10, isolation_level=None)
        try:
            if created:
                os.chmod(path, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path BLOB NOT NULL, variant TEXT NOT NULL, "
                "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, record TEXT NOT NULL, hashed_at TEXT NOT NULL, "
                "PRIMARY KEY (path, variant)) WITHOUT ROWID")
            self._db.execute("BEGIN")
        except sqlite3.Error:
            self._db.close()
            raise

    @staticmethod
    def variant(dihedral: bool) -> str:
        return f"v{HASH_VERSION}{'+dihedral' if dihedral else ''}"

    @staticmethod
    def key(task: Task) -> bytes:
        """The file's absolute path; for a link inside the tree, the link's and its target's."""
        if task.path == task.real:
            return os.fsencode(task.real)
        return os.fsencode(task.path) + b"\0" + os.fsencode(task.real)

    def get(self, task: Task, dihedral: bool) -> filehash.FileHashes | None:
        record = self.get_many([task], dihedral)[0]
        if record is None:
            return None
        try:
            return filehash.hashes_from_json(json.loads(record), task.real)
        except (ValueError, KeyError, TypeError, IndexError):
            return None

    def get_many(self, tasks: Sequence[Task], dihedral: bool) -> list[str | None]:
        """Per task, its cached record (:func:`gateway.filehash.hashes_text`) or None: one query for them all."""
        found: dict[bytes, tuple[int, int, str]] = {}
        keys = [self.key(task) for task in tasks]
        for start in range(0, len(keys), _PER_QUERY):
            part = keys[start : start + _PER_QUERY]
            cursor = self._db.execute(
                f"SELECT path, size, mtime_ns, record FROM hashes WHERE variant = ? AND path IN "
                f"({','.join('?' * len(part))})", (self.variant(dihedral), *part))
            found.update((path, (size, mtime_ns, record)) for path, size, mtime_ns, record in cursor)
        records: list[str | None] = []
        for key, task in zip(keys, tasks, strict=True):
            entry = found.get(key)
            records.append(entry[2] if entry and entry[:2] == (task.size, task.mtime_ns) else None)
        return records

    def put(self, task: Task, dihedral: bool, hashed: Hashed) -> None:
        self.put_many([(task, hashed)], dihedral)

    def put_many(self, entries: Sequence[tuple[Task, Hashed | Done]], dihedral: bool) -> None:
        """Caches what was hashed: one statement for all."""
        variant, now = self.variant(dihedral), dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        rows = []
        for task, hashed in entries:
            text = hashed.text
            if text is None:
                assert isinstance(hashed, Hashed) and hashed.hashes is not None
                text = filehash.hashes_text(hashed.hashes)
            rows.append((self.key(task), variant, hashed.size, hashed.mtime_ns, text, now))
        self._db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)", rows)

    def put_prepared(self, rows: Sequence[tuple[bytes, int, int, str]], dihedral: bool) -> None:
        """Caches (key, size, mtime_ns, record) rows, the record as :func:`gateway.filehash.hashes_text` wrote it."""
        variant, now = self.variant(dihedral), dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._db.executemany("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
                             [(key, variant, size, mtime_ns, text, now) for key, size, mtime_ns, text in rows])

    def commit(self) -> None:
        """Makes what was put so far durable (a Ctrl-C after this keeps it)."""
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def close(self) -> None:
        try:
            self._db.execute("COMMIT")
        finally:
            self._db.close()



class RunCache:
    """What one run does with the cache (or with none): lookups and writes a group at a time,
    a commit at most once a second and when hashing is over (what a killed run loses), and,
    once the cache fails (disk full, locked), no cache at all: the run goes on, saying so."""

    COMMIT_EVERY = 1.0

    def __init__(self, cache: HashCache | None, dihedral: bool, warn: Callable[[str], None]):
        self._cache, self._dihedral, self._warn = cache, dihedral, warn
        self._committed = time.monotonic()

    def get_many(self, tasks: Sequence[Task]) -> list[str | None]:
        """Per task, its cache record, or None: one cache query for them all."""
        found: list[str | None] = [None] * len(tasks)
        if tasks:
            self._use(lambda cache: found.__setitem__(slice(None), cache.get_many(tasks, self._dihedral)))
        return found

    def put_many(self, done: Sequence[tuple[Task, Done]]) -> None:
        if done:
            self._use(lambda cache: cache.put_many(done, self._dihedral))

    def put_prepared(self, rows: Sequence[tuple[bytes, int, int, str]]) -> None:
        if rows:
            self._use(lambda cache: cache.put_prepared(rows, self._dihedral))

    def readable(self) -> tuple[str, str] | None:
        """(database path, variant) for a hashing process to read the cache itself; None without a cache."""
        if self._cache is None:
            return None
        return str(self._cache.path), self._cache.variant(self._dihedral)

    def commit(self, *, if_due: bool = False) -> None:
        if if_due and time.monotonic() - self._committed < self.COMMIT_EVERY:
            return
        self._committed = time.monotonic()
        self._use(lambda cache: cache.commit())

    def _use(self, action: Callable[[HashCache], None]) -> None:
        if self._cache is None:
            return
        try:
            action(self._cache)
        except sqlite3.Error as exc:
            self._warn(f"icse-gateway: hash cache {self._cache.path} failed ({exc}): going on without it")
            self._cache = None
