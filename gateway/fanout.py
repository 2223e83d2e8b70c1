"""Fan-out: every node of the federation asked concurrently over mutual TLS.

Each call carries its own deadline and its own token (audience = that node);
a slow, dead or refusing node becomes a status line, never a failed query.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property

import grpc

from federation import protocol, tls, tokens
from federation.query import EMPTY_QUERY_SHA256, PACKED_EXACT_FEATURE, QueryItem
from federation.wire import REQUEST_ID_KEY, pb, rpc
from gateway import packing
from gateway.answers import unpack
from gateway.config import GatewayConfig, NodeEntry
from gateway.health import HealthPolicy, NodeHealth, ReplicaRound
from gateway.outcomes import attempt_words, both_attempts, status_of, tls_words
from gateway.results import NodeAnswer, NodeStatus
from gateway.signing import Signer

log = logging.getLogger("icse.gateway")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.max_send_message_length", 8 * 1024 * 1024),
    # Retries and hedging are done here, with a fresh token each time.
    ("grpc.enable_retries", 0),
    # Reconnect quickly once a node is back, so the next query is complete.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
]


@dataclass(frozen=True)
class NodeDescription:
    node_id: str
    latency_ms: float
    description: pb.DescribeResponse | None = None
    # Why there is no description: the failure's status and message.
    failure: NodeStatus | None = None
    message: str = ""
    # The address asked (a member with replicas is described once per replica).
    replica: str = ""


@dataclass(frozen=True)
class Query:
    """One query as every node is asked it (each attempt signs its own token for the form it sends)."""

    items: Sequence[QueryItem]
    case: str
    request_id: str
    pack_at_least: int = packing.PACK_AT_LEAST

    # Each form is built once, when a first node is asked in it, and its query digest with it.
    @cached_property
    def plain(self) -> packing.Form:
        return packing.plain(self.items)

    @cached_property
    def packed(self) -> packing.Form | None:
        return packing.packed(self.items, self.pack_at_least)


@dataclass(frozen=True)
class Attempt:
    """One attempt at one replica of one member: what a :data:`Strategy` needs to ask it.

    A strategy may make several calls (private matching asks twice); each takes
    its deadline from :meth:`remaining`, so together they stay within the one
    budget that hedging, fail-over and the breaker reckon with.
    """

    node: NodeEntry
    stub: rpc.NodeStub
    address: str
    query: Query
    signer: Signer
    ends: float  # time.monotonic() by which this attempt must be over
    # The form of Match this replica takes (packed when it offers it; asks Describe once per replica).
    form: Callable[[], Awaitable[packing.Form]]

    def remaining(self) -> float:
        """Seconds left for this attempt's next call (a deadline of 0 fails that call at once)."""
        return max(self.ends - time.monotonic(), 0.0)

    def metadata(self, rpc_name: str, query_digest: str) -> tuple[tuple[str, str], ...]:
        """A fresh token for one call (``rpc_name``, over ``query_digest``), and the request id."""
        token = self.signer.token(self.node.node_id, rpc_name, query_digest, self.query.case)
        return (*tokens.bearer(token), (REQUEST_ID_KEY, self.query.request_id))


# How one member is asked one query: every call it makes, its answer aligned with
# the query's items. A gRPC error it raises becomes that member's status line, a
# ``ValueError`` (malformed answer) or ``protocol.IncompatibleProtocol`` an error one.
Strategy = Callable[[Attempt], Awaitable[NodeAnswer]]


async def ordinary(attempt: Attempt) -> NodeAnswer:
    """The plain Match call: the node sees the digests (PROTOCOL.md "Match")."""
    node, query = attempt.node, attempt.query
    form = await attempt.form()
    response = await attempt.stub.Match(form.request, timeout=attempt.remaining(),
                                        metadata=attempt.metadata("Match", form.query_sha256))
    protocol.check_compatible(response.protocol_version, f"node {node.node_id}")
    hits, truncated = unpack(response, node, len(query.items), form)
    return NodeAnswer(node.node_id, node.country, NodeStatus.HIT if response.results else NodeStatus.NO_HIT,
                      hits=hits, truncated=truncated)


