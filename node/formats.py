"""Parsers (and writers) for the hash-set files a node imports and exports.

Each parser streams: it yields a ``HashRecord`` or a ``Rejection`` (line number
and reason) per input row — or an ``Unsupported`` for a hash kind the
federation does not speak (PhotoDNA) — so one bad row never stops an import
and a large file never has to fit in memory. Parsers know nothing of the store.

The import path uses the ``*_rows`` variants, which yield plain tuples in
``HashRecord`` field order (``ROW_FIELDS``) instead of records: the same
parsing and validation, without building an object per row.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from federation import algorithms
from node.records import HashRecord, Rejection

# (algorithm, digest, reference, category, victim_identified, series, date_added)
Row = tuple[str, bytes, str, str, "bool | None", str, str]
ROW_FIELDS = ("algorithm", "digest", "reference", "category", "victim_identified", "series", "date_added")


@dataclass(frozen=True)
class Unsupported:
    """A hash the input holds but the federation cannot match (e.g. PhotoDNA): skipped, counted."""

    line: int
    algorithm: str


Parsed = HashRecord | Rejection | Unsupported
# A line that gives no row to store: why not, or a hash kind no node matches.
Refused = Rejection | Unsupported
ParsedRow = Row | Refused
RowParser = Callable[[Iterable[str], str], Iterator[ParsedRow]]  # (lines, unnamed)

# Hash kinds found in case-system exports that no node can match; never computed.
UNSUPPORTED_ALGORITHMS = ("photodna",)

_TRUE = {"1", "true", "yes", "y", "t"}
_FALSE = {"0", "false", "no", "n", "f"}
_FLAGS: dict[str, bool | None] = {"": None, "true": True, "false": False, "1": True, "0": False}
MAX_FIELD = 256
_CONTROL = re.compile(r"[\x00-\x1f]")
_ALGORITHMS = {a.name: a for a in algorithms.all_algorithms()}

# A vPDQ digest of 4096 frames is 262,144 hex characters: more than csv's default field limit.
_LONGEST_DIGEST = max(a.digest_size * a.max_frames * 2 for a in algorithms.all_algorithms())
if csv.field_size_limit() < _LONGEST_DIGEST + 1024:
    csv.field_size_limit(min(sys.maxsize, _LONGEST_DIGEST + 1024))


def parse_flag(text: str) -> bool | None:
    value = text.strip().lower()
    if not value or value in {"unknown", "null", "none"}:
        return None
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"victim_identified must be true/false/empty, got {text.strip()[:20]!r}")


def _flag(text: str) -> bool | None:
    try:
        return _FLAGS[text]
    except KeyError:
        return parse_flag(text)


def short_text(name: str, value: str) -> str:
    value = value.strip()
    if len(value) <= MAX_FIELD and value.isprintable():  # the common case, checked in C
        return value
    if len(value) > MAX_FIELD:
        raise ValueError(f"{name} longer than {MAX_FIELD} characters")
    if _CONTROL.search(value):
        raise ValueError(f"{name} contains control characters")
    return value


def algorithm_named(name: str) -> algorithms.Algorithm:
    """The registry's algorithm; raises ``DigestError`` (a ValueError) naming the unknown name."""
    found = _ALGORITHMS.get(name)
    return found if found is not None else algorithms.get(name.strip().lower())


def parse_digest(algorithm: algorithms.Algorithm, text: str) -> bytes:
    """``algorithm.parse_hex`` with a fast path for the common well-formed case."""
    if algorithm.max_frames == 1 and len(text) == 2 * algorithm.digest_size:
        try:
            digest = bytes.fromhex(text)
        except ValueError:
            pass
        else:
            # fromhex skips whitespace between bytes: a short result means it was not plain hex.
            if len(digest) == algorithm.digest_size:
                return digest
    return algorithm.parse_hex(text)


_DATES: dict[str, str] = {}


def parse_date(text: str) -> str:
    """An ISO date (or date-time, whose date is kept); empty stays empty."""
    try:
        return _DATES[text]
    except KeyError:
        pass
    value = text.strip()
    if not value:
        return ""
    try:
        date = dt.date.fromisoformat(value[:10]).isoformat()
    except ValueError:
        raise ValueError(f"date_added must be an ISO date (YYYY-MM-DD), got {value[:20]!r}") from None
    if len(_DATES) > 4096:
        _DATES.clear()
    _DATES[text] = date
    return date


def unsupported_name(name: str) -> str | None:
    name = name.strip().lower()
    return name if name in UNSUPPORTED_ALGORITHMS else None


