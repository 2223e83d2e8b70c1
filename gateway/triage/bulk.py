"""Plain files (exact digests only, no note) held by the run's main process a group at a time.

A seized device is mostly such files, and every one of them goes through the
one main process: while its digests wait for the nodes it is a tuple of plain
values, not a :class:`FileRow`; its query items are made a column at a time;
and a file no node found goes to the store as it came from the worker (its
path, size, time and digests: :meth:`gateway.triage.store.RowStore.add_plain`).
A plain file becomes a :class:`FileRow` only when something must be said about
it (a hit, a node that did not answer): :class:`Rows` makes it one the first
time it is looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from itertools import filterfalse, repeat
from operator import itemgetter
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from federation.query import QueryItem
from gateway import filehash
from gateway.triage import scan
from gateway.triage.model import HASHED, Done, FileRow, Task, compact
from gateway.triage.workers import Hasher, new_pool, stop_pool

if TYPE_CHECKING:
    from gateway.triage.apart import Apart
    from gateway.triage.cache import RunCache
    from gateway.triage.result import TriageResult

# Bytes per task sent to a worker (a large file goes alone).
CHUNK_BYTES = 32 << 20
# Files of a walked directory per task: as many as make CHUNK_BYTES at the sizes seen so far,
# within these bounds (a few large files balance over the workers; many small ones cost one task).
SCAN_FIRST, SCAN_MOST = 8, 256


T = TypeVar("T")


class Plain(NamedTuple):
    """A plain file waiting for its answers."""

    key: bytes  # the path, as bytes
    size: int
    mtime_ns: int
    digests: bytes  # its exact digests end to end (:func:`gateway.filehash.exact_kinds`)
    from_cache: bool


class Rows(dict[int, FileRow]):
    """The rows not final yet, by walk index; a plain file's row is made when first looked up."""

    def __init__(self) -> None:
        super().__init__()
        self.plain: dict[int, Plain] = {}

    def __missing__(self, index: int) -> FileRow:
        key, size, mtime_ns, digests, from_cache = self.plain.pop(index)
        row = self[index] = FileRow(os.fsdecode(key), HASHED, size=size, mtime_ns=mtime_ns, from_cache=from_cache,
                                    hashes_text=filehash.exact_text(_hexes(digests)))
        return row

    def held(self) -> int:
        return len(self) + len(self.plain)

    def take(self, indices: Iterable[int]) -> tuple[list[tuple[int, FileRow]], list[tuple[int, Plain]]]:
        """The rows at ``indices``, out of memory: those made into rows, and the plain ones (a plain file
        costs no Python step of its own here: most batches hold nothing else)."""
        ordered = sorted(indices)
        made = list(filter(self.__contains__, ordered)) if len(self) else []
        plain = list(filterfalse(self.__contains__, ordered)) if made else ordered
        rows = list(zip(made, map(self.pop, made), strict=True))
        return rows, list(zip(plain, map(self.plain.pop, plain), strict=True))

    def indices(self) -> list[int]:
        return [*self, *self.plain]


def _hexes(digests: bytes) -> list[str]:
    hexes, at = [], 0
    for _, size in filehash.exact_kinds():
        hexes.append(digests[at : at + size].hex())
        at += size
    return hexes


def items(indices: Sequence[int], digests: Sequence[bytes]) -> list[tuple[int, QueryItem, str]]:
    """(row index, item, variant) for the files at ``indices``: a column of items per exact kind."""
    pending: list[tuple[int, QueryItem, str]] = []
    at = 0
    for name, size in filehash.exact_kinds():
        column = [d[at : at + size] for d in digests]
        at += size
        # tuple.__new__ makes the named tuples without a Python call per item.
        pending += zip(indices, map(tuple.__new__, repeat(QueryItem), zip(repeat(name), column, repeat(0),
                                                                          strict=False)), repeat(""), strict=False)
    return pending


