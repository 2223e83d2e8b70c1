"""Triage of a whole seized directory: every file hashed here, only digests asked.

``icse-gateway query --dir PATH`` walks the tree, hashes every regular file in
worker processes (exact digests; PDQ for images, frame hashes for videos —
:func:`gateway.filehash.hash_file`), and asks the federation in batches while
the hashing goes on. The result is one row per file (see :mod:`gateway.report`).

- **Walk**: symbolic links are never followed out of the tree, nor into
  directories (the directories inside the tree are walked anyway, and loops are
  impossible); a link to a regular file inside the tree is hashed as that
  file. FIFOs, sockets and devices are listed and never opened. What cannot be
  read (permission denied, vanished, broken link, link loop, name too long,
  I/O error) is listed with the reason — never fatal.
- **Workers**: a process pool started by a fork server (the gateway's own
  process holds gRPC channels and threads, which must not be forked). A worker
  that crashes on a hostile file breaks only that file: the chunk it was in is
  retried one file at a time in a separate process, and the culprit gets its
  exact digests computed here, without any decoder.
- **Resume**: a SQLite cache keyed by (real absolute path, size, mtime_ns)
  holds the computed hashes; entries are committed as files are hashed, so an
  interrupted run keeps its work and the next run re-hashes only what changed.
- **Queries**: one :class:`~gateway.fanout.Federation`, batches of at most
  ``batch`` items, sent as soon as a batch is full (or after a short wait when
  hashing is slower than querying). Each batch is merged on its own; a node
  that did not answer a batch makes the files in it ``partial``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import json
import multiprocessing
import os
import signal
import sqlite3
import stat
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from gateway import filehash, media
from gateway.merge import merge
from gateway.results import HitInfo, NodeAnswer, Skipped, Subject

if TYPE_CHECKING:
    from gateway.config import GatewayConfig, NodeEntry
    from gateway.signing import Signer

DEFAULT_BATCH = 2000
# A node refuses larger requests by default (node ``[limits] max_items``).
MAX_BATCH = 20_000
# Files per task sent to a worker, and bytes: small files go in groups, to
# keep the per-task overhead low; a large file goes alone.
CHUNK_FILES = 32
CHUNK_BYTES = 32 << 20
# A partly filled batch is sent after this long when the querier is idle.
FLUSH_AFTER = 2.0
# Hashing waits when this many batches are waiting for the nodes (bounded memory).
PENDING_BATCHES = 8
# Bumped when what hash_file computes changes: older cache entries are ignored.
HASH_VERSION = 1

HASHED, UNREADABLE, NOT_HASHED = "hashed", "unreadable", "not_hashed"


class TriageUsageError(ValueError):
    """Bad combination of command-line options (reported like other usage errors)."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True)
class Task:
    """A regular file to hash: ``path`` as found in the tree, ``real`` the file opened."""

    path: str
    real: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Hashed:
    """A worker's answer for one file: its hashes, or why it could not be read."""

    hashes: filehash.FileHashes | None
    size: int
    mtime_ns: int
    reason: str = ""
    # False when the file changed while it was read: the hashes are not cached.
    stable: bool = True
    notes: tuple[str, ...] = ()


@dataclass
class Match:
    algorithm: str
    variant: str
    hit: HitInfo


