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

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from federation import algorithms, oprf
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
class PrivateView:
    generation: int
    key_id: str
    secret: bytes
    stored: int
    covered: int
    active: tuple[Holding, ...]
    by_key: dict[str, tuple[Holding, ...]] = field(default_factory=dict)

    def bucket_outputs(self, buckets: Sequence[int], bits: int, encoding: int, fingerprint_bits: int
                       ) -> list[bytes]:
        """Each bucket's answer under the active key: the fingerprints of its live outputs,
        encoded (federation.buckets)."""
        prefixes, sizes = private_arrays.bucket_prefixes([(h.part, h.hidden) for h in self.active],
                                                         np.array(buckets, dtype=np.uint32), bits)
        return private_arrays.encode_buckets(prefixes, sizes, encoding, fingerprint_bits)

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


def build(live: SegmentSet, keys: PrivateKeys) -> PrivateView:
    """The view of this generation under these keys (cheap: no array is read whole)."""
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
    return PrivateView(live.generation, active_id, keys.active, stored, covered, tuple(by_key[active_id]),
                       {key_id: tuple(found) for key_id, found in by_key.items()})


def mean_bucket_size(covered: int, bits: int) -> float:
    """The anonymity set of one item: digests covered per bucket."""
    return covered / float(1 << bits)


SUITE = oprf.SUITE
