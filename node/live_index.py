"""Keeps the in-memory indexes in step with the store.

The indexes are built at start and rebuilt whenever the store's generation
moves (an import by another process, say); a query after a change waits for
the rebuild, so what was imported matches on the very next query.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from federation import algorithms
from node import index
from node.store import Store


@dataclass(frozen=True)
class IndexSet:
    generation: int
    indexes: dict[str, index.Index] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        return {name: len(idx) for name, idx in self.indexes.items()}


class LiveIndexes:
    def __init__(self, store: Store):
        self._store = store
        self._current = IndexSet(generation=-1)
        self._lock = asyncio.Lock()

    async def current(self) -> IndexSet:
        generation = await self._store.generation()
        if generation == self._current.generation:
            return self._current
        async with self._lock:
            if generation != self._current.generation:
                self._current = await self._load()
        return self._current

    async def _load(self) -> IndexSet:
        # Read the generation first: a change during loading then triggers
        # another rebuild on the next query instead of being missed.
        generation = await self._store.generation()
        built: dict[str, index.Index] = {}
        for algorithm in algorithms.all_algorithms():
            ids, digests = await self._store.digests(algorithm.name)
            if ids:
                built[algorithm.name] = await asyncio.to_thread(index.build, algorithm, ids, digests)
        return IndexSet(generation, built)
