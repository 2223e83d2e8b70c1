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

import functools
import json
import os
import sqlite3
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation import algorithms
from gateway import filehash, media
from gateway.triage import workers
from gateway.triage.model import Hashed, Task, compact, from_record

# Cache connections opened by this process, by database path (read only).
_readers: dict[str, sqlite3.Connection | None] = {}
# Paths looked up per query.
_PER_QUERY = 500
# Names that say image or video: such a file goes to the decoders, one at a time.
_MEDIA_SUFFIXES = frozenset(media.IMAGE_SUFFIXES) | frozenset(media.VIDEO_SUFFIXES)


@functools.lru_cache(maxsize=4)
def exact_kinds(names: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    """(name, digest size) of every exact kind, in the order every row and query lists them."""
    del names  # the cache key
    return tuple((a.name, a.digest_size) for a in algorithms.all_algorithms() if a.hashlib_name)


@functools.lru_cache(maxsize=4)
def _text_parts(names: tuple[str, ...]) -> tuple[str, ...]:
    """:func:`gateway.filehash.hashes_text` of exact digests alone, cut where the digests go."""
    entry = filehash.hashes_json(None)
    exact = exact_kinds(names)
    for position, (name, _) in enumerate(exact):
        entry[name] = f"@{position}@"
    text = json.dumps(entry, separators=(",", ":"))
    parts = []
    for position in range(len(exact)):
        before, text = text.split(f'"@{position}@"')
        parts.append(before)
    parts.append(text)
    return tuple(parts)


def exact_text(hexes: Sequence[str]) -> str:
    """What :func:`gateway.filehash.hashes_text` gives for exact digests alone (of every exact kind)."""
    parts = _text_parts(algorithms.names())
    return "".join([part for pair in zip(parts, hexes, strict=False) for part in (pair[0], f'"{pair[1]}"')]) \
        + parts[-1]


@dataclass
class Scanned:
    """A group's answer: per file either one of the plain columns or a :class:`Done`'s fields.

    ``plain`` lists the positions (in the group) of files read or found in the
    cache with exact digests alone; ``keys`` (their paths as bytes: the store's
    and the cache's key), ``sizes``, ``mtimes``, ``texts`` (the hashes' text),
    ``records`` (the rest of the store's row, :func:`row_record`) and
    ``cached`` (found in the cache) are theirs, in that order, and
    ``digests`` holds per exact kind their digests end to end.
    ``others`` is (position, Done fields, from the cache) for every other file.
    """

    plain: list[int]
    keys: list[bytes]
    sizes: list[int]
    mtimes: list[int]
    texts: list[str]
    records: list[str]
    cached: list[bool]
    digests: list[bytes]
    others: list[tuple[int, tuple[Any, ...], bool]]


def _reader(path: str | None) -> sqlite3.Connection | None:
    if path is None:
        return None
    if path not in _readers:
        try:
            _readers[path] = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10,
                                             check_same_thread=False)
        except sqlite3.Error:
            _readers[path] = None
    return _readers[path]


def _cached(cache: str | None, variant: str, keys: list[bytes]) -> dict[bytes, tuple[int, int, str]]:
    """The cache's records for ``keys``; none when the cache cannot be read (the files are hashed)."""
    db = _reader(cache)
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
         max_distance: int, cache: str | None, variant: str) -> Scanned:
    """Hashes the files ``names`` of each ``directory`` in ``parts``, in that order (what a worker runs)."""
    kinds = exact_kinds(algorithms.names())
    out = Scanned([], [], [], [], [], [], [], [], [])
    blobs: list[list[bytes]] = [[] for _ in kinds]
    paths = [os.path.join(directory, name) for directory, names in parts for name in names]
    keys = [os.fsencode(p) for p in paths]
    found = _cached(cache, variant, keys) if cache else {}
    for position, (path, key) in enumerate(zip(paths, keys, strict=True)):
        done = _plain(path, key, found, kinds, hasher is None)
        if done is None:
            # Anything but a plain file: as one file always was (image, video, unreadable, changed, custom hasher).
            task = _task(path)
            record = found.get(key)
            if record is not None and task is not None and record[:2] == (task.size, task.mtime_ns):
                try:
                    cached = from_record(record[2], path, task.size, task.mtime_ns, max_distance)
                except (ValueError, KeyError, TypeError, IndexError):
                    pass  # a damaged record: the file is hashed again
                else:
                    out.others.append((position, tuple(cached), True))
                    continue
            if task is None:
                task = Task(path, path, 0, 0)
            workers.on_file(time.monotonic())
            try:
                hashed = workers.hash_one(task, dihedral, hasher)
            finally:
                workers.on_file(0.0)
            out.others.append((position, tuple(compact(hashed, max_distance)), False))
            continue
        size, mtime_ns, text, digests, from_cache = done
        out.plain.append(position)
        out.keys.append(key)
        out.sizes.append(size)
        out.mtimes.append(mtime_ns)
        out.texts.append(text)
        out.records.append(row_record(size, mtime_ns, from_cache))
        out.cached.append(from_cache)
        for blob, digest in zip(blobs, digests, strict=True):
            blob.append(digest)
    out.digests = [b"".join(blob) for blob in blobs]
    return out


def task_of(path: str) -> Task:
    """A file to hash one at a time, as it is now (size and time 0 if it cannot be looked at: hashing says why)."""
    return _task(path) or Task(path, path, 0, 0)


def _task(path: str) -> Task | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return Task(path, path, st.st_size, st.st_mtime_ns)


def row_record(size: int, mtime_ns: int, from_cache: bool) -> str:
    """The store's record of a plain file no node found: what :func:`gateway.triage.store._record` writes."""
    return (f'{{"reason":"","size":{size},"mtime_ns":{mtime_ns},"from_cache":{"true" if from_cache else "false"},'
            '"matches":[],"not_answered_by":[],"truncated_by":[],"notes":[]}')


def _plain(path: str, key: bytes, found: dict[bytes, tuple[int, int, str]], kinds: tuple[tuple[str, int], ...],
           reads: bool) -> tuple[int, int, str, list[bytes], bool] | None:
    """A file that is not media, read whole (or found in the cache), unchanged while read; None for any other."""
    try:
        before = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(before.st_mode):
        return None
    record = found.get(key) if found else None
    if record is not None and record[:2] == (before.st_size, before.st_mtime_ns):
        try:
            entry = json.loads(record[2])
            hexes = [entry[name] for name, _ in kinds]
            if record[2] != exact_text(hexes):
                return None  # more than exact digests (or not all of them): one file at a time
            digests = [bytes.fromhex(h) for h in hexes]
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
        if [len(d) for d in digests] != [size for _, size in kinds]:
            return None
        return before.st_size, before.st_mtime_ns, record[2], digests, True
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
    if media.claimed_content(path, head) is not None:
        return None
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        return None  # changed while read: hashed again, one file at a time, and said so
    digests = [exact[name] for name, _ in kinds]
    return before.st_size, before.st_mtime_ns, exact_text([d.hex() for d in digests]), digests, False
