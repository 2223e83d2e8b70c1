"""Merging segments: many small ones into one, dropping what tombstones hide.

OPRF outputs (private exact matching) are carried over from the inputs, not
computed again; only rows without one under a current key are evaluated.

The merged segment is written beside the live ones and swapped in with one
catalog transaction (the inputs retired, the output published); queries go on
against the inputs until then. A merge killed at any point leaves the inputs
live and an unpublished directory that the next ``Store.open``/import removes.

Its id is allocated *before* the tombstones are read, so a retraction made
while it runs covers the merged segment too (see node.catalog). The merged
segment carries over when each row was first published (its births), so a
merge makes no old row new to a ``Match`` asked since a generation.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from federation import algorithms
from node import segment_index
from node.segment import SegmentWriter, directory_of, remove
from node.segment_set import LiveSegment, SegmentSet
from node.store import Store

log = logging.getLogger("icse.node")
ROWS_PER_READ = 50_000


@dataclass(frozen=True)
class MergePolicy:
    """Merge when more than ``max_small`` segments hold fewer than ``small_rows`` rows each."""

    max_small: int = 8
    small_rows: int = 1_000_000

    def pick(self, live: SegmentSet) -> list[int]:
        small = [s.segment_id for s in live.segments if sum(s.segment.counts.values()) < self.small_rows]
        return small if len(small) > self.max_small else []


@dataclass(frozen=True)
class MergeResult:
    merged: tuple[int, ...]  # input segment ids, now retired
    segment_id: int | None  # the output, None when every row was retracted
    rows: int
    dropped: int  # rows hidden by tombstones, now gone


async def merge(store: Store, segment_ids: Sequence[int] | None = None) -> MergeResult | None:
    """Merges these published segments (all when None); None if there was nothing to do."""
    async with store.writing():
        await store.clean(writing=True)
        writer = await store.new_segment()
        try:
            live = await store.snapshot()
            chosen = [s for s in live.segments if segment_ids is None or s.segment_id in segment_ids]
            if len(chosen) < 2 and not any(s.deleted for s in chosen):
                writer.abandon()
                await store.catalog.forget([writer.segment_id])
                return None
            born: list[tuple[int, int]] = []
            dropped = await asyncio.to_thread(_copy, writer, chosen, born)
            written = replace(await asyncio.to_thread(writer.finish), born=tuple(born))
            await store.publish([written] if written.rows else [], retire=[s.segment_id for s in chosen])
        except BaseException:
            writer.abandon()
            await store.catalog.forget([writer.segment_id])
            raise
        if not written.rows:
            writer.abandon()
            await store.catalog.forget([writer.segment_id])
        writer.close()
        for item in chosen:
            remove(directory_of(store.root, item.segment_id))
        await store.catalog.forget([s.segment_id for s in chosen])
    result = MergeResult(tuple(s.segment_id for s in chosen), written.segment_id if written.rows else None,
                         written.rows, dropped)
    log.info("segments merged", extra={"merged": list(result.merged), "segment": result.segment_id,
                                       "rows": result.rows, "dropped": dropped})
    return result


def _copy(writer: SegmentWriter, chosen: Sequence[LiveSegment], born: list[tuple[int, int]]) -> int:
    """Streams the live rows of ``chosen`` into ``writer``; how many were dropped.

    ``born`` receives the births of the rows written (``(first row id, generation)``
    runs, node.catalog): the writer numbers rows in the order added, so each row's
    generation is looked up in its input segment and runs of one generation merged."""
    dropped = 0
    for item in chosen:
        for name, by_key in item.segment.private.items():  # outputs carried over, not computed again
            for key_id, part in by_key.items():
                if writer.computes(key_id) and name in item.segment.keys:
                    writer.carry(name, key_id, *part.known(*item.segment.keys[name]))
        for batch in item.segment.iter_rows("id", ROWS_PER_READ):
            groups: dict[str, list[tuple]] = {}
            births: dict[str, list[int]] = {}
            for row_id, name, *rest in batch:
                if row_id in item.deleted.get(name, ()):
                    dropped += 1
                else:
                    groups.setdefault(name, []).append((name, bytes(rest[0]), *rest[1:]))
                    births.setdefault(name, []).append(item.born_of(row_id))
            for name, rows in groups.items():
                algorithm = algorithms.get(name)
                first = writer.rows + 1
                writer.add(algorithm, rows, segment_index.keys_of(algorithm, [r[1] for r in rows]))
                for offset, generation in enumerate(births[name]):
                    if not born or born[-1][1] != generation:
                        born.append((first + offset, generation))
    return dropped
