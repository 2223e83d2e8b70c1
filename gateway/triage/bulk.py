"""Plain files (exact digests only, no note) held by the run's main process a group at a time.

A seized device is mostly such files, and every one of them goes through the
one main process: while its digests wait for the nodes it is a tuple of plain
values, not a :class:`FileRow`; its query items are made a column at a time;
and a file no node found goes to the store as it came from the worker (its
path, size, time and digests: :meth:`gateway.triage.store.RowStore.add_plain`).
A plain file becomes a :class:`FileRow` only when something must be said about
it (a hit, a node that did not answer): :class:`Rows` makes it one the first
time it is looked up.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from itertools import filterfalse, repeat
from operator import itemgetter
from typing import NamedTuple

from federation.query import QueryItem
from gateway import filehash
from gateway.triage.model import HASHED, FileRow


class Plain(NamedTuple):
    """A plain file waiting for its answers."""

    key: bytes  # the path, as bytes
    size: int
    mtime_ns: int
    digests: bytes  # its exact digests end to end (:func:`gateway.filehash.exact_kinds`)
    from_cache: bool


class Rows(dict[int, FileRow]):
    """The rows not final yet, by walk index; a plain file's row is made when first looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.plain: dict[int, Plain] = {}

    def __missing__(self, index: int) -> FileRow:
        key, size, mtime_ns, digests, from_cache = self.plain.pop(index)
        row = self[index] = FileRow(os.fsdecode(key), HASHED, size=size, mtime_ns=mtime_ns, from_cache=from_cache,
                                    hashes_text=filehash.exact_text(_hexes(digests)))
        return row

    def held(self) -> int:
        return len(self) + len(self.plain)

    def take(self, indices: Iterable[int]) -> tuple[list[tuple[int, FileRow]], list[tuple[int, Plain]]]:
        """The rows at ``indices``, out of memory: those made into rows, and the plain ones (a plain file
        costs no Python step of its own here: most batches hold nothing else)."""
        ordered = sorted(indices)
        made = list(filter(self.__contains__, ordered)) if len(self) else []
        plain = list(filterfalse(self.__contains__, ordered)) if made else ordered
        rows = list(zip(made, map(self.pop, made)))
        return rows, list(zip(plain, map(self.plain.pop, plain)))

    def indices(self) -> list[int]:
        return [*self, *self.plain]


def _hexes(digests: bytes) -> list[str]:
    hexes, at = [], 0
    for _, size in filehash.exact_kinds():
        hexes.append(digests[at : at + size].hex())
        at += size
    return hexes


def items(indices: Sequence[int], digests: Sequence[bytes]) -> list[tuple[int, QueryItem, str]]:
    """(row index, item, variant) for the files at ``indices``: a column of items per exact kind."""
    pending: list[tuple[int, QueryItem, str]] = []
    at = 0
    for name, size in filehash.exact_kinds():
        column = [d[at : at + size] for d in digests]
        at += size
        # tuple.__new__ makes the named tuples without a Python call per item.
        pending += zip(indices, map(tuple.__new__, repeat(QueryItem), zip(repeat(name), column, repeat(0))),
                       repeat(""))
    return pending


def store_rows(plain: Sequence[tuple[int, Plain]]) -> list[tuple[int, bytes, int, int, bytes, bool]]:
    """The store's rows (:meth:`gateway.triage.store.RowStore.add_plain`) of plain files no node found."""
    return list(map(tuple.__add__, zip(map(itemgetter(0), plain)), map(itemgetter(1), plain)))