def make_row(number: int, algorithm_name: str, digest_hex: str, reference: str = "", category: str = "",
             victim: str = "", series: str = "", date: str = "", *, unnamed: str = "") -> ParsedRow:
    """One validated row from text cells, or why not. A row without a reference
    gets ``unnamed`` + its row number when ``unnamed`` is given (see
    ``node.importer.unnamed_prefix``)."""
    try:
        algorithm = algorithm_named(algorithm_name)
    except algorithms.DigestError as exc:
        unsupported = unsupported_name(algorithm_name)
        return Unsupported(number, unsupported) if unsupported else Rejection(number, str(exc))
    try:
        return (
            algorithm.name,
            parse_digest(algorithm, digest_hex),
            (short_text("reference", reference) if reference else "") or (f"{unnamed}{number}" if unnamed else ""),
            short_text("category", category) if category else "",
            _flag(victim),
            short_text("series", series) if series else "",
            parse_date(date) if date else "",
        )
    except ValueError as exc:
        return Rejection(number, str(exc))


def _records(rows: Iterator[ParsedRow]) -> Iterator[Parsed]:
    for row in rows:
        yield HashRecord(*row) if type(row) is tuple else row  # type: ignore[misc]


# -- lines ---------------------------------------------------------------------------------------

def parse_lines_rows(lines: Iterable[str], unnamed: str = "") -> Iterator[ParsedRow]:
    """One ``algorithm:hex`` per line; blank lines and ``#`` comments are skipped.
    References are ``unnamed`` + the line number (see ``make_row``)."""
    for number, line in enumerate(lines, start=1):
        row = lines_row(number, line, unnamed)
        if row is not None:
            yield row


def lines_row(number: int, line: str, unnamed: str = "") -> ParsedRow | None:
    """What one line of the lines format is (None: blank or a comment)."""
    text = line.strip()
    if not text or text[0] == "#":
        return None
    name, sep, digest_hex = text.partition(":")
    if not sep:
        return Rejection(number, f"expected ALGORITHM:HEX, got {text[:80]!r}")
    return make_row(number, name, digest_hex.strip(), unnamed=unnamed)


# -- CSV -----------------------------------------------------------------------------------------

CSV_COLUMNS = ("algorithm", "digest", "reference", "category", "victim_identified")
EXPORT_CSV_COLUMNS = ROW_FIELDS
_CSV_ALIASES = {"algo": "algorithm", "hash": "digest", "ref": "reference"}
_META = ("reference", "category", "victim_identified", "series", "date_added")
# A first cell starting with one of these may be a comment or a blank row: checked on the slow path.
_ODD_START = frozenset(" \t#")


def parse_csv_rows(lines: Iterable[str], unnamed: str = "") -> Iterator[ParsedRow]:
    """CSV in one of two shapes, told apart by the header:

    - long: ``algo,digest,reference,category,victim_identified`` (the header
      is optional; with one, ``series`` and ``date_added`` may follow);
    - wide: one column per algorithm (``md5,sha1,pdq,...``) plus the metadata
      columns; every filled algorithm cell becomes a record sharing the row's
      metadata (how case systems export an item with all its hashes). A
      ``photodna`` column is counted as unsupported.

    A row without a reference gets ``unnamed`` + its line number: the hashes of
    one wide row share it.
    """
    reader = csv.reader(lines)
    layout = CsvLayout(unnamed)
    rows = iter(reader)
    while not layout.done:
        try:
            for row in rows:
                yield from layout.rows(reader.line_num, row)
                if layout.done:
                    return
            return
        except csv.Error as exc:
            yield Rejection(reader.line_num, f"not valid CSV: {exc}")


