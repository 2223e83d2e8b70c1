"""Private exact matching, the gateway's side (PROTOCOL.md "Private exact matching").

With a member whose Describe offers ``private.exact.v2``, exact digests (MD5,
SHA-1, SHA-256) are never sent: per item the gateway sends the bucket (a short
prefix of a hash of the digest) and an RFC 9497 blinded element, packed; the
node returns the evaluated elements and, once per distinct bucket, the
fingerprints of its OPRF outputs; here each evaluation is unblinded
(``finalize``) and looked up in its bucket, the whole batch at once. Only for
those local hits does the gateway ask the node to disclose, presenting the full
output as proof, and the node's released hits join the same merge as plain
Match answers. The node so learns bucket prefixes and counts, never a no-hit
digest, and a hit only when it is disclosed.

Perceptual hashes (PDQ, video frames) cannot be asked this way (a near match
is not an equality test) and still go by plain Match, to every member; the
member's status line says how each part was asked.

The choice is per member and per query (:class:`PrivateMode`): ``auto`` asks
privately wherever offered, ``always`` never sends an exact digest in clear (a
member without the feature is reported as not asked, in words), ``never`` is
the plain protocol. Whatever the way, the answer is a :class:`NodeAnswer`
aligned with the query's items: the merge, the JSON result and the exit codes
do not know the difference. Hedging, fail-over, deadlines and the breaker are
the fan-out's (:mod:`gateway.fanout`); this module is the per-member strategy.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import TypeVar

import grpc
import numpy as np

from federation import algorithms, buckets, protocol, tokens
from federation.query import (
    ELEMENT_BYTES,
    EMPTY_QUERY_SHA256,
    DiscloseItem,
    PrivateItem,
    QueryItem,
    disclose_sha256,
    private_match_sha256,
    private_request,
    query_sha256,
)
from federation.wire import REQUEST_ID_KEY, disclose_to_pb, items_to_pb, pb, private_request_to_pb
from gateway.answers import hit_info, unpack
from gateway.config import GatewayConfig, PrivateMode
from gateway.fanout import Attempt, Federation, ordinary
from gateway.health import HealthPolicy
from gateway.results import HitInfo, NodeAnswer, NodeStatus
from gateway.signing import Signer

FEATURE = protocol.PRIVATE_EXACT_FEATURE
SUITE = "ristretto255-SHA512"
EXACT = frozenset(a.name for a in algorithms.all_algorithms() if not a.perceptual)
# How a node refuses a private request built from a description it no longer fits.
_STALE = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


@dataclass(frozen=True)
class Offer:
    """What a node's Describe says of its private exact matching."""

    prefix_bits: int
    key_id: str
    # How its bucket answers are written (federation.buckets), and the bits of each fingerprint.
    encoding: int
    fingerprint_bits: int
    algorithms: frozenset[str]
    stored: int
    covered: int
    mean_bucket_size: float


def fingerprint_bits(encoding: int, bits: int, output_bytes: int) -> int:
    """The fingerprint width an answer states (a fixed-width answer may state only ``output_bytes``);
    ``ValueError`` (a ``BucketError``) for an encoding or a width this gateway cannot read."""
    bits = bits or (8 * output_bytes if encoding == buckets.FIXED else 0)
    buckets.check_bits(encoding, bits)
    return bits


def _oprf() -> ModuleType:
    """:mod:`federation.oprf`, imported the first time a node offers private matching: it loads
    libsodium (``rbcl``), which nothing else of a query needs, and most nodes offer none (or
    ``--no-private`` asks none privately): such a run does not pay for loading it."""
    from federation import oprf  # noqa: PLC0415 - only private matching needs it

    return oprf


def offer_of(description: pb.DescribeResponse) -> Offer | None:
    """The node's offer, or None when it offers none this gateway can use (another suite or encoding)."""
    if FEATURE not in description.features or not description.HasField("private_exact"):
        return None
    info = description.private_exact
    if info.suite != SUITE or not 1 <= info.prefix_bits <= _oprf().MAX_BUCKET_BITS:
        return None
    try:
        bits = fingerprint_bits(info.bucket_encoding, info.fingerprint_bits, info.output_bytes)
    except ValueError:
        return None
    return Offer(info.prefix_bits, info.key_id, info.bucket_encoding, bits, frozenset(info.algorithms) & EXACT,
                 info.stored, info.covered, info.mean_bucket_size)


