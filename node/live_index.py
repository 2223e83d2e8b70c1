"""Keeps a serving node's view of the store in step, off the query path.

A background task polls the catalog's generation (one indexed read) and, when
it moved, maps the new snapshot in a worker thread: new segments are mapped
(their indexes were built by whoever wrote them), segments already mapped are
reused as they are, tombstones are resolved to row ids. A query reads the
generation too; if it moved, the query waits for that refresh, which runs in
its own task: a query's deadline or cancellation never cancels it, and no
index is ever built inside a query.

If a segment fails its checksum, the view is *failed*: queries are refused
with the reason (``SegmentCorrupt``) until the store is repaired, instead of
answering from a partial set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from node.segment import SegmentCorrupt
from node.segment_set import SegmentSet
from node.store import Store

log = logging.getLogger("icse.node")
POLL_SECONDS = 0.3


class LiveIndexes:
    def __init__(self, store: Store, poll_seconds: float = POLL_SECONDS):
        self._store = store
        self._poll = poll_seconds
        self._current = SegmentSet(generation=-1)
        self._failure: SegmentCorrupt | None = None
        self._refresh: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.on_change: list = []  # callables(SegmentSet) run after each refresh (merge policy, metrics)

    async def start(self) -> SegmentSet:
        """Maps the store (raising ``SegmentCorrupt`` if a file is damaged), then watches it."""
        await self._refreshed()
        if self._failure is not None:
            raise self._failure
        self._watcher = asyncio.create_task(self._watch())
        return self._current

    async def stop(self) -> None:
        for task in (self._watcher, self._refresh):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def current(self) -> SegmentSet:
        """The set as of the catalog's latest generation; raises ``SegmentCorrupt``
        if that generation cannot be served whole."""
        if await self._store.generation() != self._current.generation:
            await asyncio.shield(self._refreshed())
        if self._failure is not None:
            raise self._failure
        return self._current

    def _refreshed(self) -> asyncio.Task[None]:
        """The refresh under way, or a new one: one at a time, shared by all waiters."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.create_task(self._load())
        return self._refresh

    async def _load(self) -> None:
        for attempt in range(3):
            snapshot = await self._store.catalog.snapshot()
            if snapshot.generation == self._current.generation and self._failure is None:
                return
            try:
                self._current = await asyncio.to_thread(self._store.loader.load, snapshot)
                self._failure = None
            except SegmentCorrupt as exc:
                # A merge may have retired (and removed) a segment after the snapshot: look again.
                if snapshot.generation != await self._store.generation() and attempt < 2:
                    continue
                if self._failure is None or str(self._failure) != str(exc):
                    log.error("store damaged: refusing queries", extra={"reason": str(exc)})
                self._failure = exc
                return
            for callback in self.on_change:
                callback(self._current)
            return

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll)
            try:
                if await self._store.generation() != self._current.generation:
                    await asyncio.shield(self._refreshed())
            except asyncio.CancelledError:
                raise
            except Exception:  # a transient read error: try again at the next poll
                log.exception("store watch failed")
