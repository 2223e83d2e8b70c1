"""Imports a hash-set file into the store (and retracts one from it): streamed into
one new segment published all at once (node.store), reported."""

from __future__ import annotations

import asyncio
import hashlib
import io
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

from node import bulk_parse, formats, vics
from node.formats import Unsupported
from node.records import ImportAborted, Rejection
from node.store import ImportCounts, RemoveCounts, Store

# Rows per insert batch. Large batches sort better (inserted in digest order) and
# overlap parsing with SQLite's work; two batches are in memory at a time.
BATCH_ROWS = 50_000
# Rejections kept for the report (all are counted): a file of millions of bad rows
# must not fill the memory either.
KEPT_REJECTIONS = 10_000
_READ_CHUNK = 1 << 20

Advance = Callable[[int], None]
T = TypeVar("T")


@dataclass
class ImportReport:
    path: Path
    added: int = 0
    already_present: int = 0
    rejected: list[Rejection] = field(default_factory=list)  # the first KEPT_REJECTIONS
    rejected_total: int = 0
    # Hashes of kinds no node can match (PhotoDNA), by kind: skipped, never computed.
    unsupported: Counter[str] = field(default_factory=Counter)
    # What a rejection's position counts: "line", or "media item" for VICS files.
    unit: str = "line"


@dataclass
class RetractReport:
    paths: list[Path]
    removed: int = 0
    not_present: int = 0
    rejected: list[tuple[Path, str, Rejection]] = field(default_factory=list)  # (file, unit, rejection)
    rejected_total: int = 0
    unsupported: Counter[str] = field(default_factory=Counter)


def unnamed_prefix(path: Path, country: str) -> str:
    """What a row imported without a reference is named by: ``<country>-<file>-``,
    followed by its row number (line, or media item), where ``<file>`` is the first
    8 hex digits of the SHA-256 of the file's bytes.

    The same file gives the same references on every replica and on every run
    (importing it again changes nothing); two different files do not share them.
    A reference says which file and row a hash came from, never anything about
    the hash itself. One streaming pass over the file, at hashing speed.
    """
    return _scan(path, country)[0]


def _scan(path: Path, country: str) -> tuple[str, bool]:
    """``unnamed_prefix``, and whether the file is *plain*: no quote, no carriage
    return (a CSV record is then one line, its cells the text between commas,
    which is what lets ``node.bulk_parse`` read it). One pass, at hashing speed."""
    digest = hashlib.sha256()
    plain = True
    with path.open("rb") as handle:
        while chunk := handle.read(_READ_CHUNK):
            digest.update(chunk)
            plain = plain and b'"' not in chunk and b"\r" not in chunk
    return f"{country}-{digest.hexdigest()[:8]}-", plain


class _Counting(io.RawIOBase):
    """A file's raw bytes, reporting how many were read (drives the progress bar)."""

    def __init__(self, raw: io.RawIOBase, advance: Advance | None):
        self._raw = raw
        self._advance = advance

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer) or 0
        if count and self._advance is not None:
            self._advance(count)
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


@contextmanager
def _parsed_rows(path: Path, format_name: str, country: str, advance: Advance | None, unnamed: str = ""
                 ) -> Iterator[tuple[str, Iterator[formats.ParsedRow]]]:
    """(unit, rows) of one file in any import format; ``ImportAborted`` if it is unreadable.
    Rows without a reference are named ``unnamed`` + their row number."""
    name = formats.resolve_format(path, format_name)
    if name == "vics":
        with vics.VicsReader(path, country=country, advance=advance, unnamed=unnamed) as reader:
            yield "media item", _guard(path, reader.rows())
        return
    raw = _Counting(io.FileIO(path, "r"), advance)
    with io.TextIOWrapper(io.BufferedReader(raw, _READ_CHUNK), encoding="utf-8-sig", newline="") as text:
        yield "line", _guard(path, formats.ROW_PARSERS[name](text, unnamed))


def _guard(path: Path, rows: Iterator[T]) -> Iterator[T]:
    """Turns a file-level failure (not UTF-8, malformed JSON) into ``ImportAborted``."""
    try:
        yield from rows
    except UnicodeDecodeError as exc:
        raise ImportAborted(f"{path}: not UTF-8 text ({exc.reason}); nothing from this file was imported") from None
    except vics.VicsError as exc:
        raise ImportAborted(f"{path}: {exc}") from None


