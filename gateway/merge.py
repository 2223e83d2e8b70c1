"""Merging per-node answers into one result per query item (pure)."""

from __future__ import annotations

from collections.abc import Sequence

from gateway.results import ItemOutcome, MergedResult, NodeAnswer, Skipped, Subject


def merge(case: str, subjects: Sequence[Subject], answers: Sequence[NodeAnswer],
          skipped: Sequence[Skipped] = (), request_id: str = "") -> MergedResult:
    """Hits per item from every node that answered, nearest first, then by country.

    The answer is partial when any node did not answer: its absence of hits
    then means nothing.
    """
    outcomes = []
    for position, subject in enumerate(subjects):
        hits = [hit for answer in answers if answer.status.answered for hit in answer.hits[position]]
        hits.sort(key=lambda h: (h.distance, h.country, h.node_id, h.reference))
        truncated = tuple(
            answer.node_id for answer in answers if answer.status.answered and answer.truncated[position]
        )
        outcomes.append(ItemOutcome(subject, tuple(hits), truncated))
    return MergedResult(
        case=case,
        items=tuple(outcomes),
        nodes=tuple(sorted(answers, key=lambda a: a.node_id)),
        partial=any(not answer.status.answered for answer in answers),
        skipped=tuple(skipped),
        request_id=request_id,
    )
