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
_CSV_OPTIONAL = ("series", "date_added")


def parse_csv(lines: Iterable[str]) -> Iterator[Parsed]:
    """CSV with columns algo,digest,reference,category,victim_identified
    (header optional; with a header, ``series`` and ``date_added`` may follow)."""
    reader = csv.reader(lines)
    columns: tuple[str, ...] = CSV_COLUMNS
    for row in reader:
        number = reader.line_num
        if not row or not any(cell.strip() for cell in row) or row[0].lstrip().startswith("#"):
            continue
        if number == 1 and row[0].strip().lower() in {"algo", "algorithm"}:
            names = tuple(_CSV_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in row)
            missing = {"algorithm", "digest"} - set(names)
            if missing:
                yield Rejection(number, f"header lacks column(s): {', '.join(sorted(missing))}")
                return
            columns = names
            continue
        yield _csv_row(number, dict(zip(columns, row)), len(row), len(columns))


def _csv_row(number: int, cells: dict[str, str], width: int, expected: int) -> Parsed:
    if width > expected:
        return Rejection(number, f"{width} columns, expected at most {expected}")
    try:
        algorithm = algorithms.get(cells.get("algorithm", "").strip().lower())
        digest = algorithm.parse_hex(cells.get("digest", ""))
        return HashRecord(
            algorithm=algorithm.name,
            digest=digest,
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
