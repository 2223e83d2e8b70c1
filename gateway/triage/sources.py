"""What a triage looks at: ``--dir`` trees, the paths of ``--from-list``, the digests of ``--hashes``.

All three become one stream of entries for :class:`gateway.triage.run.Triage`,
read lazily (a list of a million paths is never held). A digest list from stdin
is copied to an anonymous temporary file, because it is read twice: once whole,
to refuse a bad line before anything is sent, then as the run goes. The run
reads the stream in a thread (:func:`feed`) into a bounded queue: the walk
waits for the hashing and never holds the tree in memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import IO

from gateway.triage import digests
from gateway.triage.model import FileRow, Task
from gateway.triage.walk import Files, listed, walk_files

Reopen = Callable[[], AbstractContextManager[Iterator[str]]]
Entry = Task | FileRow | digests.Digests | Files
# Entries handed over at once, and how many such groups the walk may be ahead of the hashing.
WALK_GROUP = 64
WALK_QUEUE = 4


def _text(binary: IO[bytes]) -> io.TextIOWrapper:
    # File names are bytes: what is not UTF-8 survives as surrogates, shown as \xNN by the reports.
    return io.TextIOWrapper(binary, encoding="utf-8", errors="surrogateescape", newline=None)


def reopenable(source: str) -> Reopen:
    """Opens ``source`` (``-``: stdin, copied first) as text lines, as many times as needed."""
    if source != "-":
        with open(source, "rb"):  # fails now if it cannot be read
            pass

        @contextmanager
        def from_file() -> Iterator[Iterator[str]]:
            with _text(open(source, "rb")) as text:
                yield text

        return from_file
    copy = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the run
    while chunk := sys.stdin.buffer.read(1 << 20):
        copy.write(chunk)

    @contextmanager
    def from_copy() -> Iterator[Iterator[str]]:
        copy.seek(0)
        text = _text(copy)
        try:
            yield text
        finally:
            text.detach()

    return from_copy


def _paths(source: str) -> Iterator[str]:
    """The paths of a ``--from-list`` file, one a line, relative ones taken from the current directory."""
    stream = _text(sys.stdin.buffer) if source == "-" else _text(open(source, "rb"))  # noqa: SIM115
    try:
        for line in stream:
            path = line.rstrip("\r\n")
            if path.strip():
                yield os.path.abspath(path)
    finally:
        if source == "-":
            stream.detach()
        else:
            stream.close()


def entries(roots: list[str], from_list: str | None, digest_list: Reopen | None,
            digest_name: str) -> Callable[[frozenset[str], threading.Event],
                                          Iterator[Entry]]:
    """The run's entries: each tree walked, then each listed path, then each listed digest."""

    def produce(exclude: frozenset[str], stop: threading.Event) -> Iterator[Entry]:
        for root in roots:
            yield from walk_files(root, exclude, stop)
        if from_list:
            for path in _paths(from_list):
                if stop.is_set():
                    return
                yield from listed(path, exclude, stop)
        if digest_list is not None:
            with digest_list() as lines:
                for entry in digests.read(lines, digest_name):
                    if stop.is_set():
                        return
                    yield entry

    return produce


def feed(produce: Iterable[Entry], queue: asyncio.Queue[list[Entry] | None], loop: asyncio.AbstractEventLoop,
         stop: threading.Event) -> None:
    """Runs in a thread: ``produce`` into ``queue`` in groups, waiting for room; ends with None."""

    def put(group: list[Entry] | None) -> bool:
        queued = asyncio.run_coroutine_threadsafe(queue.put(group), loop)
        while not stop.is_set():
            with contextlib.suppress(concurrent.futures.TimeoutError):
                queued.result(0.5)
                return True
        queued.cancel()  # the run is stopping: nobody will take it
        return False

    group: list[Entry] = []
    first = True
    try:
        for entry in produce:
            group.append(entry)
            # The first of a directory's files go at once, not with 63 more entries (a few thousand
            # files whose walk takes a while): the workers, and the run, start on them meanwhile.
            if len(group) >= WALK_GROUP or (first and isinstance(entry, Files)):
                if not put(group):
                    return
                group, first = [], False
        if group:
            put(group)
    finally:
        put(None)


async def flatten(queue: asyncio.Queue[list[Entry] | None]) -> AsyncIterator[tuple[Entry, bool]]:
    """The entries one by one, each with whether nothing else is waiting behind it."""
    while (group := await queue.get()) is not None:
        for position, entry in enumerate(group):
            yield entry, position == len(group) - 1 and queue.empty()
