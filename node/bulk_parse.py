"""Bulk parsing of the text import formats (long CSV, ``algorithm:hex`` lines):
the common, well-formed rows of a block of several megabytes are parsed and
validated with array operations, without a Python call per row.

A line is taken in bulk only if every check ``node.formats`` would make is
certain to pass: printable ASCII only, the header's number of cells, an
algorithm named exactly as the registry does (single-digest kinds), a digest of
exactly the right number of hex digits, metadata cells of at most ``MAX_FIELD``
characters with no surrounding spaces, a known flag and an ISO date. Every
other line goes through ``node.formats`` one at a time, so rejections, their
line numbers and their reasons are the ones it gives. If such a line turns out
to be a row after all (e.g. ``SHA256`` in capitals), the whole block is parsed
line by line, so rows keep the file's order within each algorithm (which row of
a repeated digest is kept depends on it).

Only files with no quote and no carriage return are parsed in bulk (the caller
checks, ``plain``): in them a CSV record is one line and its cells are the
text between commas, as ``csv`` reads them.
"""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from federation import algorithms
from node import formats
from node.records import Rejection
from node.segment import FULL, Shape

BLOCK_BYTES = 4 << 20  # read at a time: ~50,000 rows of a long CSV
_BOM = b"\xef\xbb\xbf"
_TO_NEWLINE = bytes.maketrans(b",", b"\n")
_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
for _value, _chars in enumerate(zip("0123456789abcdef", "0123456789ABCDEF", strict=True)):
    for _char in _chars:
        _HEX_VALUE[ord(_char)] = _value
# Single-digest algorithms, by the exact name a bulk row must give.
_META = ("reference", "category", "victim_identified", "series", "date_added")
_BULK_ALGORITHMS = [a for a in algorithms.all_algorithms() if a.max_frames == 1]

# Rows of one algorithm, their keys (or None), and which fields the rows hold.
Group = tuple[list[tuple], "np.ndarray | None", Shape]


@dataclass
class Chunk:
    """What one block held: rows by algorithm (in file order), and the rows not to
    use (rejected, unsupported) in line order."""

    groups: dict[str, Group] = field(default_factory=dict)
    others: list[Rejection | formats.Unsupported] = field(default_factory=list)

    def add(self, parsed: formats.ParsedRow | None) -> None:
        if parsed is None:
            return
        if type(parsed) is tuple:
            rows, _, _ = self.groups.setdefault(parsed[0], ([], None, FULL))
            rows.append(parsed)
        else:
            self.others.append(parsed)  # type: ignore[arg-type]


def chunks(read: Callable[[int], bytes], format_name: str, unnamed: str) -> Iterator[Chunk]:
    """The file's rows, block by block (``read(n)`` gives its next bytes, b"" at the end)."""
    layout = formats.CsvLayout(unnamed) if format_name == "csv" else None
    number = 0  # lines before the block
    rest = b""
    first = True
    data = read(BLOCK_BYTES)
    data = data[len(_BOM):] if data.startswith(_BOM) else data
    while True:
        block = rest + data
        if data:
            cut = block.rfind(b"\n") + 1
            block, rest = block[:cut], block[cut:]
        elif block and not block.endswith(b"\n"):
            block += b"\n"  # the last line, unterminated
        if block:
            if first and layout is not None:  # the header (or first row) decides the layout
                cut = block.index(b"\n") + 1
                chunk = Chunk()
                for row in _slow_csv(layout, 1, block[:cut]):
                    chunk.add(row)
                yield chunk
                block, number = block[cut:], 1
            first = False
            if layout is not None and layout.done:
                return
            if block:
                yield _block(block, number, layout, unnamed)
                number += block.count(b"\n")
        if not data:
            return
        data = read(BLOCK_BYTES)


def _slow_csv(layout: formats.CsvLayout, number: int, line: bytes) -> list[formats.ParsedRow]:
    text = line.decode("utf-8")
    try:
        row = next(csv.reader([text]), [])
    except csv.Error as exc:
        return [Rejection(number, f"not valid CSV: {exc}")]
    return layout.rows(number, row)


