"""The node's store: a catalog (the configured ``store`` file) and immutable segments.

An import writes its rows into a new segment nobody sees yet, builds the
segment's indexes in bulk, then publishes it in one short catalog
transaction: all of the file lands or none does, and neither queries nor the
audit log ever wait for it. Re-importing changes nothing (rows already live
are skipped with a vectorised search of each segment's sorted keys). A
retraction adds tombstones; a merge (node.merge) rewrites segments without
them. A process killed mid-import leaves only a segment directory whose lock
is free, removed by the next ``Store.open``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import heapq
import json
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from federation import algorithms
from node import private_key, segment_index
from node.catalog import Catalog, SegmentEntry
from node.private_files import make_private_directory, open_private_append
from node.records import HashRecord, StoredRecord
from node.segment import (
    FULL,
    MappedSegment,
    SegmentWriter,
    Shape,
    Written,
    directory_of,
    lock_is_free,
    remove,
    segments_root,
)
from node.segment_set import LiveSegment, SegmentLoader, SegmentSet

Row = tuple  # (algorithm, digest, reference, category, victim_identified, series, date_added)
T = TypeVar("T")
# Rows grouped by algorithm, each group with its keys if the parser made them, and
# which fields its tuples hold (node.segment.Shape).
Grouped = dict[str, tuple[list[tuple], "np.ndarray | None", Shape]]
# Rows per segment an import writes: a larger file becomes several segments (published
# together), so an import's memory is bounded (keys and index build of one segment).
SEGMENT_ROWS = 2_000_000


@dataclass(frozen=True)
class ImportCounts:
    added: int
    already_present: int


@dataclass(frozen=True)
class RemoveCounts:
    removed: int
    not_present: int


@dataclass(frozen=True)
class ReferenceRemoval:
    removed: int  # rows
    references_found: int
    references_missing: tuple[str, ...]


class Store:
    def __init__(self, catalog: Catalog, path: Path):
        self.catalog = catalog
        self.path = path
        self.root = segments_root(path)
        self.loader = SegmentLoader(self.root)

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Opens (creating if need be) the store, clearing what a killed writer left.
        Every file and directory it creates is owner-only (0600 files, 0700 directories)."""
        store = cls(await Catalog.open(path), path)
        try:
            make_private_directory(store.root)
            await store.clean()
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        await self.catalog.close()

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generation(self) -> int:
        return await self.catalog.generation()

    async def snapshot(self) -> SegmentSet:
        """The live segments, mapped (checksums verified for any not mapped before)."""
        return await asyncio.to_thread(self.loader.load, await self.catalog.snapshot())

    async def counts(self) -> dict[str, int]:
        return (await self.snapshot()).counts()

    async def records(self, ids: Iterable[int]) -> dict[int, StoredRecord]:
        wanted = list(ids)
        return await asyncio.to_thread((await self.snapshot()).records, wanted)

    async def clean(self, *, writing: bool = False) -> list[int]:
        """Removes segments whose writer died, and retired ones; the ids removed.

        ``writing``: the caller holds ``writing()``, so an id allocated with no
        directory yet is an abandoned one, not one about to be written."""
        published = set(await self.catalog.segment_ids("published"))
        stale = set(await self.catalog.segment_ids("retired"))
        for directory in self.root.glob("seg-*"):
            segment_id = int(directory.name.removeprefix("seg-")) if directory.name[4:].isdigit() else -1
            if segment_id not in published and lock_is_free(directory):
                stale.add(segment_id)
        for segment_id in stale:
            remove(directory_of(self.root, segment_id))
        if writing:
            stale.update(i for i in await self.catalog.segment_ids("building")
                         if not directory_of(self.root, i).exists())
        await self.catalog.forget(stale)
        return sorted(stale)

    @contextlib.asynccontextmanager
    async def writing(self) -> AsyncIterator[None]:
        """Held by whoever writes segments (an import, a merge): one at a time, so
        that an import deduplicates against everything published before it."""
        with open_private_append(self.path.with_name(self.path.name + ".lock")) as handle:
            await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
            yield

    async def new_segment(self) -> SegmentWriter:
        """A writer for a new segment; it computes OPRF outputs under the node's keys, if it has any."""
        keys = private_key.load(self.path)
        segment_id = await self.catalog.allocate()
        return SegmentWriter(directory_of(self.root, segment_id), segment_id, keys.computed() if keys else None)

    async def publish(self, written: Iterable[Written], retire: Iterable[int] = ()) -> None:
        await self.catalog.publish([SegmentEntry(w.segment_id, w.rows, w.counts, w.files, w.born)
                                    for w in written], retire)

    async def add(self, batches: AsyncIterator[list[HashRecord]] | Iterable[list[HashRecord]]) -> ImportCounts:
        """``add_rows`` for ``HashRecord`` batches."""
        async def rows() -> AsyncIterator[list[Row]]:
            async for batch in _aiter(batches):
                yield [(r.algorithm, r.digest, r.reference, r.category, r.victim_identified, r.series,
                        r.date_added) for r in batch]

        return await self.add_rows(rows())

    async def add_rows(self, batches: AsyncIterator[list[Row] | Grouped] | Iterable[list[Row] | Grouped], *,
                       segment_rows: int = SEGMENT_ROWS) -> ImportCounts:
        """Adds the rows (tuples in ``HashRecord`` field order) as new segments of at
        most about ``segment_rows`` rows each, all published in one transaction.

        Each batch is deduplicated (against live segments and the ones this import
        finished) and written on a worker thread while the next one is parsed. A
        segment is finished (its index built, its keys dropped from memory) once it
        holds ``segment_rows`` rows, so memory stays bounded whatever the file's size.
        An empty ``date_added`` is today.
        """
        async with self.writing():
            await self.clean(writing=True)
            live = await self.snapshot()
            finished: list[tuple[SegmentWriter, Written]] = []
            opened: list[MappedSegment] = []  # finished here, mapped for deduplication
            writer = await self.new_segment()
            offered = 0
            pending: asyncio.Future[None] | None = None
            try:
                async for batch in _aiter(batches):
                    offered += _size(batch)
                    if pending is not None:
                        await pending
                        pending = None
                    if writer.rows >= segment_rows:
                        done = await asyncio.to_thread(writer.finish)
                        finished.append((writer, done))
                        if done.rows:
                            opened.append(await asyncio.to_thread(
                                MappedSegment.open, self.root, done.segment_id, done.counts, done.files))
                            live = SegmentSet(live.generation, (*live.segments, LiveSegment(opened[-1], {})))
                        writer = await self.new_segment()
                    pending = asyncio.ensure_future(asyncio.to_thread(_write_new, writer, live, batch))
                    await asyncio.sleep(0)  # hands the batch to the worker before parsing on
                if pending is not None:
                    await pending
                    pending = None
                finished.append((writer, await asyncio.to_thread(writer.finish)))
                written = [done for _, done in finished if done.rows]
                if written:
                    await self.publish(written)
            except BaseException:
                if pending is not None:
                    with contextlib.suppress(BaseException):
                        await pending
                writers = [w for w, _ in finished]
                writers += [writer] if writer not in writers else []
                for each in writers:
                    each.abandon()
                await self.catalog.forget([w.segment_id for w in writers])
                raise
            finally:
                for mapped in opened:
                    mapped.close()
            empty = [w for w, done in finished if not done.rows]
            for each, _ in finished:
                if each in empty:
                    each.abandon()
                else:
                    each.close()
            if empty:
                await self.catalog.forget([w.segment_id for w in empty])
        added = sum(done.rows for done in written)
        return ImportCounts(added=added, already_present=offered - added)

    async def remove(self, batches: AsyncIterator[list[tuple[str, bytes]]] | Iterable[list[tuple[str, bytes]]]
                     ) -> RemoveCounts:
        """Retracts these (algorithm, digest) pairs: tombstones, in one transaction,
        which a running node applies on its next query."""
        live = await self.snapshot()
        offered, keys = 0, set()
        async for batch in _aiter(batches):
            offered += len(batch)
            keys.update(_live_keys(live, batch))
        await self.catalog.retract(sorted(keys))
        return RemoveCounts(removed=len(keys), not_present=offered - len(keys))

    async def remove_references(self, references: Iterable[str]) -> ReferenceRemoval:
        """Retracts every live row holding one of these references."""
        wanted = sorted(set(references))
        live = await self.snapshot()
        pairs: list[tuple[str, bytes]] = []
        found: set[str] = set()
        for item in live.segments:
            rows = await asyncio.to_thread(
                item.segment.query, "SELECT id, algorithm, digest, reference FROM rows "
                "WHERE reference IN (SELECT value FROM json_each(?))", (json.dumps(wanted),))
            for row_id, name, digest, reference in rows:
                if row_id not in item.deleted.get(name, ()):
                    pairs.append((name, bytes(digest)))
                    found.add(reference)
        keys = sorted(_live_keys(live, pairs))
        await self.catalog.retract(keys)
        return ReferenceRemoval(removed=len(keys), references_found=len(found),
                                references_missing=tuple(r for r in wanted if r not in found))

    async def iter_rows(self, *, by_reference: bool = False, chunk: int = 5000
                        ) -> AsyncGenerator[list[Row], None]:
        """Every live row, in chunks, from one snapshot: in segment and row order, or
        grouped by reference and metadata (for writers that gather an item's hashes);
        never the whole set in memory."""
        live = await self.snapshot()
        order = "reference, category, victim_identified, series, date_added, id" if by_reference else "id"
        streams = [_live_rows(item, order, chunk) for item in live.segments]
        rows = heapq.merge(*streams, key=lambda r: (r[2] or "", r[3] or "", r[4] is None, r[4] or 0,
                                                    r[5] or "", r[6] or "")) if by_reference \
            else (row for stream in streams for row in stream)
        while more := await asyncio.to_thread(_take, rows, chunk):
            yield more


