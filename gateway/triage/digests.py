"""Digest lists in: what an examiner has when the files themselves are not here.

``icse-gateway query --hashes FILE`` reads one of the formats the field uses and
tells which from its first line:

- ``hashdeep`` output (``%%%% HASHDEEP-1.0``, a ``%%%% size,md5,...,filename``
  line naming the columns, ``##`` comments);
- ``md5deep``/``sha1deep``/``sha256deep`` and ``md5sum``/``sha*sum`` output
  (``HEX  name``, the algorithm told by the digest's length);
- one ``ALGO:HEX`` per line, optionally followed by a name;
- a CSV export (comma, semicolon or tab) whose header has ``md5``, ``sha1``
  and/or ``sha256`` columns (spelled ``SHA-1``, ``MD5 Hash``… too), and
  perhaps a name column.

Only exact digests are read: a perceptual hash without its quality and source
would be a guess. A line that does not parse stops everything with its number,
before any digest is sent.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from federation import algorithms
from gateway import filehash

EXACT = ("md5", "sha1", "sha256")
_BY_LENGTH = {32: "md5", 40: "sha1", 64: "sha256"}
_SUM_LINE = re.compile(r"^([0-9a-fA-F]{32}|[0-9a-fA-F]{40}|[0-9a-fA-F]{64})(?: [ *]|\s+)(.+)$")
_NAME_COLUMNS = ("path", "fullpath", "filepath", "filename", "name", "file", "itempath")


class DigestListError(ValueError):
    """A digest list that cannot be read: says which line and why."""


@dataclass(frozen=True)
class Digests:
    """One entry of a digest list: its exact digests, as a row the run queries like a hashed file."""

    name: str
    hashes: filehash.FileHashes
    size: int | None
    line: int


def _hex(algorithm: str, text: str, where: str) -> bytes:
    try:
        return algorithms.get(algorithm).parse_hex(text.strip())
    except algorithms.DigestError as exc:
        raise DigestListError(f"{where}: {exc}") from None


def _entry(name: str, exact: dict[str, bytes], size: int | None, line: int, source: str) -> Digests:
    label = name or f"{source} line {line}"
    return Digests(label, filehash.FileHashes(Path(label), exact), size, line)


def _column(heading: str) -> str:
    return re.sub(r"[^a-z0-9]", "", heading.lower()).removesuffix("hash").removesuffix("digest")


def _hashdeep(lines: Iterator[tuple[int, str]], source: str) -> Iterator[Digests]:
    columns: list[str] | None = None
    for number, text in lines:
        where = f"{source} line {number}"
        if text.startswith("%%%% HASHDEEP"):
            continue
        if text.startswith("%%%%"):
            columns = [c.strip().lower() for c in text[4:].split(",")]
            if "filename" not in columns or not set(columns) & set(EXACT):
                raise DigestListError(f"{where}: hashdeep header without filename and md5/sha1/sha256 columns")
            continue
        if text.startswith("##"):
            continue
        if columns is None:
            raise DigestListError(f"{where}: hashdeep row before the %%%% line naming the columns")
        cells = text.split(",", len(columns) - 1)
        if len(cells) != len(columns):
            raise DigestListError(f"{where}: {len(cells)} fields where the header names {len(columns)}")
        row = dict(zip(columns, cells, strict=True))
        exact = {a: _hex(a, row[a], where) for a in EXACT if a in row}
        size = row.get("size", "")
        yield _entry(row["filename"], exact, int(size) if size.isdigit() else None, number, source)


def _sums(lines: Iterator[tuple[int, str]], source: str) -> Iterator[Digests]:
    for number, text in lines:
        found = _SUM_LINE.match(text)
        if not found:
            raise DigestListError(f"{source} line {number}: expected 'HEX  name' (md5deep, sha256sum), "
                                  f"got {text[:80]!r}")
        digest, name = found.groups()
        algorithm = _BY_LENGTH[len(digest)]
        yield _entry(name, {algorithm: _hex(algorithm, digest, f"{source} line {number}")}, None, number, source)


def _tagged(lines: Iterator[tuple[int, str]], source: str) -> Iterator[Digests]:
    for number, text in lines:
        where = f"{source} line {number}"
        tagged, _, name = text.strip().partition(" ")
        try:
            algorithm, digest = algorithms.parse_tagged(tagged)
        except algorithms.DigestError as exc:
            raise DigestListError(f"{where}: {exc}") from None
        if algorithm.name not in EXACT:
            raise DigestListError(f"{where}: only exact digests ({', '.join(EXACT)}) are read from a list; "
                                  f"ask {algorithm.name} with --hash")
        yield _entry(name.strip(), {algorithm.name: digest}, None, number, source)


def _csv(header: str, lines: Iterator[tuple[int, str]], source: str) -> Iterator[Digests]:
    dialect = csv.Sniffer().sniff(header, delimiters=",;\t")
    headings = [_column(h) for h in next(csv.reader([header], dialect))]
    wanted = {a: headings.index(a) for a in EXACT if a in headings}
    named = next((headings.index(n) for n in _NAME_COLUMNS if n in headings), None)
    size_at = headings.index("size") if "size" in headings else None
    for number, text in lines:
        where = f"{source} line {number}"
        cells = next(csv.reader(io.StringIO(text), dialect), [])
        if len(cells) != len(headings):
            raise DigestListError(f"{where}: {len(cells)} fields where the header names {len(headings)}")
        exact = {a: _hex(a, cells[i], where) for a, i in wanted.items() if cells[i].strip()}
        if not exact:
            raise DigestListError(f"{where}: no md5, sha1 or sha256 digest on this line")
        size = cells[size_at].strip() if size_at is not None else ""
        yield _entry(cells[named] if named is not None else "", exact, int(size) if size.isdigit() else None,
                     number, source)


def read(text_lines: Iterator[str], source: str) -> Iterator[Digests]:
    """The entries of a digest list, its format told by its first line; :class:`DigestListError` otherwise."""
    lines = ((n, t.rstrip("\r\n")) for n, t in enumerate(text_lines, 1))
    lines = ((n, t) for n, t in lines if t.strip())
    first = next(lines, None)
    if first is None:
        return
    number, text = first
    again = _chain(first, lines)
    if text.startswith("%%%% HASHDEEP") or text.startswith("%%%%"):
        yield from _hashdeep(again, source)
    elif _SUM_LINE.match(text):
        yield from _sums(again, source)
    elif re.match(r"^\s*[A-Za-z0-9]+:[0-9a-fA-F]", text):
        yield from _tagged(again, source)
    elif set(_column(h) for h in re.split(r"[,;\t]", text)) & set(EXACT):
        yield from _csv(text, lines, source)
    else:
        raise DigestListError(
            f"{source} line {number}: not a digest list this reads (hashdeep or md5deep/sha256sum output, "
            f"ALGO:HEX lines, or a CSV with md5/sha1/sha256 columns): {text[:80]!r}")


def _chain(first: tuple[int, str], rest: Iterator[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    yield first
    yield from rest
