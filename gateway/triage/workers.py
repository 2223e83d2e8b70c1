"""Hashing in worker processes, and what is left when a worker dies.

The pool is started by a fork server: the gateway's own process holds gRPC
channels and threads, which must not be forked. A worker that crashes on a
hostile file breaks only that file: the run retries the chunk it was in one
file at a time in a separate process, and the culprit gets its exact digests
computed apart (:func:`exact_only`), without any decoder. A worker stuck on one
file longer than the run's per-file limit is killed the same way
(:func:`stuck_workers` says which), and a worker's address space is limited so
that a decoder asking for too much memory fails alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import multiprocessing
import os
import resource
import signal
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing.sharedctypes import SynchronizedArray
from pathlib import Path
from typing import Any

from gateway import filehash
from gateway.triage.model import Hashed, Task, compact
from gateway.triage.walk import kind_of, reason_of

Hasher = Callable[..., filehash.FileHashes]

# Per pool, two numbers per worker: its pid, and since when (time.monotonic, the
# same clock in every process) it has been on its current file, 0 when idle.
_SLOTS: weakref.WeakKeyDictionary[ProcessPoolExecutor, SynchronizedArray] = weakref.WeakKeyDictionary()
# In a worker: its pool's slots and which pair is its own.
_slots: SynchronizedArray | None = None
_marks: Any = None
_slot = -1


# glibc's mallopt parameters (malloc.h), and what a worker sets them to.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_FROM, _TRIM_FROM = 4 << 20, 16 << 20


def _keep_buffers() -> None:
    """Lets this process reuse its freed buffers instead of returning them to the system at once.

    Decoding an image allocates a few buffers of a few hundred KB (the pixels,
    their RGB and luminance copies): above glibc's default thresholds (128 KB),
    each is mapped and unmapped per image, or trimmed off the heap, and its pages
    are faulted in afresh every time: over 500 page faults, a millisecond of
    system time per image, as much as the decoding itself. Buffers up to 4 MiB
    now come from the heap, and up to 16 MiB of free heap is kept for the next
    file: a worker's memory stays bounded (and under its address-space limit).
    Elsewhere than glibc there is no such call, and nothing to do.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_FROM)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_FROM)


