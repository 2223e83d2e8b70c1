"""A whole triage run: its rows (on disk, :mod:`gateway.triage.store`), the nodes' tallies, how it was asked.

Nothing here holds the rows: counts and listings are queries over the store,
so a run over a million files reports in the memory of a few thousand.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

from gateway.triage.model import DEFAULT_BATCH, HASHED, UNREADABLE, NodeTally
from gateway.triage.store import RowStore


@dataclass
class TriageResult:
    """A whole run: where its rows are, the nodes' tallies, and how it was asked."""

    case: str
    root: str
    started: dt.datetime
    store: RowStore
    finished: dt.datetime | None = None
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

    def count(self, status: str) -> int:
        return self.store.count(status)

    @property
    def files(self) -> int:
        """Regular files hashed."""
        return self.store.count(HASHED)

    @property
    def files_known(self) -> int:
        return self.store.count(known=True)

    @property
    def partial(self) -> bool:
        return any(not tally.complete for tally in self.nodes.values())

    @property
    def countries(self) -> dict[str, dict[str, int]]:
        """Per country with hits: how many files it knows and how many references it gave."""
        return self.store.countries()

    def exit_status(self) -> int:
        """0 some hit; 1 no hit and complete (every file read, every node answered every
        batch); 2 no hit while something was not looked up or not answered, or nothing to do."""
        if self.files_known:
            return 0
        if self.partial or self.count(UNREADABLE) or not self.files:
            return 2
        return 1
