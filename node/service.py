"""The gRPC face of a node: authenticate, apply policy, validate, match, answer.

Thin on purpose: decisions live in ``auth``, ``policy`` and ``matcher``; this
module maps their outcomes to gRPC statuses and protobuf messages, and makes
sure every outcome is in the audit log before the answer leaves.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import numpy as np
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from google.protobuf.message import DecodeError

import federation
from federation import protocol
from federation.query import (
    PACKED_EXACT_FEATURE,
    SINCE_GENERATION_FEATURE,
    PackedGroup,
    QueryItem,
    item_count,
    query_sha256,
)
from federation.tokens import QueryClaims
from federation.wire import REQUEST_ID_KEY, SERVICE_NAME, BadPacking, items_from_pb, packed_from_pb, pb, rpc
from node import matcher
from node.alerts import Alerts, ReleasedColumns
from node.audit import AuditEntry, AuditLog
from node.auth import Authenticator, AuthError
from node.config import NodeConfig
from node.hits import Asked, HitWriter
from node.live_index import LiveIndexes
from node.metrics import NodeMetrics
from node.policy import Admission, PolicyRefusal, Tier
from node.records import StoredRecord
from node.segment import SegmentCorrupt
from node.segment_set import SegmentSet

log = logging.getLogger("icse.node")

_TIERS = {Tier.HIT: pb.RELEASE_TIER_HIT, Tier.STANDARD: pb.RELEASE_TIER_STANDARD}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The optional protocol features this node offers, listed in Describe (PROTOCOL.md, "Features").
FEATURES = [SINCE_GENERATION_FEATURE, PACKED_EXACT_FEATURE]


def request_id(context: grpc.aio.ServicerContext) -> str:
    """The caller's request id (links gateway and node log lines), or a new one."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID_KEY and isinstance(value, str) and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


class Malformed:
    """Stands for request bytes that are not the message they claim to be."""


MALFORMED = Malformed()


class Refused(Exception):
    """Ends a call with ``code``; raised inside the service, audited once."""

    def __init__(self, code: grpc.StatusCode, message: str, claims: QueryClaims | None = None, gateway: str = ""):
        super().__init__(message)
        self.code = code
        self.claims = claims
        self.gateway = gateway


def _entry(rpc_name: str, items: Sequence[QueryItem], claims: QueryClaims | None, gateway: str, peer: str,
           status: str, detail: str = "", references: Sequence[str] = (), since_generation: int = 0,
           rows_searched: int = 0, packed: Sequence[PackedGroup] = ()) -> AuditEntry:
    """The audit record of one call. Never the digests asked about."""
    return AuditEntry(
        time="",
        gateway=claims.issuer if claims else gateway,
        officer=claims.subject if claims else "",
        org=claims.org if claims else "",
        country=claims.country if claims else "",
        case=claims.case if claims else "",
        rpc=rpc_name,
        items=item_count(items, packed),
        algorithms=tuple(sorted({i.algorithm[:16] for i in items} | {g.algorithm[:16] for g in packed if g.count})[:8]),
        hits=len(references),
        references=tuple(references),
        status=status,
        detail=detail,
        token_id=claims.token_id if claims else "",
        peer=peer,
        key_id=claims.key_id if claims else "",
        since_generation=since_generation,
        rows_searched=rows_searched,
    )


@dataclass(frozen=True)
class _Answer:
    """What a Match released: the response, who asked, the references, the hits for the holder's alerts,
    and how many stored rows the request searched (all of them, or those added since a generation)."""

    response: pb.MatchResponse
    claims: QueryClaims
    references: list[str]
    released: ReleasedColumns
    rows_searched: int