@dataclass
class FileRow:
    path: str
    status: str  # HASHED, UNREADABLE or NOT_HASHED
    reason: str = ""
    size: int | None = None
    mtime_ns: int | None = None
    hashes: filehash.FileHashes | None = None
    from_cache: bool = False
    matches: list[Match] = field(default_factory=list)
    # Nodes that did not answer a batch holding some of this file's hashes.
    not_answered_by: set[str] = field(default_factory=set)
    truncated_by: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @property
    def known(self) -> bool:
        return bool(self.matches)

    @property
    def countries(self) -> list[str]:
        return sorted({m.hit.country for m in self.matches})

    @property
    def best_distance(self) -> int | None:
        return min((m.hit.distance for m in self.matches), default=None)

    def references(self) -> list[dict[str, Any]]:
        """One entry per (node, reference), nearest first; which hashes matched it."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for m in sorted(self.matches, key=lambda m: (m.hit.distance, m.hit.country, m.hit.node_id)):
            key = (m.hit.node_id, m.hit.reference)
            entry = found.get(key)
            if entry is None:
                found[key] = {
                    "country": m.hit.country, "node": m.hit.node_id, "reference": m.hit.reference,
                    "distance": m.hit.distance, "matched_share": m.hit.matched_share,
                    "matched_by": [m.algorithm], "variant": m.variant,
                    "category": m.hit.category, "victim_identified": m.hit.victim_identified,
                    "series": m.hit.series, "date_added": m.hit.date_added, "contact": m.hit.contact,
                }
            elif m.algorithm not in entry["matched_by"]:
                entry["matched_by"].append(m.algorithm)
        return list(found.values())


@dataclass
class NodeTally:
    node_id: str
    country: str
    batches: int = 0
    answered: int = 0
    statuses: Counter = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def record(self, answer: NodeAnswer) -> None:
        self.batches += 1
        self.answered += answer.status.answered
        self.statuses[answer.status.value] += 1
        if answer.message and answer.message not in self.messages and len(self.messages) < 5:
            self.messages.append(answer.message)

    @property
    def complete(self) -> bool:
        return self.answered == self.batches


@dataclass
class TriageResult:
    case: str
    root: str
    started: dt.datetime
    finished: dt.datetime | None = None
    rows: list[FileRow] = field(default_factory=list)
    nodes: dict[str, NodeTally] = field(default_factory=dict)
    requester: str = ""
    gateway: str = ""
    dihedral: bool = False
    max_distance: int = 0
    batch_size: int = DEFAULT_BATCH
    jobs: int = 1
    cache_path: str | None = None
    cache_hits: int = 0
    hashed_now: int = 0
    items_queried: int = 0
    batches: int = 0

    def of_status(self, status: str) -> list[FileRow]:
        return [r for r in self.rows if r.status == status]

    @property
    def files(self) -> list[FileRow]:
        return self.of_status(HASHED)

    @property
    def known(self) -> list[FileRow]:
        return [r for r in self.rows if r.known]

    @property
    def partial(self) -> bool:
        return any(not tally.complete for tally in self.nodes.values())

    @property
    def countries(self) -> dict[str, dict[str, int]]:
        """Per country with hits: how many files it knows and how many references it gave."""
        out: dict[str, dict[str, int]] = {}
        for row in self.known:
            for country in row.countries:
                out.setdefault(country, {"files": 0, "references": 0})["files"] += 1
            for ref in row.references():
                out[ref["country"]]["references"] += 1
        return dict(sorted(out.items()))

    def exit_status(self) -> int:
        """0 some hit; 1 no hit and complete (every file read, every node answered every
        batch); 2 no hit while something was not looked up or not answered, or nothing to do."""
        if self.known:
            return 0
        if self.partial or self.of_status(UNREADABLE) or not self.files:
            return 2
        return 1


# --------------------------------------------------------------------------- walking


def _reason(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link(path: str, root: str) -> Task | FileRow:
    try:
        target_text = os.readlink(path)
    except OSError:
        target_text = "?"
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return FileRow(path, UNREADABLE, f"broken symbolic link to {target_text!r}: the target does not exist")
        return FileRow(path, UNREADABLE, f"symbolic link to {target_text!r} cannot be followed: {_reason(exc)}")
    target = os.path.realpath(path)
    if not _inside(target, root):
        return FileRow(path, NOT_HASHED, f"symbolic link to {target_text!r}, outside the directory: not followed")
    if stat.S_ISDIR(st.st_mode):
        return FileRow(path, NOT_HASHED, f"symbolic link to directory {target_text!r}: not followed "
                       "(directories inside the tree are walked on their own)")
    if not stat.S_ISREG(st.st_mode):
        return FileRow(path, NOT_HASHED, f"symbolic link to a {_kind(st.st_mode)}: not read")
    return Task(path, target, st.st_size, st.st_mtime_ns)


def walk(root: str, exclude: frozenset[str] = frozenset(),
         stop: threading.Event | None = None) -> Iterator[Task | FileRow]:
    """Every entry under ``root`` (a real, absolute path), depth first, in name order."""
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            yield FileRow(directory, UNREADABLE, f"directory cannot be listed: {_reason(exc)}")
            continue
        subdirectories = []
        for entry in entries:
            if stop is not None and stop.is_set():
                return
            path = entry.path
            if path in exclude:
                yield FileRow(path, NOT_HASHED, "written by this run (report or cache): not hashed")
                continue
            try:
                if entry.is_symlink():
                    yield _link(path, root)
                elif entry.is_dir(follow_symlinks=False):
                    subdirectories.append(path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    yield Task(path, path, st.st_size, st.st_mtime_ns)
                else:
                    kind = _kind(entry.stat(follow_symlinks=False).st_mode)
                    yield FileRow(path, NOT_HASHED, f"{kind}: not read")
            except OSError as exc:
                yield FileRow(path, UNREADABLE, _reason(exc))
        stack.extend(reversed(subdirectories))


# --------------------------------------------------------------------------- hashing (in workers)

Hasher = Callable[..., filehash.FileHashes]


def _worker_init() -> None:
    # Ctrl-C is the parent's business: it stops the pool and keeps what is cached.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def hash_one(task: Task, dihedral: bool, hasher: Hasher | None = None) -> Hashed:
    real = Path(task.real)
    try:
        before = os.stat(real, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return Hashed(None, task.size, task.mtime_ns, "vanished before it could be read")
        return Hashed(None, task.size, task.mtime_ns, _reason(exc))
    if not stat.S_ISREG(before.st_mode):
        return Hashed(None, task.size, task.mtime_ns,
                      f"no longer a regular file (now a {_kind(before.st_mode)}): not read")
    notes: tuple[str, ...] = ()
    try:
        hashes = (hasher or filehash.hash_file)(real, dihedral=dihedral)
    except Exception as exc:  # noqa: BLE001 - whatever a decoder does, the bytes still identify the file
        try:
            exact = filehash.exact_digests(real)
        except OSError as read_error:
            if read_error.errno == errno.ENOENT:
                return Hashed(None, before.st_size, before.st_mtime_ns, "vanished while it was being read")
            return Hashed(None, before.st_size, before.st_mtime_ns, _reason(read_error))
        reason = f"perceptual hashing failed: {type(exc).__name__}: {exc}"[:300]
        hashes = filehash.FileHashes(real, exact, skipped=(Skipped(str(real), "pdq/vpdq", reason),))
    try:
        after = os.stat(real, follow_symlinks=False)
        stable = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    except OSError:
        stable = False
    if not stable:
        notes = ("changed or vanished while it was being read: its hashes may not match its content now",)
    return Hashed(hashes, before.st_size, before.st_mtime_ns, stable=stable, notes=notes)


def hash_chunk(tasks: Sequence[Task], dihedral: bool, hasher: Hasher | None = None) -> list[Hashed]:
    return [hash_one(task, dihedral, hasher) for task in tasks]


def exact_only(task: Task, why: str) -> Hashed:
    """Exact digests without any decoder: for a file that crashed a worker."""
    try:
        exact = filehash.exact_digests(Path(task.real))
    except OSError as exc:
        return Hashed(None, task.size, task.mtime_ns, _reason(exc))
    skipped = (Skipped(task.real, "pdq/vpdq", why),)
    return Hashed(filehash.FileHashes(Path(task.real), exact, skipped=skipped), task.size, task.mtime_ns,
                  stable=False)


def _start_forkserver() -> None:
    """Starts the fork server with Ctrl-C ignored, so that its workers ignore it from birth.

    A terminal's Ctrl-C reaches the whole process group; a worker must not die
    of it (the parent stops the pool itself), not even while it is starting.
    """
    from multiprocessing import forkserver  # noqa: PLC0415

    forkserver.set_forkserver_preload(["gateway.filehash"])
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave the handler alone
        forkserver.ensure_running()
        return
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def _pool(workers: int) -> ProcessPoolExecutor:
    _start_forkserver()
    context = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init)


def _stop_pool(pool: ProcessPoolExecutor | None) -> None:
    """Ends a pool now: pending work is dropped, running workers are terminated."""
    if pool is None:
        return
    processes = list((getattr(pool, "_processes", None) or {}).values())  # the workers this run started
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(5)


# --------------------------------------------------------------------------- cache


def hashes_record(hashes: filehash.FileHashes) -> dict[str, Any]:
    return {
        "exact": {name: digest.hex() for name, digest in hashes.exact.items()},
        "pdq": [hashes.pdq.digest.hex(), hashes.pdq.quality] if hashes.pdq else None,
        "dihedral": [[name, h.digest.hex(), h.quality] for name, h in hashes.dihedral],
        "video": {"frames": [f.hex() for f in hashes.video.frames], "sampled": hashes.video.sampled,
                  "low_quality": hashes.video.low_quality} if hashes.video else None,
        "skipped": [[s.algorithm, s.reason] for s in hashes.skipped],
    }


def hashes_from_record(record: dict[str, Any], path: str) -> filehash.FileHashes:
    pdq = record.get("pdq")
    video = record.get("video")
    return filehash.FileHashes(
        path=Path(path),
        exact={name: bytes.fromhex(digest) for name, digest in record["exact"].items()},
        pdq=media.PerceptualHash(bytes.fromhex(pdq[0]), int(pdq[1])) if pdq else None,
        dihedral=tuple((name, media.PerceptualHash(bytes.fromhex(d), int(q))) for name, d, q in record["dihedral"]),
        video=media.VideoHash(tuple(bytes.fromhex(f) for f in video["frames"]), int(video["sampled"]),
                              int(video["low_quality"])) if video else None,
        skipped=tuple(Skipped(path, algorithm, reason) for algorithm, reason in record["skipped"]),
    )


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "icse-gateway" / "triage-cache.sqlite"


class HashCache:
    """Hashes already computed, keyed by (absolute path, size, mtime_ns) and what was computed.

    Holds digests of the investigator's files and their paths: the directory is
    created private (0700) and the database file 0600.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        created = not path.exists()
        self._db = sqlite3.connect(path, timeout=10, isolation_level=None)
        try:
            if created:
                os.chmod(path, 0o600)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS hashes (path BLOB NOT NULL, variant TEXT NOT NULL, "
                "size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, record TEXT NOT NULL, hashed_at TEXT NOT NULL, "
                "PRIMARY KEY (path, variant)) WITHOUT ROWID")
            self._db.execute("BEGIN")
        except sqlite3.Error:
            self._db.close()
            raise

    @staticmethod
    def variant(dihedral: bool) -> str:
        return f"v{HASH_VERSION}{'+dihedral' if dihedral else ''}"

    @staticmethod
    def key(task: Task) -> bytes:
        """The file's absolute path; for a link inside the tree, the link's and its target's."""
        if task.path == task.real:
            return os.fsencode(task.real)
        return os.fsencode(task.path) + b"\0" + os.fsencode(task.real)

    def get(self, task: Task, dihedral: bool) -> filehash.FileHashes | None:
        row = self._db.execute(
            "SELECT record FROM hashes WHERE path = ? AND variant = ? AND size = ? AND mtime_ns = ?",
            (self.key(task), self.variant(dihedral), task.size, task.mtime_ns)).fetchone()
        if row is None:
            return None
        try:
            return hashes_from_record(json.loads(row[0]), task.real)
        except (ValueError, KeyError, TypeError, IndexError):
            return None

    def put(self, task: Task, dihedral: bool, hashed: Hashed) -> None:
        assert hashed.hashes is not None
        self._db.execute(
            "INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?, ?)",
            (self.key(task), self.variant(dihedral), hashed.size, hashed.mtime_ns,
             json.dumps(hashes_record(hashed.hashes), separators=(",", ":")),
             dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")))

    def commit(self) -> None:
        """Makes what was put so far durable (a Ctrl-C after this keeps it)."""
        self._db.execute("COMMIT")
        self._db.execute("BEGIN")

    def close(self) -> None:
        try:
            self._db.execute("COMMIT")
        finally:
            self._db.close()


# --------------------------------------------------------------------------- the run


class _Progress:
    """A live line on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, console: Console, enabled: bool):
        self._progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TextColumn("files hashed · [bold]{task.fields[known]}[/] known ({task.fields[hits]} hits) · "
                       "{task.fields[items]} hashes asked · last batch {task.fields[answers]} · "
                       "{task.fields[cached]} from cache"),
            TimeElapsedColumn(), console=console, disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task("walking", total=None, cached=0, items=0, known=0, hits=0,
                                             answers="-")

    def __enter__(self) -> _Progress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, **fields: Any) -> None:
        self._progress.update(self._task, **fields)


class Triage:
    """One run over one directory; its counters stay readable after an interruption."""

    def __init__(self, root: str, case: str, nodes: Sequence[NodeEntry], *, jobs: int | None = None,
                 batch: int = DEFAULT_BATCH, cache: HashCache | None = None, dihedral: bool = False,
                 max_distance: int = 0, timeout: float | None = None, deadline: float | None = None,
                 exclude: frozenset[str] = frozenset(), hasher: Hasher | None = None,
                 progress: bool = False, console: Console | None = None):
        self.root = root
        self.case = case
        self.jobs = jobs or _cpu_count()
        self.batch = batch
        self.cache = cache
        self.dihedral = dihedral
        self.max_distance = max_distance
        self.timeout = timeout
        self.deadline = deadline
        self.exclude = exclude
        self.hasher = hasher
        self.console = console or Console(stderr=True)
        self.show_progress = progress
        self.result = TriageResult(
            case=case, root=root, started=dt.datetime.now(dt.timezone.utc),
            nodes={n.node_id: NodeTally(n.node_id, n.country) for n in nodes},
            dihedral=dihedral, max_distance=max_distance, batch_size=batch, jobs=self.jobs,
            cache_path=str(cache.path) if cache else None,
        )
        self.total = 0
        self.done = 0
        self._walked = False
        self._hashing_over = False
        self._pending: list[tuple[int, Subject]] = []
        self._pending_since: float | None = None
        self._wake = asyncio.Event()
        self._stop_walk = threading.Event()
        self._pool: ProcessPoolExecutor | None = None
        self._solo: ProcessPoolExecutor | None = None
        self._solo_lock = asyncio.Lock()
        self._progress: _Progress | None = None
        self._known = self._hits = 0
        self._running: set[asyncio.Task] = set()
        self._closing = False
        self._querier_task: asyncio.Task | None = None
        self._drained = asyncio.Event()

    # -- public

    async def run(self, federation: Any) -> TriageResult:
        """Walks, hashes and queries; ``federation`` has ``match(items, case, timeout, deadline)``."""
        loop = asyncio.get_running_loop()
        entries: asyncio.Queue[Task | FileRow | None] = asyncio.Queue()
        self._pool = _pool(self.jobs)
        with _Progress(self.console, self.show_progress) as progress:
            self._progress = progress
            walker = loop.run_in_executor(None, self._walk_into, entries, loop)
            querier = self._querier_task = asyncio.create_task(self._querier(federation))
            finished = False
            try:
                await self._dispatch(entries)
                await walker
                self._hashing_over = True
                self._wake.set()
                progress.update(description="querying")
                await querier
                progress.update(description="done")
                finished = True
            finally:
                self._stop_walk.set()
                self._closing = True
                unfinished = [t for t in (querier, *self._running) if not t.done()]
                for task in unfinished:
                    task.cancel()
                await asyncio.gather(*unfinished, return_exceptions=True)
                for pool in (self._pool, self._solo):
                    if finished and pool is not None:
                        pool.shutdown(wait=True)
                    else:
                        _stop_pool(pool)
                self._cached(lambda cache: cache.commit())
        self.result.finished = dt.datetime.now(dt.timezone.utc)
        return self.result

    # -- walking and hashing

    def _walk_into(self, entries: asyncio.Queue, loop: asyncio.AbstractEventLoop) -> None:
        try:
            for entry in walk(self.root, self.exclude, self._stop_walk):
                loop.call_soon_threadsafe(entries.put_nowait, entry)
        finally:
            loop.call_soon_threadsafe(entries.put_nowait, None)

    async def _dispatch(self, entries: asyncio.Queue) -> None:
        slots = asyncio.Semaphore(self.jobs * 2)
        running = self._running
        chunk: list[tuple[int, Task]] = []
        size = 0

        async def submit() -> None:
            nonlocal chunk, size
            await slots.acquire()
            try:
                await self._room()
            except BaseException:
                slots.release()
                raise
            work = asyncio.create_task(self._hash(chunk))
            running.add(work)
            work.add_done_callback(lambda t: (running.discard(t), slots.release()))
            chunk, size = [], 0

        while (entry := await entries.get()) is not None:
            if isinstance(entry, FileRow):
                self.result.rows.append(entry)
                continue
            index = len(self.result.rows)
            self.result.rows.append(FileRow(entry.path, HASHED, size=entry.size, mtime_ns=entry.mtime_ns))
            self.total += 1
            self._update(total=self.total)
            cached = self._lookup(entry)
            if cached is not None:
                self.result.cache_hits += 1
                self._finish(index, entry, Hashed(cached, entry.size, entry.mtime_ns), from_cache=True)
                continue
            chunk.append((index, entry))
            size += entry.size
            if len(chunk) >= CHUNK_FILES or size >= CHUNK_BYTES or entries.empty():
                await submit()
        self._walked = True
        self._update(description="hashing")
        if chunk:
            await submit()
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
        loop = asyncio.get_running_loop()
        pool = self._pool
        assert pool is not None
        try:
            outcomes = await loop.run_in_executor(pool, hash_chunk, [t for _, t in chunk], self.dihedral,
                                                  self.hasher)
        except BrokenProcessPool:
            if self._closing:
                return
            # A worker died (a decoder crashed on a hostile file, or the OOM killer):
            # a fresh pool for the others, and this chunk's files one by one, apart.
            if self._pool is pool:
                self._pool = _pool(self.jobs)
                _stop_pool(pool)
            for index, task in chunk:
                self._finish(index, task, await self._hash_alone(task))
        else:
            for (index, task), outcome in zip(chunk, outcomes):
                self._finish(index, task, outcome)
        self._cached(lambda cache: cache.commit())

    def _lookup(self, task: Task) -> filehash.FileHashes | None:
        found: list[filehash.FileHashes | None] = [None]

        def get(cache: HashCache) -> None:
            found[0] = cache.get(task, self.dihedral)

        self._cached(get)
        return found[0]

    def _cached(self, action: Callable[[HashCache], None]) -> None:
        """A cache write; on failure (disk full, locked) the run goes on without the cache."""
        if self.cache is None:
            return
        try:
            action(self.cache)
        except sqlite3.Error as exc:
            self.console.print(f"icse-gateway: hash cache {self.cache.path} failed ({exc}): "
                               "going on without it", style="yellow", markup=False, soft_wrap=True)
            self.cache = None

    async def _hash_alone(self, task: Task) -> Hashed:
        loop = asyncio.get_running_loop()
        async with self._solo_lock:
            if self._solo is None:
                self._solo = _pool(1)
            try:
                (outcome,) = await loop.run_in_executor(self._solo, hash_chunk, [task], self.dihedral, self.hasher)
                return outcome
            except BrokenProcessPool:
                _stop_pool(self._solo)
                self._solo = None
        why = "hashing this file crashed the hashing process: exact digests only, no perceptual hash"
        return await asyncio.to_thread(exact_only, task, why)

    def _finish(self, index: int, task: Task, outcome: Hashed, from_cache: bool = False) -> None:
        row = self.result.rows[index]
        row.size, row.mtime_ns = outcome.size, outcome.mtime_ns
        row.notes += outcome.notes
        self.done += 1
        if outcome.hashes is None:
            row.status, row.reason = UNREADABLE, outcome.reason
        else:
            row.hashes = outcome.hashes
            row.from_cache = from_cache
            if not from_cache:
                self.result.hashed_now += 1
                if self.cache is not None and outcome.stable:
                    self._cached(lambda cache: cache.put(task, self.dihedral, outcome))
            subjects = filehash.subjects(outcome.hashes, self.max_distance)
            if not self._pending:
                self._pending_since = time.monotonic()
            self._pending += [(index, s) for s in subjects]
            if len(self._pending) >= self.batch:
                self._wake.set()
        self._update(completed=self.done, cached=self.result.cache_hits)

    # -- querying

    def _batch_ready(self) -> bool:
        if len(self._pending) >= self.batch or (self._hashing_over and self._pending):
            return True
        return bool(self._pending) and time.monotonic() - (self._pending_since or 0) >= FLUSH_AFTER

    async def _querier(self, federation: Any) -> None:
        try:
            await self._query_batches(federation)
        finally:
            self._drained.set()

    async def _query_batches(self, federation: Any) -> None:
        while True:
            while not self._batch_ready():
                if self._hashing_over and not self._pending:
                    return
                self._wake.clear()
                wait = None
                if self._pending:
                    wait = max(0.05, FLUSH_AFTER - (time.monotonic() - (self._pending_since or 0)))
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
            taken = self._pending[: self.batch]
            del self._pending[: self.batch]
            self._pending_since = time.monotonic() if self._pending else None
            self._drained.set()
            await self._ask(federation, taken)

    async def _ask(self, federation: Any, taken: list[tuple[int, Subject]]) -> None:
        subjects = [s for _, s in taken]
        answers = await federation.match([s.item for s in subjects], self.case, self.timeout, self.deadline)
        merged = merge(self.case, subjects, answers)
        rows = self.result.rows
        for (index, subject), outcome in zip(taken, merged.items):
            row = rows[index]
            if outcome.hits:
                self._known += not row.matches
                self._hits += len(outcome.hits)
                row.matches += [Match(subject.item.algorithm, subject.variant, hit) for hit in outcome.hits]
            row.truncated_by.update(outcome.truncated_by)
        missing = [a.node_id for a in answers if not a.status.answered]
        if missing:
            for index in {index for index, _ in taken}:
                rows[index].not_answered_by.update(missing)
        for answer in answers:
            tally = self.result.nodes.get(answer.node_id)
            if tally is None:
                tally = self.result.nodes[answer.node_id] = NodeTally(answer.node_id, answer.country)
            tally.record(answer)
        self.result.batches += 1
        self.result.items_queried += len(taken)
        answered = sum(1 for a in answers if a.status.answered)
        self._update(items=self.result.items_queried, known=self._known, hits=self._hits,
                     answers=f"{answered}/{len(answers)} nodes answered")

    def _update(self, **fields: Any) -> None:
        if self._progress is not None:
            if "description" not in fields and not self._walked and "total" in fields:
                fields["description"] = "hashing (walking)"
            self._progress.update(**fields)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- command line


COMPANIONS = ("jobs", "batch", "jsonl", "csv", "html", "cache")


def check_options(args: Any) -> None:
    if args.dir is None:
        given = [f"--{name}" for name in COMPANIONS if getattr(args, name) is not None]
        if args.no_cache:
            given.append("--no-cache")
        if given:
            raise TriageUsageError(f"{', '.join(given)} only go with --dir")
        return
    if args.hash or args.file:
        raise TriageUsageError("--dir cannot be combined with --hash or --file")
    if args.jobs is not None and not 1 <= args.jobs <= 256:
        raise TriageUsageError("--jobs must be between 1 and 256")
    if args.batch is not None and not 1 <= args.batch <= MAX_BATCH:
        raise TriageUsageError(f"--batch must be between 1 and {MAX_BATCH} items")
    if args.no_cache and args.cache is not None:
        raise TriageUsageError("--cache and --no-cache exclude each other")


def _output_paths(args: Any) -> dict[str, Path]:
    outputs = {name: getattr(args, name) for name in ("jsonl", "csv", "html") if getattr(args, name) is not None}
    seen: dict[str, str] = {}
    for name, path in outputs.items():
        real = os.path.realpath(path)
        if real in seen:
            raise TriageUsageError(f"--{name} and --{seen[real]} name the same file")
        seen[real] = name
        if path.is_dir():
            raise TriageUsageError(f"--{name} {path}: is a directory")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir() or not os.access(parent, os.W_OK):
            raise TriageUsageError(f"--{name} {path}: directory {parent} does not exist or is not writable")
    return outputs


def command(args: Any, config: GatewayConfig, case: str, signer: Callable[[], Signer]) -> int:
    """``icse-gateway query --dir``: called by :mod:`gateway.cli` once the common options are checked."""
    from gateway import report  # noqa: PLC0415 - only this command needs it

    check_options(args)
    if not args.dir.is_dir():
        raise TriageUsageError(f"--dir {args.dir}: not a directory")
    root = os.path.realpath(args.dir)
    outputs = _output_paths(args)
    console = Console(stderr=True, highlight=False)
    cache: HashCache | None = None
    exclude = {os.path.realpath(p) for p in outputs.values()}
    if not args.no_cache:
        cache_path = (args.cache or default_cache_path()).absolute()
        exclude |= {os.path.realpath(f"{cache_path}{suffix}") for suffix in ("", "-wal", "-shm", "-journal")}
        try:
            cache = HashCache(cache_path)
        except (sqlite3.Error, OSError) as exc:
            console.print(f"icse-gateway: cache {cache_path} unusable ({exc}): every file is hashed",
                          style="yellow", markup=False)
    triage = Triage(root, case, config.nodes, jobs=args.jobs, batch=args.batch or DEFAULT_BATCH, cache=cache,
                    dihedral=args.dihedral, max_distance=args.max_distance, timeout=args.timeout,
                    deadline=args.deadline, exclude=frozenset(exclude), progress=sys.stderr.isatty(),
                    console=console)
    triage.result.gateway = config.gateway_id
    who = signer()
    requester = config.requester
    triage.result.requester = " / ".join(x for x in (args.officer or requester.officer, requester.org,
                                                     requester.country) if x)
    try:
        result = asyncio.run(_run(triage, config, who))
    except KeyboardInterrupt:
        if cache is not None:
            console.print(f"interrupted: {triage.result.hashed_now} file(s) hashed in this run are kept in "
                          f"{cache.path}; the same command resumes", markup=False, soft_wrap=True)
        raise
    finally:
        if cache is not None:
            try:
                cache.close()
            except sqlite3.Error:
                pass
    for name, path in outputs.items():
        report.WRITERS[name](result, path)
    if args.format == "json":
        print(json.dumps(report.summary_json(result, outputs), indent=2))
    else:
        report.print_summary(result, Console() if sys.stdout.isatty() else Console(width=160), outputs)
    return result.exit_status()


async def _run(triage: Triage, config: GatewayConfig, signer: Signer) -> TriageResult:
    from gateway.fanout import Federation  # noqa: PLC0415 - only the run talks to nodes

    async with Federation(config, signer) as federation:
        return await triage.run(federation)
