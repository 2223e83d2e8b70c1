"""Asking the federation while the hashing goes on: batches out as they fill, answers into the rows.

The half of a run (:class:`gateway.triage.run.Triage`) that talks to the nodes:
hashes wait in ``_pending`` (row index, item, variant); a batch goes out when
it is full, or after a short wait when hashing is slower than querying, a few
at a time; each batch's answers are applied to the rows it asked about
(:mod:`.answers`), and rows whose every hash is answered go to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from federation.query import QueryItem
from gateway.results import NodeAnswer
from gateway.triage.answers import apply
from gateway.triage.model import NodeTally

if TYPE_CHECKING:
    from gateway.triage.bulk import Rows
    from gateway.triage.result import TriageResult

# A partly filled batch is sent after this long when the querier is idle.
FLUSH_AFTER = 2.0
# Hashing waits when this many batches are waiting for the nodes (bounded memory).
PENDING_BATCHES = 8
# The first batch is this small, so that the first answer comes early.
FIRST_BATCH = 100
# Batches waiting for the nodes at once: the next goes out while one is answered.
QUERIES_AT_ONCE = 3

class MatchingFederation(Protocol):
    """What a run needs of the federation: :class:`gateway.fanout.Federation` is one; tests pass others."""

    async def match(self, items: Sequence[QueryItem], case: str, timeout: float | None = None,
                    deadline: float | None = None) -> list[NodeAnswer]: ...


class Asking:
    """The querying half of a run: what it needs of the run is declared here, the run has it."""

    batch: int
    case: str
    timeout: float | None
    deadline: float | None
    result: TriageResult
    items_sent: int
    _pending: list[tuple[int, QueryItem, str]]
    _pending_since: float | None
    _hashing_over: bool
    _wake: asyncio.Event
    _drained: asyncio.Event
    _live: Rows
    _unanswered: dict[int, int]
    _known: int
    _hits: int

    if TYPE_CHECKING:  # the run's own
        def _final(self, indices: list[int]) -> None: ...

        def _update(self, **fields: Any) -> None: ...

    def _batch_size(self) -> int:
        return min(self.batch, FIRST_BATCH) if not self.items_sent else self.batch

    def _batch_ready(self) -> bool:
        if len(self._pending) >= self._batch_size() or (self._hashing_over and self._pending):
            return True
        return bool(self._pending) and time.monotonic() - (self._pending_since or 0) >= FLUSH_AFTER

    async def _querier(self, federation: MatchingFederation) -> None:
        try:
            await self._query_batches(federation)
        finally:
            self._drained.set()

    async def _query_batches(self, federation: MatchingFederation) -> None:
        """Batches out as they fill, up to QUERIES_AT_ONCE of them waiting for the nodes at a time
        (one at a time, the run would wait a round trip per batch)."""
        asking: set[asyncio.Task[None]] = set()
        room = asyncio.Semaphore(QUERIES_AT_ONCE)

        failed: set[asyncio.Task[None]] = set()

        def answered(work: asyncio.Task[None]) -> None:
            asking.discard(work)
            if not work.cancelled() and work.exception() is not None:
                failed.add(work)
            room.release()
            self._wake.set()  # a failure is raised at once

        try:
            while True:
                while not self._batch_ready():
                    _raise_failed(failed)
                    if self._hashing_over and not self._pending:
                        if asking:
                            await asyncio.wait(list(asking), return_when=asyncio.FIRST_COMPLETED)
                            continue  # answered, or failed: the next turn says which
                        return
                    self._wake.clear()
                    wait = None
                    if self._pending:
                        wait = max(0.05, FLUSH_AFTER - (time.monotonic() - (self._pending_since or 0)))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), wait)
                await room.acquire()
                _raise_failed(failed)
                if not self._pending:
                    room.release()
                    continue
                size = self._batch_size()
                taken = self._pending[:size]
                del self._pending[:size]
                self.items_sent += len(taken)
                self._update(items=self.items_sent)
                self._pending_since = time.monotonic() if self._pending else None
                self._drained.set()
                work = asyncio.create_task(self._ask(federation, taken))
                asking.add(work)
                work.add_done_callback(answered)
        finally:
            for work in asking:
                work.cancel()
            if asking:
                await asyncio.gather(*asking, return_exceptions=True)

    async def _ask(self, federation: MatchingFederation, taken: list[tuple[int, QueryItem, str]]) -> None:
        answers = await federation.match([item for _, item, _ in taken], self.case, self.timeout, self.deadline)
        applied = apply(self.case, taken, answers, self._live, self._unanswered)
        self._known += applied.known
        self._hits += applied.hits
        if applied.final:
            self._final(applied.final)
        for answer in answers:
            tally = self.result.nodes.get(answer.node_id)
            if tally is None:
                tally = self.result.nodes[answer.node_id] = NodeTally(answer.node_id, answer.country)
            tally.record(answer)
        self.result.batches += 1
        self.result.items_queried += len(taken)
        answered = sum(1 for a in answers if a.status.answered)
        self._update(known=self._known, hits=self._hits,
                     answers=f"{answered}/{len(answers)} nodes answered")


def _raise_failed(tasks: set[asyncio.Task[None]]) -> None:
    """Raises the error of the first of ``tasks`` that failed (a batch that could not be asked ends the run)."""
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            task.result()