class NodeService(rpc.NodeServicer):
    def __init__(self, config: NodeConfig, indexes: LiveIndexes, auth: Authenticator,
                 admission: Admission, audit: AuditLog, metrics: NodeMetrics, alerts: Alerts | None = None):
        self._config = config
        self._alerts = alerts
        self._metrics = metrics
        self._indexes = indexes
        self._auth = auth
        self._admission = admission
        self._audit = audit
        self._hits = HitWriter(config.country, config.node_id, config.contact)
        # Describe's private_exact (node.private_service.PrivateMode.info), when the node offers it.
        self.private_info: Callable[[SegmentSet], pb.PrivateInfo | None] | None = None

    def _authorize(self, context: grpc.aio.ServicerContext, method: str, digest: str) -> QueryClaims:
        try:
            return self._auth.authorize(context.invocation_metadata(), context.auth_context(), method, digest)
        except AuthError as exc:
            code = grpc.StatusCode.PERMISSION_DENIED if exc.denied else grpc.StatusCode.UNAUTHENTICATED
            raise Refused(code, str(exc), exc.claims, exc.gateway) from None

    async def _refuse(self, context: grpc.aio.ServicerContext, method: str, items: Sequence[QueryItem],
                      refusal: Refused, started: float, since_generation: int = 0,
                      packed: Sequence[PackedGroup] = ()) -> NoReturn:
        claims = refusal.claims
        log.warning("refused", extra={
            "request_id": request_id(context), "rpc": method, "status": refusal.code.name,
            "reason": str(refusal), "gateway": claims.issuer if claims else refusal.gateway,
            "officer": claims.subject if claims else "", "peer": context.peer(),
            "items": item_count(items, packed)})
        try:
            await self._audit.append(_entry(method, items, claims, refusal.gateway, context.peer(),
                                            refusal.code.name, str(refusal), since_generation=since_generation,
                                            packed=packed))
        except Exception:  # the refusal still goes out; the log says its record is missing
            log.exception("audit append failed", extra={"request_id": request_id(context), "rpc": method})
        self._metrics.refused(method, refusal.code.name, time.perf_counter() - started)
        await context.abort(refusal.code, str(refusal))

    async def Match(self, request: pb.MatchRequest | Malformed,
                    context: grpc.aio.ServicerContext) -> pb.MatchResponse:
        started = time.perf_counter()
        if isinstance(request, Malformed):
            await self._refuse_malformed(context, "Match", "icse.v1.MatchRequest", started)
        items = items_from_pb(request)
        try:
            packed = packed_from_pb(request)
        except BadPacking as exc:
            await self._refuse_malformed(context, "Match", "icse.v1.MatchRequest", started, str(exc), items)
        rid = request_id(context)
        since = request.since_generation
        try:
            answer = await self._match(items, packed, since, context)
        except Refused as refusal:
            await self._refuse(context, "Match", items, refusal, started, since, packed)
        except Exception as exc:  # noqa: BLE001 - a defect, not the caller's fault: audited INTERNAL, never UNKNOWN
            await self._refuse(context, "Match", items, _internal(context, exc), started, since, packed)
        # The record is durable before the answer leaves; no record, no answer.
        claims, references = answer.claims, answer.references
        await self.recorded(context, _entry("Match", items, claims, claims.issuer, context.peer(), "OK",
                                        references=references, since_generation=since,
                                        rows_searched=answer.rows_searched, packed=packed))
        if self._alerts is not None:  # the holder's desk hears of what was released; never fails the answer
            await self._alerts.record_released(claims, rid, answer.released)
        elapsed = time.perf_counter() - started
        asked = Counter(item.algorithm for item in items)
        for group in packed:
            asked[group.algorithm] += group.count
        self._metrics.answered("Match", asked, len(references), elapsed)
        # No digests in the log: a no-hit item must leave no trace of what was asked.
        log.info("answered", extra={
            "request_id": rid, "rpc": "Match", "gateway": claims.issuer,
            "officer": claims.subject, "org": claims.org, "requester_country": claims.country,
            "case": claims.case, "items": item_count(items, packed), "hits": len(references),
            "since_generation": since, "rows_searched": answer.rows_searched, "ms": round(elapsed * 1000, 1)})
        return answer.response

    async def _match(self, items: Sequence[QueryItem], packed: Sequence[PackedGroup], since: int,
                     context: grpc.aio.ServicerContext) -> _Answer:
        claims = self._authorize(context, "Match", query_sha256(items, since, packed=packed))
        try:
            tier = self._admission.permit(claims)
            valid = matcher.validate(items, self._config.limits, packed)
            self._admission.consume(claims, valid.size)
        except PolicyRefusal as exc:
            code = grpc.StatusCode.RESOURCE_EXHAUSTED if exc.exhausted else grpc.StatusCode.PERMISSION_DENIED
            raise Refused(code, str(exc), claims) from None
        except matcher.InvalidRequest as exc:
            raise Refused(grpc.StatusCode.INVALID_ARGUMENT, str(exc), claims) from None
        current = await self._current(claims)
        if since > current.generation:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"since_generation {since} is ahead of this node's store (generation {current.generation}): "
                          "the store was replaced or restored from a backup; ask again with since_generation 0",
                          claims)
        self._metrics.serving(current.generation, current.counts())
        searched = current.since(since)
        found, exact = matcher.search(valid, searched.indexes, self._config.limits)
        hit_ids = np.concatenate([np.fromiter((c.record_id for m in found.values() for c in m.candidates), np.int64),
                                  exact.record_ids])
        rows = await asyncio.to_thread(current.hit_rows, hit_ids) if len(hit_ids) else current.hit_rows(hit_ids)
        response = pb.MatchResponse(node_id=self._config.node_id, country=self._config.country,
                                    tier=_TIERS[tier], protocol_version=protocol.VERSION,
                                    generation=current.generation)
        asked = Asked(items, packed)
        if found:
            references, released = self._hits.add(response, matcher.merged(found, exact), rows.by_id(), asked, tier)
        else:  # exact items only (a packed batch, mostly): straight from the arrays
            references, released = self._hits.add_exact(response, exact, rows, asked, tier)
        return _Answer(response, claims, references, released, searched.rows_searched)

    async def recorded(self, context: grpc.aio.ServicerContext, entry: AuditEntry) -> None:
        """Appends the record of an answered call. A node that cannot record a call does not
        answer it: INTERNAL, in words (the cause, a full disk say, goes to the node's log)."""
        try:
            await self._audit.append(entry)
        except Exception:  # whatever failed, the answer must not leave unrecorded
            rid = request_id(context)
            log.exception("audit append failed", extra={"request_id": rid, "rpc": entry.rpc})
            self._metrics.refused(entry.rpc, grpc.StatusCode.INTERNAL.name, 0.0)
            await context.abort(grpc.StatusCode.INTERNAL,
                                f"this node could not record the call in its audit log, so it does not answer it "
                                f"(request id {rid}); its operator can find the cause in the node's log")

    async def _current(self, claims: QueryClaims | None) -> SegmentSet:
        try:
            return await self._indexes.current()
        except SegmentCorrupt as exc:
            raise Refused(grpc.StatusCode.FAILED_PRECONDITION,
                          f"this node's store is damaged and it will not answer from part of it: {exc}",
                          claims) from None

    def _hit(self, hits: RepeatedCompositeFieldContainer[pb.Hit], stored: StoredRecord, distance: int,
             share: float | None, tier: Tier) -> str:
        """Adds the hit to ``hits`` (an ItemResult's repeated field); its reference."""
        return self._hits.add_record(hits, stored, distance, share, tier)

    async def _refuse_malformed(self, context: grpc.aio.ServicerContext, method: str, message: str,
                                started: float, why: str = "protobuf did not parse",
                                items: Sequence[QueryItem] = ()) -> NoReturn:
        try:
            gateway = self._auth.peer_gateway(context.auth_context())
            refusal = Refused(grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {message} ({why})",
                              gateway=gateway)
        except AuthError as exc:
            refusal = Refused(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        await self._refuse(context, method, items, refusal, started)

    async def refuse_early(self, context: grpc.aio.ServicerContext, method: str, code: grpc.StatusCode,
                           message: str) -> NoReturn:
        """Refuses a call before its request is read (see ``MetadataLimits``)."""
        try:
            gateway = self._auth.peer_gateway(context.auth_context())
        except AuthError:
            gateway = ""
        await self._refuse(context, method, [], Refused(code, message, gateway=gateway), time.perf_counter())

    async def Describe(self, request: pb.DescribeRequest | Malformed,
                       context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        started = time.perf_counter()
        if isinstance(request, Malformed):
            await self._refuse_malformed(context, "Describe", "icse.v1.DescribeRequest", started)
        try:
            claims = self._authorize(context, "Describe", query_sha256([]))
        except Refused as refusal:
            await self._refuse(context, "Describe", [], refusal, started)
        try:
            current = await self._current(claims)
        except Refused as refusal:
            await self._refuse(context, "Describe", [], refusal, started)
        await self.recorded(context, _entry("Describe", [], claims, claims.issuer, context.peer(), "OK"))
        self._metrics.serving(current.generation, current.counts())
        self._metrics.answered("Describe", {}, 0, time.perf_counter() - started)
        private = self.private_info(current) if self.private_info is not None else None
        return pb.DescribeResponse(
            private_exact=private,
            node_id=self._config.node_id,
            country=self._config.country,
            software_version=federation.__version__,
            generation=current.generation,
            counts=[pb.AlgorithmCount(algorithm=a, count=n) for a, n in sorted(current.counts().items())],
            max_items_per_request=self._config.limits.max_items,
            max_distance=self._config.limits.max_distance,
            contact=self._config.contact,
            protocol_version=protocol.VERSION,
            features=[*FEATURES, *([protocol.PRIVATE_EXACT_FEATURE] if private is not None else [])],
        )


def _internal(context: grpc.aio.ServicerContext, exc: Exception) -> Refused:
    """An unexpected failure, logged with its traceback, answered in words."""
    rid = request_id(context)
    log.error("internal error", exc_info=exc, extra={"request_id": rid})
    return Refused(grpc.StatusCode.INTERNAL,
                   f"the node failed to answer because of an internal error (request id {rid}); "
                   "its operator can find the cause in the node's log")


def _lenient(parse):
    """A request deserializer that lets the service refuse bad bytes itself
    (INVALID_ARGUMENT, audited) instead of grpc answering UNKNOWN."""
    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError:
            return MALFORMED
    return deserialize


def unary_handlers(methods: dict[str, tuple[Callable[..., Awaitable[Any]], Any, Any]]) -> grpc.GenericRpcHandler:
    """Handlers of the Node service's unary methods, ``name: (behaviour, request class, response class)``
    (what the generated registration does, with lenient request parsing: see ``_lenient``)."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, {
        name: grpc.unary_unary_rpc_method_handler(behaviour, request_deserializer=_lenient(request.FromString),
                                                  response_serializer=response.SerializeToString)
        for name, (behaviour, request, response) in methods.items()})


def handlers(service: NodeService) -> grpc.GenericRpcHandler:
    """The Node service's Match and Describe."""
    return unary_handlers({"Match": (service.Match, pb.MatchRequest, pb.MatchResponse),
                           "Describe": (service.Describe, pb.DescribeRequest, pb.DescribeResponse)})
