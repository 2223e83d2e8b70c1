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
from pathlib import Path

from gateway import filehash
from gateway.triage.model import Hashed, Task

# Bumped when what hash_file computes changes: older cache entries are ignored.
HASH_VERSION = 2


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
        row = self._db.execute(
            "SELECT record FROM hashes WHERE path = ? AND variant = ? AND size = ? AND mtime_ns = ?",
            (self.key(task), self.variant(dihedral), task.size, task.mtime_ns)).fetchone()
        if row is None:
            return None
        try:
            return filehash.hashes_from_json(json.loads(row[0]), task.real)
        except (ValueError, KeyError, TypeError, IndexError):
            return None

    def put(self, task: Task, dihedral: bool, hashed: Hashed) -> None:
        assert hashed.hashes is not None
        self._db.execute(
            "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
            (self.key(task), self.variant(dihedral), hashed.size, hashed.mtime_ns,
             json.dumps(filehash.hashes_json(hashed.hashes), separators=(",", ":")),
             dt.datetime.now(dt.UTC).isoformat(timespec="seconds")))

    def commit(self) -> None:
        """Makes what was put so far durable (a Ctrl-C after this keeps it)."""
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def close(self) -> None:
        try:
            self._db.execute("COMMIT")
        finally:
            self._db.close()

