"""The pure core of answering a query: validate items, search the indexes.

Knows nothing of gRPC or SQLite; the service feeds it items and indexes and
turns its candidates into hits. Items are grouped by algorithm once, so each
index is searched a single time per batch.

Packed exact items (``PackedGroup``) arrive as one byte string per algorithm
and stay one array from the wire to the index: a batch's items cost Python
objects only where they hit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from federation import algorithms
from federation.algorithms import Algorithm, MatchKind
from federation.query import PackedGroup, QueryItem, item_count
from node.index import Candidate, Index


class InvalidRequest(ValueError):
    """A request the node refuses to evaluate; the message names the bad item."""


@dataclass(frozen=True)
class Limits:
    max_items: int = 20_000
    max_hits_per_item: int = 25
    max_distance: int = 31


@dataclass(frozen=True)
class Group:
    """The items of one algorithm in a batch, with their positions in it
    (a packed group: an array of digests and a range of positions)."""

    algorithm: Algorithm
    positions: Sequence[int]
    digests: Sequence[bytes] | np.ndarray
    max_distances: Sequence[int]


@dataclass(frozen=True)
class ValidBatch:
    size: int
    groups: list[Group]


class ItemMatches(NamedTuple):
    """One item's answer; a named tuple because a batch has thousands."""

    candidates: list[Candidate]
    truncated: bool = False


def validate(items: Sequence[QueryItem], limits: Limits, packed: Sequence[PackedGroup] = ()) -> ValidBatch:
    """The batch grouped by algorithm, or ``InvalidRequest``. ``packed`` groups follow ``items``
    in the item list and are whole digests of an exact algorithm (``federation.wire.packed_from_pb``)."""
    count = item_count(items, packed)
    if not count:
        raise InvalidRequest("request has no items")
    if count > limits.max_items:
        raise InvalidRequest(f"request has {count} items; this node accepts at most {limits.max_items}")
    positions: dict[str, list[int]] = {}
    for position, item in enumerate(items):
        positions.setdefault(item.algorithm, []).append(position)
    groups = [_group(name, where, items, limits) for name, where in positions.items()]
    start = len(items)
    for packed_group in packed:
        if packed_group.count:
            groups.append(_packed(packed_group, start))
        start += packed_group.count
    return ValidBatch(count, groups)


def _packed(group: PackedGroup, start: int) -> Group:
    try:
        algorithm = algorithms.get(group.algorithm)
    except algorithms.DigestError as exc:
        raise InvalidRequest(f"item {start}: {exc}") from None
    if algorithm.match_kind is not MatchKind.EXACT or algorithm.digest_size != group.size:
        raise InvalidRequest(f"item {start}: {group.algorithm} items cannot be packed")
    return Group(algorithm, range(start, start + group.count), group.array(), _Zeros(group.count))


class _Zeros(Sequence[int]):
    """``max_distance`` 0 for each of a packed group's items, without a list of them."""

    def __init__(self, count: int):
        self._count = count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [0] * len(range(*index.indices(self._count)))
        if not -self._count <= index < self._count:
            raise IndexError(index)
        return 0


def _group(name: str, where: list[int], items: Sequence[QueryItem], limits: Limits) -> Group:
    try:
        algorithm = algorithms.get(name)
    except algorithms.DigestError as exc:
        raise InvalidRequest(f"item {where[0]}: {exc}") from None
    digests = [items[p].digest for p in where]
    for position, digest in zip(where, digests, strict=True):
        if len(digest) != algorithm.digest_size:
            try:
                algorithm.validate(digest)
            except algorithms.DigestError as exc:
                raise InvalidRequest(f"item {position}: {exc}") from None
    wanted = [items[p].max_distance for p in where]
    if algorithm.match_kind is MatchKind.EXACT:
        for position, distance in zip(where, wanted, strict=True):
            if distance:
                raise InvalidRequest(f"item {position}: {name} is matched exactly; max_distance must be 0")
        distances = wanted
    else:
        # The node's cap bounds what a requester may ask for, whatever it asks.
        distances = [min(d or algorithm.default_distance, limits.max_distance) for d in wanted]
    return Group(algorithm, where, digests, distances)


