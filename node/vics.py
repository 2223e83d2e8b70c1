"""Project VIC's VICS JSON (OData): streamed import and export.

A VICS file is an OData document. Exporters disagree on its shape, so all of
these are read:

- ``{"@odata.context": "...#Cases", "value": [{"CaseID": .., "Media": [media, ...]}, ...]}``
- ``{"@odata.context": "...#Media", "value": [media, ...]}``
- ``{"Media": [media, ...]}`` and a bare top-level array of media (or of cases).

The layout is sniffed from the first keys, then the media items are streamed
one at a time with ijson (a multi-gigabyte file never has to fit in memory).
Each hash of a media item (``MD5``, ``SHA1``, and ``SHA256``/``PDQ``/``VPDQ``
when present) becomes a row sharing the item's metadata: ``Category`` (as text),
``VictimIdentified``, ``Series``, ``DateUpdated`` (as an ISO date). ``PhotoDNA``
is proprietary: counted as unsupported, never computed. Field names are
matched case-insensitively; unknown fields are ignored, and so is everything
that could say where a file lived (``RelativeFilePath``, ``MediaFiles``, EXIF):
the reference is ``<country>-VICS-<MediaID>``, or generated when there is none.
A rejection's position is the media item's index in the file (1-based).

Numbers are parsed exactly (``use_float=False``: integers of any size, other
numbers as ``Decimal``): ijson's C backend stops a whole file with "integer
overflow" on an integer of 2^64 or more when asked for floats, and such values
turn up in fields we ignore (``SourceFileID``). Parsing exactly costs no
measurable import speed.

Malformed JSON stops the file with ``VicsError`` naming the byte offset, line
and column; the importer then rolls the whole file back.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import ijson

from federation import algorithms
from node import formats
from node.formats import ParsedRow, Row, Unsupported
from node.records import Rejection

ODATA_CONTEXT = "http://github.com/VICSDATAMODEL/ProjectVic/DataModels/2.0.xml/CUSTOM/$metadata#Cases"
# The export's own field carrying a row's reference verbatim, so that export -> import is identical.
REFERENCE_FIELD = "IcseReference"
_BOM = b"\xef\xbb\xbf"
_READ = 1 << 16
# Lower-case field name -> algorithm, for every kind the registry knows.
_HASH_FIELDS = {a.name: a for a in algorithms.all_algorithms()}
# Keys that only a media item has: seeing one tells the layout.
_MEDIA_KEYS = frozenset({"mediaid", "photodna", "category", "mediasize", "relativefilepath", "mediafiles",
                         "exifs", "isprecategorized", *_HASH_FIELDS})
_MEDIA_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._{}-]{0,63}")
_ODATA_DATE = re.compile(r"/Date\((-?\d+)(?:[+-]\d{4})?\)/")


class VicsError(ValueError):
    """The file cannot be read as VICS JSON; the message says where and why."""


_DIGITS = b"0123456789"
_AS_DIGIT_MARKS = bytes(ord("0") if chr(i).isdigit() and i < 128 else ord(".") for i in range(256))


def _max_digits() -> int:
    """Longest digit run ijson may see: Python refuses to convert longer integers
    (``sys.get_int_max_str_digits``), and ijson's C backend crashes the process
    on that refusal instead of raising it."""
    return sys.get_int_max_str_digits() or 1 << 62


class _Reader:
    """Reads a file for ijson, remembering the offsets of the last chunk read.

    Refuses a run of digits longer than ``_max_digits()`` (across chunk
    boundaries too) before ijson sees it: see ``_max_digits``.
    """

    def __init__(self, handle: BinaryIO, start: int, advance: Callable[[int], None] | None):
        self._handle = handle
        self._advance = advance
        self.chunk_start = self.position = start
        self._run = 0  # digits at the end of what was read so far
        self._limit = _max_digits()
        self._long = b"0" * (self._limit + 1)  # in a chunk with digits marked '0', the rest '.'

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.chunk_start, self.position = self.position, self.position + len(data)
        self._check_digits(data)
        if data and self._advance is not None:
            self._advance(len(data))
        return data

    def _check_digits(self, data: bytes) -> None:
        leading = len(data) - len(data.lstrip(_DIGITS))
        found = data.translate(_AS_DIGIT_MARKS).find(self._long)  # 10x faster than a regular expression
        if self._run + leading > self._limit or found >= 0:
            at = self.chunk_start - self._run if self._run + leading > self._limit else self.chunk_start + found
            raise VicsError(f"a number of more than {self._limit:,} digits at byte offset {at:,}: "
                            f"not read; nothing from this file was imported")
        self._run = self._run + len(data) if leading == len(data) else len(data) - len(data.rstrip(_DIGITS))


class VicsReader:
    """One VICS file, opened for streaming: ``rows()`` yields its rows, rejections and unsupported hashes."""

    def __init__(self, path: Path, *, country: str, advance: Callable[[int], None] | None = None,
                 unnamed: str = ""):
        self.path = path
        self.country = country
        self.unnamed = unnamed  # a media item without a reference gets this + its number
        self._advance = advance
        self._handle: BinaryIO | None = None
        self.items = 0  # media items read so far

    def __enter__(self) -> VicsReader:
        self._handle = self.path.open("rb")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.close()

    def rows(self) -> Iterator[ParsedRow]:
        assert self._handle is not None, "use VicsReader as a context manager"
        start = len(_BOM) if self._handle.read(len(_BOM)) == _BOM else 0
        self._handle.seek(start)
        reader = _Reader(self._handle, start, None)
        try:
            prefix = _sniff(ijson.parse(reader))
        except ijson.JSONError as exc:
            raise self._error(exc, reader) from None
        # The sniffed start is read again from the beginning; only this pass reports progress.
        self._handle.seek(start)
        reader = _Reader(self._handle, start, self._advance)
        try:
            for item in ijson.items(reader, prefix, use_float=False):
                self.items += 1
                yield from media_rows(item, self.items, self.country, self.unnamed)
        except ijson.JSONError as exc:
            raise self._error(exc, reader) from None

    def _error(self, exc: Exception, reader: _Reader) -> VicsError:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # Never echo the text around the error: it may hold a path or a digest.
        where = locate_error(self.path, reader.chunk_start, reader.position)
        after = f", after media item {self.items:,}" if self.items else ""
        return VicsError(f"malformed JSON at {where}{after}: {reason}; nothing from this file was imported")


def _sniff(events: Iterator[tuple[str, str, Any]]) -> str:
    """The ijson prefix of the media items, from the first keys of the document."""
    container: str | None = None  # prefix of the array whose items are cases or media
    for prefix, event, value in events:
        if container is None:
            if prefix != "":
                continue
            if event == "start_array":
                container = "item"
            elif event == "map_key" and value.lower() in ("value", "media"):
                kind = next(events, ("", "end", None))
                if kind[1] != "start_array":
                    raise VicsError(f"'{value}' is not an array: not a VICS file")
                if value.lower() == "media":
                    return f"{value}.item"
                container = f"{value}.item"
            elif event in ("string", "number", "boolean", "null"):
                raise VicsError("the document is not a JSON object or array: not a VICS file")
            continue
        if prefix == container and event == "map_key":
            key = value.lower()
            if key == "media":
                return f"{container}.{value}.item"
            if key in _MEDIA_KEYS:
                return container
        elif event == "end_array" and prefix == container[: -len(".item")].rstrip("."):
            return container  # no item told: whatever is there is read as media
    if container is None:
        raise VicsError("no 'value' or 'Media' array at the top level: not a VICS file")
    return container


def locate_error(path: Path, chunk_start: int, chunk_end: int) -> str:
    """Where in the file the parser fails: re-reads it up to the failing chunk, then byte by byte.

    Only called on the error path; costs one more pass up to the error.
    """
    events = ijson.sendable_list()
    parser = ijson.basic_parse_coro(events)
    line, line_start = 1, 0
    with path.open("rb") as handle:
        offset = len(_BOM) if handle.read(len(_BOM)) == _BOM else 0
        handle.seek(offset)
        try:
            while offset < chunk_start:
                data = handle.read(min(_READ, chunk_start - offset))
                if not data:
                    break
                parser.send(data)
                events.clear()
                newlines = data.count(b"\n")
                if newlines:
                    line += newlines
                    line_start = offset + data.rindex(b"\n") + 1
                offset += len(data)
            while byte := handle.read(1):
                parser.send(byte)
                events.clear()
                offset += 1
                if byte == b"\n":
                    line, line_start = line + 1, offset
            parser.close()
        except ijson.JSONError:
            return f"byte offset {offset:,} (line {line:,}, column {offset - line_start + 1:,})"
    return f"bytes {chunk_start:,}..{chunk_end:,}"


def _whole(value: Any) -> Any:
    """A JSON number written with a fraction or exponent but whole (``2.0``) as an int;
    anything else unchanged. Bounded, so ``1e999999`` is never expanded."""
    if (isinstance(value, Decimal) and value.is_finite() and value == value.to_integral_value()
            and value.adjusted() < 64):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _text(name: str, value: Any) -> str:
    if value is None:
        return ""
    value = _whole(value)
    if isinstance(value, bool) or not isinstance(value, (str, int, float, Decimal)):
        raise ValueError(f"{name} must be text or a number, got {type(value).__name__}")
    return formats.short_text(name, str(value))


def _flag(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, (int, float, Decimal)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        try:
            return formats.parse_flag(value)
        except ValueError:
            pass
    raise ValueError(f"VictimIdentified must be true/false/null, got {str(value)[:20]!r}")


def _date(value: Any) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError(f"DateUpdated must be a date, got {type(value).__name__}")
    legacy = _ODATA_DATE.fullmatch(value.strip())
    if legacy:
        return dt.datetime.fromtimestamp(int(legacy.group(1)) / 1000, dt.UTC).date().isoformat()
    try:
        return formats.parse_date(value)
    except ValueError:
        raise ValueError(f"DateUpdated must be an ISO date, got {value.strip()[:30]!r}") from None


def _reference(fields: dict[str, Any], country: str) -> str:
    own = fields.get(REFERENCE_FIELD.lower())
    if isinstance(own, str) and own.strip():
        return formats.short_text("reference", own)
    media_id = _whole(fields.get("mediaid"))
    if isinstance(media_id, int) and not isinstance(media_id, bool):
        return f"{country}-VICS-{media_id}"
    if isinstance(media_id, str) and _MEDIA_ID.fullmatch(media_id.strip()):
        return f"{country}-VICS-{media_id.strip()}"
    return ""  # the importer names it (media_rows' ``unnamed``)


def media_rows(item: Any, number: int, country: str, unnamed: str = "") -> list[ParsedRow]:
    """The rows of one media item (one per hash), or why not; ``number`` is its position.
    Without a reference of its own or a MediaID, the item's reference is ``unnamed`` + ``number``."""
    if not isinstance(item, dict):
        return [Rejection(number, f"media item is not a JSON object but {type(item).__name__}")]
    fields = {key.lower(): value for key, value in item.items()}
    media_id = fields.get("mediaid")
    label = f"MediaID {media_id}: " if isinstance(media_id, (int, str)) and len(str(media_id)) <= 64 else ""
    try:
        reference = _reference(fields, country) or (f"{unnamed}{number}" if unnamed else "")
        category = _text("Category", fields.get("category"))
        victim = _flag(fields.get("victimidentified"))
        series = _text("Series", fields.get("series"))
        date = _date(fields.get("dateupdated"))
    except ValueError as exc:
        return [Rejection(number, label + str(exc))]
    found: list[ParsedRow] = []
    for name, algorithm in _HASH_FIELDS.items():
        value = fields.get(name)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            found.append(Rejection(number, f"{label}{name.upper()} must be a hex string"))
            continue
        try:
            found.append((algorithm.name, formats.parse_digest(algorithm, value), reference, category, victim,
                          series, date))
        except ValueError as exc:
            found.append(Rejection(number, f"{label}{name.upper()}: {exc}"))
    for name in formats.UNSUPPORTED_ALGORITHMS:
        if fields.get(name) not in (None, ""):
            found.append(Unsupported(number, name))
    if not found:
        found.append(Rejection(number, f"{label}no hash (MD5, SHA1) in the media item"))
    return found