@dataclass(frozen=True)
class Blinded:
    """One exact item made ready to ask privately. The blind never leaves this process."""

    position: int  # in the query
    input: bytes  # oprf.digest_input of the item
    blind: bytes
    item: PrivateItem  # what is sent: algorithm, bucket, prefix bits, blinded element


_In = TypeVar("_In")
_Out = TypeVar("_Out")
# Threads for a batch's blinds and finalizations: libsodium's scalar multiplications (~60 µs each,
# most of an item's cost) run without the GIL, so a batch is done sooner on a gateway with cores.
WORKERS = max(1, min(4, os.cpu_count() or 1))
_SPREAD_FROM = 512  # items: below this one thread is quicker than starting others


def _spread(function: Callable[[_In], _Out], inputs: Sequence[_In], workers: int = WORKERS) -> list[_Out]:
    """``[function(x) for x in inputs]``, in that order, on up to ``workers`` threads."""
    if workers <= 1 or len(inputs) < _SPREAD_FROM:
        return [function(x) for x in inputs]
    size = -(-len(inputs) // workers)
    chunks = [inputs[at:at + size] for at in range(0, len(inputs), size)]
    with ThreadPoolExecutor(len(chunks), thread_name_prefix="oprf") as pool:
        done = list(pool.map(lambda chunk: [function(x) for x in chunk], chunks))
    return [result for part in done for result in part]


def blind_items(items: Sequence[QueryItem], positions: Sequence[int], prefix_bits: int) -> list[Blinded]:
    """Fresh blinds for the items at ``positions`` (fresh per node and attempt: nodes cannot link them)."""
    oprf = _oprf()

    def one(position: int) -> Blinded:
        item = items[position]
        data = oprf.digest_input(item.algorithm, item.digest)
        blind, element = oprf.blind(data)
        bucket = oprf.bucket_of(data, prefix_bits)
        return Blinded(position, data, blind, PrivateItem(item.algorithm, bucket, prefix_bits, element))
    return _spread(one, list(positions))


def local_hits(blinded: Sequence[Blinded], response: pb.PrivateMatchResponse) -> list[tuple[Blinded, bytes]]:
    """The items whose output's fingerprint is in their bucket, each with its full output (the proof to disclose).

    ``ValueError`` for an answer that does not fit the request (count,
    encoding, bucket answers that do not decode, an element that is not one). A
    fingerprint shared with another stored output is a false candidate: the
    node's disclosure, which checks the full output, weeds those out.
    """
    oprf = _oprf()
    bits = fingerprint_bits(response.bucket_encoding, response.fingerprint_bits, response.output_bytes)
    evaluated = bytes(response.evaluated_elements)
    if len(evaluated) != oprf.ELEMENT_BYTES * len(blinded):
        raise ValueError(f"{len(evaluated)} bytes of evaluated elements for {len(blinded)} items "
                         f"({oprf.ELEMENT_BYTES} each)")
    def one(number: int) -> bytes:
        element = evaluated[number * oprf.ELEMENT_BYTES:(number + 1) * oprf.ELEMENT_BYTES]
        try:
            return oprf.finalize(blinded[number].input, blinded[number].blind, element)
        except oprf.OprfError as exc:
            raise ValueError(f"evaluated element: {exc}") from None
    outputs = _spread(one, range(len(blinded)))
    distinct, which = buckets.distinct(np.array([entry.item.bucket for entry in blinded], dtype=np.int64))
    members = buckets.members(bytes(response.bucket_answers), which, len(distinct), response.bucket_encoding, bits,
                              outputs)
    return [(entry, output) for entry, output, member in zip(blinded, outputs, members.tolist(), strict=True)
            if member]


def answer_bytes(entries: float, encoding: int, bits: int) -> float:
    """About how many bytes a bucket answer of ``entries`` fingerprints takes (federation.buckets):
    a 2-byte count, then fixed, ``bits / 8`` each; Elias-Fano, ``L`` low bits each and a bitmap of
    ``entries + 2^(bits - L)`` bits, where ``L = floor(log2(2^bits / entries))``."""
    if encoding == buckets.FIXED:
        return 2 + entries * bits / 8
    if entries < 1:
        return 2 + entries * (bits + 2) / 8
    return float(buckets.answer_length(max(round(entries), 1), encoding, bits))


# What one PrivateMatch answer is kept under: well below the 16 MiB a message may
# have (gateway.fanout's channels, and the node's own 15 MiB refusal), with room
# for buckets twice the mean size.
ANSWER_BUDGET = 6 * 1024 * 1024
RESULT_OVERHEAD = ELEMENT_BYTES  # an item's evaluated element


def items_per_request(offer: Offer, budget: int = ANSWER_BUDGET) -> int:
    """How many items one PrivateMatch may carry for its answer to stay within ``budget``."""
    per_item = RESULT_OVERHEAD + 2 * answer_bytes(offer.mean_bucket_size, offer.encoding, offer.fingerprint_bits)
    return max(1, int(budget // per_item))


def _answer(attempt: Attempt, hits: Sequence[tuple[HitInfo, ...]], truncated: Sequence[bool],
            message: str) -> NodeAnswer:
    node = attempt.node
    return NodeAnswer(node.node_id, node.country, NodeStatus.HIT if any(hits) else NodeStatus.NO_HIT, message,
                      hits=tuple(hits), truncated=tuple(truncated))


class Chooser:
    """The fan-out strategy: per member, private exact matching where offered (and wanted), plain Match otherwise.

    What each replica offers is learnt from its Describe once per instance
    (one run of the command) and asked again after any failed call, so a node
    that changed its key or prefix length is described afresh.
    """

    def __init__(self, mode: PrivateMode, answer_budget: int = ANSWER_BUDGET):
        self.mode = mode
        # Bytes one PrivateMatch answer is planned to stay within (items_per_request).
        self.answer_budget = answer_budget
        self._offers: dict[tuple[str, str], Offer | None] = {}

    async def __call__(self, attempt: Attempt) -> NodeAnswer:
        items = attempt.query.items
        exact = [p for p, item in enumerate(items) if item.algorithm in EXACT]
        if self.mode is PrivateMode.NEVER or not exact:
            return await ordinary(attempt)
        key = (attempt.node.node_id, attempt.address)
        fresh = key not in self._offers
        try:
            if fresh:
                self._offers[key] = await self._describe(attempt)
            offer = self._offers[key]
            missing = sorted({items[p].algorithm for p in exact} - (offer.algorithms if offer else frozenset()))
            if offer is None or missing:
                if self.mode is PrivateMode.ALWAYS:
                    return self._not_asked(attempt, offer, missing)
                return await ordinary(attempt)
            return await self._private(attempt, offer, exact)
        except grpc.aio.AioRpcError as error:
            self._offers.pop(key, None)
            if fresh or error.code() not in _STALE:
                raise
            # Described earlier in this run, and since restarted with other buckets (or a
            # rotated key): described afresh and asked once more, within the same attempt.
            return await self(attempt)
        except Exception:
            # Described afresh next time (a cancelled hedge is no reason to).
            self._offers.pop(key, None)
            raise

    async def _describe(self, attempt: Attempt) -> Offer | None:
        token = attempt.signer.token(attempt.node.node_id, "Describe", EMPTY_QUERY_SHA256, "")
        response = await attempt.stub.Describe(pb.DescribeRequest(), timeout=attempt.remaining(),
                                               metadata=(*tokens.bearer(token),
                                                         (REQUEST_ID_KEY, attempt.query.request_id)))
        protocol.check_compatible(response.protocol_version, f"node {attempt.node.node_id}")
        return offer_of(response)

    def _not_asked(self, attempt: Attempt, offer: Offer | None, missing: Sequence[str]) -> NodeAnswer:
        node = attempt.node
        why = (f"does not offer private exact matching ({FEATURE})" if offer is None
               else f"offers no private matching for {', '.join(missing)}")
        return NodeAnswer(node.node_id, node.country, NodeStatus.REFUSED,
                          f"not asked: node {why}, and --private sends no exact digest in clear")

    async def _private(self, attempt: Attempt, offer: Offer, exact: list[int]) -> NodeAnswer:
        items = attempt.query.items
        count = len(items)
        exact_set = set(exact)
        others = [p for p in range(count) if p not in exact_set]
        hits: list[tuple[HitInfo, ...]] = [()] * count
        truncated = [False] * count
        plain = asyncio.ensure_future(self._plain_part(attempt, others)) if others else None
        try:
            blinded = await asyncio.to_thread(blind_items, items, exact, offer.prefix_bits)
            # Large buckets (few prefix bits for a large store) make large answers: asked in parts.
            size = items_per_request(offer, self.answer_budget)
            # Candidates by the key their outputs are under (a rotation may switch keys between parts).
            found: dict[str, list[tuple[Blinded, bytes]]] = {}
            for start in range(0, len(blinded), size):
                response, part = await self._private_match(attempt, blinded[start:start + size])
                found.setdefault(response.key_id, []).extend(part)
            for key_id, candidates in found.items():
                if candidates:
                    await self._disclose(attempt, key_id, candidates, hits, truncated)
            if plain is not None:
                for position, (item_hits, cut) in zip(others, await plain, strict=True):
                    hits[position], truncated[position] = item_hits, cut
        finally:
            if plain is not None and not plain.done():
                plain.cancel()
            elif plain is not None and not plain.cancelled():
                plain.exception()  # retrieved: the private part's error is the one reported
        words = (f"private exact matching: {len(exact)} item(s) by bucket of {response.prefix_bits} bits "
                 f"(~{offer.mean_bucket_size:,.0f} stored digests each)")
        if response.covered < response.stored:
            words += f"; its outputs cover {response.covered:,} of {response.stored:,} stored exact digests"
        if others:
            words += f"; {len(others)} perceptual item(s) in clear (they cannot be matched privately)"
        self._offers[(attempt.node.node_id, attempt.address)] = Offer(
            response.prefix_bits, response.key_id, response.bucket_encoding,
            fingerprint_bits(response.bucket_encoding, response.fingerprint_bits, response.output_bytes),
            offer.algorithms, response.stored, response.covered, offer.mean_bucket_size)
        return _answer(attempt, hits, truncated, words)

    async def _private_match(self, attempt: Attempt,
                             blinded: list[Blinded]) -> tuple[pb.PrivateMatchResponse, list[tuple[Blinded, bytes]]]:
        """Step 1 for some items: the node's answer, and the items found in their buckets."""
        request = private_request([b.item for b in blinded])
        response = await attempt.stub.PrivateMatch(
            private_request_to_pb(request), timeout=attempt.remaining(),
            metadata=attempt.metadata("PrivateMatch", private_match_sha256(request)))
        protocol.check_compatible(response.protocol_version, f"node {attempt.node.node_id}")
        if response.node_id != attempt.node.node_id:
            raise ValueError(f"answer is from node {response.node_id!r}")
        return response, await asyncio.to_thread(local_hits, blinded, response)

    async def _plain_part(self, attempt: Attempt, positions: list[int]) -> list[tuple[tuple[HitInfo, ...], bool]]:
        """The perceptual items by plain Match (their own token over just them), per position."""
        items = [attempt.query.items[p] for p in positions]
        response = await attempt.stub.Match(items_to_pb(items), timeout=attempt.remaining(),
                                            metadata=attempt.metadata("Match", query_sha256(items)))
        protocol.check_compatible(response.protocol_version, f"node {attempt.node.node_id}")
        hits, truncated = unpack(response, attempt.node, len(items))
        return list(zip(hits, truncated, strict=True))

    async def _disclose(self, attempt: Attempt, key_id: str, found: list[tuple[Blinded, bytes]],
                        hits: list[tuple[HitInfo, ...]], truncated: list[bool]) -> None:
        """Step 2: the local hits' details, released against their full outputs."""
        request = [DiscloseItem(entry.item.algorithm, output) for entry, output in found]
        response = await attempt.stub.Disclose(
            disclose_to_pb(key_id, request), timeout=attempt.remaining(),
            metadata=attempt.metadata("Disclose", disclose_sha256(key_id, request)))
        protocol.check_compatible(response.protocol_version, f"node {attempt.node.node_id}")
        if response.node_id != attempt.node.node_id:
            raise ValueError(f"answer is from node {response.node_id!r}")
        previous = -1
        for result in response.results:
            if not previous < result.item < len(found):
                raise ValueError(f"disclosed item position {result.item} out of order or range")
            previous = result.item
            position = found[result.item][0].position
            hits[position] = tuple(hit_info(h) for h in result.hits)
            truncated[position] = result.truncated


def federation(config: GatewayConfig, signer: Signer, health: HealthPolicy | None = None) -> Federation:
    """The fan-out as the configuration (and ``--private``/``--no-private``) wants members asked."""
    return Federation(config, signer, health, strategy=Chooser(config.private))


__all__ = ["EXACT", "FEATURE", "Blinded", "Chooser", "Offer", "blind_items", "federation", "local_hits",
           "offer_of"]
