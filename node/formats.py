"""Parsers for the hash-set files a node imports.

Each parser streams: it yields a ``HashRecord`` or a ``Rejection`` (line number
and reason) per input row, so one bad row never stops an import and a large
file never has to fit in memory. Parsers know nothing of the store.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from federation import algorithms
from node.records import HashRecord, Rejection

Parsed = HashRecord | Rejection
Parser = Callable[[Iterable[str]], Iterator[Parsed]]

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}
MAX_FIELD = 256


def parse_flag(text: str) -> bool | None:
    value = text.strip().lower()
    if not value or value in {"unknown", "null", "none"}:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"victim_identified must be true/false/empty, got {text.strip()[:20]!r}")


def _short_text(name: str, value: str) -> str:
    value = value.strip()
    if len(value) > MAX_FIELD:
        raise ValueError(f"{name} longer than {MAX_FIELD} characters")
    if any(ord(ch) < 32 for ch in value):
        raise ValueError(f"{name} contains control characters")
    return value


def parse_lines(lines: Iterable[str]) -> Iterator[Parsed]:
    """One ``algorithm:hex`` per line; blank lines and ``#`` comments are skipped."""
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        try:
            algorithm, digest = algorithms.parse_tagged(text)
        except algorithms.DigestError as exc:
            yield Rejection(number, str(exc))
            continue
        yield HashRecord(algorithm.name, digest)


CSV_COLUMNS = ("algorithm", "digest", "reference", "category", "victim_identified")
_CSV_ALIASES = {"algo": "algorithm", "hash": "digest", "ref": "reference"}


def parse_csv(lines: Iterable[str]) -> Iterator[Parsed]:
    """CSV in one of two shapes, told apart by the header:

    - long: ``algo,digest,reference,category,victim_identified`` (the header
      is optional; with one, ``series`` and ``date_added`` may follow);
    - wide: one column per algorithm (``md5,sha1,pdq,...``) plus the metadata
      columns; every filled algorithm cell becomes a record sharing the row's
      metadata (how case systems export an item with all its hashes).
    """
    reader = csv.reader(lines)
    columns: tuple[str, ...] = CSV_COLUMNS
    wide: tuple[str, ...] = ()
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if number == 1 and _is_header(row):
            columns = tuple(_CSV_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in row)
            wide = tuple(c for c in columns if c in algorithms.names())
            if "algorithm" not in columns and not wide:
                yield Rejection(number, "header names neither an 'algorithm' column nor algorithm columns "
                                f"({', '.join(algorithms.names())})")
                return
            if "algorithm" in columns and "digest" not in columns:
                yield Rejection(number, "header lacks column(s): digest")
                return
            if "algorithm" in columns:
                wide = ()
            continue
        if len(row) > len(columns):
            yield Rejection(number, f"{len(row)} columns, expected at most {len(columns)}")
            continue
        cells = dict(zip(columns, row))
        if not wide:
            yield _csv_record(number, cells.get("algorithm", ""), cells.get("digest", ""), cells)
            continue
        filled = [name for name in wide if cells.get(name, "").strip()]
        if not filled:
            yield Rejection(number, f"no hash in any of the columns {', '.join(wide)}")
        for name in filled:
            yield _csv_record(number, name, cells[name], cells)


def _is_header(row: list[str]) -> bool:
    first = _CSV_ALIASES.get(row[0].strip().lower(), row[0].strip().lower())
    names = {c.strip().lower() for c in row}
    return first == "algorithm" or bool(names & set(algorithms.names())) and not _looks_hex(row)


def _looks_hex(row: list[str]) -> bool:
    return any(len(c.strip()) >= 32 and all(ch in "0123456789abcdefABCDEF" for ch in c.strip()) for c in row)


def _csv_record(number: int, algorithm_name: str, digest_hex: str, cells: dict[str, str]) -> Parsed:
    try:
        algorithm = algorithms.get(algorithm_name.strip().lower())
        return HashRecord(
            algorithm=algorithm.name,
            digest=algorithm.parse_hex(digest_hex),
            reference=_short_text("reference", cells.get("reference", "")),
            category=_short_text("category", cells.get("category", "")),
            victim_identified=parse_flag(cells.get("victim_identified", "")),
            series=_short_text("series", cells.get("series", "")),
            date_added=_parse_date(cells.get("date_added", "")),
        )
    except ValueError as exc:
        return Rejection(number, str(exc))


def _parse_date(text: str) -> str:
    text = text.strip()
    if not text:
        return ""
    try:
        return dt.date.fromisoformat(text[:10]).isoformat()
    except ValueError:
        raise ValueError(f"date_added must be an ISO date (YYYY-MM-DD), got {text[:20]!r}") from None


PARSERS: dict[str, Parser] = {"lines": parse_lines, "csv": parse_csv}
_SUFFIXES = {".csv": "csv", ".txt": "lines", ".lst": "lines"}


def detect_format(path: Path) -> str:
    return _SUFFIXES.get(path.suffix.lower(), "lines")


def parser_for(path: Path, format_name: str = "auto") -> Parser:
    name = detect_format(path) if format_name == "auto" else format_name
    if name not in PARSERS:
        raise ValueError(f"unknown import format {name!r} (known: auto, {', '.join(PARSERS)})")
    return PARSERS[name]


def read_text(text: str, format_name: str) -> Iterator[Parsed]:
    return PARSERS[format_name](io.StringIO(text, newline=""))
