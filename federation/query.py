"""Query items and their canonical digest (``qh``, PROTOCOL.md "The query digest").

The digest binds a signed token to exactly the items it was issued for. It is
computed from the items' values, never from protobuf bytes (whose encoding is
not canonical), so gateway and node arrive at the same value independently.

The encoding is length-prefixed binary, not JSON: every language reproduces it
byte for byte without a JSON library's escaping rules (Python's ``json.dumps``
escapes non-ASCII, JavaScript's ``JSON.stringify`` does not). It is, in order::

    "icse.v1.match" 0x00                      domain tag; "v1" is the protocol's major version
    u32be(number of items)
    per item, in request order (plain items, then packed groups' digests):
        u32be(len(algorithm_utf8)) algorithm_utf8   the name exactly as sent, no normalisation
        u32be(len(digest)) digest                   the raw digest bytes
        u32be(max_distance)
    only when since_generation is not 0:
        "since" 0x00 u64be(since_generation)    a Match restricted to rows published after it

and ``qh`` is the lowercase hex SHA-256 of those bytes. Describe carries no
items: its ``qh`` is the digest of zero items. The trailer is appended only
for a non-zero ``since_generation``, so every digest of protocol 1.0 (which
has no such field) is unchanged, and a token for a restricted query never
verifies an unrestricted one (or one restricted otherwise).

Packed exact items (PROTOCOL.md "Packed exact items") are items too: a request's
item list is its ``QueryItem`` s, then each packed group's digests in order, and
the encoding above is of that list. A packed digest is encoded exactly as the
``QueryItem(algorithm, digest, 0)`` it stands for, so the same items have the
same ``qh`` packed or not, and a node that ignores packed groups (it does not
offer the feature) computes another ``qh`` and refuses the token instead of
answering "no hit" for digests it never saw. A group's bytes are built as one
array (``numpy``), not item by item; ``numpy`` is imported by the first
packed group, not with this module, which every process of a triage (its
hashing processes too) imports for :class:`QueryItem` alone.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from federation import protocol

if TYPE_CHECKING:
    import numpy as np

DOMAIN_TAG = f"icse.v{protocol.MAJOR}.match".encode("ascii") + b"\x00"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
SINCE_TAG = b"since\x00"
# The Describe feature name of a node that honours ``since_generation`` (PROTOCOL.md, "Features").
SINCE_GENERATION_FEATURE = "match.since-generation"
# The Describe feature name of a node that accepts ``MatchRequest.packed`` (PROTOCOL.md, "Features").
PACKED_EXACT_FEATURE = "match.packed-exact"


class QueryItem(NamedTuple):
    """One digest to look up. ``algorithm`` is as received, not yet validated.

    A named tuple because batches hold tens of thousands of them.
    """

    algorithm: str
    digest: bytes
    max_distance: int = 0

    def tagged(self) -> str:
        return f"{self.algorithm}:{self.digest.hex()}"


@dataclass(frozen=True, slots=True)
class PackedGroup:
    """Exact digests of one algorithm as one byte string, each ``size`` bytes:
    the items ``QueryItem(algorithm, digests[i*size:(i+1)*size], 0)``.

    ``size`` is the algorithm's digest size, known to both sides from the
    algorithm's name (``federation.algorithms``); it is not on the wire.
    """

    algorithm: str
    digests: bytes
    size: int

    def __post_init__(self) -> None:
        if self.size <= 0 or len(self.digests) % self.size:
            raise ValueError(f"packed {self.algorithm[:32]!r} digests are {len(self.digests)} bytes, "
                             f"not a whole number of {self.size}-byte digests")

    @property
    def count(self) -> int:
        return len(self.digests) // self.size

    def array(self) -> np.ndarray:
        """The digests as a fixed-width byte-string array (a view of ``digests``, no copy)."""
        import numpy as np  # noqa: PLC0415 - see the module's docstring

        return np.frombuffer(self.digests, dtype=f"S{self.size}")

    def digest(self, offset: int) -> bytes:
        return self.digests[offset * self.size:(offset + 1) * self.size]


def item_count(items: Sequence[QueryItem], packed: Sequence[PackedGroup] = ()) -> int:
    return len(items) + sum(group.count for group in packed)


def canonical_bytes(items: Sequence[QueryItem], since_generation: int = 0, *,
                    packed: Sequence[PackedGroup] = ()) -> bytes:
    """The exact bytes ``qh`` hashes (see the module docstring).

    ``ValueError`` for what the encoding cannot hold (a length or distance of
    2^32 or more, a generation of 2^64 or more; protobuf's own limits keep real
    requests far below).
    """
    return b"".join(_encoded(items, packed, since_generation))


def _encoded(items: Sequence[QueryItem], packed: Sequence[PackedGroup],
             since_generation: int = 0) -> Iterator[bytes | memoryview]:
    """The items (plain, then each packed group's), then the ``since`` trailer if any."""
    yield b"".join(_item_parts(items, item_count(items, packed)))
    for group in packed:
        if group.count:
            yield _packed_records(group)
    if since_generation:
        if not 0 < since_generation <= U64_MAX:
            raise ValueError("since_generation does not fit the query digest's encoding")
        yield SINCE_TAG + _U64.pack(since_generation)


def _packed_records(group: PackedGroup) -> memoryview:
    """A group's items, encoded as ``_item_parts`` would encode them one by one, as one array."""
    name = group.algorithm.encode("utf-8")
    if len(name) > U32_MAX or group.size > U32_MAX:
        raise ValueError("query item does not fit the query digest's encoding")
    import numpy as np  # noqa: PLC0415 - see the module's docstring

    head = np.frombuffer(_U32.pack(len(name)) + name + _U32.pack(group.size), dtype=np.uint8)
    records = np.zeros((group.count, len(head) + group.size + 4), dtype=np.uint8)  # max_distance u32 0 at the end
    records[:, :len(head)] = head
    records[:, len(head):len(head) + group.size] = np.frombuffer(group.digests, np.uint8).reshape(-1, group.size)
    return memoryview(records.data).cast("B")


def _item_parts(items: Sequence[QueryItem], count: int) -> list[bytes]:
    pack = _U32.pack
    if count > U32_MAX:
        raise ValueError("query item does not fit the query digest's encoding")
    parts = [DOMAIN_TAG, pack(count)]
    # The bytes before a digest repeat for every item of one kind: encoded once per (name, length).
    heads: dict[tuple[str, int], bytes] = {}
    zero = pack(0)
    for algorithm, digest, max_distance in items:
        head = heads.get((algorithm, len(digest)))
        if head is None:
            name = algorithm.encode("utf-8")
            if len(name) > U32_MAX or len(digest) > U32_MAX:
                raise ValueError("query item does not fit the query digest's encoding")
            head = heads[algorithm, len(digest)] = pack(len(name)) + name + pack(len(digest))
        if max_distance and not 0 <= max_distance <= U32_MAX:
            raise ValueError("query item does not fit the query digest's encoding")
        parts += (head, digest, pack(max_distance) if max_distance else zero)
    return parts


def query_sha256(items: Sequence[QueryItem], since_generation: int = 0, *,
                 packed: Sequence[PackedGroup] = ()) -> str:
    """``qh``: lowercase hex SHA-256 of ``canonical_bytes(items, since_generation, packed=packed)``."""
    digest = hashlib.sha256()
    for part in _encoded(items, packed, since_generation):
        digest.update(part)
    return digest.hexdigest()


# Describe's ``qh``: the digest of no items.
EMPTY_QUERY_SHA256 = query_sha256(())


# Private exact matching (PROTOCOL.md, "Private exact matching"): the same
# length-prefixed style over what a private request asks, with its own domain tag
# so that no token for one kind of request verifies another.
PRIVATE_MATCH_TAG = f"icse.v{protocol.MAJOR}.private-match.v2".encode("ascii") + b"\x00"
DISCLOSE_TAG = f"icse.v{protocol.MAJOR}.disclose".encode("ascii") + b"\x00"
ELEMENT_BYTES = 32


def bucket_width(prefix_bits: int) -> int:
    """Bytes of one packed bucket number: ``ceil(prefix_bits / 8)``."""
    return (prefix_bits + 7) // 8


class PrivateGroup(NamedTuple):
    """The private membership questions of one algorithm, packed (no digest): each item's bucket
    as ``bucket_width`` bytes big-endian, concatenated, and its blinded element (32 bytes),
    concatenated in the same order."""

    algorithm: str
    buckets: bytes
    blinded: bytes


@dataclass(frozen=True)
class PrivateRequest:
    """A PrivateMatch request: its item list is the groups' items, group after group."""

    prefix_bits: int
    groups: tuple[PrivateGroup, ...]

    def count(self) -> int:
        """Items in the item list (``ValueError`` if a group's fields disagree on it)."""
        width = bucket_width(self.prefix_bits) if self.prefix_bits else 0
        total = 0
        for number, group in enumerate(self.groups):
            if not width or len(group.buckets) % width:
                raise ValueError(f"group {number}: buckets are {len(group.buckets)} bytes, not a whole number of "
                                 f"{width or '?'}-byte buckets of {self.prefix_bits} bits")
            items = len(group.buckets) // width
            if len(group.blinded) != items * ELEMENT_BYTES:
                raise ValueError(f"group {number}: {items} buckets but {len(group.blinded)} bytes of blinded "
                                 f"elements ({ELEMENT_BYTES} each)")
            total += items
        return total


class PrivateItem(NamedTuple):
    """One private membership question, as a gateway makes it: the bucket and a blinded element
    (no digest). Sent packed (``private_request``)."""

    algorithm: str
    bucket: int
    prefix_bits: int
    blinded: bytes


def private_request(items: Sequence[PrivateItem]) -> PrivateRequest:
    """The request asking ``items`` in this order: each run of one algorithm is one group (so the
    item list is ``items`` itself). ``ValueError`` if the items disagree on ``prefix_bits``, or
    a bucket or an element does not fit."""
    bits = items[0].prefix_bits if items else 0
    width = bucket_width(bits) if bits else 0
    groups: list[PrivateGroup] = []
    start = 0
    for end in range(1, len(items) + 1):
        if end < len(items) and items[end].algorithm == items[start].algorithm:
            continue
        run = items[start:end]
        if any(i.prefix_bits != bits for i in run):
            raise ValueError("private items of one request share one prefix_bits")
        if any(not 0 <= i.bucket < 1 << (8 * width) for i in run):
            raise ValueError(f"a bucket does not fit in {width} bytes")
        groups.append(PrivateGroup(run[0].algorithm, b"".join(i.bucket.to_bytes(width, "big") for i in run),
                                   b"".join(bytes(i.blinded) for i in run)))
        start = end
    return PrivateRequest(bits, tuple(groups))


def private_items(request: PrivateRequest) -> list[PrivateItem]:
    """The item list of a request (``ValueError`` as ``PrivateRequest.count``)."""
    request.count()
    width = bucket_width(request.prefix_bits)
    items = []
    for group in request.groups:
        for at in range(0, len(group.buckets), width):
            number = at // width
            items.append(PrivateItem(group.algorithm, int.from_bytes(group.buckets[at:at + width], "big"),
                                     request.prefix_bits,
                                     bytes(group.blinded[number * ELEMENT_BYTES:(number + 1) * ELEMENT_BYTES])))
    return items


class DiscloseItem(NamedTuple):
    """One disclosure request: the full OPRF output that proves a hit."""

    algorithm: str
    output: bytes


def _field(data: bytes) -> list[bytes]:
    if len(data) > U32_MAX:
        raise ValueError("field does not fit the query digest's encoding")
    return [_U32.pack(len(data)), data]


def private_match_bytes(request: PrivateRequest) -> bytes:
    """``"icse.v1.private-match.v2" 0x00 || u32be(prefix_bits) || u32be(number of groups)`` then per
    group ``u32be(len(algorithm_utf8)) algorithm_utf8 || u32be(len(buckets)) buckets ||
    u32be(len(blinded)) blinded``: the request's bytes as sent, so a node hashes them whole."""
    if not 0 <= request.prefix_bits <= U32_MAX:
        raise ValueError("prefix_bits does not fit the query digest's encoding")
    parts = [PRIVATE_MATCH_TAG, _U32.pack(request.prefix_bits), _U32.pack(len(request.groups))]
    for group in request.groups:
        parts += [*_field(group.algorithm.encode("utf-8")), *_field(bytes(group.buckets)),
                  *_field(bytes(group.blinded))]
    return b"".join(parts)


def disclose_bytes(key_id: str, items: Sequence[DiscloseItem]) -> bytes:
    """``"icse.v1.disclose" 0x00 || u32be(len(key_id_utf8)) key_id_utf8 || u32be(n)`` then per
    item ``u32be(len(algorithm_utf8)) algorithm_utf8 || u32be(len(output)) output``."""
    parts = [DISCLOSE_TAG, *_field(key_id.encode("utf-8")), _U32.pack(len(items))]
    for item in items:
        parts += [*_field(item.algorithm.encode("utf-8")), *_field(bytes(item.output))]
    return b"".join(parts)


def private_match_sha256(request: PrivateRequest) -> str:
    """``qh`` of a PrivateMatch request."""
    return hashlib.sha256(private_match_bytes(request)).hexdigest()


def disclose_sha256(key_id: str, items: Sequence[DiscloseItem]) -> str:
    """``qh`` of a Disclose request."""
    return hashlib.sha256(disclose_bytes(key_id, items)).hexdigest()
