"""The node's tamper-evident, append-only audit log of every call it answers.

Prüm/ECRIS-style rules require every query to be logged, and an auditor must
be able to trust that the log was not edited afterwards. Each record is chained
to the one before it: ``hash = sha256(prev_hash + "\\n" + canonical_json)``, so
editing, deleting or reordering any record breaks the chain at that record.
Removing records from the *end*, or rewriting the whole chain, needs an
outside reference to catch: an operator copies ``head()`` to a ticket daily.

The tables live in a SQLite file of their own next to the store's catalog
(``audit_path``), on a connection of their own (node.db: WAL,
``synchronous=FULL``): an append never waits for an import or a merge, which
take the catalog's write lock, not this file's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiosqlite

from node import db as sqlite_setup

DEFAULT_RETENTION_DAYS = 730
GENESIS = "0" * 64  # prev_hash of the very first record

SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    entry TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_time ON audit (time);
CREATE TABLE IF NOT EXISTS audit_anchor (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    pruned_at TEXT NOT NULL
);
"""


@dataclass(frozen=True)
class AuditEntry:
    """Who asked what kind of question, and what the node answered.

    Deliberately has no field for the queried digests: the log must not become
    a second copy of what officers searched for. Only the references of hits
    (which the node holds anyway) are kept.
    """

    time: str  # ISO 8601 UTC; append() fills it in when empty
    gateway: str
    officer: str
    org: str
    country: str
    case: str
    rpc: str  # "Match", "Describe", ...
    items: int
    algorithms: tuple[str, ...]
    hits: int
    references: tuple[str, ...]  # returned references, only for hits
    status: str  # gRPC status name: "OK", "UNAUTHENTICATED", ...
    detail: str  # refusal message, may be empty
    token_id: str
    peer: str
    # ``kid`` of the key that signed the token (empty when none verified).
    key_id: str = ""
    # Match restricted to rows published after this store generation (0: every row).
    since_generation: int = 0
    # Live rows in the segments the Match searched (what a restricted Match saves).
    rows_searched: int = 0


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    checked: int  # records found good (before the first bad one, if any)
    first_bad_seq: int | None
    reason: str


class AuditError(Exception):
    """The chain is broken where an operation needed it intact."""


def utc_iso(when: dt.datetime) -> str:
    """One fixed-width UTC form, so times compare correctly as text in SQL."""
    if when.tzinfo is None:
        raise ValueError(f"audit times must carry a time zone, got naive {when.isoformat()}")
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds")


