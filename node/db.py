"""How the node opens its SQLite files: the connection settings live here, once.

Every file the node writes while serving (the catalog, the audit log) is in
WAL mode, so readers never wait for a writer, with ``synchronous=FULL``, so a
committed transaction survives a power cut, and a busy timeout, so a writer
waits its turn instead of failing at once. A segment's own row file is
written once, by one process, before anyone may read it (see node.segment):
it needs none of this, and is opened read-only and immutable afterwards.

Every file is created owner-only (0600, node.private_files) before SQLite
opens it, whatever the umask: SQLite gives its -wal and -shm files the mode
of the database file, so they are private too.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite

from node.private_files import make_private

BUSY_TIMEOUT_MS = 10_000
PRAGMAS = ("PRAGMA journal_mode=WAL", "PRAGMA synchronous=FULL", f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")


async def connect(path: Path) -> aiosqlite.Connection:
    """An autocommit connection (transactions are explicit) with the node's settings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_private(path)
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        for pragma in PRAGMAS:
            await db.execute(pragma)
    except BaseException:
        await db.close()
        raise
    return db


def connect_sync(path: Path) -> sqlite3.Connection:
    """The same settings on a plain connection, for work done in a worker thread."""
    path.parent.mkdir(parents=True, exist_ok=True)
    make_private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        db.execute(pragma)
    return db


def open_immutable(path: Path) -> sqlite3.Connection:
    """A read-only connection to a file nobody writes again: no locks, no journal."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def connect_sync_unjournaled(path: Path) -> sqlite3.Connection:
    """For a file written once by one process and fsynced when complete (a new
    segment's rows): nobody reads it before then, so no journal and no syncs."""
    make_private(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    return db