def _line_by_line(block: bytes, number: int, layout: formats.CsvLayout | None, unnamed: str,
                  lines: np.ndarray | None = None) -> Chunk:
    """Parses the block's lines (or only ``lines``, indexes) as node.formats does."""
    chunk = Chunk()
    if lines is not None and not len(lines):
        return chunk
    split = block.split(b"\n")
    for i in range(len(split) - 1) if lines is None else lines.tolist():
        if layout is None:
            chunk.add(formats.lines_row(number + i + 1, split[i].decode("utf-8"), unnamed))
        else:
            for row in _slow_csv(layout, number + i + 1, split[i] + b"\n"):
                chunk.add(row)
            if layout.done:
                break
    return chunk


def _block(block: bytes, number: int, layout: formats.CsvLayout | None, unnamed: str) -> Chunk:
    """One block of whole lines, the first being line ``number + 1``."""
    if layout is not None and not layout.long:
        return _line_by_line(block, number, layout, unnamed)
    if layout is None:
        width, role = 2, {"algorithm": 0, "digest": 1}
    else:
        width, role = len(layout.columns), layout.index
    arr = np.frombuffer(block, dtype=np.uint8)
    ends = np.flatnonzero(arr == 10)
    count = len(ends)
    starts = np.empty(count, dtype=np.int64)
    starts[0], starts[1:] = 0, ends[:-1] + 1
    # Printable ASCII only (a lines-format line: no space either, it would be stripped).
    odd = (arr < (33 if layout is None else 32)) | (arr > 126)
    odd[ends] = False
    ok = np.ones(count, dtype=bool)
    ok[np.searchsorted(ends, np.flatnonzero(odd))] = False
    separators = np.flatnonzero(arr == (58 if layout is None else 44))
    line_of = np.searchsorted(ends, separators)
    ok &= np.bincount(line_of, minlength=count) == width - 1
    if layout is None:
        ok &= arr[starts] != 35  # '#': a comment
    good = np.flatnonzero(ok)
    bounds = np.empty((len(good), width + 1), dtype=np.int64)
    bounds[:, 0] = starts[good] - 1
    bounds[:, 1:width] = separators[ok[line_of]].reshape(len(good), width - 1)
    bounds[:, width] = ends[good]
    cell_start, cell_end = bounds[:, :-1] + 1, bounds[:, 1:]
    lengths = cell_end - cell_start

    code = np.full(len(good), -1, dtype=np.int64)
    a_start, a_length = cell_start[:, role["algorithm"]], lengths[:, role["algorithm"]]
    for n, algorithm in enumerate(_BULK_ALGORITHMS):
        spelled = np.frombuffer(algorithm.name.encode(), dtype=np.uint8)
        match = a_length == len(spelled)
        for offset, char in enumerate(spelled):
            match &= arr[np.minimum(a_start + offset, len(arr) - 1)] == char
        code[match] = n
    fine = code >= 0
    for name in _META:
        column = role.get(name, -1) if layout is not None else -1
        if 0 <= column < width:
            length = lengths[:, column]
            start, end = cell_start[:, column], np.maximum(cell_end[:, column] - 1, 0)
            padded = (length > 0) & ((arr[np.minimum(start, len(arr) - 1)] == 32) | (arr[end] == 32))
            fine &= (length <= formats.MAX_FIELD) & ~padded
    # Digests last: what is left of each algorithm's rows are the rows taken.
    digests: dict[int, np.ndarray] = {}

    def windows(size: int, offsets: np.ndarray) -> np.ndarray:
        """arr[offset:offset + size] for each offset, as rows (no index matrix)."""
        if not len(offsets):
            return np.empty((0, size), dtype=np.uint8)
        return np.lib.stride_tricks.sliding_window_view(arr, size)[offsets]

    d_start, d_length = cell_start[:, role["digest"]], lengths[:, role["digest"]]
    for n, algorithm in enumerate(_BULK_ALGORITHMS):
        size = algorithm.digest_size
        rows = np.flatnonzero(fine & (code == n))
        right = d_length[rows] == 2 * size
        fine[rows[~right]] = False
        rows = rows[right]
        values = _HEX_VALUE[windows(2 * size, d_start[rows])]
        valid = (values != 255).all(axis=1)
        fine[rows[~valid]] = False
        values = values[valid]
        digests[n] = ((values[:, 0::2] << 4) | values[:, 1::2]).astype(np.uint8)
    # Metadata cells are read as text from the first of them to the line's end.
    first = min((role[name] for name in _META if layout is not None and role.get(name, width) < width),
                default=width)
    text_from = cell_start[fine, first] if first < width else np.empty(0, dtype=np.int64)
    return _assemble(block, number, layout, unnamed, good[fine], code[fine], digests, role, (first, width),
                     arr, text_from, ends)