def _tally(report: ImportReport | RetractReport, row: Rejection | Unsupported, kept: object,
           path: Path, unit: str, strict: bool) -> None:
    """Counts a row that is not a hash to use: unsupported kind, or rejected
    (kept for the report up to a limit; with ``strict``, the file is aborted)."""
    if isinstance(row, Unsupported):
        report.unsupported[row.algorithm] += 1
        return
    if strict:
        raise ImportAborted(f"{path}: {unit} {row.line}: {row.reason}")
    report.rejected_total += 1
    if len(report.rejected) < KEPT_REJECTIONS:
        report.rejected.append(kept)  # type: ignore[arg-type]


async def import_file(
    store: Store,
    path: Path,
    *,
    country: str,
    format_name: str = "auto",
    strict: bool = False,
    advance: Advance | None = None,
) -> ImportReport:
    """Adds the file's valid rows as one segment, published at once; bad rows are reported.

    With ``strict``, any bad row aborts the whole import and nothing is written;
    so does a file that cannot be read to its end (malformed JSON, not UTF-8).
    """
    report = ImportReport(path)
    unnamed, plain = await asyncio.to_thread(_scan, path, country)
    if plain and formats.resolve_format(path, format_name) in ("csv", "lines"):
        return await _import_in_bulk(store, path, report, formats.resolve_format(path, format_name),
                                     unnamed, strict, advance)
    with _parsed_rows(path, format_name, country, advance, unnamed) as (unit, rows):
        report.unit = unit

        async def batches() -> AsyncIterator[list[formats.Row]]:
            batch: list[formats.Row] = []
            append = batch.append
            for row in rows:
                if type(row) is tuple:
                    append(row)
                    if len(batch) >= BATCH_ROWS:
                        yield batch
                        batch = []
                        append = batch.append
                else:
                    _tally(report, cast(formats.Refused, row), row, path, unit, strict)
            if batch:
                yield batch

        counts: ImportCounts = await store.add_rows(batches())
    report.added, report.already_present = counts.added, counts.already_present
    return report


async def _import_in_bulk(store: Store, path: Path, report: ImportReport, format_name: str, unnamed: str,
                          strict: bool, advance: Advance | None) -> ImportReport:
    """``import_file`` of a plain text file, parsed by blocks (node.bulk_parse)."""
    def batches(handle: io.BufferedReader[io.FileIO]) -> Iterator[dict[str, bulk_parse.Group]]:
        def read(size: int) -> bytes:
            data = handle.read(size)
            if advance is not None and data:
                advance(len(data))
            return data

        for chunk in _guard(path, bulk_parse.chunks(read, format_name, unnamed)):
            for other in chunk.others:
                _tally(report, other, other, path, "line", strict)
            if chunk.groups:
                yield chunk.groups

    with path.open("rb", buffering=0) as raw, io.BufferedReader(raw, _READ_CHUNK) as handle:
        counts: ImportCounts = await store.add_rows(_in_thread(batches(handle)))
    report.added, report.already_present = counts.added, counts.already_present
    return report


async def _in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """The items, computed on a worker thread of their own (the event loop stays
    free). Always the same thread: the C allocator keeps an arena per thread that
    allocates, so a parser hopping between pool threads would hold the freed
    memory of its working set once in each of them."""
    done = object()
    loop = asyncio.get_running_loop()
    with ThreadPoolExecutor(1, thread_name_prefix="parse") as parser:
        while (item := await loop.run_in_executor(parser, next, items, done)) is not done:
            yield item  # type: ignore[misc]


async def retract_files(
    store: Store,
    paths: list[Path],
    *,
    country: str,
    format_name: str = "auto",
    strict: bool = False,
    advance: Callable[[Path], Advance | None] | None = None,
) -> RetractReport:
    """Removes every (algorithm, digest) the files list, all files in one transaction.

    Metadata in the files is ignored; rows the store does not hold count as not
    present. With ``strict``, a bad row aborts and nothing is removed.
    """
    report = RetractReport(list(paths))

    async def batches() -> AsyncIterator[list[tuple[str, bytes]]]:
        batch: list[tuple[str, bytes]] = []
        for path in paths:
            with _parsed_rows(path, format_name, country, advance(path) if advance else None) as (unit, rows):
                for row in rows:
                    if type(row) is tuple:
                        batch.append((row[0], row[1]))
                        if len(batch) >= BATCH_ROWS:
                            yield batch
                            batch = []
                    else:
                        _tally(report, cast(formats.Refused, row), (path, unit, row), path, unit, strict)
        if batch:
            yield batch

    counts: RemoveCounts = await store.remove(batches())
    report.removed, report.not_present = counts.removed, counts.not_present
    return report
