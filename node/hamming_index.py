"""Near-match search over 256-bit PDQ hashes by Hamming distance.

Two indexes implement the ``Index`` protocol with compiled (numba) kernels:

- ``ScanHammingIndex`` compares every query with every stored hash;
- ``MultiIndexHammingIndex`` uses multi-index hashing (Norouzi et al.): the
  256 bits are cut into 16 substrings of 16 bits. By pigeonhole, a hash within
  distance d of a query has at least one substring within r = d // 16 of the
  query's same substring, so it is enough to look, in each of 16 tables, in
  the buckets of the query's substring and of its flips of up to r bits
  (17 buckets per table for d <= 31), and to verify those candidates with a
  full 256-bit popcount: ~40,000 candidates per query at 10 M random hashes.

``build_hamming_index`` picks between them by size.

A batch is searched table by table, bucket by bucket (see ``hamming_kernels.probe``), both
cores in parallel. Measured on 2 cores at 10 M random hashes, distance 31:
~6,900 queries/s in batches of 10,000, ~2,700 in batches of 100, ~900 one
at a time (tests/bench/bench_pdq_index.py).

Memory per stored hash of the multi-index: the hash (32 bytes; rows sorted
by substring 0, so table 0 needs no position list), a uint32 row position in
each of the 15 other tables (60 bytes) and a uint32 id (4 bytes): 96 bytes,
plus 16 x 65,537 uint32 bucket offsets (4 MiB) whatever the size.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import ModuleType
from typing import Self

import numpy as np

from node.hamming_layout import BUCKETS, DIGEST_SIZE, MAX_RADIUS, TABLES
from node.index import Candidate, hits_of

__all__ = ["BUCKETS", "DIGEST_SIZE", "MAX_RADIUS", "TABLES", "MultiIndexHammingIndex", "ScanHammingIndex",
           "build_hamming_index", "load_hamming_index"]

# Also TABLES, BUCKETS, MAX_RADIUS: node/hamming_layout.py, shared with the kernels.
# See build_hamming_index.
SCAN_BELOW = 20_000
# First-pass output slots of a scanned query; a unit (query or table) that
# finds more hits than its slots is searched again with exactly as many.
FIRST_SLOTS = 32

# numba's default (workqueue) threading layer aborts the process when two
# threads launch parallel kernels at once, and indexes are built in worker
# threads while searches run elsewhere. One launch already uses every core,
# so serialising launches costs nothing.
_LAUNCH = threading.Lock()




def _fill_tables(hashes, offsets, positions):
    """Each table's CSR: offsets[t, key]:offsets[t, key + 1] is bucket key of table t;
    for t > 0, positions[t - 1] there lists its rows, ascending (so a bucket's
    accesses to hashes run forwards).

    numpy, not a compiled kernel: a stable sort of 16-bit keys is a radix sort,
    about as fast, and an import (which builds indexes but searches none) then
    never waits for the search kernels to compile in a fresh store.
    """
    keys = hashes.view(np.uint16)  # column t is substring t (_substring)
    for t in range(TABLES):
        column = keys[:, t]
        np.cumsum(np.bincount(column, minlength=BUCKETS), out=offsets[t, 1:], dtype=np.uint32)
        if t:
            positions[t - 1] = np.argsort(column, kind="stable")


def _collect(kernel: str, arguments: tuple, units: np.ndarray, slots_each: int) -> list[np.ndarray]:
    """(query, row, distance) of every hit of kernel over units, in no particular order."""
    if not len(units):
        return [np.empty(0, np.int64)] * 3
    slots = np.full(len(units), slots_each, dtype=np.int64)
    query, row, dist, counts = _launch(kernel, arguments, units, slots)
    over = counts > slots
    # Keep the first counts[u] entries of each unit's slots, none of an overflowing unit's...
    starts = np.cumsum(slots) - slots
    valid = np.arange(len(row)) - np.repeat(starts, slots) < np.repeat(np.where(over, 0, counts), slots)
    hits = [query[valid], row[valid], dist[valid]]
    if over.any():
        # ...which runs again with exactly the slots it needs.
        more = _launch(kernel, arguments, units[over], counts[over])[:3]
        hits = [np.concatenate(pair) for pair in zip(hits, more, strict=True)]
    return hits


def _kernels() -> ModuleType:
    """The compiled kernels, imported on the first search: numba takes ~0.6 s to import, and
    ``icse-node import``, ``retract`` or ``stats`` build or read indexes but search none."""
    from node import hamming_kernels  # noqa: PLC0415

    return hamming_kernels


def _launch(kernel: str, arguments: tuple, units: np.ndarray, slots: np.ndarray):
    starts = np.cumsum(slots) - slots
    total = int(slots.sum())
    query, row, dist = (np.empty(total, dtype=np.int64) for _ in range(3))
    counts = np.empty(len(units), dtype=np.int64)
    with _LAUNCH:
        getattr(_kernels(), kernel)(*arguments, units, starts, slots, query, row, dist, counts)
    return query, row, dist, counts


def _pack(digests: Sequence[bytes] | np.ndarray) -> np.ndarray:
    """Digests as an (n, 4) uint64 array whose rows are 64-byte aligned.

    An aligned 32-byte row never straddles two cache lines: one memory access
    per candidate. Also takes an (n, 32) uint8 array (no bytes objects).
    """
    if isinstance(digests, np.ndarray):
        raw = np.ascontiguousarray(digests, dtype=np.uint8)
        if raw.ndim != 2 or raw.shape[1] != DIGEST_SIZE:
            raise ValueError(f"digests must be an (n, {DIGEST_SIZE}) uint8 array, got {raw.shape}")
    else:
        raw = np.frombuffer(b"".join(digests), dtype=np.uint8)
        if len(raw) != DIGEST_SIZE * len(digests):
            raise ValueError(f"every digest must be {DIGEST_SIZE} bytes")
    count = raw.size // DIGEST_SIZE
    buffer = np.empty(count * DIGEST_SIZE + 64, dtype=np.uint8)
    skip = -buffer.ctypes.data % 64
    packed = buffer[skip : skip + count * DIGEST_SIZE].view(np.uint64).reshape(count, 4)
    packed[...] = raw.reshape(count, DIGEST_SIZE).view(np.uint64)
    return packed


class ScanHammingIndex:
    """Every query against every stored hash, queries in parallel."""

    def __init__(self, algorithm, ids: Sequence[int] | np.ndarray, digests: Sequence[bytes] | np.ndarray):
        if algorithm.digest_size != DIGEST_SIZE:
            raise ValueError(f"{algorithm.name}: a Hamming index takes {DIGEST_SIZE}-byte hashes")
        if len(ids) != len(digests):
            raise ValueError(f"{len(ids)} ids for {len(digests)} digests")
        self._hashes = _pack(digests)
        id_array = np.asarray(ids, dtype=np.int64)
        # Ids as uint32 offsets from the smallest when they fit: 4 bytes a hash, not 8.
        self._base = int(id_array.min()) if len(id_array) else 0
        fits = not len(id_array) or int(id_array.max()) - self._base < 1 << 32
        self._ids = (id_array - self._base).astype(np.uint32 if fits else np.int64)
        self._positions = np.empty((0, 0), dtype=np.uint32)  # no tables

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Self:
        """The index over arrays that ``arrays()`` gave (memory-mapped files, say): no build."""
        index = cls.__new__(cls)
        index._hashes, index._ids = arrays["hashes"], arrays["ids"]
        index._base = int(arrays["base"][0])
        index._positions = arrays.get("positions", np.empty((0, 0), dtype=np.uint32))
        return index

    def arrays(self) -> dict[str, np.ndarray]:
        """What ``from_arrays`` needs to rebuild this index without work, for saving to files."""
        return {"hashes": self._hashes, "ids": self._ids, "base": np.array([self._base], dtype=np.int64)}

    def __len__(self) -> int:
        return len(self._hashes)

    @property
    def nbytes(self) -> int:
        return self._hashes.nbytes + self._ids.nbytes

    def search(self, digests: Sequence[bytes] | np.ndarray,
               max_distance: Sequence[int]) -> list[list[Candidate]]:
        if not len(digests):
            return []
        if not len(self._hashes):
            return [[] for _ in range(len(digests))]
        queries = _pack(digests)
        limits = np.asarray(max_distance, dtype=np.int64)
        if limits.shape != (len(queries),):
            raise ValueError(f"{limits.size} distances for {len(queries)} digests")
        owner, rows, dists = self._hits(queries, limits)
        # Each query's candidates by distance then id, as the matcher ranks them.
        ids = self._ids[rows].astype(np.int64) + self._base
        order = np.lexsort((ids, dists, owner))
        ends = np.cumsum(np.bincount(owner, minlength=len(queries))).tolist()
        ids, dists = ids[order].tolist(), dists[order].tolist()
        results, start = [], 0
        for end in ends:  # one Python step per query and per hit, never per stored hash
            results.append([Candidate(ids[k], dists[k]) for k in range(start, end)])
            start = end
        return results

    def hits(self, digests: Sequence[bytes] | np.ndarray, max_distance: Sequence[int]) -> dict[int, list[Candidate]]:
        return hits_of(self.search(digests, max_distance))

    def _hits(self, queries: np.ndarray, limits: np.ndarray) -> list[np.ndarray]:
        """(query number, row, distance) of every hit."""
        return _collect("scan", (self._hashes, self._positions, queries, limits),
                        np.flatnonzero(limits >= 0), FIRST_SLOTS)


class MultiIndexHammingIndex(ScanHammingIndex):
    """Multi-index hashing: 16 bucket tables over the 16-bit substrings."""

    def __init__(self, algorithm, ids: Sequence[int] | np.ndarray, digests: Sequence[bytes] | np.ndarray):
        super().__init__(algorithm, ids, digests)
        if len(self._hashes) >= 1 << 32:
            raise ValueError("row positions are uint32: at most 2**32 - 1 hashes")
        # Rows sorted by substring 0 (numpy's stable sort of 16-bit keys is a radix sort).
        order = np.argsort(self._hashes.view(np.uint16)[:, 0], kind="stable")
        np.take(self._hashes.copy(), order, axis=0, out=self._hashes)
        self._ids = self._ids[order]
        del order
        self._offsets = np.zeros((TABLES, BUCKETS + 1), dtype=np.uint32)
        self._positions = np.empty((TABLES - 1, len(self._hashes)), dtype=np.uint32)
        _fill_tables(self._hashes, self._offsets, self._positions)

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Self:
        index = super().from_arrays(arrays)
        index._offsets = arrays["offsets"]
        return index

    @property
    def nbytes(self) -> int:
        return super().nbytes + self._offsets.nbytes + self._positions.nbytes

    def arrays(self) -> dict[str, np.ndarray]:
        return {**super().arrays(), "offsets": self._offsets, "positions": self._positions}

    def _hits(self, queries: np.ndarray, limits: np.ndarray) -> list[np.ndarray]:
        probing = (limits >= 0) & (limits // TABLES <= MAX_RADIUS)
        # Larger distances scan (a limit of -1 leaves the others out of the scan).
        hits = super()._hits(queries, np.where(probing, -1, limits))
        chosen = np.flatnonzero(probing)
        if len(chosen):
            # Table 0 reports every exact duplicate: room for two hits a query in each table.
            query, row, dist = _collect(
                "probe", (self._hashes, self._offsets, self._positions, queries[chosen], limits[chosen]),
                np.arange(TABLES), 2 * len(chosen) + 64)
            hits = [np.concatenate(pair) for pair in zip(hits, (chosen[query], row, dist), strict=True)]
        return hits


def load_hamming_index(arrays: dict[str, np.ndarray]) -> ScanHammingIndex:
    """The index saved as ``arrays`` (a multi-index when it has bucket tables)."""
    kind = MultiIndexHammingIndex if "offsets" in arrays else ScanHammingIndex
    return kind.from_arrays(arrays)


def build_hamming_index(algorithm, ids: Sequence[int] | np.ndarray,
                        digests: Sequence[bytes] | np.ndarray) -> ScanHammingIndex:
    """The Hamming index for this many hashes: a scan when small, else multi-index hashing.

    Below SCAN_BELOW rows (640 KB of hashes, cache resident) a scan answers a
    query in tens of microseconds, with no build and a third of the memory;
    the multi-index also pays ~1 ms a search call to sort its probes into
    16 x 65,536 buckets. Above, the scan's cost grows with the store while
    the multi-index reads ~0.4 % of it.
    """
    kind = ScanHammingIndex if len(digests) < SCAN_BELOW else MultiIndexHammingIndex
    return kind(algorithm, ids, digests)
