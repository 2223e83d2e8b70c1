"""What private exact matching answers from, at one store generation and key set.

Built once per generation (and key change) from the mapped segments: which of
their OPRF arrays are under the active key (bucket answers), which under any
key still held (disclosures), the row ids tombstones hide in each as a sorted
array, and how much of the store the active key covers. A segment written
before the node had its key, or before a rotation's outputs were computed, is
not covered until the serving node computes its outputs (node.private_builder):
``covered`` says how many exact digests the answers stand for, ``stored`` how
many there are.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from federation import algorithms, buckets as buckets_module, oprf
from federation.algorithms import MatchKind
from node import private_arrays
from node.private_arrays import PrivatePart
from node.private_key import PrivateKeys
from node.segment_set import SegmentSet, record_id

EXACT = tuple(a.name for a in algorithms.all_algorithms() if a.match_kind is MatchKind.EXACT)


@dataclass(frozen=True)
class Holding:
    """One algorithm's outputs under one key in one segment, with its hidden rows."""

    segment_id: int
    algorithm: str
    part: PrivatePart
    hidden: np.ndarray  # sorted uint32 row ids that tombstones hide


@dataclass(frozen=True)
class BucketTable:
    """One part's outputs laid out for bucket answers: the first 8 bytes of each output
    (big-endian uint64) in bucket-hash order (the order of ``part.buckets``), so that a bucket,
    a range of ``part.buckets``, is a slice of ``prefixes`` (read whole, never gathered row by
    row from the 64-byte outputs). 8 bytes per output, whatever the prefix length."""

    prefixes: np.ndarray

    @classmethod
    def build(cls, part: PrivatePart) -> BucketTable:
        firsts = part.raw().view(">u8")[:, 0]  # a strided view: only the gathered words are read
        return cls(firsts[part.positions].astype(np.uint64))


def bucket_ranges(part: PrivatePart, buckets: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Where each ``bits``-bit bucket's entries start and end in ``part.buckets`` (sorted 32-bit
    bucket hashes): two binary searches per bucket, in the array's own type (no copy of it)."""
    order = np.argsort(buckets, kind="stable")  # sorted keys: each search starts where the last ended
    asked = buckets[order].astype(np.uint64)
    shift = np.uint64(32 - bits)
    first = (asked << shift).astype(np.uint32)
    last = (((asked + np.uint64(1)) << shift) - np.uint64(1)).astype(np.uint32)
    starts, ends = np.empty(len(buckets), dtype=np.int64), np.empty(len(buckets), dtype=np.int64)
    starts[order] = np.searchsorted(part.buckets, first, side="left")
    ends[order] = np.searchsorted(part.buckets, last, side="right")
    return starts, ends


class Tables:
    """The bucket tables of the node's segments, kept while their segment is live: segments are
    immutable, so a table is built once (at its first PrivateMatch, ~1 s per 10 M outputs)."""

    def __init__(self) -> None:
        self._tables: dict[tuple[int, str, str], BucketTable] = {}
        self._lock = threading.Lock()

    def get(self, holding: Holding, key_id: str) -> BucketTable:
        key = (holding.segment_id, holding.algorithm, key_id)
        with self._lock:
            table = self._tables.get(key)
            if table is None:
                table = self._tables[key] = BucketTable.build(holding.part)
            return table

    def keep(self, live: set[tuple[int, str, str]]) -> None:
        """Forgets the tables of segments (or keys) no longer served."""
        with self._lock:
            for key in [k for k in self._tables if k not in live]:
                del self._tables[key]


@dataclass(frozen=True)
class BucketAnswers:
    """A request's bucket answers: its distinct buckets' answers concatenated (in the order of
    their first item), and their size."""

    data: bytes
    distinct: int