def _worker_init(memory: int | None, slots: SynchronizedArray | None) -> None:
    global _slots, _slot, _marks  # noqa: PLW0603 - one per worker process
    # Ctrl-C is the parent's business: it stops the pool and keeps what is cached.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _keep_buffers()
    if memory:
        # A decoder that asks for more gets MemoryError (the file keeps its exact digests),
        # not the whole machine.
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        soft = memory if hard == resource.RLIM_INFINITY else min(memory, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    if slots is not None:
        with slots.get_lock():
            for i in range(0, len(slots), 2):
                if not slots[i]:
                    slots[i], _slot = os.getpid(), i
                    break
        _slots = slots
        _marks = slots.get_obj()  # this process alone writes its pair: no lock per file


def on_file(since: float) -> None:
    """Marks the start of a file (``time.monotonic()``), or the end of it (0), for the watchdog."""
    if _marks is not None and _slot >= 0:
        _marks[_slot + 1] = since


def stuck_workers(pool: ProcessPoolExecutor | None, limit: float) -> list[int]:
    """The pids of ``pool``'s workers that have been on one file for longer than ``limit`` seconds."""
    slots = _SLOTS.get(pool) if pool is not None else None
    if slots is None:
        return []
    now = time.monotonic()
    with slots.get_lock():
        pairs = slots[:]
    return [int(pairs[i]) for i in range(0, len(pairs), 2) if pairs[i] and pairs[i + 1] and now - pairs[i + 1] > limit]


def hash_one(task: Task, dihedral: bool, hasher: Hasher | None = None) -> Hashed:
    """Hashes one file; whatever a decoder does, the file keeps at least its exact digests."""
    real = Path(task.real)
    try:
        before = os.stat(real, follow_symlinks=False)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return Hashed(None, task.size, task.mtime_ns, "vanished before it could be read")
        return Hashed(None, task.size, task.mtime_ns, reason_of(exc))
    if not stat.S_ISREG(before.st_mode):
        return Hashed(None, task.size, task.mtime_ns,
                      f"no longer a regular file (now a {kind_of(before.st_mode)}): not read")
    notes: tuple[str, ...] = ()
    try:
        hashes = (hasher or filehash.hash_file)(real, dihedral=dihedral)
    except Exception as exc:  # noqa: BLE001 - whatever a decoder does, the bytes still identify the file
        reason = f"perceptual hashing failed: {type(exc).__name__}: {exc}"[:300]
        try:
            hashes = filehash.exact_only(real, reason)
        except OSError as read_error:
            if read_error.errno == errno.ENOENT:
                return Hashed(None, before.st_size, before.st_mtime_ns, "vanished while it was being read")
            return Hashed(None, before.st_size, before.st_mtime_ns, reason_of(read_error))
    text = filehash.hashes_text(hashes)  # encoded here, in parallel, not in the run's main process
    try:
        after = os.stat(real, follow_symlinks=False)
        stable = (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    except OSError:
        stable = False
    if not stable:
        notes = ("changed or vanished while it was being read: its hashes may not match its content now",)
    return Hashed(hashes, before.st_size, before.st_mtime_ns, stable=stable, notes=notes, text=text)


def hash_chunk(tasks: Sequence[Task], dihedral: bool, hasher: Hasher | None = None) -> list[Hashed]:
    """What a worker runs: a few small files, or one large one; each file's start is marked for the watchdog."""
    done = []
    for task in tasks:
        on_file(time.monotonic())
        try:
            done.append(hash_one(task, dihedral, hasher))
        finally:
            on_file(0.0)
    return done


def hash_many(tasks: Sequence[Task], dihedral: bool, hasher: Hasher | None = None,
              max_distance: int = 0) -> list[tuple[Any, ...]]:
    """:func:`hash_chunk`, answered compactly: per file the fields of a :class:`Done` (``Done._make``
    takes them back), as a plain tuple, which pickles in half the time of the named one."""
    return [tuple(compact(hashed, max_distance)) for hashed in hash_chunk(tasks, dihedral, hasher)]


def exact_only(task: Task, why: str) -> Hashed:
    """Exact digests without any decoder: for a file that crashed a worker."""
    try:
        hashes = filehash.exact_only(Path(task.real), why)
    except OSError as exc:
        return Hashed(None, task.size, task.mtime_ns, reason_of(exc))
    return Hashed(hashes, task.size, task.mtime_ns, stable=False)


# What the fork server imports once for all its workers: what they run, and no more (numpy and
# the decoders only for a file that needs them: most files of a device are not images).
PRELOAD = ("gateway.filehash", "gateway.triage.workers", "gateway.triage.scan")


def start_forkserver() -> None:
    """Starts the fork server now, without waiting for it: it imports the hashing modules while the
    caller sets up the rest (the first pool then starts at once)."""
    _start_forkserver()


def _start_forkserver() -> None:
    """Starts the fork server with Ctrl-C ignored, so that its workers ignore it from birth.

    A terminal's Ctrl-C reaches the whole process group; a worker must not die
    of it (the parent stops the pool itself), not even while it is starting.
    """
    from multiprocessing import forkserver  # noqa: PLC0415

    forkserver.set_forkserver_preload(list(PRELOAD))
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except ValueError:  # not the main thread: leave the handler alone
        forkserver.ensure_running()
        return
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


def new_pool(workers: int, memory: int | None = None) -> ProcessPoolExecutor:
    """Hashing processes forked from the fork server, never from this (threaded) process,
    each limited to ``memory`` bytes of address space and watched by :func:`stuck_workers`."""
    _start_forkserver()
    context = multiprocessing.get_context("forkserver")
    slots = context.Array("d", 2 * workers)
    pool = _Pool(max_workers=workers, mp_context=context, initializer=_worker_init, initargs=(memory, slots))
    _SLOTS[pool] = slots
    pool.submit(os.getpid)  # the first worker starts now
    return pool


class _Pool(ProcessPoolExecutor):
    """A pool whose workers never import the main module (:func:`_main_unseen`).

    Workers started by a fork server are started on demand, one per
    :meth:`submit` that finds none idle, up to the pool's size: the second one
    starts with the run's second task, not with the pool. Each submit hides the
    main module, so that every worker, whenever it starts, is spared it.
    """

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        with _main_unseen():
            return super().submit(fn, *args, **kwargs)


_HIDING = threading.RLock()


@contextlib.contextmanager
def _main_unseen() -> Iterator[None]:
    """Hides which module is ``__main__`` while workers start.

    A process started by the fork server imports the parent's main module
    first (multiprocessing's "safe importing of main module"); here that is the
    gateway's command line, with gRPC and the rest: a second or more per
    worker and tens of MB each, for nothing a worker runs (the functions it
    runs live in this package). Without a name or a file, none is imported.
    """
    with _HIDING:  # a pool may be starting in another thread
        main = sys.modules["__main__"]
        saved: dict[str, Any] = {name: main.__dict__[name] for name in ("__spec__", "__file__")
                                 if name in main.__dict__}
        main.__dict__.pop("__file__", None)
        main.__dict__["__spec__"] = None
        try:
            yield
        finally:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def stop_pool(pool: ProcessPoolExecutor | None) -> None:
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


def usable_cpus() -> int:
    """The CPUs this process may run on: the default number of hashing processes."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1