def _ranked(candidates: list[Candidate], cap: int) -> ItemMatches:
    if len(candidates) == 1:  # an exact hit, mostly
        return ItemMatches(candidates)
    if len(candidates) > 1:
        candidates = sorted(candidates, key=lambda c: (c.distance, c.record_id))
    return ItemMatches(candidates[:cap], truncated=len(candidates) > cap)


def match(batch: ValidBatch, indexes: Mapping[str, Index], limits: Limits) -> list[ItemMatches]:
    """Per item in request order, its best candidates up to the per-item cap."""
    results = [ItemMatches([])] * batch.size
    for position, matches in hits(batch, indexes, limits).items():
        results[position] = matches
    return results


class ExactHits(NamedTuple):
    """The hits of exact groups as arrays: batch positions ascending, one entry per hit (a
    position repeats only when its digest is live in several segments), and record ids."""

    positions: np.ndarray
    record_ids: np.ndarray


_NO_EXACT = ExactHits(np.empty(0, np.int64), np.empty(0, np.int64))


def hits(batch: ValidBatch, indexes: Mapping[str, Index], limits: Limits) -> dict[int, ItemMatches]:
    """``match`` for the items that have any candidate, by position: no-hit items cost nothing."""
    found, exact = search(batch, indexes, limits)
    return merged(found, exact)


def merged(found: dict[int, ItemMatches], exact: ExactHits) -> dict[int, ItemMatches]:
    """``search``'s two parts as one mapping of position to matches, by position."""
    for position, record_id in zip(exact.positions.tolist(), exact.record_ids.tolist(), strict=True):
        if position in found:
            found[position].candidates.append(Candidate(record_id))
        else:
            found[position] = ItemMatches([Candidate(record_id)])
    return dict(sorted(found.items()))


def search(batch: ValidBatch, indexes: Mapping[str, Index], limits: Limits) -> tuple[dict[int, ItemMatches], ExactHits]:
    """``hits``, with the hits of exact algorithms as arrays (``ExactHits``: no object per hit)
    and the others by position. An item with more exact hits than the per-item cap (a digest
    live in that many segments) is among the others, ranked and truncated like them."""
    found: dict[int, ItemMatches] = {}
    positions: list[np.ndarray] = []
    record_ids: list[np.ndarray] = []
    for group in batch.groups:
        index = indexes.get(group.algorithm.name)
        if index is None:
            continue
        digests = group.digests
        if group.algorithm.match_kind is MatchKind.EXACT:
            if not isinstance(digests, np.ndarray):
                # One array for the whole group, searched in every segment without per-digest objects.
                digests = np.array(digests, dtype=f"S{group.algorithm.digest_size}")
            exact = getattr(index, "exact", None)
            arrays = exact(digests) if exact is not None else None
            if arrays is not None:
                offsets, ids = arrays
                where = group.positions
                at = (offsets + where.start if isinstance(where, range) and where.step == 1
                      else np.asarray(where, dtype=np.int64)[offsets])
                positions.append(at)
                record_ids.append(ids)
                continue
        for offset, candidates in index.hits(digests, group.max_distances).items():
            found[group.positions[offset]] = _ranked(candidates, limits.max_hits_per_item)
    if not positions:
        return dict(sorted(found.items())), _NO_EXACT
    at, ids = np.concatenate(positions), np.concatenate(record_ids)
    order = np.lexsort((ids, at))
    at, ids = at[order], ids[order]
    if len(at) > 1 and (at[1:] == at[:-1]).any():
        _, first, counts = np.unique(at, return_index=True, return_counts=True)
        for start, count in zip(first[counts > limits.max_hits_per_item].tolist(),
                                counts[counts > limits.max_hits_per_item].tolist(), strict=True):
            found[int(at[start])] = _ranked([Candidate(i) for i in ids[start:start + count].tolist()],
                                            limits.max_hits_per_item)
        over = np.isin(at, np.fromiter(found, np.int64, len(found)))
        at, ids = at[~over], ids[~over]
    return dict(sorted(found.items())), ExactHits(at, ids)