@dataclass(frozen=True)
class PrivateView:
    generation: int
    key_id: str
    secret: bytes
    stored: int
    covered: int
    active: tuple[Holding, ...]
    by_key: dict[str, tuple[Holding, ...]] = field(default_factory=dict)
    tables: Tables = field(default_factory=Tables)

    def bucket_answers(self, buckets: np.ndarray, bits: int, encoding: int, fingerprint_bits: int) -> BucketAnswers:
        """The answers of these items' distinct buckets under the active key: the fingerprints of
        each bucket's live outputs, encoded (federation.buckets), by the compiled kernels."""
        from node import private_kernels  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set

        distinct, _ = buckets_module.distinct(buckets.astype(np.int64))
        tables = [(h, self.tables.get(h, self.key_id)) for h in self.active]
        spans = [bucket_ranges(h.part, distinct, bits) for h, _ in tables]
        room = sum((hi - lo for lo, hi in spans), np.zeros(len(distinct), dtype=np.int64))
        base = np.cumsum(room) - room
        values = np.empty(int(room.sum()), dtype=np.uint64)
        cursor = base.copy()
        for (holding, table), (lo, hi) in zip(tables, spans, strict=True):
            part = holding.part
            private_kernels.collect(table.prefixes, lo, hi, part.positions, part.ids, holding.hidden, values, cursor)
        counts = cursor - base
        if len(counts) and int(counts.max()) > buckets_module.MAX_ENTRIES:
            raise buckets_module.BucketError(f"a bucket of {int(counts.max())} entries does not fit the encoding "
                                             f"(at most {buckets_module.MAX_ENTRIES})")
        lengths = buckets_module.lengths(counts, encoding, fingerprint_bits)
        offsets = np.cumsum(lengths) - lengths
        data = np.zeros(int(lengths.sum()), dtype=np.uint8)
        private_kernels.encode(values, base, counts, offsets, encoding, fingerprint_bits,
                               buckets_module.low_bits_many(counts, fingerprint_bits), data)
        return BucketAnswers(data.tobytes(), len(distinct))

    def disclose(self, key_id: str, items: Sequence[tuple[str, bytes]]) -> list[int | None]:
        """The record id of the live row whose output under ``key_id`` is each item's
        proof (of that algorithm), or None: a proof that is no stored output finds nothing."""
        found: list[int | None] = [None] * len(items)
        for holding in self.by_key.get(key_id, ()):
            wanted = [i for i, (name, _) in enumerate(items) if name == holding.algorithm and found[i] is None]
            if not wanted:
                continue
            rows = private_arrays.find_outputs(holding.part, [items[i][1] for i in wanted])
            for position, row in zip(wanted, rows, strict=True):
                if row >= 0 and not _hidden(holding.hidden, row):
                    found[position] = record_id(holding.segment_id, row)
        return found


def _hidden(hidden: np.ndarray, row: int) -> bool:
    at = int(np.searchsorted(hidden, row))
    return at < len(hidden) and int(hidden[at]) == row


def build(live: SegmentSet, keys: PrivateKeys, tables: Tables | None = None) -> PrivateView:
    """The view of this generation under these keys (cheap: no array is read whole; the bucket
    tables of new segments are built at their first use)."""
    held = keys.by_id()
    by_key: dict[str, list[Holding]] = {key_id: [] for key_id in held}
    stored = covered = 0
    active_id = keys.active_id
    for item in live.segments:
        for name in EXACT:
            count = item.segment.counts.get(name, 0) - len(item.deleted.get(name, ()))
            stored += count
            hidden = np.array(sorted(item.deleted.get(name, ())), dtype=np.uint32)
            for key_id, part in item.segment.private.get(name, {}).items():
                if key_id in by_key:
                    by_key[key_id].append(Holding(item.segment_id, name, part, hidden))
                    if key_id == active_id:
                        covered += count
    tables = tables if tables is not None else Tables()
    tables.keep({(h.segment_id, h.algorithm, active_id) for h in by_key[active_id]})
    return PrivateView(live.generation, active_id, keys.active, stored, covered, tuple(by_key[active_id]),
                       {key_id: tuple(found) for key_id, found in by_key.items()}, tables)


def warm_up() -> None:
    """Compiles (or loads from the cache) the bucket-answer kernels before the node says it is
    ready, so that the first PrivateMatch pays no compilation (node.readiness does the same for
    the PDQ kernels)."""
    from node import private_kernels  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set

    private_kernels.warm()


def mean_bucket_size(covered: int, bits: int) -> float:
    """The anonymity set of one item: digests covered per bucket."""
    return covered / float(1 << bits)


SUITE = oprf.SUITE