def canonical_json(value: Any) -> str:
    """The exact text that is hashed: any byte changed changes the hash."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def entry_fields(entry: AuditEntry) -> dict[str, Any]:
    """The entry as the object whose ``canonical_json`` is recorded: ``dataclasses.asdict``'s
    result without its deep copy of each reference, 7 ms of a 5,000-hit answer (the values are
    strings, numbers and tuples of strings, which need none)."""
    return {name: getattr(entry, name) for name in _ENTRY_FIELDS}


def chain_hash(prev_hash: str, entry_json: str) -> str:
    return hashlib.sha256(f"{prev_hash}\n{entry_json}".encode("ascii")).hexdigest()


def audit_path(store: Path) -> Path:
    """The audit log's own file, beside the store's catalog."""
    return store.with_name(store.name + ".audit")


async def connect(path: Path) -> aiosqlite.Connection:
    """A connection to an audit log file (the node's SQLite settings, node.db;
    created owner-only, 0600, like every file of the store)."""
    return await sqlite_setup.connect(path)


# One statement reads anchor and records, so both come from one snapshot even
# while another process prunes; the anchor's scalar subqueries run once.
_WALK = """
SELECT (SELECT seq FROM audit_anchor), (SELECT hash FROM audit_anchor), seq, time, entry, prev_hash, hash
FROM audit ORDER BY seq
"""


def _check(row: tuple, expected_seq: int, expected_prev: str) -> str:
    """Why this record breaks the chain, or '' if it fits."""
    seq, time, entry, prev_hash, stored = row
    if seq != expected_seq:
        return f"expected seq {expected_seq} next, found {seq}: records missing or renumbered"
    if prev_hash != expected_prev:
        return "prev_hash does not match the previous record's hash: a record was deleted, moved or edited"
    if chain_hash(prev_hash, entry) != stored:
        return "hash does not match the record's content: the record was edited"
    try:
        if json.loads(entry)["time"] != time:
            return "time column differs from the hashed entry's time"
    except (ValueError, KeyError, TypeError):
        return "entry is not a valid audit entry"
    return ""


_ENTRY_FIELDS = tuple(f.name for f in dataclasses.fields(AuditEntry))


class AuditLog:
    def __init__(self, db: aiosqlite.Connection):
        self._db = db
        self._lock = asyncio.Lock()  # one transaction at a time on the shared connection
        self._maintenance = asyncio.Lock()  # keeps an in-process prune out of a verify's walk

    @classmethod
    async def open(cls, db: aiosqlite.Connection) -> AuditLog:
        """Creates the tables if missing (``db`` from ``connect``: synchronous=FULL, so an append is durable)."""
        await db.executescript(SCHEMA)
        return cls(db)

    async def append(self, entry: AuditEntry) -> int:
        """Records ``entry`` durably and returns its seq.

        Shielded: a caller cancelled mid-append (say, the client hung up)
        still leaves its record, since the query was already answered or refused.
        """
        if not entry.time:
            entry = dataclasses.replace(entry, time=utc_iso(dt.datetime.now(dt.UTC)))
        else:
            entry = dataclasses.replace(entry, time=utc_iso(dt.datetime.fromisoformat(entry.time)))
        return await asyncio.shield(self._append(entry))

    async def _append(self, entry: AuditEntry) -> int:
        text = canonical_json(entry_fields(entry))
        async with self._lock, _transaction(self._db):
            # Inside BEGIN IMMEDIATE: no other process can append between this read and the insert.
            seq, prev = await self._last()
            await self._db.execute(
                "INSERT INTO audit (seq, time, entry, prev_hash, hash) VALUES (?, ?, ?, ?, ?)",
                (seq + 1, entry.time, text, prev, chain_hash(prev, text)),
            )
        return seq + 1

    async def head(self) -> tuple[int, str] | None:
        """Latest (seq, hash), for anchoring outside the node; the anchor if all was pruned."""
        last = await self._last()
        return None if last == (0, GENESIS) else last

    async def verify(self) -> VerifyResult:
        """Walks the chain in seq order and names the first record that breaks it."""
        async with self._maintenance:
            checked, expected_seq, expected_prev = 0, 1, GENESIS
            async with self._db.execute(_WALK) as cursor:
                async for anchor_seq, anchor_hash, *row in cursor:
                    if checked == 0 and anchor_seq is not None:
                        expected_seq, expected_prev = anchor_seq + 1, anchor_hash
                    reason = _check(tuple(row), expected_seq, expected_prev)
                    if reason:
                        if checked == 0 and anchor_seq is not None:
                            reason += " (or the prune anchor was edited)"
                        return VerifyResult(False, checked, row[0], reason)
                    checked, expected_seq, expected_prev = checked + 1, row[0] + 1, row[4]
        return VerifyResult(True, checked, None, "")

    async def export(self, since: str | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """Each record as one flat dict (seq, time, hash, prev_hash and the entry's fields)."""
        cutoff = utc_iso(dt.datetime.fromisoformat(since)) if since else ""
        async with self._db.execute(
            "SELECT seq, time, entry, prev_hash, hash FROM audit WHERE time >= ? ORDER BY seq", (cutoff,)
        ) as cursor:
            async for seq, time, entry, prev_hash, digest in cursor:
                yield {**json.loads(entry), "seq": seq, "time": time, "prev_hash": prev_hash, "hash": digest}

    async def write_jsonl(self, out: TextIO, since: str | None = None) -> int:
        """Writes export() as JSON lines to ``out`` for an auditor; returns the count."""
        count = 0
        # aclosing: a failed write (a closed pipe) ends the query before the connection closes.
        async with aclosing(self.export(since)) as records:
            async for record in records:
                out.write(canonical_json(record) + "\n")
                count += 1
        return count

    async def prune(self, older_than: dt.datetime) -> int:
        """Deletes the oldest records, those before ``older_than``, keeping the rest verifiable.

        Only a prefix of the chain goes (up to the first record that is not
        older), so the remaining chain stays contiguous; the last deleted
        record's seq and hash become the anchor. The deleted part is verified
        first, in the same transaction: pruning must not launder an edit.
        Raises AuditError if it is broken.
        """
        cutoff = utc_iso(older_than)
        async with self._maintenance, self._lock, _transaction(self._db):
            async with self._db.execute("SELECT MIN(seq) FROM audit WHERE time >= ?", (cutoff,)) as cursor:
                first_kept = await cursor.fetchone()  # MIN() gives one row, NULL when none is that recent
            keep_from = first_kept[0] if first_kept is not None else None
            async with self._db.execute("SELECT seq, hash FROM audit_anchor") as cursor:
                expected_seq, expected_prev = (await cursor.fetchone()) or (0, GENESIS)
            expected_seq += 1
            deleted = 0
            async with self._db.execute(
                "SELECT seq, time, entry, prev_hash, hash FROM audit WHERE ?1 IS NULL OR seq < ?1 ORDER BY seq",
                (keep_from,),
            ) as cursor:
                async for row in cursor:
                    reason = _check(tuple(row), expected_seq, expected_prev)
                    if reason:
                        raise AuditError(f"not pruning: audit record {row[0]}: {reason}")
                    deleted, expected_seq, expected_prev = deleted + 1, row[0] + 1, row[4]
            if deleted:
                await self._db.execute("DELETE FROM audit WHERE seq < ?", (expected_seq,))
                await self._db.execute(
                    "INSERT OR REPLACE INTO audit_anchor (id, seq, hash, pruned_at) VALUES (1, ?, ?, ?)",
                    (expected_seq - 1, expected_prev, utc_iso(dt.datetime.now(dt.UTC))),
                )
        return deleted

    async def _last(self) -> tuple[int, str]:
        for sql in ("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", "SELECT seq, hash FROM audit_anchor"):
            async with self._db.execute(sql) as cursor:
                row = await cursor.fetchone()
            if row:
                return row[0], row[1]
        return 0, GENESIS


@asynccontextmanager
async def _transaction(db: aiosqlite.Connection) -> AsyncIterator[None]:
    """BEGIN IMMEDIATE takes the write lock up front; any error rolls everything back."""
    await db.execute("BEGIN IMMEDIATE")
    try:
        yield
        await db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            await db.execute("ROLLBACK")
        raise
