"""Files that a worker could not get through: each again, alone, under the per-file limits.

When a hashing process dies (a decoder crashed, went over its memory limit, or
was killed by :func:`watch` for taking too long on one file), the files it had
are hashed here one at a time in a process of their own: the culprit costs at
most the time limit again, then keeps its exact digests (computed apart, without
any decoder), or is listed with why even that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from gateway.triage.model import Hashed, Task
from gateway.triage.workers import Hasher, exact_only, hash_chunk, new_pool, stop_pool, stuck_workers


async def watch(pool: Callable[[], ProcessPoolExecutor | None], limit: float | None) -> None:
    """Kills, for ever, any worker of ``pool()`` stuck on one file for longer than ``limit`` seconds."""
    if limit is None:
        return
    while True:
        await asyncio.sleep(min(1.0, limit / 4))
        for pid in stuck_workers(pool(), limit):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


class Apart:
    """One file at a time, in a process of its own, under the time limit (None: none)."""

    def __init__(self, dihedral: bool, hasher: Hasher | None, timeout: float | None, memory: int | None):
        self.dihedral, self.hasher, self.timeout, self.memory = dihedral, hasher, timeout, memory
        self._pool: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()

    async def hash(self, task: Task) -> Hashed:
        """The file hashed, or its exact digests only, or why neither."""
        async with self._lock:
            outcome, why = await self._run(hash_chunk, [task], self.dihedral, self.hasher)
            if outcome is None:
                why = f"hashing this file {why}"
                outcome, again = await self._run(exact_only, task, f"{why}: exact digests only, no perceptual hash")
                if outcome is None:
                    return Hashed(None, task.size, task.mtime_ns, f"even reading it {again}")
        return outcome

    async def _run(self, work: Callable[..., Any], *args: Any) -> tuple[Hashed | None, str]:
        loop = asyncio.get_running_loop()
        if self._pool is None:
            self._pool = new_pool(1, self.memory)
        try:
            done = await asyncio.wait_for(loop.run_in_executor(self._pool, work, *args), self.timeout)
        except BrokenProcessPool:
            why = "crashed the hashing process (or went over its memory limit)"
        except TimeoutError:
            why = f"took longer than {self.timeout:g} s (--file-timeout): stopped"
        else:
            return (done[0] if isinstance(done, list) else done), ""
        self.close(finished=False)
        return None, why

    def close(self, finished: bool) -> None:
        """Waits for the process when all went well; stops it otherwise."""
        if finished and self._pool is not None:
            self._pool.shutdown(wait=True)
        else:
            stop_pool(self._pool)
        self._pool = None
