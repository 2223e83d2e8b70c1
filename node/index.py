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


class ExactIndex:
    """Sorted fixed-width byte strings searched with ``numpy.searchsorted``.

    About digest_size + 8 bytes per stored hash (a Python dict would take over
    100), and a 10,000-item batch costs a few milliseconds at millions of rows.
    """

    def __init__(self, algorithm: Algorithm, ids: Sequence[int], digests: Sequence[bytes]):
        self._dtype = np.dtype(f"S{algorithm.digest_size}")
        keys = np.array(digests, dtype=self._dtype) if len(digests) else np.empty(0, self._dtype)
        order = np.argsort(keys, kind="stable")
        self._keys = keys[order]
        self._ids = np.asarray(ids, dtype=np.int64)[order] if len(ids) else np.empty(0, np.int64)

    @classmethod
    def from_sorted(cls, keys: np.ndarray, ids: np.ndarray) -> ExactIndex:
        """An index over keys already sorted (a segment's mapped key file): no sort, no copy."""
        index = cls.__new__(cls)
        index._dtype, index._keys, index._ids = keys.dtype, keys, ids
        return index

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def nbytes(self) -> int:
        return self._keys.nbytes + self._ids.nbytes

    def search(self, digests: Sequence[bytes], max_distance: Sequence[int] = ()) -> list[list[Candidate]]:
        found = self.hits(digests, max_distance)
        return [found.get(position, _NONE) for position in range(len(digests))]

    def hits(self, digests: Sequence[bytes] | np.ndarray,
             max_distance: Sequence[int] = ()) -> dict[int, list[Candidate]]:
        """One vectorised search of the whole batch; Python objects only for the digests found."""
        if not len(self._keys) or not len(digests):
            return {}
        queries = digests if isinstance(digests, np.ndarray) else np.array(digests, dtype=self._dtype)
        clipped = np.minimum(np.searchsorted(self._keys, queries), len(self._keys) - 1)
        positions = np.flatnonzero(self._keys[clipped] == queries)
        ids = self._ids[clipped[positions]]
        return {p: [Candidate(i)] for p, i in zip(positions.tolist(), ids.tolist(), strict=True)}