def store_rows(plain: Sequence[tuple[int, Plain]]) -> list[tuple[int, bytes, int, int, bytes, bool]]:
    """The store's rows (:meth:`gateway.triage.store.RowStore.add_plain`) of plain files no node found."""
    return list(map(tuple.__add__, zip(map(itemgetter(0), plain), strict=True), map(itemgetter(1), plain)))


class Grouped:
    """The half of a run that hands a walked directory's files to the workers a group at a time
    (:func:`gateway.triage.scan.scan`) and takes their answers in; what it needs of the run is declared here."""

    batch: int
    jobs: int
    worker_memory: int | None
    dihedral: bool
    hasher: Hasher | None
    max_distance: int
    cache: RunCache
    result: TriageResult
    done: int
    _pool: ProcessPoolExecutor | None
    _closing: bool
    _live: Rows
    _apart: Apart
    _unanswered: dict[int, int]
    _pending: list[tuple[int, QueryItem, str]]
    _pending_since: float | None
    _wake: asyncio.Event
    _per_scan: int
    _scanned_files: int
    _scanned_bytes: int
    file_timeout: float | None
    # The pool being started (in a thread), and whether a group is being read in this process meanwhile.
    _starting: asyncio.Future[ProcessPoolExecutor] | None
    _early_busy: bool

    if TYPE_CHECKING:  # the run's own, and the querying half's
        def _finish(self, outcomes: list[tuple[int, Task | None, Done]], from_cache: bool = False) -> None: ...

        def _batch_size(self) -> int: ...

        def _update(self, **fields: Any) -> None: ...

    async def _in_workers(self, function: Callable[..., T], *args: Any) -> T | None:
        """``function(*args)`` in a worker process; None if the pool broke (a decoder crashed on a
        hostile file, or the OOM killer): the others get a fresh pool (unless the run is closing),
        and the caller looks at its files one by one, apart."""
        pool = self._pool or await self._started()
        try:
            return await asyncio.get_running_loop().run_in_executor(pool, function, *args)
        except BrokenProcessPool:
            if not self._closing and self._pool is pool:
                self._pool = new_pool(self.jobs, self.worker_memory)
                stop_pool(pool)
            return None

    def _start_pool(self) -> asyncio.Future[ProcessPoolExecutor]:
        """Starts the pool in a thread, the first time a file is to be looked at (a run of listed digests
        needs none). Its first worker waits for the fork server, which may still be importing what the
        workers run: meanwhile the run goes on, and reads its first files itself (:meth:`_early`)."""
        if self._starting is None:
            self._starting = asyncio.get_running_loop().run_in_executor(None, new_pool, self.jobs, self.worker_memory)
        return self._starting

    async def _started(self) -> ProcessPoolExecutor:
        """The pool, once started (whoever waits for it, it is started once, and never lost to a cancellation)."""
        pool = await asyncio.shield(self._start_pool())
        if self._pool is None:
            self._pool = pool
        return self._pool

    async def _pool_settled(self) -> None:
        """Waits for a pool still being started, so that the run stops it with the rest."""
        if self._pool is None and self._starting is not None:
            with contextlib.suppress(Exception):
                self._pool = await self._starting

    async def _early(self, args: tuple[Any, ...]) -> scan.Scanned | None:
        """A group's plain files read and hashed by a thread of this process while the pool starts: no
        decoder runs here (images, videos and the other files are left to the workers: ``rest``), so this
        process risks no hostile file; only a read can hang (a dead network share), and that is bounded
        by the per-file limit: past it, None, and the group goes to the workers, which the watchdog
        watches. One group at a time, so that the run's own work is not slowed."""
        self._early_busy = True
        try:
            return await asyncio.wait_for(_in_thread(scan.scan, *args, True), self.file_timeout)
        except TimeoutError:
            return None
        finally:
            self._early_busy = False

    async def _scan(self, parts: list[tuple[str, list[str], int]], early: bool = True) -> None:
        cache = self.cache.readable()
        args = ([(d, names) for d, names, _ in parts], self.dihedral, self.hasher, self.max_distance,
                *(cache or (None, "")))
        started = self._start_pool()
        if early and not started.done() and not self._early_busy and self.hasher is None:
            read = await self._early(args)
            if read is not None:
                self._scanned(parts, read)
                if read.rest:  # files to decode, or to look at one at a time: the workers' business
                    where = [(d, name, start + at) for d, names, start in parts for at, name in enumerate(names)]
                    await self._scan([(where[p][0], [where[p][1]], where[p][2]) for p in read.rest], early=False)
                else:
                    self.cache.commit(if_due=True)
                return
        found = await self._in_workers(scan.scan, *args)
        if found is None:
            if self._closing:
                return
            for directory, names, start in parts:
                for at, name in enumerate(names):
                    path = os.path.join(directory, name)
                    task = scan.task_of(path)
                    self._live[start + at] = FileRow(path, HASHED)
                    self._finish([(start + at, task, compact(await self._apart.hash(task), self.max_distance))])
        else:
            self._scanned(parts, found)
        self.cache.commit(if_due=True)

    def _scanned(self, parts: list[tuple[str, list[str], int]], found: scan.Scanned) -> None:
        """A scanned group: its plain files in bulk (:mod:`.bulk`), the others one by one."""
        where = [(directory, name, start + at) for directory, names, start in parts for at, name in enumerate(names)]
        if found.others:
            fresh: list[tuple[int, Task | None, Done]] = []
            cached: list[tuple[int, Task | None, Done]] = []
            for position, fields, from_cache in found.others:
                directory, name, index = where[position]
                outcome = Done._make(fields)
                path = os.path.join(directory, name)
                self._live[index] = FileRow(path, HASHED, size=outcome.size, mtime_ns=outcome.mtime_ns)
                (cached if from_cache else fresh).append((index, Task(path, path, outcome.size, outcome.mtime_ns),
                                                          outcome))
            if fresh:
                self._finish(fresh)
            if cached:
                self.result.cache_hits += len(cached)
                self._finish(cached, from_cache=True)
        if found.plain:
            indices = [where[p][2] for p in found.plain]
            self._live.plain.update(zip(indices, map(tuple.__new__, repeat(Plain), zip(
                found.keys, found.sizes, found.mtimes, found.digests, found.cached, strict=True)), strict=True))
            self._unanswered.update(dict.fromkeys(indices, len(filehash.exact_kinds())))
            hits = sum(found.cached)
            self.result.cache_hits += hits
            self.result.hashed_now += len(indices) - hits
            if hits < len(indices):
                self.cache.put_prepared([(key, size, mtime_ns, text) for key, size, mtime_ns, text
                                         in zip(found.keys, found.sizes, found.mtimes, found.texts, strict=True)
                                         if text is not None])
            pending = self._pending
            if not pending:
                self._pending_since = time.monotonic()
            pending += items(indices, found.digests)
            self.done += len(indices)
            if len(pending) >= self._batch_size():
                self._wake.set()
            self._update(completed=self.done, cached=self.result.cache_hits)
        self._scanned_files += len(where) - len(found.rest)
        self._scanned_bytes += sum(found.sizes)
        average = max(1, self._scanned_bytes // max(1, self._scanned_files))
        # At most a batch's worth of files at a time: what waits for the nodes stays near PENDING_BATCHES batches.
        self._per_scan = max(1, min(SCAN_MOST, self.batch, CHUNK_BYTES // average))


def _in_thread(function: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``function(*args)`` in a thread of its own, as a future of the running loop. A daemon thread:
    one stuck in a read the run has given up on does not keep the process from ending."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if not future.done():  # not given up on (wait_for cancels it past its limit)
            if error is None:
                future.set_result(result)
            else:
                future.set_exception(error)

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task, whatever it is
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name="triage-early", daemon=True).start()
    return future