def _take(rows: Iterator[Row], count: int) -> list[Row]:
    taken = []
    for row in rows:
        taken.append(row)
        if len(taken) >= count:
            break
    return taken


def _live_rows(item, order: str, chunk: int) -> Iterator[Row]:
    for batch in item.segment.iter_rows(order, chunk):
        for row_id, name, digest, reference, category, victim, series, date_added in batch:
            if row_id not in item.deleted.get(name, ()):
                yield (name, bytes(digest), reference, category, None if victim is None else bool(victim),
                       series, date_added)


def _live_keys(live: SegmentSet, pairs: Iterable[tuple[str, bytes]]) -> set[tuple[str, bytes]]:
    """The (algorithm, key) of each pair that is live in the set."""
    by_algorithm: dict[str, list[bytes]] = {}
    for name, digest in pairs:
        by_algorithm.setdefault(name, []).append(digest)
    found: set[tuple[str, bytes]] = set()
    for name, digests in by_algorithm.items():
        keys = segment_index.keys_of(algorithms.get(name), digests)
        present = live.present(name, keys)
        found.update((name, bytes(k)) for k in keys[present].tolist())
    return found


def _size(batch: list[Row] | Grouped) -> int:
    return sum(len(group[0]) for group in batch.values()) if isinstance(batch, dict) else len(batch)


