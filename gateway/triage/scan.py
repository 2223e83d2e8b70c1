"""What a hashing process does with a group of a directory's files: stat, cache, read, hash, encode.

Most files of a seized device are neither image nor video: such a file costs
one read, and its answer is a few columns shared by the whole group (sizes,
digests as one byte string per algorithm, the row's text already encoded), so
the run's main process touches it only in bulk. The resume cache is read here
too (SQLite in WAL mode lets readers in beside the run's writer): a fully
cached re-run costs the main process no lookup and no decoding. Anything else
— images, videos, files that changed or could not be read, a damaged cache
record — is answered as before, one :class:`gateway.triage.model.Done` per
file.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gateway import filehash, media
from gateway.triage import workers
from gateway.triage.model import Task, compact, from_record

# Cache connections opened by this process, by database path (read only).
_readers: dict[str, sqlite3.Connection | None] = {}
# Paths looked up per query.
_PER_QUERY = 500
# Names that say image or video: such a file goes to the decoders, one at a time.
_MEDIA_SUFFIXES = frozenset(media.IMAGE_SUFFIXES) | frozenset(media.VIDEO_SUFFIXES)


@dataclass
class Scanned:
    """A group's answer: per file either one of the plain columns or a :class:`Done`'s fields.

    ``plain`` lists the positions (in the group) of files read or found in the
    cache with exact digests alone (:func:`gateway.filehash.exact_kinds`);
    ``keys`` (their paths as bytes: the store's and the cache's key),
    ``sizes``, ``mtimes``, ``digests`` (each file's exact digests end to end),
    ``cached`` (found in the cache) and ``texts`` (their hashes' text, for the
    cache: only for files read when there is a cache) are theirs, in that order.
    ``others`` is (position, Done fields, from the cache) for every other file,
    unless the group was read for plain files only: ``rest`` then lists their
    positions, not looked at further.
    """

    plain: list[int] = field(default_factory=list)
    keys: list[bytes] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)
    mtimes: list[int] = field(default_factory=list)
    digests: list[bytes] = field(default_factory=list)
    cached: list[bool] = field(default_factory=list)
    texts: list[str | None] = field(default_factory=list)
    others: list[tuple[int, tuple[Any, ...], bool]] = field(default_factory=list)
    rest: list[int] = field(default_factory=list)


def _open(path: str) -> sqlite3.Connection | None:
    try:
        return sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True, timeout=10,
                               check_same_thread=False)
    except sqlite3.Error:
        return None


def _reader(path: str | None) -> sqlite3.Connection | None:
    if path is None:
        return None
    if path not in _readers:
        _readers[path] = _open(path)
    return _readers[path]


def _cached(cache: str | None, variant: str, keys: list[bytes], keep: bool = True) -> dict[bytes, tuple[int, int, str]]:
    """The cache's records for ``keys``; none when the cache cannot be read (the files are hashed).
    A worker keeps its connection for its life; the run's own process (``keep`` false) opens one for the
    call: it outlives runs, and a cache file removed and made anew at the same path needs a new one."""
    if not keep:
        db = _open(cache) if cache else None
        try:
            return _cached_in(db, variant, keys)
        finally:
            if db is not None:
                db.close()
    return _cached_in(_reader(cache), variant, keys)


def _cached_in(db: sqlite3.Connection | None, variant: str, keys: list[bytes]) -> dict[bytes, tuple[int, int, str]]:
    found: dict[bytes, tuple[int, int, str]] = {}
    if db is None:
        return found
    try:
        for start in range(0, len(keys), _PER_QUERY):
            part = keys[start : start + _PER_QUERY]
            cursor = db.execute(f"SELECT path, size, mtime_ns, record FROM hashes WHERE variant = ? AND path IN "
                                f"({','.join('?' * len(part))})", (variant, *part))
            found.update((path, (size, mtime_ns, record)) for path, size, mtime_ns, record in cursor)
    except sqlite3.Error:
        return {}
    return found


def scan(parts: Sequence[tuple[str, Sequence[str]]], dihedral: bool, hasher: workers.Hasher | None,
         max_distance: int, cache: str | None, variant: str, plain_only: bool = False) -> Scanned:
    """Hashes the files ``names`` of each ``directory`` in ``parts``, in that order (what a worker runs);
    with ``plain_only``, only the plain files: no decoder runs (the run's own process, while its workers start)."""
    kinds = filehash.exact_kinds()
    out = Scanned()
    paths = [path for directory, names in parts for path in _joined(directory, names)]
    keys = list(map(os.fsencode, paths))
    found = _cached(cache, variant, keys, keep=not plain_only) if cache else {}
    for position, (path, key) in enumerate(zip(paths, keys, strict=True)):
        done = _plain(path, key, found, kinds, hasher is None, cache is not None)
        if done is None:
            if plain_only:
                out.rest.append(position)
                continue
            # Anything but a plain file: as one file always was (image, video, unreadable, changed, custom hasher).
            out.others.append((position, *_other(path, key, found, dihedral, hasher, max_distance)))
            continue
        size, mtime_ns, digests, from_cache, text = done
        out.plain.append(position)
        out.keys.append(key)
        out.sizes.append(size)
        out.mtimes.append(mtime_ns)
        out.digests.append(digests)
        out.cached.append(from_cache)
        out.texts.append(text)
    return out


def _joined(directory: str, names: Sequence[str]) -> list[str]:
    """``os.path.join(directory, name)`` for each name (names from a listing: no separator in them)."""
    prefix = directory if directory.endswith(os.sep) else directory + os.sep
    return [prefix + name for name in names]


def _other(path: str, key: bytes, found: dict[bytes, tuple[int, int, str]], dihedral: bool,
           hasher: workers.Hasher | None, max_distance: int) -> tuple[tuple[Any, ...], bool]:
    """A file that is not plain: its :class:`Done` fields, and whether they came from the cache."""
    task = _task(path)
    record = found.get(key)
    if record is not None and task is not None and record[:2] == (task.size, task.mtime_ns):
        try:
            return tuple(from_record(record[2], path, task.size, task.mtime_ns, max_distance)), True
        except (ValueError, KeyError, TypeError, IndexError):
            pass  # a damaged record: the file is hashed again
    if task is None:
        task = Task(path, path, 0, 0)
    workers.on_file(time.monotonic())
    try:
        hashed = workers.hash_one(task, dihedral, hasher)
    finally:
        workers.on_file(0.0)
    return tuple(compact(hashed, max_distance)), False


def task_of(path: str) -> Task:
    """A file to hash one at a time, as it is now (size and time 0 if it cannot be looked at: hashing says why)."""
    return _task(path) or Task(path, path, 0, 0)


def _task(path: str) -> Task | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return Task(path, path, st.st_size, st.st_mtime_ns)


def _plain(path: str, key: bytes, found: dict[bytes, tuple[int, int, str]], kinds: tuple[tuple[str, int], ...],
           reads: bool, cached: bool) -> tuple[int, int, bytes, bool, str | None] | None:
    """A file that is not media, read whole (or found in the cache), unchanged while read: its size, time,
    exact digests end to end, whether from the cache, and its hashes' text when there is a cache to fill;
    None for any other file."""
    try:
        before = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(before.st_mode):
        return None
    record = found.get(key) if found else None
    if record is not None and record[:2] == (before.st_size, before.st_mtime_ns):
        digests = _exact_record(record[2], kinds)
        if digests is None:
            return None  # more than exact digests, or not all of them, or damaged: one file at a time
        return before.st_size, before.st_mtime_ns, digests, True, None
    if not reads or os.path.splitext(path)[1].lower() in _MEDIA_SUFFIXES:
        return None
    workers.on_file(time.monotonic())
    try:
        exact, head, after = filehash.exact_and_head(path, before.st_size)
        if after is None:
            after = os.lstat(path)
    except OSError:
        return None
    finally:
        workers.on_file(0.0)
    if media.content_by_signature(head) is not None:  # the name was looked at above
        return None
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return None  # changed while read: hashed again, one file at a time, and said so
    ordered = [exact[name] for name, _ in kinds]
    text = filehash.exact_text([d.hex() for d in ordered]) if cached else None
    return before.st_size, before.st_mtime_ns, b"".join(ordered), False, text


def _exact_record(text: str, kinds: tuple[tuple[str, int], ...]) -> bytes | None:
    """The digests end to end of a cache record that is exact digests alone, as
    :func:`gateway.filehash.exact_text` writes it; None for any other record.

    Such a record has a fixed layout: the digests are read at their places, and
    the record must then be exactly what they render to (no JSON parsing per file).
    """
    parts = filehash.exact_text_parts()
    if len(text) != sum(map(len, parts)) + sum(2 * size + 2 for _, size in kinds):
        return None
    hexes, at = [], 0
    for part, (_, size) in zip(parts, kinds, strict=False):
        at += len(part) + 1
        hexes.append(text[at : at + 2 * size])
        at += 2 * size + 1
    if text != filehash.exact_text(hexes):
        return None
    try:
        return bytes.fromhex("".join(hexes))
    except ValueError:
        return None
