"""In-memory indexes over a node's digests, one per algorithm.

The store stays the record of truth; an index maps query digests to store row
ids in bulk so that a batch of thousands of items costs one vectorised search
and one SQL query for the hits, never one SQL query per digest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from federation.algorithms import Algorithm


@dataclass(frozen=True)
class Candidate:
    """A stored row that answers a query digest, and how far it is from it."""

    record_id: int
    distance: int = 0
    # Video: the share of the query's frames that matched this stored video.
    matched_share: float | None = None


_NONE: list[Candidate] = []  # shared by every miss; callers never mutate results


class Index(Protocol):
    def __len__(self) -> int: ...

    def search(self, digests: Sequence[bytes], max_distance: Sequence[int]) -> list[list[Candidate]]:
        """Per query digest, the stored rows within ``max_distance`` of it."""
        ...

    def hits(self, digests: Sequence[bytes] | np.ndarray, max_distance: Sequence[int]) -> dict[int, list[Candidate]]:
        """The same, for the query positions that have any: a batch's misses cost no Python object."""
        ...


def hits_of(results: list[list[Candidate]]) -> dict[int, list[Candidate]]:
    """``Index.hits`` from ``Index.search``'s answer."""
    return {position: found for position, found in enumerate(results) if found}


PREFIX_BYTES = 8


def prefix_of(keys: np.ndarray) -> np.ndarray:
    """Each fixed-width byte key's first 8 bytes as a big-endian unsigned integer, so that the
    integers sort like the keys (a key shorter than 8 bytes is padded with zero bytes).

    ``numpy.searchsorted`` compares byte-string keys through a generic per-item compare;
    on uint64 it is a plain integer binary search, three to six times faster, and a
    random digest's prefix is unique among millions, so the full key is compared only
    once per candidate (``find_sorted``)."""
    width = keys.dtype.itemsize
    raw = keys.view(np.uint8).reshape(len(keys), width)
    head = np.zeros((len(keys), PREFIX_BYTES), dtype=np.uint8)
    head[:, :min(width, PREFIX_BYTES)] = raw[:, :PREFIX_BYTES]
    return head.view(">u8").ravel().astype(np.uint64)


# Prefixes per entry of an exact index's sample, the first level of its search
# (``node.exact_kernels``): a power of two, so that the 15 keys between two entries
# take four lockstep steps. The sample is 1/16 of the prefixes: 1 MB at 2 M keys.
SAMPLE_STEP = 16


def sample_of(prefix: np.ndarray) -> np.ndarray:
    """Every ``SAMPLE_STEP``-th prefix (a copy, kept in memory with the index)."""
    return np.ascontiguousarray(prefix[::SAMPLE_STEP])


@dataclass(frozen=True)
class Probe:
    """A batch of query keys prepared once for the search of every segment: sorted by their
    prefix (a sorted batch walks each segment's arrays in order, which the cache likes),
    with the batch position of each."""

    keys: np.ndarray
    prefix: np.ndarray  # uint64, ascending
    order: np.ndarray  # int64: batch position of keys[i]

    @classmethod
    def of(cls, keys: np.ndarray) -> Probe:
        prefix = prefix_of(keys)
        order = np.argsort(prefix, kind="stable")
        return cls(keys[order], prefix[order], order)


def find_sorted(keys: np.ndarray, prefix: np.ndarray, probe: Probe,
                sample: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Where probe keys sit in sorted, unique ``keys`` (``prefix``: their ``prefix_of``):
    (indexes into the probe's keys of those found, their positions in ``keys``).

    Searched on the uint64 prefixes; each candidate is confirmed on the whole key. A
    prefix shared by several stored keys (never seen with real digests, but possible)
    sends the queries on it to a search of the whole keys, so the answer is always exact."""
    count = len(keys)
    if not count or not len(probe.keys):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    from node import exact_kernels  # noqa: PLC0415 - imports numba: only a process that searches
    sample = sample if sample is not None else sample_of(prefix)
    at = np.minimum(exact_kernels.search(prefix, sample, SAMPLE_STEP, probe.prefix), count - 1)
    candidates = np.flatnonzero(prefix[at] == probe.prefix)
    at = at[candidates]
    wanted = probe.keys[candidates]
    found = keys[at] == wanted
    # A run of keys sharing the prefix: the first of it is not necessarily the one asked.
    after = np.minimum(at + 1, count - 1)
    tied = ~found & (after > at) & (prefix[after] == probe.prefix[candidates])
    if tied.any():
        exact = np.minimum(np.searchsorted(keys, wanted[tied]), count - 1)
        at[tied] = exact
        found[tied] = keys[exact] == wanted[tied]
    return candidates[found], at[found]


class ExactIndex:
    """Sorted fixed-width byte strings and their uint64 prefixes, searched with ``numpy.searchsorted``.

    About digest_size + 16 bytes per stored hash (a Python dict would take over
    100), and a 10,000-item batch costs a few milliseconds at millions of rows.
    """

    def __init__(self, algorithm: Algorithm, ids: Sequence[int], digests: Sequence[bytes]):
        self._dtype = np.dtype(f"S{algorithm.digest_size}")
        keys = np.array(digests, dtype=self._dtype) if len(digests) else np.empty(0, self._dtype)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._ids = np.asarray(ids, dtype=np.int64)[order] if len(ids) else np.empty(0, np.int64)
        self._prefix = prefix_of(self._keys)
        self._sample = sample_of(self._prefix)

    @classmethod
    def from_sorted(cls, keys: np.ndarray, ids: np.ndarray, prefix: np.ndarray | None = None) -> ExactIndex:
        """An index over keys already sorted (a segment's mapped key file): no sort, no copy
        of the keys. ``prefix``: their ``prefix_of`` (mapped); computed here when absent
        (a segment written before the prefix file existed)."""
        index = cls.__new__(cls)
        index._dtype, index._keys, index._ids = keys.dtype, keys, ids
        index._prefix = prefix if prefix is not None else prefix_of(keys)
        index._sample = sample_of(index._prefix)
        return index

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def prefix(self) -> np.ndarray:
        """The keys' ``prefix_of``, in key order."""
        return self._prefix

    @property
    def sample(self) -> np.ndarray:
        """The prefixes' ``sample_of``."""
        return self._sample

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._ids.nbytes + self._prefix.nbytes + self._sample.nbytes

    def search(self, digests: Sequence[bytes], max_distance: Sequence[int] = ()) -> list[list[Candidate]]:
        found = self.hits(digests, max_distance)
        return [found.get(position, _NONE) for position in range(len(digests))]

    def probe(self, digests: Sequence[bytes] | np.ndarray) -> Probe:
        return Probe.of(digests if isinstance(digests, np.ndarray) else np.array(digests, dtype=self._dtype))

    def lookup(self, probe: Probe) -> tuple[np.ndarray, np.ndarray]:
        """(batch positions, row ids) of the probe's keys found here, in the probe's sorted order."""
        where, at = find_sorted(self._keys, self._prefix, probe, self._sample)
        return probe.order[where], self._ids[at].astype(np.int64)

    def hits(self, digests: Sequence[bytes] | np.ndarray,
             max_distance: Sequence[int] = ()) -> dict[int, list[Candidate]]:
        """One vectorised search of the whole batch; Python objects only for the digests found."""
        if not len(self._keys) or not len(digests):
            return {}
        positions, ids = self.lookup(self.probe(digests))
        order = np.argsort(positions)
        return {p: [Candidate(i)] for p, i in zip(positions[order].tolist(), ids[order].tolist(), strict=True)}
