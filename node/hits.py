"""A Match answer's hits: the found rows as protobuf hits, their references for the
audit record, and what the holder's alerts hear of each (``node.alerts.Released``).

A 10,000-item exact batch may have thousands of hits: they go from the matcher's
arrays (``matcher.ExactHits``) and the rows' tuples (``SegmentSet.hit_rows``) to the
response in one pass, with no object per hit beyond its protobuf message, its
alert's fields and its reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from federation.query import PackedGroup, QueryItem
from federation.wire import pb
from node import matcher
from node.alerts import Released
from node.policy import Tier
from node.records import StoredRecord


def _released(position: int, algorithm: str, digest: bytes, row: tuple, distance: int, share: float | None,
              tier: Tier) -> Released:
    """What the holder's alerts hear of one released hit (``node.alerts``)."""
    reference, category, victim, series, _ = row
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


class HitWriter:
    """Writes hits as this node releases them (its country, id and contact on each)."""

    def __init__(self, country: str, node_id: str, contact: str):
        self._constant = {"country": country, "node_id": node_id, "contact": contact}

    def add(self, response: pb.MatchResponse, found: dict[int, matcher.ItemMatches],
            rows: dict[int, tuple], asked: Asked, tier: Tier) -> tuple[list[str], list[Released]]:
        """Adds the found rows to the response as hits; their references and what the holder's alerts hear."""
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
                references.append(row[0])
                released.append(_released(position, algorithm, digest, row, candidate.distance,
                                          candidate.matched_share, tier))
        return references, released

    def add_exact(self, response: pb.MatchResponse, exact: matcher.ExactHits, rows: dict[int, tuple],
                  asked: Asked, tier: Tier) -> tuple[list[str], list[Released]]:
        """``add`` for exact hits given as arrays (in position order): one pass, no object
        per hit beyond its protobuf message, its alert's fields and its reference. The Hit's
        fields are ``fields``' for distance 0 (tests/test_packed.py compares the two paths)."""
        references: list[str] = []
        released: list[Released] = []
        standard, level = tier is Tier.STANDARD, tier.value
        constant = self._constant
        add_result = response.results.add
        hits: RepeatedCompositeFieldContainer[pb.Hit] | None = None
        last, algorithm, digest = -1, "", b""
        for position, record_id in zip(exact.positions.tolist(), exact.record_ids.tolist(), strict=True):
            row = rows.get(record_id)
            if row is None:
                continue
            if position != last:  # several hits of one item (live in several segments) share its result
                hits, last = add_result(item=position).hits, position
                algorithm, digest = asked(position)
            assert hits is not None
            reference, category, victim, series, date_added = row
            if victim is not None:
                victim = bool(victim)
            if standard:
                hit = hits.add(reference=reference, category=category, series=series, date_added=date_added,
                               **constant)
                if victim is not None:
                    hit.victim_identified = victim
            else:
                hits.add(reference=reference, **constant)
            references.append(reference)
            released.append(Released(position, algorithm, digest, reference, series, category, victim, 0, None,
                                     level))
        return references, released

    def add_record(self, hits: RepeatedCompositeFieldContainer[pb.Hit], stored: StoredRecord, distance: int,
                   share: float | None, tier: Tier) -> str:
        """Adds the hit to ``hits`` (an ItemResult's repeated field); its reference."""
        record = stored.record
        row = (record.reference, record.category, record.victim_identified, record.series, record.date_added)
        hits.add(**self.fields(row, distance, share, tier is Tier.STANDARD))
        return record.reference

    def fields(self, row: tuple, distance: int, share: float | None, standard: bool) -> dict[str, Any]:
        """A Hit's fields from a stored row (``SegmentSet.hit_rows``): what the tier releases of it
        (the standard tier: its metadata too)."""
        fields: dict[str, Any] = {"reference": row[0], **self._constant}
        if distance:
            fields["distance"] = distance
        if share:
            fields["matched_share"] = share
        if standard:
            _, fields["category"], victim, fields["series"], fields["date_added"] = row
            if victim is not None:
                fields["victim_identified"] = bool(victim)
        return fields