# -- export --------------------------------------------------------------------------------------

def _media(number: int, group: list[Row]) -> dict[str, Any]:
    _, _, reference, category, victim, series, date = group[0]
    item: dict[str, Any] = {"MediaID": number, REFERENCE_FIELD: reference}
    if category:
        item["Category"] = int(category) if category.isdigit() and str(int(category)) == category else category
    if victim is not None:
        item["VictimIdentified"] = victim
    if series:
        item["Series"] = series
    if date:
        item["DateUpdated"] = date
    for row in group:
        item[row[0].upper()] = row[1].hex().upper()
    return item


class VicsWriter:
    """Writes rows as one VICS case; consecutive rows sharing a reference and metadata
    (and no algorithm) share a media item, so feed rows grouped by reference
    (``Store.iter_rows(by_reference=True)``). Streams: one media item in memory."""

    def __init__(self, handle: TextIO, *, case_number: str = ""):
        self._handle = handle
        self._group: list[Row] = []
        self.count = self.items = 0
        handle.write('{"@odata.context": ' + json.dumps(ODATA_CONTEXT) + ',\n "value": [{"CaseID": 1, '
                     '"CaseNumber": ' + json.dumps(case_number) + ', "SourceApplicationName": "icse-node", '
                     '"Media": [\n')

    def write(self, batch: Iterable[Row]) -> None:
        group = self._group
        for row in batch:
            if group and (row[2:] != group[0][2:] or any(row[0] == g[0] for g in group)):
                self._flush()
            group.append(row)
            self.count += 1

    def _flush(self) -> None:
        if self._group:
            self.items += 1
            self._handle.write(("" if self.items == 1 else ",\n") + json.dumps(_media(self.items, self._group)))
            self._group.clear()

    def close(self) -> None:
        self._flush()
        self._handle.write("\n]}]}\n")


def read_media(text: str, country: str = "XX") -> list[ParsedRow]:
    """Every row of a VICS document held in a string (for tests and small inputs)."""
    data = text.encode()
    prefix = _sniff(ijson.parse(_Reader(io.BytesIO(data), 0, None)))
    rows: list[ParsedRow] = []
    for number, item in enumerate(ijson.items(_Reader(io.BytesIO(data), 0, None), prefix, use_float=False),
                                  start=1):
        rows.extend(media_rows(item, number, country))
    return rows