def _write_new(writer: SegmentWriter, live: SegmentSet, batch: list[Row] | Grouped) -> None:
    """Appends the batch's rows that are not live already, algorithm by algorithm.
    A batch is a list of rows, or rows already grouped by algorithm (with their
    keys, when the parser has them: ``segment_index.keys_of`` order)."""
    groups: Grouped = batch if isinstance(batch, dict) else {}
    if not isinstance(batch, dict):
        for row in batch:
            group = groups.get(row[0])
            if group is None:
                group = groups[row[0]] = ([], None, FULL)
            group[0].append(row)
    for name, (rows, given, shape) in groups.items():
        algorithm = algorithms.get(name)
        digest = shape.fields.index(1)
        keys = given if given is not None else segment_index.keys_of(algorithm, [row[digest] for row in rows])
        new = ~live.present(name, keys) if live.segments else np.ones(len(keys), dtype=bool)
        kept = rows if new.all() else [row for row, keep in zip(rows, new.tolist(), strict=True) if keep]
        writer.add(algorithm, kept, keys if new.all() else keys[new], shape)


async def _aiter(batches: AsyncIterator[T] | Iterable[T]) -> AsyncIterator[T]:
    if hasattr(batches, "__aiter__"):
        async for batch in batches:
            yield batch
    else:
        for batch in batches:
            yield batch
