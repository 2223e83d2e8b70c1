"""Hedged requests: a member that is slow only sometimes.

A real node process cannot be made slow for one chosen call, so the member here
is a small in-test gRPC server speaking the node's ``Match`` over real mutual TLS
(the session PKI's FR certificate). It answers at once, except for the calls it
is told to make slow (they take ``SLOW`` seconds) or to hold (they never answer:
they end only when the gateway cancels them); it records every call's token id
(``jti``), whether it finished and whether it was cancelled. The gateway side is
the real ``gateway.fanout.Federation``.

The claims are proved by what the double saw, not by how long the gateway took:
an answer that arrives while the only other call is still held can only have
come from the hedge, whatever the speed of the machine.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import jwt
import pytest

from federation import tokens
from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from federation.query import QueryItem, query_sha256
from federation.tls import TlsFiles, server_credentials
from federation.wire import pb, rpc
from gateway import config as gateway_config
from gateway.fanout import Federation
from gateway.health import HealthPolicy
from gateway.results import NodeStatus
from gateway.signing import signer_for
from tests.support import wait_until_async

NODE = "FR"
SLOW = 4.0  # how long a slow call takes, seconds: the test double's delay is the scenario


@dataclass
class Call:
    index: int
    jti: str
    qh: str
    slow: bool
    held: bool
    started: float
    cancelled: bool = False
    finished: bool = False


class FlakyNode(rpc.NodeServicer):
    """Answers ``Match`` with "no hit" at once, except the next ``slow_next`` calls sleep ``SLOW``
    and the next ``held_next`` calls never answer (until cancelled)."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.slow_next = 0
        self.held_next = 0

    async def Match(self, request: pb.MatchRequest, context: grpc.aio.ServicerContext) -> pb.MatchResponse:
        token = tokens.token_from_metadata(context.invocation_metadata())
        # A test double: the token is only read, not verified (the real node does that).
        claims = jwt.decode(token, options={"verify_signature": False})
        held = self.held_next > 0
        self.held_next -= 1 if held else 0
        slow = not held and self.slow_next > 0
        self.slow_next -= 1 if slow else 0
        call = Call(len(self.calls), claims["jti"], claims["qh"], slow, held, time.monotonic())
        self.calls.append(call)
        context.add_done_callback(lambda ctx: setattr(call, "cancelled", call.cancelled or ctx.cancelled()))
        try:
            if held:
                await asyncio.Event().wait()  # nothing sets it: only cancellation ends the call
            if slow:
                await asyncio.sleep(SLOW)
        except asyncio.CancelledError:
            call.cancelled = True
            raise
        call.finished = True
        return pb.MatchResponse(node_id=NODE, country=NODE, protocol_version="1.0")

    def for_query(self, items: list[QueryItem]) -> list[Call]:
        digest = query_sha256(items)
        return [c for c in self.calls if c.qh == digest]


@dataclass
class Member:
    node: FlakyNode
    config: gateway_config.GatewayConfig


@pytest.fixture
async def member(pki: DevPki, tmp_path: Path) -> AsyncIterator[Member]:
    node = FlakyNode()
    server = grpc.aio.server()
    rpc.add_NodeServicer_to_server(node, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(TlsFiles(pki.ca_cert, pki.node_cert(NODE), pki.node_key(NODE))))
    await server.start()
    try:
        local = LocalFederation(tmp_path, pki, [NodeSpec(NODE, NODE)])
        local[NODE].port = port  # never started: the gateway config points at the test server
        path = local.write_gateway_config(node_timeout=10.0)
        yield Member(node, gateway_config.load(path))
    finally:
        await server.stop(0)


def _items(tag: int) -> list[QueryItem]:
    return [QueryItem("sha256", os.urandom(32)) for _ in range(3 + tag % 3)]


async def _fast_queries(fed: Federation, count: int, prefix: str) -> None:
    for n in range(count):
        [answer] = await fed.match(_items(n), f"{prefix}-{n}")
        assert answer.status is NodeStatus.NO_HIT, answer


async def test_slow_primary_is_hedged_and_the_loser_cancelled(member: Member) -> None:
    policy = HealthPolicy(failures_to_open=1000)
    async with Federation(member.config, signer_for(member.config), policy) as fed:
        await _fast_queries(fed, 2 * policy.samples_for_hedging, "WARM")
        delay = fed.health(NODE).hedge_delay()
        assert delay is not None, "enough fast answers to hedge from"
        assert not any(c.slow or c.held for c in member.node.calls)

        member.node.held_next = 1
        items = _items(0)
        [answer] = await fed.match(items, "HEDGE-1")

        assert answer.status is NodeStatus.NO_HIT, answer
        calls = member.node.for_query(items)
        assert len(calls) == 2, calls
        primary, hedge = calls
        # The answer came while the primary was still held: only the hedge can have given it.
        assert primary.held and not primary.finished
        assert not hedge.held and hedge.finished
        assert primary.jti != hedge.jti, "each request carries its own token (replay protection holds)"
        # Sent after the node's recent p95, not at once (a lower bound: a timer never fires early).
        assert hedge.started - primary.started >= delay * 0.9, (hedge.started - primary.started, delay)
        await wait_until_async(lambda: primary.cancelled, 3, "the held primary is cancelled")
        assert not primary.finished

        # And the gateway goes on as before: the next query is one fast call.
        before = len(member.node.calls)
        await _fast_queries(fed, 1, "AFTER")
        assert len(member.node.calls) == before + 1


async def test_no_hedge_while_the_node_has_too_few_samples(member: Member) -> None:
    policy = HealthPolicy(failures_to_open=1000)
    async with Federation(member.config, signer_for(member.config), policy) as fed:
        # The very first call: no history at all.
        member.node.slow_next = 1
        items = _items(1)
        [answer] = await fed.match(items, "COLD-1")
        assert answer.status is NodeStatus.NO_HIT, answer
        # One call, and the answer is the slow call's own: the gateway waited for it.
        [call] = member.node.for_query(items)
        assert call.slow and call.finished and not call.cancelled

        # One sample short of the threshold: still no hedge.
        await _fast_queries(fed, policy.samples_for_hedging - 2, "WARM")
        assert len(fed.health(NODE).latencies) == policy.samples_for_hedging - 1
        assert fed.health(NODE).hedge_delay() is None
        member.node.slow_next = 1
        items = _items(2)
        [answer] = await fed.match(items, "COLD-2")
        assert answer.status is NodeStatus.NO_HIT, answer
        [call] = member.node.for_query(items)
        assert call.slow and call.finished and not call.cancelled
        # Now it has enough samples to hedge from.
        assert fed.health(NODE).hedge_delay() is not None


async def test_hedge_and_primary_both_slow_end_at_the_node_deadline(member: Member) -> None:
    policy = HealthPolicy(failures_to_open=1000)
    async with Federation(member.config, signer_for(member.config), policy) as fed:
        await _fast_queries(fed, 2 * policy.samples_for_hedging, "WARM")
        member.node.held_next = 2
        items = _items(3)
        [answer] = await fed.match(items, "BOTH-HELD", timeout=1.0)
        # Neither call can answer: what ended the query is the node deadline.
        assert answer.status is NodeStatus.TIMED_OUT, answer
        calls = member.node.for_query(items)
        assert len(calls) == 2 and calls[0].jti != calls[1].jti
        assert all(c.held and not c.finished for c in calls), calls
        await wait_until_async(lambda: all(c.cancelled for c in calls), 3,
                               "the hedge and the primary are both cancelled")
