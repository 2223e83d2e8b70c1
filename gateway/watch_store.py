"""The agency's own store of standing queries: its open cases' digests, on its side only.

No node ever holds a standing query: a node sees each re-ask as an ordinary
signed, audited Match and forgets its items. This file is what remembers them —
one SQLite file of the agency's (0600), next to the gateway configuration — with
per case its digests, and per case and node (member and replica address) the
store generation the case was last completely asked at.

``remove`` deletes a case's digests for real: ``secure_delete`` overwrites freed
content with zeros, the rollback journal (not WAL, whose frames would keep old
pages until a checkpoint) is deleted at commit, and ``VACUUM`` rewrites the
file without the freed pages.
"""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from federation.query import QueryItem

BUSY_TIMEOUT_MS = 30_000
SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    reference TEXT PRIMARY KEY,
    created TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS digests (
    case_ref TEXT NOT NULL REFERENCES cases (reference) ON DELETE CASCADE,
    algorithm TEXT NOT NULL,
    digest BLOB NOT NULL,
    max_distance INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (case_ref, algorithm, digest)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS asked (
    case_ref TEXT NOT NULL REFERENCES cases (reference) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    address TEXT NOT NULL,
    generation INTEGER NOT NULL,
    PRIMARY KEY (case_ref, node_id, address)
) WITHOUT ROWID;
"""


@dataclass(frozen=True)
class Watched:
    """One digest of a case and where it came from (a file, or the hash given)."""

    item: QueryItem
    source: str


@dataclass(frozen=True)
class CaseSummary:
    reference: str
    created: str
    digests: int
    nodes_asked: int


class CaseStore:
    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        for pragma in ("PRAGMA journal_mode=DELETE", "PRAGMA secure_delete=ON", "PRAGMA foreign_keys=ON",
                       "PRAGMA synchronous=FULL", f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}"):
            self._db.execute(pragma)
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> CaseStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(self, reference: str, watched: Iterable[Watched]) -> int:
        """Adds digests to a case (opening it if new); how many were new to it.

        A case that gains digests is asked about them everywhere from scratch:
        its generations are forgotten, so the next round asks every node since 0."""
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.execute("INSERT OR IGNORE INTO cases (reference, created) VALUES (?, ?)", (reference, created))
            before = self._count(reference)
            self._db.executemany(
                "INSERT OR IGNORE INTO digests (case_ref, algorithm, digest, max_distance, source) "
                "VALUES (?, ?, ?, ?, ?)",
                [(reference, w.item.algorithm, w.item.digest, w.item.max_distance, w.source) for w in watched])
            added = self._count(reference) - before
            if added:
                self._db.execute("DELETE FROM asked WHERE case_ref = ?", (reference,))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return added

    def _count(self, reference: str) -> int:
        return self._db.execute("SELECT count(*) FROM digests WHERE case_ref = ?", (reference,)).fetchone()[0]

    def remove(self, reference: str) -> bool:
        """Closes a case: its digests and generations deleted, the file rewritten without them."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            found = self._db.execute("DELETE FROM cases WHERE reference = ?", (reference,)).rowcount
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        self._db.execute("VACUUM")
        return bool(found)

    def cases(self) -> list[CaseSummary]:
        return [CaseSummary(*row) for row in self._db.execute(
            "SELECT reference, created, (SELECT count(*) FROM digests WHERE case_ref = reference), "
            "(SELECT count(*) FROM asked WHERE case_ref = reference) FROM cases ORDER BY reference")]

    def references(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT reference FROM cases ORDER BY reference")]

    def watched(self, reference: str) -> list[Watched]:
        return [Watched(QueryItem(a, bytes(d), m), s) for a, d, m, s in self._db.execute(
            "SELECT algorithm, digest, max_distance, source FROM digests WHERE case_ref = ? "
            "ORDER BY algorithm, digest", (reference,))]

    def generations(self, node_id: str, address: str) -> dict[str, int]:
        """Per open case, the generation it was last completely asked at on this replica (absent: never)."""
        return dict(self._db.execute("SELECT case_ref, generation FROM asked WHERE node_id = ? AND address = ?",
                                     (node_id, address)).fetchall())

    def asked(self, reference: str, node_id: str, address: str, generation: int) -> None:
        """Records a complete answer at ``generation`` (ignored if the case was closed meanwhile)."""
        self._db.execute(
            "INSERT INTO asked (case_ref, node_id, address, generation) "
            "SELECT ?1, ?2, ?3, ?4 WHERE EXISTS (SELECT 1 FROM cases WHERE reference = ?1) "
            "ON CONFLICT (case_ref, node_id, address) DO UPDATE SET generation = excluded.generation",
            (reference, node_id, address, generation))

    def add_many(self, cases: Sequence[tuple[str, Sequence[Watched]]]) -> None:
        """Many cases in one transaction (a benchmark's thousand cases)."""
        created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for reference, watched in cases:
                self._db.execute("INSERT OR IGNORE INTO cases (reference, created) VALUES (?, ?)",
                                 (reference, created))
                self._db.executemany(
                    "INSERT OR IGNORE INTO digests (case_ref, algorithm, digest, max_distance, source) "
                    "VALUES (?, ?, ?, ?, ?)",
                    [(reference, w.item.algorithm, w.item.digest, w.item.max_distance, w.source) for w in watched])
                self._db.execute("DELETE FROM asked WHERE case_ref = ?", (reference,))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
