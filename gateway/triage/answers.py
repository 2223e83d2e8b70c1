"""One batch's answers applied to the rows of the files it asked about.

Only the items some node found (or cut short) are merged: a no-hit item needs
no work of its own. A node that did not answer marks every file of the batch
as not answered by it; a file is final once every one of its items has been
in an answered or failed batch.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import compress
from operator import itemgetter, not_, sub

from federation.query import QueryItem
from gateway.merge import merge
from gateway.results import NodeAnswer, Subject
from gateway.triage.model import FileRow, Match


@dataclass
class Applied:
    known: int = 0  # files known for the first time
    hits: int = 0
    final: list[int] = field(default_factory=list)  # rows whose every item is answered


def apply(case: str, taken: Sequence[tuple[int, QueryItem, str]], answers: Sequence[NodeAnswer],
          rows: dict[int, FileRow], unanswered: dict[int, int]) -> Applied:
    """Updates ``rows`` (matches, truncation, nodes that did not answer) and ``unanswered``
    (items per row still to be answered) for the batch ``taken`` (row index, item, variant)."""
    applied = Applied()
    replied = [a for a in answers if a.status.answered]
    found = sorted({position for answer in replied for column in (answer.hits, answer.truncated)
                    if any(column) for position, value in enumerate(column) if value})
    if found:
        picked = [_picked(answer, found) if answer.status.answered else answer for answer in answers]
        subjects = [Subject(taken[p][1], rows[taken[p][0]].path, taken[p][2]) for p in found]
        merged = merge(case, subjects, picked)
        for position, outcome in zip(found, merged.items, strict=True):
            index, item, variant = taken[position]
            row = rows[index]
            if outcome.hits:
                applied.known += not row.matches
                applied.hits += len(outcome.hits)
                row.matches += [Match(item.algorithm, variant, hit) for hit in outcome.hits]
            row.truncated_by.update(outcome.truncated_by)
    missing = [a.node_id for a in answers if not a.status.answered]
    if missing:
        for index in {index for index, _, _ in taken}:
            rows[index].not_answered_by.update(missing)
    # Items left per row, a column at a time (a batch holds thousands of rows, most of them no hit).
    counts = Counter(map(itemgetter(0), taken))
    indices = list(counts)
    left = list(map(sub, map(unanswered.__getitem__, indices), counts.values()))
    unanswered.update(zip(indices, left, strict=True))
    applied.final += compress(indices, map(not_, left))
    return applied


def _picked(answer: NodeAnswer, positions: list[int]) -> NodeAnswer:
    """``answer`` for the items at ``positions`` only."""
    return dataclasses.replace(answer, hits=tuple(answer.hits[p] for p in positions),
                               truncated=tuple(answer.truncated[p] for p in positions))
