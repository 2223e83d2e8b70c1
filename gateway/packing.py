"""The two forms a Match request can take on the wire (pure: no I/O).

``plain``: one ``QueryItem`` per item, in the caller's order; every node
understands it. ``packed`` (PROTOCOL.md "Packed exact items"): the exact items
of each algorithm concatenated into one ``PackedItems`` byte string, for nodes
that list ``match.packed-exact`` in Describe. A 10,000-digest batch is then a
few byte strings instead of 10,000 messages, on both sides of the wire.

Packing reorders: the node's item list is the unpacked items (perceptual
ones), then each packed group. A batch with an item the node will refuse (an
unknown algorithm, a digest of the wrong size, a distance on an exact kind) is
not packed: the refusal then names the item by the caller's own position. ``Form.order`` maps a position of
that list back to the caller's position, and the query digest is computed over
the list as sent. The same items signed for one form are not valid for the
other; each node is asked in one form, with a token for that form.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, compress
from operator import itemgetter

import numpy as np

from federation import algorithms
from federation.query import PackedGroup, QueryItem, query_sha256
from federation.wire import items_to_pb, packable, pb, request_to_pb

# Below this many exact items packing saves too little to be worth a Describe to learn whether a node offers it.
PACK_AT_LEAST = 64


@dataclass(frozen=True)
class Form:
    request: pb.MatchRequest
    query_sha256: str
    # Position in the request's item list -> position in the caller's items; None when they are the same.
    order: np.ndarray | None = None


def plain(items: Sequence[QueryItem]) -> Form:
    return Form(items_to_pb(items), query_sha256(items))


def packed(items: Sequence[QueryItem], at_least: int = PACK_AT_LEAST) -> Form | None:
    """The packed form, or None when fewer than ``at_least`` items can be packed."""
    sizes = {a.name: size for a in algorithms.all_algorithms() if (size := packable(a.name))}
    if len(items) >= max(at_least, 1) and (whole := _one_group(items, sizes)) is not None:
        return Form(request_to_pb((), [whole]), query_sha256((), packed=[whole]))
    if len(items) >= max(at_least, 1) and (exact := _exact_groups(items, sizes)) is not None:
        packs, order = exact
        return Form(request_to_pb((), packs), query_sha256((), packed=packs), order)
    rest: list[int] = []
    groups: dict[str, list[int]] = {}
    for position, (name, digest, distance) in enumerate(items):
        if not distance and len(digest) == sizes.get(name, -1):
            groups.setdefault(name, []).append(position)
        elif name in sizes or not _well_formed(name, digest):
            return None  # the node's refusal names a position: sent unpacked, it is the caller's
        else:
            rest.append(position)
    if sum(len(where) for where in groups.values()) < max(at_least, 1):
        return None
    unpacked = [items[p] for p in rest]
    packs = [PackedGroup(name, b"".join([items[p].digest for p in where]), sizes[name])
             for name, where in groups.items()]
    order = np.fromiter((p for where in (rest, *groups.values()) for p in where), dtype=np.int64, count=len(items))
    return Form(request_to_pb(unpacked, packs), query_sha256(unpacked, packed=packs), order)


def _well_formed(name: str, digest: bytes) -> bool:
    try:
        algorithms.get(name).validate(digest)
    except algorithms.DigestError:
        return False
    return True


def _exact_groups(items: Sequence[QueryItem], sizes: Mapping[str, int]) -> tuple[list[PackedGroup], np.ndarray] | None:
    """What the loop of :func:`packed` makes of a batch of exact items only, all well formed (a disk's
    files hashed several ways), found a column at a time instead of a Python step per item; else None."""
    if any(map(itemgetter(2), items)):
        return None
    names = list(map(itemgetter(0), items))
    packs: list[PackedGroup] = []
    where: list[list[int]] = []
    for name in dict.fromkeys(names):  # in the order of first appearance, as the loop groups them
        if name not in sizes:
            return None
        positions = list(compress(range(len(names)), map(name.__eq__, names)))
        digests = list(map(itemgetter(1), map(items.__getitem__, positions)))
        if set(map(len, digests)) != {sizes[name]}:
            return None
        packs.append(PackedGroup(name, b"".join(digests), sizes[name]))
        where.append(positions)
    return packs, np.fromiter(chain.from_iterable(where), dtype=np.int64, count=len(items))


def _one_group(items: Sequence[QueryItem], sizes: Mapping[str, int]) -> PackedGroup | None:
    """The whole batch as one group when it is one exact algorithm, well formed (the usual
    batch: a disk's files hashed one way), found without a Python step per item; else None."""
    names = set(map(itemgetter(0), items))
    if len(names) != 1 or any(map(itemgetter(2), items)):
        return None
    name = names.pop()
    digests = list(map(itemgetter(1), items))
    if name not in sizes or set(map(len, digests)) != {sizes[name]}:
        return None
    return PackedGroup(name, b"".join(digests), sizes[name])
