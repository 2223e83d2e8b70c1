"""One triage run: walk, hash in workers and ask the federation, all at once.

The walk runs in a thread, hashing in a process pool, and queries go out as
the hashes come in: one :class:`MatchingFederation`, batches of at most
``batch`` items, sent as soon as a batch is full (or after a short wait when
hashing is slower than querying), a few at a time (:mod:`.asking`). Each
batch is merged on its own; a node that did not answer a batch makes the files
in it ``partial``. Hashing waits when the nodes fall behind, so memory stays
bounded. A walked directory's regular files go to the workers by name, a group
at a time (:mod:`.bulk`, :mod:`.scan`); listed paths and the odd entries of a
tree (links, devices, what cannot be read) go one by one, as :class:`Task` and
:class:`FileRow`. The pool starts in a thread with the first file to look at;
until its first worker is up, the run reads the first plain files itself
(no decoder runs in this process).
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import gc
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
from typing import TYPE_CHECKING, Any

from rich.console import Console

from federation.query import QueryItem
from gateway.triage import bulk, sources
from gateway.triage.apart import Apart, watch
from gateway.triage.asking import PENDING_BATCHES, Asking, MatchingFederation
from gateway.triage.bulk import CHUNK_BYTES, SCAN_FIRST, Grouped
from gateway.triage.cache import HashCache, RunCache
from gateway.triage.digests import Digests
from gateway.triage.model import (
    DEFAULT_BATCH,
    HASHED,
    UNREADABLE,
    Done,
    FileRow,
    Hashed,
    NodeTally,
    Task,
    compact,
    from_record,
)
from gateway.triage.progress import LiveProgress
from gateway.triage.result import TriageResult
from gateway.triage.store import RowStore
from gateway.triage.walk import Files, walk_files
from gateway.triage.workers import Hasher, hash_many, stop_pool, usable_cpus

if TYPE_CHECKING:
    from gateway.config import NodeEntry

# What a run looks at, given what to leave out and when to stop: a tree (:func:`walk`),
# a list of paths, digests read from a list.
Entries = Callable[[frozenset[str], threading.Event], Iterable[Task | FileRow | Digests | Files]]
LISTED = "digests read from a list: the file itself was not read here"

# Files per task sent to a worker, and bytes: small files go in groups, to
# keep the per-task overhead low; a large file goes alone.
CHUNK_FILES = 64
# Seconds one file may take to decode and hash (--file-timeout), and bytes of address
# space per hashing process (--worker-memory): a hostile file costs at most that.
FILE_TIMEOUT = 30.0
WORKER_MEMORY = 8 << 30
# Allocations between two collections of the youngest generation during a run (Python's default: 700).
# The hashes waiting for the nodes are young objects by the hundred thousand, alive until their batch
# is answered: at the default the collector goes over them again and again (most of its passes find
# nothing to free); a run makes few cycles, still collected, less often.
GC_YOUNG = 50_000


class Triage(Asking, Grouped):
    """One run over one directory; its counters stay readable after an interruption."""

    def __init__(self, root: str, case: str, nodes: Sequence[NodeEntry], *, jobs: int | None = None,
                 batch: int = DEFAULT_BATCH, cache: HashCache | None = None, dihedral: bool = False,
                 max_distance: int = 0, timeout: float | None = None, deadline: float | None = None,
                 exclude: frozenset[str] = frozenset(), hasher: Hasher | None = None,
                 progress: bool = False, console: Console | None = None, store: RowStore | None = None,
                 file_timeout: float | None = FILE_TIMEOUT, worker_memory: int | None = WORKER_MEMORY,
                 entries: Entries | None = None):
        self.root = root
        # What to look at; by default, the tree under ``root``.
        self.entries = entries or (lambda exclude, stop: walk_files(root, exclude, stop))
        self.case = case
        self.jobs = jobs or usable_cpus()
        self.batch = batch
        self.dihedral = dihedral
        self.max_distance = max_distance
        self.timeout = timeout
        self.deadline = deadline
        self.store = store or RowStore()
        self.exclude = exclude | {str(p) for p in self.store.files}
        self.hasher = hasher
        self.file_timeout = file_timeout
        self.worker_memory = worker_memory
        self.console = console or Console(stderr=True)
        self.cache = RunCache(cache, dihedral, lambda words: self.console.print(
            words, style="yellow", markup=False, soft_wrap=True))
        self.show_progress = progress
        self.result = TriageResult(
            case=case, root=root, started=dt.datetime.now(dt.UTC), store=self.store,
            nodes={n.node_id: NodeTally(n.node_id, n.country) for n in nodes},
            dihedral=dihedral, max_distance=max_distance, batch_size=batch, jobs=self.jobs,
            cache_path=str(cache.path) if cache else None,
        )
        self.total = 0
        self.done = 0
        self._walked = False
        self._hashing_over = False
        # Hashes waiting to be asked: (row index, item, PDQ variant or "").
        self._pending: list[tuple[int, QueryItem, str]] = []
        self._pending_since: float | None = None
        self._wake = asyncio.Event()
        self._stop_walk = threading.Event()
        self._pool: ProcessPoolExecutor | None = None
        self._starting: asyncio.Future[ProcessPoolExecutor] | None = None
        self._early_busy = False
        self._apart = Apart(dihedral, hasher, file_timeout, worker_memory)
        self._progress: LiveProgress | None = None
        self._known = self._hits = 0
        # Hashes sent to the nodes so far, answered or not (the progress line shows it as batches go out).
        self.items_sent = 0
        self._running: set[asyncio.Task] = set()
        self._closing = False
        self._querier_task: asyncio.Task | None = None
        self._drained = asyncio.Event()
        # Rows not final yet (being hashed, or some hash not answered), and how many of
        # their hashes are still to be answered: all that is held in memory.
        self._live = bulk.Rows()
        self._unanswered: dict[int, int] = {}
        self._next_index = 0
        self.peak_live = 0
        # Files per scanning task, and the files and bytes scanned so far (what sets it).
        self._per_scan = min(SCAN_FIRST, batch)
        self._scanned_files = self._scanned_bytes = 0

    # -- public

    async def run(self, federation: MatchingFederation) -> TriageResult:
        """Walks, hashes and queries; ``federation`` has ``match(items, case, timeout, deadline)``."""
        gc.freeze()  # what is alive now (imported modules) lives as long as the run: the collector skips it
        thresholds = gc.get_threshold()
        gc.set_threshold(GC_YOUNG, *thresholds[1:])
        loop = asyncio.get_running_loop()
        entries: asyncio.Queue[list[Task | FileRow | Digests | Files] | None] = asyncio.Queue(sources.WALK_QUEUE)
        with LiveProgress(self.console, self.show_progress) as progress:
            self._progress = progress
            walker = loop.run_in_executor(None, sources.feed, self.entries(self.exclude, self._stop_walk), entries,
                                          loop, self._stop_walk)
            querier = self._querier_task = asyncio.create_task(self._querier(federation))
            watchdog = asyncio.create_task(watch(lambda: self._pool, self.file_timeout))
            finished = False
            try:
                await self._dispatch(entries)
                await walker
                self.cache.commit()  # all is hashed: kept, whatever the nodes do
                self._hashing_over = True
                self._wake.set()
                progress.update(description="querying")
                await querier
                progress.update(description="done")
                finished = True
            finally:
                self._stop_walk.set()
                self._closing = True
                unfinished = [t for t in (querier, watchdog, *self._running) if not t.done()]
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)
                await self._pool_settled()
                if finished and self._pool is not None:
                    self._pool.shutdown(wait=True)
                else:
                    stop_pool(self._pool)
                self._apart.close(finished)
                self.cache.commit()
                gc.set_threshold(*thresholds)
                gc.unfreeze()
        if finished:
            self._final(self._live.indices())  # none is left, unless a hash was never answered
            self.store.commit()
        self.result.finished = dt.datetime.now(dt.UTC)
        return self.result

    # -- walking and hashing

    async def _dispatch(self, entries: asyncio.Queue[list[Task | FileRow | Digests | Files] | None]) -> None:
        slots = asyncio.Semaphore(self.jobs * 2)
        running = self._running
        chunk: list[tuple[int, Task]] = []
        size = 0
        parts: list[tuple[str, list[str], int]] = []  # (directory, names, index of the first)
        count = 0

        def done(work: asyncio.Task[None]) -> None:
            running.discard(work)
            slots.release()

        async def launch(start: Callable[[], Coroutine[Any, Any, None]]) -> None:
            """One call of the workers, once a slot is free and the run has room for its files."""
            await slots.acquire()
            try:
                await self._room()
            except BaseException:
                slots.release()
                raise
            work = asyncio.create_task(start())
            running.add(work)
            work.add_done_callback(done)

        async def submit() -> None:
            nonlocal chunk, size
            await launch(functools.partial(self._hash, chunk))
            chunk, size = [], 0

        async def submit_parts() -> None:
            nonlocal parts, count
            await launch(functools.partial(self._scan, parts))
            parts, count = [], 0

        # A group of entries at a time (what the walk hands over): one cache query, one store write, one update.
        while (group := await entries.get()) is not None:
            idle = entries.empty()
            listed: list[tuple[int, Task | None, Done]] = []
            tasks: list[tuple[int, Task]] = []
            others: list[tuple[int, FileRow]] = []
            for entry in group:
                index = self._next_index
                if isinstance(entry, Files):  # a directory's files, to be looked at in a worker
                    self._next_index += len(entry.names)
                    self.total += len(entry.names)
                    at = 0
                    while at < len(entry.names):
                        take = max(1, self._per_scan - count)
                        parts.append((entry.directory, entry.names[at : at + take], index + at))
                        count += len(parts[-1][1])
                        at += take
                        if count >= self._per_scan:
                            await submit_parts()
                    continue
                self._next_index += 1
                if isinstance(entry, FileRow):
                    others.append((index, entry))
                elif isinstance(entry, Digests):  # from a digest list: nothing to read, only to ask
                    self._live[index] = FileRow(entry.name, HASHED, size=entry.size, notes=[LISTED])
                    hashed = Hashed(entry.hashes, entry.size or 0, 0)
                    listed.append((index, None, compact(hashed, self.max_distance)))
                else:
                    self._live[index] = FileRow(entry.path, HASHED, size=entry.size, mtime_ns=entry.mtime_ns)
                    tasks.append((index, entry))
            if others:
                self.store.add_many(others)
            self.total += len(listed) + len(tasks)
            self.peak_live = max(self.peak_live, self._live.held())
            self._update(total=self.total)
            if listed:
                self._finish(listed)
            cached: list[tuple[int, Task | None, Done]] = []
            for (index, task), record in zip(tasks, self.cache.get_many([t for _, t in tasks]), strict=True):
                if record is not None:
                    try:
                        found = from_record(record, task.real, task.size, task.mtime_ns, self.max_distance)
                    except (ValueError, KeyError, TypeError, IndexError):
                        pass  # a damaged record: the file is hashed again
                    else:
                        cached.append((index, task, found))
                        continue
                chunk.append((index, task))
                size += task.size
                if len(chunk) >= CHUNK_FILES or size >= CHUNK_BYTES:
                    await submit()
            if cached:
                self.result.cache_hits += len(cached)
                self._finish(cached, from_cache=True)
            if chunk and idle:
                await submit()
            if parts and idle:
                await submit_parts()
        self._walked = True
        self._update(description="hashing")
        if chunk:
            await submit()
        if parts:
            await submit_parts()
        while running:
            for outcome in await asyncio.gather(*list(running), return_exceptions=True):
                if isinstance(outcome, BaseException):
                    raise outcome

    async def _room(self) -> None:
        """Waits while the nodes are behind; raises the querier's error if it failed."""
        while True:
            querier = self._querier_task
            if querier is not None and querier.done():
                querier.result()
            if len(self._pending) < self.batch * PENDING_BATCHES:
                return
            self._drained.clear()
            await self._drained.wait()

    async def _hash(self, chunk: list[tuple[int, Task]]) -> None:
        outcomes = await self._in_workers(hash_many, [t for _, t in chunk], self.dihedral, self.hasher,
                                          self.max_distance)
        if outcomes is None:
            if self._closing:
                return
            for index, task in chunk:
                self._finish([(index, task, compact(await self._apart.hash(task), self.max_distance))])
        else:
            self._finish([(index, task, Done._make(outcome))
                          for (index, task), outcome in zip(chunk, outcomes, strict=True)])
        self.cache.commit(if_due=True)

    def _finish(self, outcomes: list[tuple[int, Task | None, Done]], from_cache: bool = False) -> None:
        """Files read (or found in the cache): their hashes wait for the nodes; a file with none is final."""
        rows, pending, unanswered = self._live, self._pending, self._unanswered
        was_empty = not pending
        final: list[int] = []
        new: list[tuple[Task, Done]] = []
        for index, task, outcome in outcomes:
            row = rows[index]
            if task is not None:
                row.size, row.mtime_ns = outcome.size, outcome.mtime_ns
            if outcome.notes:
                row.notes += outcome.notes
            if outcome.text is None:
                row.status, row.reason = UNREADABLE, outcome.reason
                final.append(index)
                continue
            row.hashes_text, row.not_sent, row.from_cache = outcome.text, outcome.skipped, from_cache
            if not from_cache and task is not None:
                self.result.hashed_now += 1
                if outcome.stable:
                    new.append((task, outcome))
            if not outcome.items:
                final.append(index)
                continue
            unanswered[index] = len(outcome.items)
            pending += [(index, QueryItem(a, d, m), v) for a, d, m, v in outcome.items]
        self.done += len(outcomes)
        self.cache.put_many(new)
        if final:
            self._final(final)
        if was_empty and pending:
            self._pending_since = time.monotonic()
        if len(pending) >= self._batch_size():
            self._wake.set()
        self._update(completed=self.done, cached=self.result.cache_hits)

    def _final(self, indices: list[int]) -> None:
        """The rows at ``indices`` are complete: to the store, out of memory."""
        collections.deque(map(self._unanswered.pop, indices, repeat(None)), maxlen=0)  # no Python step per file
        rows, plain = self._live.take(indices)
        if rows:
            self.store.add_many(rows)
        if plain:
            self.store.add_plain(bulk.store_rows(plain))

    def _update(self, **fields: Any) -> None:
        if self._progress is not None:
            if "description" not in fields and not self._walked and "total" in fields:
                fields["description"] = "hashing (walking)"
            self._progress.update(**fields)


