"""The rows of one run, on disk: a private SQLite file, so a million files cost no memory.

A row is written once, when it is final (read, hashed and every one of its
hashes answered); the reports read it back in the order they need (walk
order, known first, by status) and the summary counts with queries. The file
holds digests and paths of seized files: it is created 0600 in a private
temporary directory and removed when the run is closed.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from gateway import filehash
from gateway.results import HitInfo
from gateway.triage.model import HASHED, FileRow, Match

# Rows written between commits (a commit is cheap here: durability is not needed).
COMMIT_EVERY = 2000
# Sorts unknown distances after every real one.
_FAR = 1 << 30


def _record(row: FileRow) -> str:
    """Everything of a row but its path, status and hashes (those have their own columns)."""
    if not (row.reason or row.matches or row.not_answered_by or row.truncated_by or row.notes):
        # Most rows: what json.dumps writes below, without its cost.
        return (f'{{"reason":"","size":{_number(row.size)},"mtime_ns":{_number(row.mtime_ns)},'
                f'"from_cache":{"true" if row.from_cache else "false"},"matches":[],"not_answered_by":[],'
                '"truncated_by":[],"notes":[]}')
    return json.dumps({
        "reason": row.reason, "size": row.size, "mtime_ns": row.mtime_ns, "from_cache": row.from_cache,
        "matches": [[m.algorithm, m.variant, asdict(m.hit)] for m in row.matches],
        "not_answered_by": sorted(row.not_answered_by), "truncated_by": sorted(row.truncated_by),
        "notes": row.notes,
    }, separators=(",", ":"), ensure_ascii=False)


def _plain_hashes() -> str:
    """SQL for a plain file's hashes text from its digests: :func:`gateway.filehash.exact_text`'s."""
    parts = filehash.exact_text_parts()
    pieces, at = [_literal(parts[0])], 1
    for (_, size), part in zip(filehash.exact_kinds(), parts[1:], strict=True):
        pieces += ["'\"'", f"lower(hex(substr(digests, {at}, {size})))", "'\"'", _literal(part)]
        at += size
    return "(" + " || ".join(pieces) + ")"


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


# A plain file's record: what _record writes for a row with nothing to say.
_PLAIN_RECORD = ("""('{"reason":"","size":' || size || ',"mtime_ns":' || mtime_ns || ',"from_cache":' || """
                 """CASE WHEN from_cache THEN 'true' ELSE 'false' END || ',"matches":[],"not_answered_by":[],"""
                 """"truncated_by":[],"notes":[]}')""")


def _number(value: int | None) -> str:
    return "null" if value is None else str(int(value))


def _hashes(row: FileRow) -> str | None:
    if row.hashes_text is not None:
        return row.hashes_text
    return None if row.hashes is None else filehash.hashes_text(row.hashes)


def _row(path: bytes, status: str, hashes_text: str | None, record: str) -> FileRow:
    data: dict[str, Any] = json.loads(record)
    name = os.fsdecode(path)
    hashes = None if hashes_text is None else filehash.hashes_from_json(json.loads(hashes_text), name)
    return FileRow(
        name, status, data["reason"], data["size"], data["mtime_ns"], hashes, data["from_cache"],
        [Match(algorithm, variant, HitInfo(**hit)) for algorithm, variant, hit in data["matches"]],
        set(data["not_answered_by"]), set(data["truncated_by"]), data["notes"], hashes_text)


