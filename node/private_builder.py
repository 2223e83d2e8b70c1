"""Computes OPRF outputs the serving node lacks, in the background, and rotates its key.

Imports and merges write outputs with each segment under the keys the key file
holds at that moment (node.segment). Everything else is done here, one segment
at a time, off the query path:

- segments written before the node had a key (private matching enabled on an
  existing store) or during a rotation get their missing outputs;
- after ``icse-node private-key rotate``, every segment gets outputs under the
  ``next`` key while queries go on under the active one; once every live
  segment has them, ``next`` becomes active (node.private_key.promote) and
  answers name the new key id;
- outputs under keys the file no longer holds are dropped.

Outputs are computed without holding the store's writer lock (an import or a
merge is never kept waiting for minutes); the lock is taken only to add the
files to the segment's catalog entry, which fails harmlessly if a merge retired
the segment meanwhile (the merged segment gets its own outputs). Until a
segment has outputs under the active key, private answers do not cover it:
Describe and every PrivateMatch answer say how many digests are covered.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from federation import algorithms
from node import private_arrays, private_key
from node.private_view import EXACT
from node.segment import MappedSegment, save_array
from node.segment_set import SegmentSet
from node.store import Store

log = logging.getLogger("icse.node")
KEY_POLL_SECONDS = 1.0
WORKERS = 1  # the builder leaves the other core to queries


def missing(segment: MappedSegment, keys: private_key.PrivateKeys) -> list[tuple[str, str]]:
    """(algorithm, key id) pairs whose outputs this segment lacks."""
    wanted = keys.computed()
    return [(name, key_id) for name in EXACT if name in segment.keys
            for key_id in sorted(wanted) if key_id not in segment.private.get(name, {})]


def stale(segment: MappedSegment, keys: private_key.PrivateKeys) -> list[str]:
    """File names of outputs under keys no longer held."""
    held = keys.by_id()
    names = []
    for name in segment.files:
        split = private_arrays.split_name(name.removesuffix(".npy").partition(".")[2])
        if split is not None and split[0] not in held:
            names.append(name)
    return names


def _compute(segment: MappedSegment, work: list[tuple[str, str]], keys: private_key.PrivateKeys) -> dict[str, str]:
    """Writes the missing arrays into the segment's directory; file name -> checksum."""
    secrets = keys.by_id()
    files: dict[str, str] = {}
    for name, key_id in work:
        sorted_keys, ids = segment.keys[name]
        arrays = private_arrays.build(algorithms.get(name), sorted_keys, ids, secrets[key_id],
                                      workers=WORKERS)
        for part, array in arrays.items():
            file_name = f"{name}.{private_arrays.array_name(key_id, part)}.npy"
            files[file_name] = save_array(segment.directory, file_name, array)
    return files


class PrivateBuilder:
    def __init__(self, store: Path):
        self._store = store
        self._latest: SegmentSet | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # What this builder added or dropped, until the node's view shows it (a refresh follows each change).
        self._done: set[tuple[int, str]] = set()
        self._failure = ""  # the last failure logged: a lasting one is logged once, not every second

    def consider(self, live: SegmentSet) -> None:
        """Called after every refresh of the node's view (a new generation)."""
        self._latest = live
        self._wake.set()

    def start(self, live: SegmentSet) -> None:
        self.consider(live)
        self._task = asyncio.get_running_loop().create_task(self._run_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    async def _run_forever(self) -> None:
        while True:
            # Woken by a new generation; the key file (a rotation) is looked at every second.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), KEY_POLL_SECONDS)
            self._wake.clear()
            try:
                await self.run_once()
                self._failure = ""
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if str(exc) != self._failure:
                    log.exception("computing OPRF outputs failed; trying again at the next change")
                self._failure = str(exc)

    async def run_once(self) -> bool:
        """One pass over the latest view; whether it changed anything."""
        live, keys = self._latest, await asyncio.to_thread(private_key.load, self._store)
        if live is None or keys is None:
            return False
        changed = False
        for item in live.segments:
            segment = item.segment
            work = [(n, k) for n, k in missing(segment, keys) if (segment.segment_id, f"{n}/{k}") not in self._done]
            drop = [n for n in stale(segment, keys) if (segment.segment_id, n) not in self._done]
            if not work and not drop:
                continue
            added = await asyncio.to_thread(_compute, segment, work, keys) if work else {}
            files = {name: value for name, value in {**segment.files, **added}.items() if name not in drop}
            async with await Store.open(self._store) as store, store.writing():
                kept = await store.catalog.set_files(segment.segment_id, files)
            if kept:
                changed = True
                log.info("OPRF outputs updated", extra={
                    "segment": segment.segment_id, "computed": sorted({f"{n}/{k}" for n, k in work}),
                    "dropped_files": len(drop)})
                for name in drop:
                    (segment.directory / name).unlink(missing_ok=True)
                self._done.update((segment.segment_id, f"{n}/{k}") for n, k in work)
                self._done.update((segment.segment_id, name) for name in drop)
            else:  # retired by a merge meanwhile: the merged segment has its own outputs
                for name in added:
                    (segment.directory / name).unlink(missing_ok=True)
        if not changed and keys.next is not None and all(
                (item.segment_id, f"{n}/{k}") in self._done
                for item in live.segments for n, k in missing(item.segment, keys)):
            next_id = private_key.PrivateKeys(keys.next).active_id
            promoted = await asyncio.to_thread(private_key.promote, self._store, next_id)
            if promoted is not None:
                log.info("OPRF key rotated: answers now under the new key",
                         extra={"key_id": promoted.active_id, "previous_key_id": keys.active_id})
                self._wake.set()  # outputs under the key before the previous one can go
                return True
        return changed
