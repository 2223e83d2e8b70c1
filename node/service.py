"""The gRPC face of a node: authenticate, validate, match, answer.

Thin on purpose: decisions live in ``auth`` and ``matcher``; this module maps
their outcomes to gRPC statuses and protobuf messages.
"""

from __future__ import annotations

import logging
import time

import grpc

import federation
from federation.query import query_sha256
from federation.tokens import QueryClaims
from federation.wire import items_from_pb, pb, rpc
from node import matcher
from node.auth import AuthError, Authenticator
from node.config import NodeConfig
from node.live_index import LiveIndexes
from node.records import StoredRecord
from node.store import Store

log = logging.getLogger("icse.node")


class NodeService(rpc.NodeServicer):
    def __init__(self, config: NodeConfig, store: Store, indexes: LiveIndexes, auth: Authenticator):
        self._config = config
        self._store = store
        self._indexes = indexes
        self._auth = auth

    async def _authorize(self, context: grpc.aio.ServicerContext, method: str, digest: str) -> QueryClaims:
        try:
            return self._auth.authorize(
                context.invocation_metadata(), context.auth_context(), method, digest
            )
        except AuthError as exc:
            code = grpc.StatusCode.PERMISSION_DENIED if exc.denied else grpc.StatusCode.UNAUTHENTICATED
            log.warning("refused %s: %s (peer %s)", method, exc, context.peer())
            await context.abort(code, str(exc))
            raise  # unreachable: abort raises

    async def Match(self, request: pb.MatchRequest, context: grpc.aio.ServicerContext) -> pb.MatchResponse:
        started = time.perf_counter()
        items = items_from_pb(request)
        claims = await self._authorize(context, "Match", query_sha256(items))
        try:
            valid = matcher.validate(items, self._config.limits)
        except matcher.InvalidRequest as exc:
            log.info("invalid request from %s/%s case=%s: %s", claims.issuer, claims.subject, claims.case, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        current = await self._indexes.current()
        found = matcher.match(valid, current.indexes, self._config.limits)
        records = await self._store.records(c.record_id for m in found for c in m.candidates)
        response = pb.MatchResponse(
            node_id=self._config.node_id,
            country=self._config.country,
            tier=pb.RELEASE_TIER_STANDARD,
            results=[
                pb.ItemResult(
                    item=position,
                    hits=[self._hit(records[c.record_id], c.distance) for c in m.candidates if c.record_id in records],
                    truncated=m.truncated,
                )
                for position, m in enumerate(found)
                if m.candidates
            ],
        )
        hits = sum(len(m.candidates) for m in found)
        # No digests in the log: a no-hit item must leave no trace of what was asked.
        log.info(
            "match gateway=%s officer=%s org=%s country=%s case=%s items=%d hits=%d ms=%.1f",
            claims.issuer, claims.subject, claims.org, claims.country, claims.case,
            len(items), hits, (time.perf_counter() - started) * 1000,
        )
        return response

    def _hit(self, stored: StoredRecord, distance: int) -> pb.Hit:
        record = stored.record
        hit = pb.Hit(
            reference=record.reference,
            country=self._config.country,
            node_id=self._config.node_id,
            contact=self._config.contact,
            category=record.category,
            series=record.series,
            date_added=record.date_added,
            distance=distance,
        )
        if record.victim_identified is not None:
            hit.victim_identified = record.victim_identified
        return hit

    async def Describe(self, request: pb.DescribeRequest, context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        await self._authorize(context, "Describe", query_sha256([]))
        current = await self._indexes.current()
        return pb.DescribeResponse(
            node_id=self._config.node_id,
            country=self._config.country,
            software_version=federation.__version__,
            generation=current.generation,
            counts=[pb.AlgorithmCount(algorithm=a, count=n) for a, n in sorted(current.counts().items())],
            max_items_per_request=self._config.limits.max_items,
            max_distance=self._config.limits.max_distance,
            contact=self._config.contact,
        )
