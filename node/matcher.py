"""The pure core of answering a query: validate items, search the indexes.

Knows nothing of gRPC or SQLite; the service feeds it items and indexes and
turns its candidates into hits.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from federation import algorithms
from federation.algorithms import Algorithm, MatchKind
from federation.query import QueryItem
from node.index import Candidate, Index


class InvalidRequest(ValueError):
    """A request the node refuses to evaluate; the message names the bad item."""


@dataclass(frozen=True)
class Limits:
    max_items: int = 20_000
    max_hits_per_item: int = 25
    max_distance: int = 31


@dataclass(frozen=True)
class ValidItem:
    algorithm: Algorithm
    digest: bytes
    max_distance: int


@dataclass(frozen=True)
class ItemMatches:
    candidates: list[Candidate]
    truncated: bool = False


def validate(items: Sequence[QueryItem], limits: Limits) -> list[ValidItem]:
    if not items:
        raise InvalidRequest("request has no items")
    if len(items) > limits.max_items:
        raise InvalidRequest(f"request has {len(items)} items; this node accepts at most {limits.max_items}")
    return [_validate_item(n, item, limits) for n, item in enumerate(items)]


def _validate_item(number: int, item: QueryItem, limits: Limits) -> ValidItem:
    try:
        algorithm = algorithms.get(item.algorithm)
        digest = algorithm.validate(item.digest)
    except algorithms.DigestError as exc:
        raise InvalidRequest(f"item {number}: {exc}") from None
    if algorithm.match_kind is MatchKind.EXACT:
        if item.max_distance:
            raise InvalidRequest(f"item {number}: {algorithm.name} is matched exactly; max_distance must be 0")
        return ValidItem(algorithm, digest, 0)
    wanted = item.max_distance or algorithm.max_distance
    return ValidItem(algorithm, digest, min(wanted, limits.max_distance, algorithm.max_distance))


def match(items: Sequence[ValidItem], indexes: Mapping[str, Index], limits: Limits) -> list[ItemMatches]:
    """Searches each algorithm's index once for all of its items in the batch."""
    positions: dict[str, list[int]] = defaultdict(list)
    for position, item in enumerate(items):
        positions[item.algorithm.name].append(position)
    results = [ItemMatches([]) for _ in items]
    for name, where in positions.items():
        index = indexes.get(name)
        if index is None:
            continue
        found = index.search([items[p].digest for p in where], [items[p].max_distance for p in where])
        for position, candidates in zip(where, found):
            ranked = sorted(candidates, key=lambda c: (c.distance, c.record_id))
            results[position] = ItemMatches(
                ranked[: limits.max_hits_per_item], truncated=len(ranked) > limits.max_hits_per_item
            )
    return results