class CsvLayout:
    """The columns of one CSV file (from its header, if any) and what each row of it
    holds: line by line, so that a bulk parser (node.bulk_parse) can hand it the
    rows it does not take itself and get exactly what this module would say."""

    def __init__(self, unnamed: str = ""):
        self.unnamed = unnamed
        self.columns: tuple[str, ...] = CSV_COLUMNS
        self.wide: tuple[str, ...] = ()
        self.unsupported_columns: tuple[str, ...] = ()
        self.index = {name: n for n, name in enumerate(self.columns)}
        self.done = False  # a bad header: nothing more is read

    @property
    def long(self) -> bool:
        """Rows are one hash each, in an ``algorithm`` and a ``digest`` column."""
        return not self.wide and "algorithm" in self.index and "digest" in self.index

    def rows(self, number: int, row: list[str]) -> list[ParsedRow]:
        """What CSV row ``row`` (on line ``number``) gives: none, one or several."""
        first = row[0] if row else ""
        if (not first or first[0] in _ODD_START) and (
                not row or first.lstrip().startswith("#") or not any(c.strip() for c in row)):
            return []
        width = len(row)
        if number == 1 and _is_header(row):
            return self._header(row)
        if width > len(self.columns):
            return [Rejection(number, f"{width} columns, expected at most {len(self.columns)}")]
        index, unnamed = self.index, self.unnamed
        meta = [row[index[name]] if index.get(name, width) < width else "" for name in _META]
        if not self.wide:
            algo = row[index["algorithm"]] if index["algorithm"] < width else ""
            digest = row[index["digest"]] if index["digest"] < width else ""
            return [make_row(number, algo, digest, *meta, unnamed=unnamed)]
        filled = [name for name in self.wide if index[name] < width and row[index[name]].strip()]
        skipped = [name for name in self.unsupported_columns if index[name] < width and row[index[name]].strip()]
        found: list[ParsedRow] = []
        if not filled and not skipped:
            found.append(Rejection(number, f"no hash in any of the columns {', '.join(self.wide)}"))
        found += [make_row(number, name, row[index[name]], *meta, unnamed=unnamed) for name in filled]
        found += [Unsupported(number, name) for name in skipped]
        return found

    def _header(self, row: list[str]) -> list[ParsedRow]:
        columns = self.columns = tuple(_CSV_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in row)
        wide = tuple(c for c in columns if c in algorithms.names())
        unsupported_columns = tuple(c for c in columns if c in UNSUPPORTED_ALGORITHMS)
        if "algorithm" not in columns and not wide:
            self.done = True
            return [Rejection(1, "header names neither an 'algorithm' column nor algorithm columns "
                                 f"({', '.join(algorithms.names())})")]
        if "algorithm" in columns and "digest" not in columns:
            self.done = True
            return [Rejection(1, "header lacks column(s): digest")]
        if "algorithm" in columns:
            wide = unsupported_columns = ()
        self.wide, self.unsupported_columns = wide, unsupported_columns
        self.index = {}
        for n, name in enumerate(columns):
            self.index.setdefault(name, n)
        return []


def _is_header(row: list[str]) -> bool:
    first = _CSV_ALIASES.get(row[0].strip().lower(), row[0].strip().lower())
    names = {c.strip().lower() for c in row}
    return first == "algorithm" or (bool(names & set(algorithms.names())) and not _looks_hex(row))


def _looks_hex(row: list[str]) -> bool:
    return any(len(c.strip()) >= 32 and all(ch in "0123456789abcdefABCDEF" for ch in c.strip()) for c in row)


# -- writers (export) ----------------------------------------------------------------------------

def _flag_text(value: bool | None) -> str:
    return "" if value is None else ("true" if value else "false")


class CsvWriter:
    """Writes rows in the long CSV form ``parse_csv`` reads back identically."""

    def __init__(self, handle: TextIO):
        self._writer = csv.writer(handle, lineterminator="\n")
        self._writer.writerow(EXPORT_CSV_COLUMNS)
        self.count = 0

    def write(self, batch: Iterable[Row]) -> None:
        rows = [(a, d.hex(), ref, cat, _flag_text(v), ser, date) for a, d, ref, cat, v, ser, date in batch]
        self._writer.writerows(rows)
        self.count += len(rows)

    def close(self) -> None:
        pass


class LinesWriter:
    """``algorithm:hex`` per line: the digests only, no metadata."""

    def __init__(self, handle: TextIO):
        self._handle = handle
        handle.write("# algorithm:hex, one per line (digests only; export as csv or vics to keep metadata)\n")
        self.count = 0

    def write(self, batch: Iterable[Row]) -> None:
        lines = [f"{row[0]}:{row[1].hex()}\n" for row in batch]
        self._handle.writelines(lines)
        self.count += len(lines)

    def close(self) -> None:
        pass


# -- formats -------------------------------------------------------------------------------------

ROW_PARSERS: dict[str, RowParser] = {"lines": parse_lines_rows, "csv": parse_csv_rows}
# Every import format; 'vics' (Project VIC JSON) is binary and parsed by node.vics.
FORMATS = ("lines", "csv", "vics")
_SUFFIXES = {".csv": "csv", ".txt": "lines", ".lst": "lines", ".json": "vics"}


def detect_format(path: Path) -> str:
    return _SUFFIXES.get(path.suffix.lower(), "lines")


def resolve_format(path: Path, format_name: str = "auto") -> str:
    name = detect_format(path) if format_name == "auto" else format_name
    if name not in FORMATS:
        raise ValueError(f"unknown import format {name!r} (known: auto, {', '.join(FORMATS)})")
    return name


def read_text(text: str, format_name: str) -> Iterator[Parsed]:
    """Parses text in a text format into records (what the import path does, as objects)."""
    return _records(ROW_PARSERS[format_name](io.StringIO(text, newline=""), ""))
