"""The calls a standing-query round makes: Describe every replica, Match one replica.

Unlike a query's fan-out (gateway.fanout), a re-ask must reach the very replica
whose generation it last saw: replicas of one member keep stores of their own,
and a generation means something only on the store that gave it. So each
replica has its own channel here and is asked directly, with a token of its
own for every call, over the same mutual TLS.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from federation import protocol, tls, tokens
from federation.query import EMPTY_QUERY_SHA256, QueryItem, query_sha256
from federation.wire import REQUEST_ID_KEY, items_to_pb, pb, rpc
from gateway.config import GatewayConfig, NodeEntry
from gateway.fanout import CHANNEL_OPTIONS
from gateway.signing import Signer


class CallFailed(Exception):
    """A call that gave no usable answer; the message says why, in words.

    ``refused``: the node said no (rate, quota, policy) — asking it again in the
    same round would only be refused again."""

    def __init__(self, message: str, refused: bool = False):
        super().__init__(message)
        self.refused = refused


_REFUSALS = (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED,
             grpc.StatusCode.UNAUTHENTICATED)


@dataclass(frozen=True)
class Replica:
    """One address of one member."""

    node: NodeEntry
    address: str
    stub: rpc.NodeStub

    @property
    def name(self) -> str:
        return self.node.node_id if len(self.node.addresses) == 1 else f"{self.node.node_id}@{self.address}"


class WatchClient:
    def __init__(self, config: GatewayConfig, signer: Signer):
        self._config = config
        self._signer = signer
        credentials = tls.channel_credentials(config.tls)
        self._channels: list[grpc.aio.Channel] = []
        self.replicas: list[Replica] = []
        for node in config.nodes:
            for address in node.addresses:
                channel = grpc.aio.secure_channel(
                    address, credentials, options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", node.tls_name)])
                self._channels.append(channel)
                self.replicas.append(Replica(node, address, rpc.NodeStub(channel)))

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def describe(self, replica: Replica) -> pb.DescribeResponse:
        token = self._signer.token(replica.node.node_id, "Describe", EMPTY_QUERY_SHA256, "")
        try:
            answer = await replica.stub.Describe(pb.DescribeRequest(), timeout=self._config.node_timeout,
                                                 metadata=tokens.bearer(token))
        except grpc.aio.AioRpcError as error:
            raise CallFailed(f"{error.code().name}: {error.details() or ''}") from None
        self._check(replica, answer.node_id, answer.protocol_version)
        return answer

    async def match(self, replica: Replica, items: Sequence[QueryItem], since: int, case: str
                    ) -> pb.MatchResponse:
        """One signed Match of ``items`` under ``case``, restricted to rows published after ``since``."""
        token = self._signer.token(replica.node.node_id, "Match", query_sha256(items, since), case)
        try:
            answer = await replica.stub.Match(
                items_to_pb(items, since), timeout=self._config.node_timeout,
                metadata=(*tokens.bearer(token), (REQUEST_ID_KEY, uuid.uuid4().hex)))
        except grpc.aio.AioRpcError as error:
            raise CallFailed(f"{error.code().name}: {error.details() or ''}", error.code() in _REFUSALS) from None
        self._check(replica, answer.node_id, answer.protocol_version)
        previous = -1
        for result in answer.results:
            if not previous < result.item < len(items):
                raise CallFailed(f"malformed answer: item position {result.item} out of order or range")
            previous = result.item
        return answer

    @staticmethod
    def _check(replica: Replica, node_id: str, version: str) -> None:
        if node_id != replica.node.node_id:
            raise CallFailed(f"answer is from node {node_id!r}")
        try:
            protocol.check_compatible(version, f"node {replica.node.node_id}")
        except protocol.IncompatibleProtocol as exc:
            raise CallFailed(str(exc)) from None
