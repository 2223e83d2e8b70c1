"""A node's Match answer read for the merge (pure: no I/O).

An answer is sparse (only items with hits) and, when the request was packed
(``gateway.packing``), in the node's item order: ``unpack`` checks it and
returns one entry per item of the caller's, in the caller's order.
"""

from __future__ import annotations

from federation.wire import pb
from gateway import packing
from gateway.config import NodeEntry
from gateway.results import HitInfo


def hit_info(message: pb.Hit) -> HitInfo:
    """A node's hit as the merge takes it."""
    return HitInfo(
        node_id=message.node_id,
        country=message.country,
        reference=message.reference,
        contact=message.contact,
        category=message.category,
        victim_identified=message.victim_identified if message.HasField("victim_identified") else None,
        series=message.series,
        date_added=message.date_added,
        distance=message.distance,
        matched_share=message.matched_share or None,
    )


def unpack(response: pb.MatchResponse, node: NodeEntry, count: int,
           form: packing.Form | None = None) -> tuple[tuple, tuple]:
    """Per-item hits and truncation flags from a node's sparse answer, in the caller's item order."""
    if response.node_id != node.node_id:
        raise ValueError(f"answer is from node {response.node_id!r}")
    hits: list[tuple[HitInfo, ...]] = [()] * count
    truncated = [False] * count
    previous = -1
    for result in response.results:
        if not previous < result.item < count:
            raise ValueError(f"item position {result.item} out of order or range")
        previous = result.item
        position = result.item if form is None else form.caller_position(result.item)
        hits[position] = tuple(hit_info(h) for h in result.hits)
        truncated[position] = result.truncated
    return tuple(hits), tuple(truncated)
