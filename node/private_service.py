"""Private exact matching on the node: the ``PrivateMatch`` and ``Disclose`` RPCs.

Same front door as ``Match`` (node.service): the signed token (its ``qh`` over
the private request, federation.query), the release policy, the rate limit and
the daily quota counting items, an audit record before any answer leaves.
What differs is what the node learns and therefore what it can record:

- ``PrivateMatch``: per item a bucket (a ``prefix_bits`` prefix of a hash of
  the digest) and a blinded element, packed per algorithm. The node evaluates
  each element with its key and returns the fingerprints of each distinct
  bucket once; it never sees the digest and does not know whether the item
  hit. Its audit record and log line hold counts only: no digest, no bucket,
  no hit flag.
- ``Disclose``: per item the full OPRF output the gateway unblinded. Only an
  output the node holds (constant-time comparison of all 64 bytes) releases its
  row, at the requester's tier, and is audited as a hit with its reference, as
  ``Match`` does. Any other proof finds nothing and is answered exactly like a
  no-hit (left out of the results), so a forger learns nothing beyond "no hit".
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from federation import algorithms, buckets, oprf, protocol
from federation.query import (
    DiscloseItem,
    PrivateRequest,
    QueryItem,
    bucket_width,
    disclose_sha256,
    private_match_sha256,
)
from federation.tokens import QueryClaims
from federation.wire import disclose_items_from_pb, pb, private_request_from_pb
from node import private_key, private_view
from node.alerts import ReleasedHit
from node.audit import AuditEntry
from node.config import NodeConfig, PrivateSettings
from node.policy import PolicyRefusal
from node.private_view import PrivateView
from node.segment_set import SegmentSet
from node.service import _TIERS, Malformed, NodeService, Refused, _internal, request_id, unary_handlers

log = logging.getLogger("icse.node")
_T = TypeVar("_T")

FEATURE = protocol.PRIVATE_EXACT_FEATURE
_KEY_ID = re.compile(r"[0-9a-f]{16}")


class PrivateMode:
    """The node's private-matching state: its settings, its keys (the key file is
    re-read when it changes: a rotation switches keys while the node serves) and
    the view of the current generation under them (built once per generation)."""

    def __init__(self, settings: PrivateSettings, store: Path):
        self.settings = settings
        self._store = store
        self._stamp: tuple[int, int, int] | None = None
        self._keys: private_key.PrivateKeys | None = None
        self._view: PrivateView | None = None
        self._tables = private_view.Tables()

    def keys(self) -> private_key.PrivateKeys | None:
        try:
            status = os.stat(private_key.key_path(self._store))
            stamp = (status.st_mtime_ns, status.st_size, status.st_ino)
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp != self._stamp:
            self._keys = private_key.load(self._store)
            self._stamp = stamp
            self._view = None
        return self._keys

    def view(self, live: SegmentSet) -> PrivateView | None:
        keys = self.keys()
        if keys is None:
            return None
        if self._view is None or self._view.generation != live.generation or self._view.key_id != keys.active_id:
            self._view = private_view.build(live, keys, self._tables)
        return self._view

    def info(self, live: SegmentSet) -> pb.PrivateInfo | None:
        """Describe's ``private_exact``; None when private matching is off, has no key yet, or
        its key file is damaged (logged: Describe itself must keep answering)."""
        try:
            view = self.view(live) if self.settings.enabled else None
        except private_key.KeyFileError as exc:
            log.error("private matching unavailable", extra={"reason": str(exc)})
            return None
        if view is None:
            return None
        bits = self.settings.prefix_bits
        mean = private_view.mean_bucket_size(view.covered, bits)
        fingerprint = self.settings.bits(mean)
        return pb.PrivateInfo(suite=oprf.SUITE, prefix_bits=bits, key_id=view.key_id, stored=view.stored,
                              covered=view.covered, output_bytes=output_bytes(self.settings),
                              mean_bucket_size=mean, algorithms=list(private_view.EXACT),
                              bucket_encoding=_WIRE_ENCODING[self.settings.encoding],
                              fingerprint_bits=fingerprint, false_candidate_rate=mean / 2.0 ** fingerprint)


def encoding_of(settings: PrivateSettings) -> int:
    return buckets.FIXED if settings.encoding == "fixed" else buckets.ELIAS_FANO


_WIRE_ENCODING = {"fixed": pb.PRIVATE_BUCKET_ENCODING_FIXED, "elias-fano": pb.PRIVATE_BUCKET_ENCODING_ELIAS_FANO}


def output_bytes(settings: PrivateSettings) -> int:
    """``output_bytes`` on the wire: the fixed encoding's width, 0 with another encoding."""
    return settings.output_bytes if settings.encoding == "fixed" else 0


