"""The published segments of one generation, as one searchable hash set.

Queries search every segment and merge; tombstones are applied by dropping the
candidates they hide (their row ids, found once per generation with a
vectorised search of each segment's sorted keys). A record id names its
segment and row: ``segment_id << 32 | row_id``.

``SegmentLoader`` maps a catalog snapshot: segments it already mapped are
kept as the very same objects, so publishing one small segment costs mapping
that segment only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from federation import algorithms
from node import segment_index
from node.catalog import Snapshot
from node.index import Candidate, Index
from node.records import HashRecord, StoredRecord
from node.segment import MappedSegment

ROW_BITS = 32


def record_id(segment_id: int, row_id: int) -> int:
    return segment_id << ROW_BITS | row_id


@dataclass(frozen=True)
class LiveSegment:
    segment: MappedSegment
    deleted: dict[str, frozenset[int]]  # algorithm -> row ids hidden by tombstones

    @property
    def segment_id(self) -> int:
        return self.segment.segment_id


class MergedIndex:
    """One algorithm over every segment: the ``Index`` the matcher searches."""

    def __init__(self, parts: Sequence[tuple[int, Index, frozenset[int]]]):
        self._parts = parts

    def __len__(self) -> int:
        return sum(len(index) - len(deleted) for _, index, deleted in self._parts)

    def search(self, digests: Sequence[bytes], max_distance: Sequence[int]) -> list[list[Candidate]]:
        merged: list[list[Candidate]] = [[] for _ in digests]
        for segment_id, index, deleted in self._parts:
            base = segment_id << ROW_BITS
            for found, candidates in zip(merged, index.search(digests, max_distance), strict=True):
                for c in candidates:
                    if c.record_id not in deleted:
                        found.append(Candidate(base | c.record_id, c.distance, c.matched_share))
        return merged


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
        by_segment: dict[int, list[int]] = {}
        for rid in ids:
            by_segment.setdefault(rid >> ROW_BITS, []).append(rid & ((1 << ROW_BITS) - 1))
        found: dict[int, StoredRecord] = {}
        for live in self.segments:
            wanted = by_segment.get(live.segment_id)
            if wanted:
                for row in live.segment.rows(wanted):
                    rid = record_id(live.segment_id, row[0])
                    found[rid] = StoredRecord(rid, to_record(row[1:]))
        return found


def to_record(row: Sequence) -> HashRecord:
    return HashRecord(algorithm=row[0], digest=bytes(row[1]), reference=row[2], category=row[3],
                      victim_identified=None if row[4] is None else bool(row[4]), series=row[5],
                      date_added=row[6])


class SegmentLoader:
    """Maps snapshots' segments, keeping those it has already mapped."""

    def __init__(self, root: Path):
        self.root = root
        self._mapped: dict[int, MappedSegment] = {}

    def load(self, snapshot: Snapshot) -> SegmentSet:
        """Blocking (maps files, verifies checksums): run it off the event loop."""
        mapped = {}
        for entry in snapshot.segments:
            segment = self._mapped.get(entry.segment_id)
            if segment is None or segment.files != entry.files:  # new, or its OPRF outputs changed
                segment = MappedSegment.open(self.root, entry.segment_id, entry.counts, entry.files)
            mapped[entry.segment_id] = segment
        # Segments no longer live are dropped, not closed: a query may still be reading one.
        self._mapped = mapped
        live = tuple(LiveSegment(segment, _hidden(segment, snapshot)) for segment in mapped.values())
        parts: dict[str, list[tuple[int, Index, frozenset[int]]]] = {}
        for item in live:
            for name, index in item.segment.indexes.items():
                parts.setdefault(name, []).append((item.segment_id, index, item.deleted.get(name, frozenset())))
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