class RowStore:
    """Final rows of a run, by walk index; the queries the reports and the summary need."""

    def __init__(self, directory: Path | None = None):
        self._dir = Path(tempfile.mkdtemp(prefix="icse-triage-", dir=directory))  # 0700
        self.path = self._dir / "rows.sqlite"
        self._db = sqlite3.connect(self.path, isolation_level=None)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("CREATE TABLE rows (idx INTEGER PRIMARY KEY, path BLOB NOT NULL, status TEXT NOT NULL, "
                         "known INTEGER NOT NULL, best INTEGER, skipped INTEGER NOT NULL, hits INTEGER NOT NULL, "
                         "hashes TEXT, record TEXT NOT NULL)")
        self._db.execute("CREATE TABLE refs (idx INTEGER NOT NULL, country TEXT NOT NULL, node TEXT NOT NULL, "
                         "reference TEXT NOT NULL)")
        # Files no node found, with exact digests alone and nothing to say (most of a device): a short row,
        # written as the worker made it; the listings see them as rows through the view ``every``.
        self._db.execute("CREATE TABLE plain (idx INTEGER PRIMARY KEY, path BLOB NOT NULL, size INTEGER NOT NULL, "
                         "mtime_ns INTEGER NOT NULL, digests BLOB NOT NULL, from_cache INTEGER NOT NULL)")
        self._db.execute("CREATE VIEW every AS SELECT idx, path, status, known, best, skipped, hits, hashes, record "
                         f"FROM rows UNION ALL SELECT idx, path, '{HASHED}', 0, NULL, 0, 0, {_plain_hashes()}, "
                         f"{_PLAIN_RECORD} FROM plain")
        self._db.execute("BEGIN")
        self._unsaved = 0
        # Counted as rows are written, so that the summary scans no table (a million rows):
        # rows per (status, known, skipped), known files whose best match is near, hits.
        self._counts: Counter[tuple[str, bool, bool]] = Counter()
        self._near = self._hits = 0

    @property
    def files(self) -> tuple[Path, ...]:
        """What this store writes: never to be hashed by the run that uses it."""
        return (self._dir, self.path)

    def add(self, index: int, row: FileRow) -> None:
        """Writes ``row``, final, at walk position ``index``."""
        self.add_many([(index, row)])

    def add_many(self, rows: list[tuple[int, FileRow]]) -> None:
        """Writes final rows, each at its walk position: one statement for all (a row costs microseconds)."""
        values = []
        references = []
        for index, row in rows:
            skipped = row.not_sent if row.hashes is None else bool(row.hashes.skipped)
            best = row.best_distance
            values.append((index, os.fsencode(row.path), row.status, bool(row.matches), best, skipped,
                           len(row.matches), _hashes(row), _record(row)))
            self._counts[row.status, bool(row.matches), bool(skipped)] += 1
            self._near += bool(row.matches and best)
            self._hits += len(row.matches)
            if row.matches:
                references += [(index, r["country"], r["node"], r["reference"]) for r in row.references()]
        self._db.executemany("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", values)
        if references:
            self._db.executemany("INSERT INTO refs VALUES (?, ?, ?, ?)", references)
        self._unsaved += len(rows)
        if self._unsaved >= COMMIT_EVERY:
            self.commit()

    def add_plain(self, values: list[tuple[int, bytes, int, int, bytes, bool]]) -> None:
        """Writes files no node found that have exact digests alone and nothing else to say: (walk index,
        path as bytes, size, mtime_ns, exact digests end to end, from the cache), as :mod:`.bulk` holds them."""
        self._db.executemany("INSERT INTO plain VALUES (?, ?, ?, ?, ?, ?)", values)
        self._counts[HASHED, False, False] += len(values)
        self._unsaved += len(values)
        if self._unsaved >= COMMIT_EVERY:
            self.commit()

    def commit(self) -> None:
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")
        self._unsaved = 0

    def _rows(self, where: str = "", order: str = "idx", args: tuple[Any, ...] = (),
              limit: int | None = None, table: str = "every") -> Iterator[FileRow]:
        tail = f" LIMIT {int(limit)}" if limit is not None else ""
        cursor = self._db.execute(f"SELECT path, status, hashes, record FROM {table} {where} ORDER BY {order}{tail}",
                                  args)
        for path, status, hashes, record in cursor:
            yield _row(path, status, hashes, record)

    def rows(self) -> Iterator[FileRow]:
        """Every row, in walk order."""
        return self._rows()

    def of_status(self, status: str, limit: int | None = None) -> Iterator[FileRow]:
        return self._rows("WHERE status = ?", args=(status,), limit=limit)

    def known(self, limit: int | None = None, *, near: bool | None = None) -> Iterator[FileRow]:
        """Known files nearest match first, then by path: the order every report lists them in;
        only near-duplicates (best distance > 0) or only exact copies when ``near`` says so."""
        where = {None: "WHERE known", True: "WHERE known AND best > 0", False: "WHERE known AND best = 0"}[near]
        return self._rows(where, f"coalesce(best, {_FAR}), path", limit=limit, table="rows")  # never plain

    def known_by_reference(self) -> Iterator[tuple[str, str, str, FileRow]]:
        """(country, reference, node, file) for every reference a file matched, grouped by country and
        reference, nearest file first: a file that matched two references comes twice."""
        cursor = self._db.execute(
            "SELECT refs.country, refs.reference, refs.node, rows.path, rows.status, rows.hashes, rows.record "
            "FROM refs JOIN rows USING (idx) ORDER BY refs.country, refs.reference, refs.node, "
            f"coalesce(rows.best, {_FAR}), rows.path")
        for country, reference, node, path, status, hashes, record in cursor:
            yield country, reference, node, _row(path, status, hashes, record)

    def known_near(self) -> int:
        """Known files whose nearest match is a perceptual one at distance > 0."""
        return self._near

    def hits(self) -> int:
        """Hits in all: one per hash of a file that matched a reference (several per reference, often)."""
        return self._hits

    def references(self) -> int:
        """References in all: a file counts once per node and reference it matched."""
        return int(self._db.execute("SELECT count(*) FROM refs").fetchone()[0])

    def files_known_first(self) -> Iterator[FileRow]:
        """Every hashed file: the known ones as :meth:`known` lists them, then the others by path."""
        return self._rows("WHERE status = ?", f"known DESC, CASE WHEN known THEN coalesce(best, {_FAR}) END, path",
                          (HASHED,))

    def count(self, status: str | None = None, *, known: bool = False, skipped: bool = False) -> int:
        """How many rows (of ``status``; known only; with perceptual hashes not sent only)."""
        return sum(count for (of, is_known, is_skipped), count in self._counts.items()
                   if status in (None, of) and is_known >= known and is_skipped >= skipped)

    def countries(self) -> dict[str, dict[str, int]]:
        """Per country with hits: how many files it knows and how many references it gave."""
        found = self._db.execute("SELECT country, count(DISTINCT idx), count(*) FROM refs GROUP BY country "
                                 "ORDER BY country")
        return {country: {"files": files, "references": references} for country, files, references in found}

    def close(self) -> None:
        """Removes the file: the reports are written from it before."""
        try:
            self._db.close()
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)
