"""What a federated query yields: per-node answers and the merged view."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from federation.query import QueryItem


class NodeStatus(Enum):
    HIT = "hit"
    NO_HIT = "no_hit"
    TIMED_OUT = "timed_out"
    UNAVAILABLE = "unavailable"
    REFUSED = "refused"
    ERROR = "error"
    # Not asked: its circuit breaker is open after repeated failures.
    SKIPPED = "skipped"

    @property
    def answered(self) -> bool:
        return self in (NodeStatus.HIT, NodeStatus.NO_HIT)


@dataclass(frozen=True)
class HitInfo:
    node_id: str
    country: str
    reference: str
    contact: str = ""
    category: str = ""
    victim_identified: bool | None = None
    series: str = ""
    date_added: str = ""
    distance: int = 0
    matched_share: float | None = None


@dataclass(frozen=True)
class NodeAnswer:
    node_id: str
    country: str
    status: NodeStatus
    message: str = ""
    latency_ms: float = 0.0
    # Aligned with the query's items when the node answered; empty otherwise.
    hits: tuple[tuple[HitInfo, ...], ...] = ()
    truncated: tuple[bool, ...] = ()
    # Which of the member's addresses gave this answer (its replicas share one identity).
    replica: str = ""


@dataclass(frozen=True)
class Subject:
    """A query item and what the investigator knows it as (file path or given hash)."""

    item: QueryItem
    source: str = ""
    # For rotated/flipped PDQ variants of an image: which one ("rot90", ...).
    variant: str = ""


@dataclass(frozen=True)
class Skipped:
    """A hash that was not sent, and why (low quality, undecodable media)."""

    source: str
    algorithm: str
    reason: str


@dataclass(frozen=True)
class ItemOutcome:
    subject: Subject
    hits: tuple[HitInfo, ...]
    # Nodes that had more hits for this item than they return.
    truncated_by: tuple[str, ...] = ()


@dataclass(frozen=True)
class MergedResult:
    case: str
    items: tuple[ItemOutcome, ...]
    nodes: tuple[NodeAnswer, ...]
    partial: bool = field(default=False)
    skipped: tuple[Skipped, ...] = ()
    # Sent to every node with the query: finds its lines in their logs.
    request_id: str = ""

    @property
    def countries_with_hits(self) -> tuple[str, ...]:
        return tuple(sorted({hit.country for item in self.items for hit in item.hits}))

    def exit_status(self) -> int:
        """Like grep: 0 some hit, 1 no hit anywhere, 2 no hit but not every node answered."""
        if any(item.hits for item in self.items):
            return 0
        return 2 if self.partial else 1