@dataclass(frozen=True)
class Answer:
    response: pb.PrivateMatchResponse | pb.DiscloseResponse
    claims: QueryClaims
    references: tuple[str, ...] = ()
    # Disclose: the hits released, for the holder's alerts (node.alerts), as Match's are.
    released: tuple[ReleasedHit, ...] = ()


class InvalidPrivateRequest(ValueError):
    """A private request the node refuses to evaluate; the message names the bad item."""


# A PrivateMatch answer must fit the node's 16 MiB message limit (node.server): buckets are
# large when prefix_bits is small for the store's size, so the answer is measured first.
MAX_ANSWER_BYTES = 15 * 1024 * 1024
ITEM_OVERHEAD = oprf.ELEMENT_BYTES  # the evaluated element of one item


class AnswerTooLarge(ValueError):
    """The buckets asked for do not fit one answer; the message says how many items would."""


def check_answer_size(items: int, answers: int, limit: int = MAX_ANSWER_BYTES) -> None:
    """``answers``: bytes of the bucket answers of ``items`` items."""
    size = answers + ITEM_OVERHEAD * items
    if size > limit:
        fits = max(1, items * limit // size)
        raise AnswerTooLarge(f"the answer to these {items:,} items would be {size:,} bytes, over this "
                             f"node's {limit:,}-byte limit (its buckets are large): send at most about "
                             f"{fits:,} items per request")


def _counted(names: Iterable[str]) -> list[QueryItem]:
    """Items for a refusal's audit record: their algorithms and number, no digest (there is none)."""
    return [QueryItem(name, b"") for name in names]


@dataclass(frozen=True)
class Asked:
    """A validated PrivateMatch request: every item's bucket and blinded element, in item-list order."""

    buckets: np.ndarray  # int64
    blinded: list[bytes]


def validate_private(request: PrivateRequest, settings: PrivateSettings, max_items: int) -> Asked:
    bits = settings.prefix_bits
    if request.prefix_bits != bits:
        raise InvalidPrivateRequest(f"buckets of {request.prefix_bits} bits; this node's buckets have {bits} bits "
                                    f"(Describe, private_exact.prefix_bits)")
    try:
        count = request.count()
    except ValueError as exc:
        raise InvalidPrivateRequest(str(exc)) from None
    _check_count(count, max_items)
    width = bucket_width(bits)
    found: list[np.ndarray] = []
    blinded: list[bytes] = []
    position = 0
    for number, group in enumerate(request.groups):
        _check_algorithm(f"group {number}", group.algorithm)
        raw = np.frombuffer(group.buckets, dtype=np.uint8).reshape(-1, width).astype(np.int64)
        values = np.zeros(len(raw), dtype=np.int64)
        for column in range(width):
            values = (values << 8) | raw[:, column]
        too_large = np.flatnonzero(values >= 1 << bits)
        if len(too_large):
            at = int(too_large[0])
            raise InvalidPrivateRequest(f"item {position + at}: bucket {int(values[at])} does not fit in {bits} bits")
        data = group.blinded
        elements = [data[i:i + oprf.ELEMENT_BYTES] for i in range(0, len(data), oprf.ELEMENT_BYTES)]
        for at, element in enumerate(elements):
            try:
                oprf.check_element(element, "blinded element")
            except oprf.OprfError as exc:
                raise InvalidPrivateRequest(f"item {position + at}: {exc}") from None
        found.append(values)
        blinded += elements
        position += len(values)
    return Asked(np.concatenate(found) if found else np.zeros(0, dtype=np.int64), blinded)


def validate_disclose(key_id: str, items: Sequence[DiscloseItem], max_items: int) -> None:
    if not _KEY_ID.fullmatch(key_id):
        raise InvalidPrivateRequest("key_id must be 16 lowercase hex digits (PrivateMatchResponse.key_id)")
    _check_count(len(items), max_items)
    for position, item in enumerate(items):
        _check_algorithm(f"item {position}", item.algorithm)
        if len(item.output) != oprf.OUTPUT_BYTES:
            raise InvalidPrivateRequest(f"item {position}: output is {len(item.output)} bytes; a proof is the "
                                        f"whole {oprf.OUTPUT_BYTES}-byte OPRF output")


def _check_count(count: int, max_items: int) -> None:
    if not count:
        raise InvalidPrivateRequest("request has no items")
    if count > max_items:
        raise InvalidPrivateRequest(f"request has {count} items; this node accepts at most {max_items}")


def _check_algorithm(where: str, name: str) -> None:
    if name not in private_view.EXACT:
        shown = name[:32].encode("unicode_escape").decode("ascii")
        known = "a perceptual algorithm" if name in algorithms.names() else "not a registered algorithm"
        raise InvalidPrivateRequest(f"{where}: algorithm {shown!r} is {known}; private matching takes "
                                    f"exact digests only ({', '.join(private_view.EXACT)})")


class PrivateService:
    """The two RPCs, composed with the node's ``NodeService`` for authentication,
    refusals and hits (one front door, one audit log)."""

    def __init__(self, node: NodeService, mode: PrivateMode, config: NodeConfig):
        self._node = node
        self._mode = mode
        self._config = config

    async def PrivateMatch(self, request: pb.PrivateMatchRequest | Malformed,
                           context: grpc.aio.ServicerContext) -> pb.PrivateMatchResponse:
        started = time.perf_counter()
        if isinstance(request, Malformed):
            await self._node._refuse_malformed(context, "PrivateMatch", "icse.v1.PrivateMatchRequest", started)
        asked = private_request_from_pb(request)
        counted: Counter[str] = Counter()
        for group in asked.groups:
            counted[group.algorithm] += len(group.blinded) // oprf.ELEMENT_BYTES
        answer = await self._answer(context, "PrivateMatch", started, self._private_match(asked, context),
                                    _counted(counted.elements()))
        await self._record(context, "PrivateMatch", answer, sum(counted.values()), counted, started,
                           f"private: {self._mode.settings.prefix_bits}-bit buckets; hits are not known to the node")
        assert isinstance(answer.response, pb.PrivateMatchResponse)
        return answer.response

    async def Disclose(self, request: pb.DiscloseRequest | Malformed,
                       context: grpc.aio.ServicerContext) -> pb.DiscloseResponse:
        started = time.perf_counter()
        if isinstance(request, Malformed):
            await self._node._refuse_malformed(context, "Disclose", "icse.v1.DiscloseRequest", started)
        items = disclose_items_from_pb(request)
        answer = await self._answer(context, "Disclose", started, self._disclose(request.key_id, items, context),
                                    _counted(i.algorithm for i in items))
        await self._record(context, "Disclose", answer, len(items), Counter(i.algorithm for i in items), started)
        if self._node._alerts is not None:  # the holder's desk hears of hits released privately too
            await self._node._alerts.record(answer.claims, request_id(context), answer.released)
        assert isinstance(answer.response, pb.DiscloseResponse)
        return answer.response

    async def _answer(self, context: grpc.aio.ServicerContext, method: str, started: float,
                      work: Coroutine[object, object, Answer], counted: Sequence[QueryItem]) -> Answer:
        """Runs one call's work, turning a refusal or a defect into its audited gRPC status
        (the record counts the items and names their algorithms, nothing more)."""
        try:
            return await work
        except Refused as refusal:
            await self._node._refuse(context, method, counted, refusal, started)
        except Exception as exc:  # noqa: BLE001 - a defect, not the caller's fault: audited INTERNAL
            await self._node._refuse(context, method, counted, _internal(context, exc), started)

    async def _record(self, context: grpc.aio.ServicerContext, method: str, answer: Answer, items: int,
                      asked: Counter[str], started: float, detail: str = "") -> None:
        """The audit record (durable before the answer leaves), metrics and a log line: counts only."""
        claims = answer.claims
        await self._node.recorded(context, AuditEntry(
            time="", gateway=claims.issuer, officer=claims.subject, org=claims.org, country=claims.country,
            case=claims.case, rpc=method, items=items, algorithms=tuple(sorted(a[:16] for a in asked)[:8]),
            hits=len(answer.references), references=answer.references, status="OK", detail=detail,
            token_id=claims.token_id, peer=context.peer(), key_id=claims.key_id))
        elapsed = time.perf_counter() - started
        self._node._metrics.answered(method, asked, len(answer.references), elapsed)
        extra: dict[str, object] = {
            "request_id": request_id(context), "rpc": method, "gateway": claims.issuer,
            "officer": claims.subject, "org": claims.org, "requester_country": claims.country,
            "case": claims.case, "items": items, "ms": round(elapsed * 1000, 1)}
        if method == "Disclose":  # PrivateMatch's hits are not known to the node
            extra["hits"] = len(answer.references)
        log.info("answered", extra=extra)

    def _admit(self, claims: QueryClaims, items: int, check: Callable[[], _T]) -> _T:
        """Policy, then validation (its result returned), then the charge (a refused request is not charged)."""
        if not self._mode.settings.enabled:
            raise Refused(grpc.StatusCode.UNIMPLEMENTED,
                          f"this node does not offer private matching ({FEATURE}); use Match", claims)
        try:
            self._node._admission.permit(claims)
            checked = check()
            self._node._admission.consume(claims, items)
            return checked
        except PolicyRefusal as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.exhausted else grpc.StatusCode.PERMISSION_DENIED
            raise Refused(code, str(exc), claims) from None
        except InvalidPrivateRequest as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), claims) from None

    async def _view(self, claims: QueryClaims) -> tuple[SegmentSet, PrivateView]:
        current = await self._node._current(claims)
        try:
            view = self._mode.view(current)
        except private_key.KeyFileError as exc:
            log.error("private matching unavailable", extra={"reason": str(exc)})
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          "this node's OPRF key file is damaged; its operator must restore it", claims) from None
        if view is None:
            raise Refused(grpc.StatusCode.UNAVAILABLE,
                          "this node has no OPRF key yet (it is created when the node starts with private "
                          "matching enabled); try again later", claims)
        return current, view

    async def _private_match(self, request: PrivateRequest, context: grpc.aio.ServicerContext) -> Answer:
        claims = self._node._authorize(context, "PrivateMatch", private_match_sha256(request))
        settings = self._mode.settings
        asked = self._admit(claims, sum(len(g.blinded) // oprf.ELEMENT_BYTES for g in request.groups),
                            lambda: validate_private(request, settings, self._config.limits.max_items))
        current, view = await self._view(claims)
        fingerprint_bits = settings.bits(private_view.mean_bucket_size(view.covered, settings.prefix_bits))

        def work() -> tuple[bytes, private_view.BucketAnswers]:
            answers = view.bucket_answers(asked.buckets, settings.prefix_bits, encoding_of(settings), fingerprint_bits)
            check_answer_size(len(asked.blinded), len(answers.data))  # before the scalar multiplications
            return oprf.blind_evaluate_many(view.secret, asked.blinded), answers

        try:
            evaluated, answers = await asyncio.to_thread(work)
        except AnswerTooLarge as exc:
            raise Refused(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), claims) from None
        response = pb.PrivateMatchResponse(
            node_id=self._config.node_id, country=self._config.country, key_id=view.key_id,
            generation=current.generation, output_bytes=output_bytes(settings), prefix_bits=settings.prefix_bits,
            stored=view.stored, covered=view.covered, protocol_version=protocol.VERSION,
            bucket_encoding=_WIRE_ENCODING[settings.encoding], fingerprint_bits=fingerprint_bits,
            evaluated_elements=evaluated, bucket_answers=answers.data)
        return Answer(response, claims)

    async def _disclose(self, key_id: str, items: Sequence[DiscloseItem],
                        context: grpc.aio.ServicerContext) -> Answer:
        claims = self._node._authorize(context, "Disclose", disclose_sha256(key_id, items))
        self._admit(claims, len(items), lambda: validate_disclose(key_id, items, self._config.limits.max_items))
        tier = self._node._admission.permit(claims)
        current, view = await self._view(claims)
        if key_id not in view.by_key:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this node no longer holds outputs under key {key_id} (its key was rotated; it now "
                          f"answers under {view.key_id}): ask PrivateMatch again", claims)
        found = await asyncio.to_thread(view.disclose, key_id, [(i.algorithm, i.output) for i in items])
        wanted = [rid for rid in found if rid is not None]
        records = await asyncio.to_thread(current.records, wanted) if wanted else {}
        response = pb.DiscloseResponse(node_id=self._config.node_id, country=self._config.country,
                                       tier=_TIERS[tier], protocol_version=protocol.VERSION)
        references, released = [], []
        for position, rid in enumerate(found):
            if rid is not None and rid in records:
                stored = records[rid]
                references.append(self._node._hit(response.results.add(item=position).hits, stored, 0, None, tier))
                # A proven exact hit: the stored digest is the requester's.
                released.append(ReleasedHit(position, items[position].algorithm, stored.record.digest,
                                            stored.record, 0, None, tier.value))
        return Answer(response, claims, tuple(references), tuple(released))


def handlers(service: PrivateService) -> grpc.GenericRpcHandler:
    """The private RPCs' handlers, served beside node.service's."""
    return unary_handlers({
        "PrivateMatch": (service.PrivateMatch, pb.PrivateMatchRequest, pb.PrivateMatchResponse),
        "Disclose": (service.Disclose, pb.DiscloseRequest, pb.DiscloseResponse)})