def _assemble(block: bytes, number: int, layout: formats.CsvLayout | None, unnamed: str, taken: np.ndarray,
              codes: np.ndarray, digests: dict[int, np.ndarray], role: dict[str, int], columns: tuple[int, int],
              arr: np.ndarray, text_from: np.ndarray, ends: np.ndarray) -> Chunk:
    """The rows of the lines taken in bulk (``taken``, of algorithm ``codes``, with
    ``digests`` per algorithm), and the others parsed one at a time."""
    others = np.ones(len(ends), dtype=bool)
    others[taken] = False
    slow = _line_by_line(block, number, layout, unnamed, np.flatnonzero(others))
    if slow.groups:  # a row only node.formats could read: keep the file's order
        return _line_by_line(block, number, layout, unnamed)
    chunk = Chunk(others=slow.others)
    if not len(taken):
        return chunk
    # Metadata cells as text: columns first.. of the taken lines (each with its
    # newline), commas turned into newlines, split once.
    first, width = columns
    column: dict[str, list[str]] = {}
    if first < width:
        inside = np.zeros(len(arr) + 1, dtype=np.int8)
        np.add.at(inside, text_from, 1)
        np.add.at(inside, ends[taken] + 1, -1)
        text = arr[np.cumsum(inside[:-1], dtype=np.int8).view(bool)].tobytes()
        cells = text.translate(_TO_NEWLINE).decode("ascii").split("\n")
        column = {name: cells[index - first::width - first][: len(taken)] for name, index in role.items()
                  if first <= index < width}
    numbers = (taken + number + 1).tolist()
    references = column.get("reference") or [""] * len(taken)
    if unnamed and "" in references:
        references = [r or f"{unnamed}{n}" for r, n in zip(references, numbers, strict=True)]
    category = column.get("category") or [""] * len(taken)
    series = column.get("series") or [""] * len(taken)
    flags, bad_flags = _mapped(column.get("victim_identified"), formats._flag, len(taken))
    dates, bad_dates = _mapped(column.get("date_added"), formats.parse_date, len(taken))
    if bad_flags or bad_dates:  # an unknown flag or a malformed date: node.formats says why
        return _line_by_line(block, number, layout, unnamed)
    for n, values in digests.items():
        which = np.flatnonzero(codes == n)
        if not len(which):
            continue
        algorithm = _BULK_ALGORITHMS[n]
        size = algorithm.digest_size
        keys = np.ascontiguousarray(values).view(f"S{size}").ravel()
        blobs = np.ascontiguousarray(values).view(f"V{size}").ravel().tolist()
        pick = (lambda seq: seq) if len(which) == len(taken) else _picker(which)
        fields, cells = [1], [blobs]
        same: list[tuple[int, object]] = [(0, algorithm.name)]
        for position, column_cells in enumerate((references, category, flags, series, dates), start=2):
            picked = pick(column_cells)
            if len(set(picked)) == 1:
                same.append((position, picked[0]))
            else:
                fields.append(position)
                cells.append(picked)
        chunk.groups[algorithm.name] = (list(zip(*cells, strict=True)), keys, Shape(tuple(fields), tuple(same)))
    return chunk


def _picker(which: np.ndarray) -> Callable[[list], list]:
    indexes = which.tolist()
    return lambda seq: [seq[i] for i in indexes]


def _mapped(cells: list[str] | None, convert: Callable[[str], object], count: int) -> tuple[list, bool]:
    """Each cell converted (once per distinct value); whether any failed to convert."""
    if cells is None:
        return [None if convert is formats._flag else ""] * count, False
    table: dict[str, object] = {}
    for value in set(cells):
        try:
            table[value] = convert(value) if value else (None if convert is formats._flag else "")
        except ValueError:
            return [], True
    return list(map(table.__getitem__, cells)), False
