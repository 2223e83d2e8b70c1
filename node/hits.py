"""A Match answer's hits: the found rows as protobuf hits, their references for the
audit record, and what the holder's alerts hear of each (``node.alerts.ReleasedColumns``).

A 10,000-item exact batch may have thousands of hits: they go from the matcher's
arrays (``matcher.ExactHits``) and the rows' tuples (``SegmentSet.hit_rows``) to the
response in one pass, with no object per hit beyond its protobuf message; the
references and the alerts' columns are the rows transposed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Any

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from federation.query import PackedGroup, QueryItem
from federation.wire import pb
from node import matcher
from node.alerts import Released, ReleasedColumns
from node.policy import Tier
from node.records import StoredRecord
from node.segment_set import HitRows


def _released(position: int, algorithm: str, digest: bytes, row: tuple, distance: int, share: float | None,
              tier: Tier) -> Released:
    """What the holder's alerts hear of one released hit (``node.alerts``)."""
    _, reference, category, victim, series, _ = row
    return Released(position, algorithm, digest, reference, series, category,
                    None if victim is None else bool(victim), distance, share, tier.value)


class Asked:
    """The algorithm and digest of the request's item at a position (the ``items``, then the
    packed groups), without a ``QueryItem`` made for each packed one."""

    def __init__(self, items: Sequence[QueryItem], packed: Sequence[PackedGroup]):
        self._items = items
        self._groups: list[tuple[int, int, PackedGroup]] = []  # (first position, end, group)
        start = len(items)
        for group in packed:
            self._groups.append((start, start + group.count, group))
            start += group.count

    def __call__(self, position: int) -> tuple[str, bytes]:
        if position < len(self._items):
            item = self._items[position]
            return item.algorithm, item.digest
        for start, end, group in self._groups:
            if position < end:
                offset = (position - start) * group.size
                return group.algorithm, group.digests[offset:offset + group.size]
        raise IndexError("item position beyond the request")

    def in_hex(self, positions: list[int]) -> tuple[list[str], list[str]]:
        """The algorithm and hex digest of the items at these (ascending) positions: a packed
        group's digests are written in hex once and sliced."""
        algorithms: list[str] = []
        digests: list[str] = []
        cut = bisect_left(positions, len(self._items))
        for position in positions[:cut]:
            item = self._items[position]
            algorithms.append(item.algorithm)
            digests.append(item.digest.hex())
        for start, end, group in self._groups:
            stop = bisect_left(positions, end, cut)
            if stop > cut:
                text, width = group.digests.hex(), 2 * group.size
                digests.extend([text[(p - start) * width:(p - start + 1) * width] for p in positions[cut:stop]])
                algorithms.extend([group.algorithm] * (stop - cut))
                cut = stop
        if cut != len(positions):
            raise IndexError("item position beyond the request")
        return algorithms, digests


class HitWriter:
    """Writes hits as this node releases them (its country, id and contact on each)."""

    def __init__(self, country: str, node_id: str, contact: str):
        self._constant = {"country": country, "node_id": node_id, "contact": contact}

    def add(self, response: pb.MatchResponse, found: dict[int, matcher.ItemMatches],
            rows: dict[int, tuple], asked: Asked, tier: Tier) -> tuple[list[str], ReleasedColumns]:
        """Adds the found rows (``HitRows.by_id``) to the response as hits; their references
        and what the holder's alerts hear."""
        references: list[str] = []
        released: list[Released] = []
        standard = tier is Tier.STANDARD
        add_result = response.results.add
        # Results are added in place (``add``): a message built apart and then put in a list is copied.
        for position, (candidates, truncated) in found.items():
            kept = [(c, rows[c.record_id]) for c in candidates if c.record_id in rows]
            if not kept:
                continue
            hits = add_result(item=position, truncated=truncated).hits
            algorithm, digest = asked(position)
            for candidate, row in kept:
                hits.add(**self.fields(row, candidate.distance, candidate.matched_share, standard))
                references.append(row[1])
                released.append(_released(position, algorithm, digest, row, candidate.distance,
                                          candidate.matched_share, tier))
        return references, ReleasedColumns.of(released)

    def add_exact(self, response: pb.MatchResponse, exact: matcher.ExactHits, rows: HitRows,
                  asked: Asked, tier: Tier) -> tuple[list[str], ReleasedColumns]:
        """``add`` for exact hits given as arrays (in position order): one pass, no object
        per hit beyond its protobuf message and its row's tuple; the references and alert
        columns are that pass's tuples transposed. The Hit's fields are ``fields``' for
        distance 0 (tests/test_packed.py compares the two paths)."""
        found = rows.of(exact.record_ids)
        if not found:
            return [], ReleasedColumns.of([])
        positions = exact.positions.tolist()
        standard = tier is Tier.STANDARD
        country, node_id, contact = (self._constant[k] for k in ("country", "node_id", "contact"))
        add_result = response.results.add
        hits: RepeatedCompositeFieldContainer[pb.Hit] | None = None
        last = -1
        for position, (_, reference, category, victim, series, date_added) in zip(positions, found, strict=True):
            if position != last:  # several hits of one item (live in several segments) share its result
                hits, last = add_result(item=position).hits, position
            assert hits is not None
            if standard:
                hit = hits.add(reference=reference, category=category, series=series, date_added=date_added,
                               country=country, node_id=node_id, contact=contact)
                if victim is not None:
                    hit.victim_identified = bool(victim)
            else:
                hits.add(reference=reference, country=country, node_id=node_id, contact=contact)
        _, references, categories, victims, series_of, _ = zip(*found, strict=True)
        algorithms, digests = asked.in_hex(positions)
        count = len(positions)
        return list(references), ReleasedColumns(
            positions, algorithms, digests, references, series_of, categories,
            [None if victim is None else bool(victim) for victim in victims], [0] * count, [None] * count,
            [tier.value] * count)

    def add_record(self, hits: RepeatedCompositeFieldContainer[pb.Hit], stored: StoredRecord, distance: int,
                   share: float | None, tier: Tier) -> str:
        """Adds the hit to ``hits`` (an ItemResult's repeated field); its reference."""
        record = stored.record
        row = (stored.id, record.reference, record.category, record.victim_identified, record.series,
               record.date_added)
        hits.add(**self.fields(row, distance, share, tier is Tier.STANDARD))
        return record.reference

    def fields(self, row: tuple, distance: int, share: float | None, standard: bool) -> dict[str, Any]:
        """A Hit's fields from a stored row (``HitRows``): what the tier releases of it (the
        standard tier: its metadata too)."""
        fields: dict[str, Any] = {"reference": row[1], **self._constant}
        if distance:
            fields["distance"] = distance
        if share:
            fields["matched_share"] = share
        if standard:
            _, _, fields["category"], victim, fields["series"], fields["date_added"] = row
            if victim is not None:
                fields["victim_identified"] = bool(victim)
        return fields
