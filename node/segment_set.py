"""The published segments of one generation, as one searchable hash set.

Queries search every segment and merge; tombstones are applied by dropping the
candidates they hide (their row ids, found once per generation with a
vectorised search of each segment's sorted keys). A record id names its
segment and row: ``segment_id << 32 | row_id``.

``SegmentLoader`` maps a catalog snapshot: segments it already mapped are
kept as the very same objects, so publishing one small segment costs mapping
that segment only.

``SegmentSet.since(generation)`` is the same search restricted to rows first
published after a generation (node.catalog, births): a segment none of whose
rows is newer is not searched at all, one whose rows are all newer is searched
as it is, and only a merged segment holding both has its hits filtered by row.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from federation import algorithms
from node import segment, segment_index
from node.catalog import Births, Snapshot
from node.index import Candidate, ExactIndex, Index, Probe
from node.records import HashRecord, StoredRecord
from node.segment import MappedSegment

ROW_BITS = 32
_ROW_MASK = (1 << ROW_BITS) - 1


def record_id(segment_id: int, row_id: int) -> int:
    return segment_id << ROW_BITS | row_id


@dataclass(frozen=True)
class LiveSegment:
    segment: MappedSegment
    deleted: dict[str, frozenset[int]]  # algorithm -> row ids hidden by tombstones
    born: Births = ()  # when its rows were first published (node.catalog); empty: unknown, taken as 0

    @property
    def segment_id(self) -> int:
        return self.segment.segment_id

    @property
    def newest(self) -> int:
        """The latest generation at which any of its rows was first published."""
        return max((generation for _, generation in self.born), default=0)

    @property
    def oldest(self) -> int:
        return min((generation for _, generation in self.born), default=0)

    @cached_property
    def _firsts(self) -> list[int]:
        return [first for first, _ in self.born]

    def born_of(self, row_id: int) -> int:
        """The generation at which this row was first published."""
        at = bisect_right(self._firsts, row_id) - 1
        return self.born[at][1] if at >= 0 else 0

    def born_of_rows(self, row_ids: np.ndarray) -> np.ndarray:
        """``born_of`` of each row id, in one vectorised search."""
        if not self.born:
            return np.zeros(len(row_ids), dtype=np.int64)
        at = np.searchsorted(np.array(self._firsts, dtype=np.int64), row_ids, side="right") - 1
        generations = np.array([generation for _, generation in self.born], dtype=np.int64)
        return np.where(at >= 0, generations[np.maximum(at, 0)], 0)

    def live_rows(self) -> int:
        return sum(self.segment.counts.values()) - sum(len(rows) for rows in self.deleted.values())


# One segment's index of one algorithm: (segment id, index, hidden row ids, and
# the segment when only its rows born after ``after`` count, else None).
Part = tuple[int, Index, frozenset[int], "LiveSegment | None"]


class MergedIndex:
    """One algorithm over every segment: the ``Index`` the matcher searches."""

    def __init__(self, parts: Sequence[Part], after: int = 0):
        self._parts = parts
        self._after = after

    def __len__(self) -> int:
        return sum(len(index) - len(deleted) for _, index, deleted, _ in self._parts)

    def search(self, digests: Sequence[bytes], max_distance: Sequence[int]) -> list[list[Candidate]]:
        found = self.hits(digests, max_distance)
        return [found.get(position, []) for position in range(len(digests))]

    def exact(self, digests: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """For an exact algorithm (every part an ``ExactIndex``): the batch positions found and
        their record ids, ordered by position then record id, tombstones and ``after`` applied;
        arrays only, the query keys prepared once for every segment. None for other kinds."""
        exact = [index for _, index, _, _ in self._parts if isinstance(index, ExactIndex)]
        if len(exact) != len(self._parts):
            return None
        probe = Probe.of(digests)
        positions: list[np.ndarray] = []
        records: list[np.ndarray] = []
        for (segment_id, _, deleted, mixed), index in zip(self._parts, exact, strict=True):
            where, rows = index.lookup(probe)
            keep = np.ones(len(rows), dtype=bool)
            if deleted:  # looked up for the rows found only (a segment may hide millions)
                keep &= np.fromiter((row not in deleted for row in rows.tolist()), bool, len(rows))
            if mixed is not None:
                keep &= mixed.born_of_rows(rows) > self._after
            positions.append(where[keep])
            records.append(rows[keep] | (segment_id << ROW_BITS))
        if not positions:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        where, ids = np.concatenate(positions), np.concatenate(records)
        order = np.lexsort((ids, where))
        return where[order], ids[order]

    def hits(self, digests: Sequence[bytes] | np.ndarray, max_distance: Sequence[int]) -> dict[int, list[Candidate]]:
        if isinstance(digests, np.ndarray) and (found := self.exact(digests)) is not None:
            merged_exact: dict[int, list[Candidate]] = {}
            for position, rid in zip(*(array.tolist() for array in found), strict=True):
                merged_exact.setdefault(position, []).append(Candidate(rid))
            return merged_exact
        merged: dict[int, list[Candidate]] = {}
        for segment_id, index, deleted, mixed in self._parts:
            base = segment_id << ROW_BITS
            for position, candidates in index.hits(digests, max_distance).items():
                kept = [Candidate(base | c.record_id, c.distance, c.matched_share) for c in candidates
                        if c.record_id not in deleted and (mixed is None or mixed.born_of(c.record_id) > self._after)]
                if kept:
                    merged.setdefault(position, []).extend(kept)
        return merged


@dataclass(frozen=True)
class Restricted:
    """The indexes of the rows first published after ``after``, and how many live rows they search."""

    after: int
    indexes: dict[str, MergedIndex]
    rows_searched: int


@dataclass(frozen=True)
class SegmentSet:
    generation: int
    segments: tuple[LiveSegment, ...] = ()
    indexes: dict[str, MergedIndex] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for live in self.segments:
            for name, count in live.segment.counts.items():
                totals[name] = totals.get(name, 0) + count - len(live.deleted.get(name, ()))
        return {name: count for name, count in sorted(totals.items()) if count}

    def since(self, generation: int) -> Restricted:
        """The search restricted to rows first published after ``generation`` (0: every row)."""
        if generation <= 0:
            return Restricted(0, self.indexes, sum(live.live_rows() for live in self.segments))
        parts: dict[str, list[Part]] = {}
        searched = 0
        for live in self.segments:
            if live.newest <= generation:
                continue  # nothing in it is newer: not searched at all
            searched += live.live_rows()
            mixed = live if live.oldest <= generation else None
            for name, index in live.segment.indexes.items():
                parts.setdefault(name, []).append((live.segment_id, index, live.deleted.get(name, frozenset()), mixed))
        return Restricted(generation, {name: MergedIndex(p, generation) for name, p in parts.items()}, searched)

    def present(self, algorithm: str, keys: np.ndarray) -> np.ndarray:
        """Whether each key is live in some segment (not hidden by a tombstone)."""
        found = np.zeros(len(keys), dtype=bool)
        for live in self.segments:
            rows = live.segment.find(algorithm, keys)
            hidden = live.deleted.get(algorithm, frozenset())
            if hidden:
                rows = np.where(np.isin(rows, np.fromiter(hidden, np.int64, len(hidden))), -1, rows)
            found |= rows >= 0
        return found

    def records(self, ids: Iterable[int]) -> dict[int, StoredRecord]:
        """The rows for a batch of hits: one query per segment holding any."""
        return {rid: StoredRecord(rid, to_record(row)) for rid, row in self.rows(ids).items()}

    def rows(self, ids: Iterable[int]) -> dict[int, tuple]:
        """``records`` as the rows' tuples (``HashRecord`` field order; victim_identified as
        stored, 0/1/None)."""
        by_segment: dict[int, list[int]] = {}
        for rid in ids:
            by_segment.setdefault(rid >> ROW_BITS, []).append(rid & _ROW_MASK)
        found: dict[int, tuple] = {}
        for live in self.segments:
            wanted = by_segment.get(live.segment_id)
            if wanted:
                base = live.segment_id << ROW_BITS
                found.update((base | row[0], row[1:]) for row in live.segment.rows(wanted))
        return found

    def hit_rows(self, ids: np.ndarray) -> HitRows:
        """What hits release of their rows, for the distinct ``ids`` (int64 record ids): a
        batch's thousands of hits read with no object each beyond the row's tuple."""
        wanted = np.unique(ids)
        by_id = {live.segment_id: live.segment for live in self.segments}
        rows: list[tuple] = []
        owners = wanted >> ROW_BITS
        for owner in np.unique(owners).tolist():
            local = (wanted[owners == owner] & _ROW_MASK).tolist()
            found = by_id[owner].rows_in_order(local, segment.HIT_COLUMNS)
            if [row[0] for row in found] != local:
                raise segment.SegmentCorrupt(f"segment {owner}: its rows file lacks rows its index holds")
            rows.extend(found)
        return HitRows(wanted, rows)


@dataclass(frozen=True)
class HitRows:
    """Rows of hits: ``rows[k]`` is (row id in its segment, reference, category,
    victim_identified as stored (0/1/None), series, date_added) of record ``ids[k]``."""

    ids: np.ndarray  # int64 record ids, ascending, distinct
    rows: list[tuple]

    def of(self, record_ids: np.ndarray) -> list[tuple]:
        """The row of each of these record ids (each one of ``ids``)."""
        at = np.searchsorted(self.ids, record_ids)
        rows = self.rows
        return [rows[k] for k in at.tolist()]

    def by_id(self) -> dict[int, tuple]:
        return dict(zip(self.ids.tolist(), self.rows, strict=True))


def to_record(row: Sequence) -> HashRecord:
    victim = row[4]
    return HashRecord(row[0], row[1] if type(row[1]) is bytes else bytes(row[1]), row[2], row[3],
                      None if victim is None else bool(victim), row[5], row[6])


class SegmentLoader:
    """Maps snapshots' segments, keeping those it has already mapped."""

    def __init__(self, root: Path):
        self.root = root
        self._mapped: dict[int, MappedSegment] = {}

    def load(self, snapshot: Snapshot) -> SegmentSet:
        """Blocking (maps files, verifies checksums): run it off the event loop."""
        mapped = {}
        births = {entry.segment_id: entry.born for entry in snapshot.segments}
        for entry in snapshot.segments:
            segment = self._mapped.get(entry.segment_id)
            if segment is None or segment.files != entry.files:  # new, or its OPRF outputs changed
                segment = MappedSegment.open(self.root, entry.segment_id, entry.counts, entry.files)
            mapped[entry.segment_id] = segment
        # Segments no longer live are dropped, not closed: a query may still be reading one.
        self._mapped = mapped
        live = tuple(LiveSegment(segment, _hidden(segment, snapshot), births[segment.segment_id])
                     for segment in mapped.values())
        parts: dict[str, list[Part]] = {}
        for item in live:
            for name, index in item.segment.indexes.items():
                parts.setdefault(name, []).append((item.segment_id, index, item.deleted.get(name, frozenset()), None))
        return SegmentSet(snapshot.generation, live, {name: MergedIndex(p) for name, p in parts.items()})


def _hidden(segment: MappedSegment, snapshot: Snapshot) -> dict[str, frozenset[int]]:
    """Row ids of this segment that tombstones hide, per algorithm."""
    wanted: dict[str, list[bytes]] = {}
    for tombstone in snapshot.tombstones:
        if tombstone.before > segment.segment_id and tombstone.algorithm in segment.keys:
            wanted.setdefault(tombstone.algorithm, []).append(tombstone.key)
    hidden = {}
    for name, keys in wanted.items():
        rows = segment.find(name, np.array(keys, dtype=segment_index.key_dtype(algorithms.get(name))))
        if (rows >= 0).any():
            hidden[name] = frozenset(rows[rows >= 0].tolist())
    return hidden