@dataclass
class _Replica:
    """One address of a member: its own channel and its own health and breaker."""

    address: str
    stub: rpc.NodeStub
    health: NodeHealth
    # What its last Describe listed (PROTOCOL.md "Features"); None until asked, or after a refusal.
    features: frozenset[str] | None = None


@dataclass
class _Member:
    entry: NodeEntry
    replicas: list[_Replica]
    # Which replica a query starts with; advanced by every query.
    turn: int = 0


@dataclass
class _Tried:
    """One member's calls in one query: every failed call, in order, by replica."""

    round: ReplicaRound
    failures: list[tuple[int, NodeAnswer]] = field(default_factory=list)


class Federation:
    """Long-lived channels to every node; reuse one instance across queries.

    Per query: one overall deadline, and under it a per-node deadline. A node
    that is slower than its recent 95th percentile gets a hedged second
    request (with its own token, so replay protection holds) and the loser is
    cancelled; an unavailable node is retried once if the budget allows; a
    node that keeps failing is skipped for a cool-down.

    A member with several replicas (addresses of nodes with one identity) is
    asked at one of them, in turn; an unavailable replica fails over to
    another, and a hedge goes to another, within the same budget. Each replica
    has its own channel and breaker, so a dead one is passed over while another
    serves. One answer per member is kept, whichever replica gave it.
    """

    RETRY_BACKOFF = 0.05
    # Below this much budget a retry could not get an answer back anyway.
    RETRY_MIN_BUDGET = 0.25
    # Fewer exact items than this go unpacked (packing.PACK_AT_LEAST).
    PACK_AT_LEAST = packing.PACK_AT_LEAST

    def __init__(self, config: GatewayConfig, signer: Signer, health: HealthPolicy | None = None,
                 strategy: Strategy = ordinary):
        self._config = config
        self._signer = signer
        # How each member is asked (gateway.private chooses per member between private and plain matching).
        self._strategy = strategy
        credentials = tls.channel_credentials(config.tls)
        self._channels: list[grpc.aio.Channel] = []
        self._members: dict[str, _Member] = {}
        for node in config.nodes:
            replicas = []
            for address in node.addresses:
                channel = grpc.aio.secure_channel(
                    address,
                    credentials,
                    options=[*CHANNEL_OPTIONS, ("grpc.ssl_target_name_override", node.tls_name)],
                )
                self._channels.append(channel)
                replicas.append(_Replica(address, rpc.NodeStub(channel), NodeHealth(health or HealthPolicy())))
            self._members[node.node_id] = _Member(node, replicas)

    async def close(self) -> None:
        await asyncio.gather(*(channel.close() for channel in self._channels))

    async def __aenter__(self) -> Federation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def health(self, node_id: str, address: str | None = None) -> NodeHealth:
        """A member's health: of the replica at ``address``, or of its first one."""
        replicas = self._members[node_id].replicas
        return next(r.health for r in replicas if address in (None, r.address))

    async def match(self, items: Sequence[QueryItem], case: str, timeout: float | None = None,
                    deadline: float | None = None, request_id: str | None = None) -> list[NodeAnswer]:
        """Asks every node; ``request_id`` (sent to each node) links their log lines to ours."""
        call = Query(items, case, request_id or uuid.uuid4().hex, self.PACK_AT_LEAST)
        per_node = timeout or self._config.node_timeout
        ends = time.monotonic() + (deadline or self._config.deadline)
        return list(await asyncio.gather(*(self._ask(self._members[node.node_id], call, per_node, ends)
                                           for node in self._config.nodes)))

    async def _ask(self, member: _Member, call: Query, per_node: float, ends: float) -> NodeAnswer:
        node = member.entry
        tried = _Tried(ReplicaRound([r.health for r in member.replicas], member.turn))
        member.turn = (member.turn + 1) % len(member.replicas)
        first = tried.round.next(time.monotonic())
        if first is None:
            answer = NodeAnswer(node.node_id, node.country, NodeStatus.SKIPPED, self._failure_words(member, tried))
        else:
            try:
                answer = await self._attempts(member, tried, first, call, per_node, ends)
            finally:
                # Whatever became of the calls (answers, failures, a cancelled
                # query): every replica admitted is settled, trial calls included.
                tried.round.settle(time.monotonic())
        log.info("node answered", extra={"request_id": call.request_id, "node": node.node_id,
                                         "replica": answer.replica, "status": answer.status.value,
                                         "ms": round(answer.latency_ms, 1), "detail": answer.message})
        return answer

    async def _attempts(self, member: _Member, tried: _Tried, first: int, call: Query, per_node: float,
                        ends: float) -> NodeAnswer:
        """The (hedged) call; if unavailable, another replica while time allows, or one retry of the only one.

        A replica that timed out is not asked again in this query, but another
        replica is if the overall deadline leaves time (a hung replica must not
        cost the member's answer).
        """
        started = time.monotonic()
        answer, index = await self._hedged(member, tried, first, call, min(per_node, ends - started))
        retried_same = False
        while (answer.status in (NodeStatus.UNAVAILABLE, NodeStatus.TIMED_OUT)
               and ends - time.monotonic() > self.RETRY_MIN_BUDGET):
            following = tried.round.next(time.monotonic())
            if following is None:
                if answer.status is NodeStatus.TIMED_OUT or retried_same or tried.round.asked > 1:
                    break
                following, retried_same = index, True
                await asyncio.sleep(self.RETRY_BACKOFF)
            answer, index = await self._call(member, tried, following, call, min(per_node, ends - time.monotonic()))
        if not answer.status.answered:
            answer = replace(answer, message=self._failure_words(member, tried))
        # What the investigator waited for this node, hedges, fail-overs and retries included.
        return replace(answer, latency_ms=(time.monotonic() - started) * 1000)

    def _failure_words(self, member: _Member, tried: _Tried) -> str:
        """Why no replica answered: each replica's calls, or why it was passed over."""
        said: dict[int, list[str]] = {}
        for index, failure in tried.failures:
            said.setdefault(index, []).append(failure.message)
        if len(member.replicas) == 1:
            messages = said.get(0, [])
            if not messages:
                return tried.round.passed_over.get(0, "")
            # Both outcomes: "died during my call" reads differently from "was already down".
            return messages[0] if len(messages) == 1 else both_attempts(messages[-2], messages[-1])
        parts = []
        for index, replica in enumerate(member.replicas):
            messages = said.get(index, [])
            if len(messages) > 1:
                words = both_attempts(messages[0], messages[-1])
            elif messages:
                words = attempt_words(messages[0])
            else:
                words = tried.round.passed_over.get(index, "not asked: no time left")
            parts.append(f"replica {replica.address}: {words}")
        return "; ".join(parts)

    async def _hedged(self, member: _Member, tried: _Tried, index: int, call: Query,
                      timeout: float) -> tuple[NodeAnswer, int]:
        health = member.replicas[index].health
        delay = health.hedge_delay()
        primary = asyncio.create_task(self._call(member, tried, index, call, timeout))
        if delay is None or delay >= timeout:
            return await primary
        done, _ = await asyncio.wait({primary}, timeout=delay)
        if done or not health.may_hedge():
            return primary.result() if done else await primary
        # The hedge goes to another replica when there is one that may be asked.
        other = tried.round.next(time.monotonic())
        backup = asyncio.create_task(self._call(member, tried, index if other is None else other, call,
                                                timeout - delay))
        pending = {primary, backup}
        try:
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                answers = [task.result() for task in done]
                good = [a for a in answers if a[0].status.answered]
                if good or not pending:
                    return (good or answers)[0]
        finally:
            for task in pending:
                task.cancel()

    async def _call(self, member: _Member, tried: _Tried, index: int, call: Query,
                    timeout: float) -> tuple[NodeAnswer, int]:
        """One RPC to one replica, with its own token and deadline; its outcome noted for that replica."""
        answer = await self._rpc(member.entry, member.replicas[index], call, timeout)
        answered = answer.status.answered
        tried.round.record(index, None if answer.status is NodeStatus.REFUSED else answered,
                           answer.latency_ms / 1000)
        if not answered:
            tried.failures.append((index, answer))
        return answer, index

    async def _rpc(self, node: NodeEntry, replica: _Replica, call: Query, timeout: float) -> NodeAnswer:
        if timeout <= 0:
            return NodeAnswer(node.node_id, node.country, NodeStatus.TIMED_OUT, "query deadline spent",
                              replica=replica.address)
        ends = time.monotonic() + timeout
        attempt = Attempt(node, replica.stub, replica.address, call, self._signer, ends,
                          lambda: self._form(node, replica, call, ends))
        started = time.perf_counter()
        try:
            answer = await self._strategy(attempt)
        except grpc.aio.AioRpcError as error:
            if status_of(error) is NodeStatus.REFUSED and PACKED_EXACT_FEATURE in (replica.features or ()):
                # Perhaps no longer the software that offered packing: the next query asks Describe again.
                replica.features = None
            answer = NodeAnswer(node.node_id, node.country, status_of(error),
                                self._details(node, replica.address, error))
        except protocol.IncompatibleProtocol as exc:
            # Its answer may mean something else under another major version: not used.
            answer = NodeAnswer(node.node_id, node.country, NodeStatus.ERROR, str(exc))
        except ValueError as exc:
            answer = NodeAnswer(node.node_id, node.country, NodeStatus.ERROR, f"malformed answer: {exc}")
        return replace(answer, latency_ms=(time.perf_counter() - started) * 1000, replica=replica.address)

    async def _form(self, node: NodeEntry, replica: _Replica, call: Query, ends: float) -> packing.Form:
        """Packed for a replica that offers it (learnt from Describe once per replica), else plain.

        Never packed for a node not known to offer it: a node that ignored the
        packed groups would refuse the token (its query digest is over fewer
        items), so asking blindly would cost a refusal, never a silent no-hit.
        """
        if call.packed is None:
            return call.plain
        if replica.features is None:
            await self._describe_one(node, replica, max(ends - time.monotonic(), 0.0) / 2)
        return call.packed if PACKED_EXACT_FEATURE in (replica.features or ()) else call.plain

    def _details(self, node: NodeEntry, address: str, error: grpc.aio.AioRpcError) -> str:
        details = error.details() or ""
        if error.code() != grpc.StatusCode.UNAVAILABLE:
            return details
        words = tls_words(details, node, address, str(self._config.tls.ca))
        if words != details:
            log.debug("TLS failure", extra={"node": node.node_id, "replica": address, "detail": details})
        return words

    async def describe(self, timeout: float | None = None) -> list[NodeDescription]:
        """Every node asked to describe itself: one description per replica of each member."""
        deadline = timeout or self._config.node_timeout
        return list(await asyncio.gather(*(self._describe_one(member.entry, replica, deadline)
                                           for member in self._members.values() for replica in member.replicas)))

    async def _describe_one(self, node: NodeEntry, replica: _Replica, timeout: float) -> NodeDescription:
        token = self._signer.token(node.node_id, "Describe", EMPTY_QUERY_SHA256, "")
        started = time.perf_counter()
        try:
            response = await replica.stub.Describe(
                pb.DescribeRequest(), timeout=timeout, metadata=tokens.bearer(token)
            )
        except grpc.aio.AioRpcError as error:
            return NodeDescription(node.node_id, (time.perf_counter() - started) * 1000,
                                   failure=status_of(error), message=self._details(node, replica.address, error),
                                   replica=replica.address)
        latency = (time.perf_counter() - started) * 1000
        try:
            protocol.check_compatible(response.protocol_version, f"node {node.node_id}")
        except protocol.IncompatibleProtocol as exc:
            return NodeDescription(node.node_id, latency, failure=NodeStatus.ERROR, message=str(exc),
                                   replica=replica.address)
        replica.features = frozenset(response.features)
        return NodeDescription(node.node_id, latency, response, replica=replica.address)
