"""``icse-conformance gateway``: a checking node that judges every call a gateway makes.

The kit listens with a node's certificate, runs the gateway's own commands
against it (``{address}`` and ``{config}`` in them are filled in), records each
call's metadata, certificate and items, and checks them against PROTOCOL.md.
It answers Match with a hit on the first item (reference ``CONFORMANCE-HIT``)
so the gateway has something to show; a second phase, speaking protocol major
2, checks that the gateway does not use the answer of an incompatible node.
"""

from __future__ import annotations

import asyncio
import re
import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError

from federation import identity, protocol, tls, tokens
from federation.conformance.report import Result, judged
from federation.query import EMPTY_QUERY_SHA256, query_sha256
from federation.wire import REQUEST_ID_KEY, SERVICE_NAME, items_from_pb, pb

HIT_REFERENCE = "CONFORMANCE-HIT"
REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass
class Seen:
    """One call as the checking node received it, and what was wrong with it."""

    method: str
    at: float
    problems: dict[str, str] = field(default_factory=dict)
    token_id: str = ""


@dataclass(frozen=True)
class GatewaySetup:
    files: tls.TlsFiles  # federation CA, the node certificate the kit serves with, its key
    node_id: str
    federation: str
    jwks: Path  # the gateways' public keys, each naming its owner
    listen: str = "127.0.0.1:0"
    template: Path | None = None  # gateway configuration with {address}; written to {config}
    runs: Sequence[str] = ()
    incompatible_runs: Sequence[str] = ()
    timeout: float = 60.0


# Every check made on every call: name -> what it requires.
CALL_CHECKS = {
    "call.certificate": "the client certificate names a gateway: spiffe://<federation>/gateway/<id>",
    "call.authorization": "exactly one 'authorization: Bearer <token>' entry",
    "call.token": "the token verifies against the key set (EdDSA or ES256, kid known, required claims typed)",
    "call.key-owner": "the signing key belongs to iss (JWK member icse_gateway)",
    "call.issuer": "iss is the gateway named by the client certificate",
    "call.audience": "aud is exactly the node id",
    "call.cnf": "cnf.x5t#S256 is the thumbprint of the client certificate",
    "call.rpc": "rpc is the method's name",
    "call.qh": "qh is the digest of exactly the request's items (Describe: of no items)",
    "call.case": "a Match token carries a non-empty case",
    "call.times": "iat within 5 s of now, exp - iat <= 60 s",
    "call.jti-unique": "no jti is used twice",
    "call.request-id": f"{REQUEST_ID_KEY}, when sent, matches [A-Za-z0-9._-]{{1,64}}",
}


class CheckingNode:
    def __init__(self, setup: GatewaySetup):
        self.setup = setup
        self.keys = tokens.KeySet.load(setup.jwks)
        self.calls: list[Seen] = []
        self.version = protocol.VERSION

    def _judge(self, method: str, context: grpc.aio.ServicerContext, qh: str) -> Seen:
        seen = Seen(method, time.time())
        problems = seen.problems
        auth = context.auth_context()
        named = (identity.gateway_id_from_uri(self.setup.federation, u) for u in tls.peer_uris(auth))
        gateway = next((g for g in named if g), None)
        if gateway is None:
            problems["call.certificate"] = f"certificate names {tls.peer_uris(auth) or 'no URI'}"
        metadata = tuple(context.invocation_metadata() or ())
        for key, value in metadata:
            if key == REQUEST_ID_KEY and not (isinstance(value, str) and REQUEST_ID.fullmatch(value)):
                problems["call.request-id"] = f"{REQUEST_ID_KEY} {str(value)[:80]!r}"
        try:
            token = tokens.token_from_metadata(metadata)
        except tokens.TokenError as exc:
            problems["call.authorization"] = str(exc)
            return seen
        try:
            claims = self.keys.verify(token, audience=self.setup.node_id)
        except tokens.TokenError as exc:
            name = "call.audience" if "addressed to another node" in str(exc) else "call.token"
            problems[name] = str(exc)
            return seen
        seen.token_id = claims.token_id
        if claims.key_owner != claims.issuer:
            problems["call.key-owner"] = (f"key {claims.key_id!r} belongs to {claims.key_owner!r}, "
                                          f"iss is {claims.issuer!r}")
        if claims.issuer != gateway:
            problems["call.issuer"] = f"iss {claims.issuer!r}, certificate names {gateway!r}"
        presented = tls.peer_thumbprint(auth)
        if claims.cert_thumbprint != presented:
            problems["call.cnf"] = f"cnf {claims.cert_thumbprint!r} is not the certificate's {presented!r}"
        if claims.rpc != method:
            problems["call.rpc"] = f"rpc {claims.rpc!r} on {method}"
        if claims.query_sha256 != qh:
            problems["call.qh"] = f"qh {claims.query_sha256[:16]}… is not {qh[:16]}…"
        if method == "Match" and not claims.case.strip():
            problems["call.case"] = "no case"
        if abs(claims.issued_at - seen.at) > tokens.CLOCK_SKEW_SECONDS:
            problems["call.times"] = f"iat {claims.issued_at} is {claims.issued_at - seen.at:+.0f} s from now"
        if any(c.token_id == claims.token_id for c in self.calls):
            problems["call.jti-unique"] = f"jti {claims.token_id!r} used before"
        return seen

    async def Match(self, request: pb.MatchRequest | None, context: grpc.aio.ServicerContext) -> pb.MatchResponse:
        items = items_from_pb(request) if request is not None else []
        seen = self._judge("Match", context, query_sha256(items))
        self.calls.append(seen)
        if request is None:
            seen.problems["call.qh"] = "request bytes did not parse as icse.v1.MatchRequest"
        hits = [pb.ItemResult(item=0, hits=[pb.Hit(reference=HIT_REFERENCE, country="ZZ", node_id=self.setup.node_id,
                                                   contact="conformance kit")])] if items else []
        return pb.MatchResponse(node_id=self.setup.node_id, country="ZZ", results=hits,
                                tier=pb.RELEASE_TIER_HIT, protocol_version=self.version)

    async def Describe(self, request: pb.DescribeRequest | None,
                       context: grpc.aio.ServicerContext) -> pb.DescribeResponse:
        self.calls.append(self._judge("Describe", context, EMPTY_QUERY_SHA256))
        return pb.DescribeResponse(node_id=self.setup.node_id, country="ZZ", software_version="conformance-kit",
                                   max_items_per_request=20_000, max_distance=31, protocol_version=self.version)

    def handlers(self) -> grpc.GenericRpcHandler:
        def lenient(parse):
            def deserialize(data: bytes):
                try:
                    return parse(data)
                except DecodeError:
                    return None
            return deserialize
        return grpc.method_handlers_generic_handler(SERVICE_NAME, {
            "Match": grpc.unary_unary_rpc_method_handler(self.Match, lenient(pb.MatchRequest.FromString),
                                                         pb.MatchResponse.SerializeToString),
            "Describe": grpc.unary_unary_rpc_method_handler(self.Describe, lenient(pb.DescribeRequest.FromString),
                                                            pb.DescribeResponse.SerializeToString),
        })


async def _run(command: str, address: str, config: Path | None, timeout: float) -> tuple[int, str]:
    """Runs one gateway command (no shell); returns its exit status and output."""
    words = [w.replace("{address}", address).replace("{config}", str(config or "")) for w in shlex.split(command)]
    process = await asyncio.create_subprocess_exec(*words, stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        return -1, output.decode(errors="replace") + f"\n(killed after {timeout:g} s)"
    return process.returncode or 0, output.decode(errors="replace")


async def run(setup: GatewaySetup, workdir: Path) -> list[Result]:
    node = CheckingNode(setup)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((node.handlers(),))
    port = server.add_secure_port(setup.listen, tls.server_credentials(setup.files))
    await server.start()
    host = setup.listen.rpartition(":")[0] or "127.0.0.1"
    address = f"{host}:{port}"
    config = None
    if setup.template is not None:
        config = workdir / "gateway-under-test.toml"
        config.write_text(setup.template.read_text().replace("{address}", address))
    results: list[Result] = []
    try:
        for number, command in enumerate(setup.runs, start=1):
            status, output = await _run(command, address, config, setup.timeout)
            results.append(judged(f"run.{number}", f"gateway command {number} exits 0", "exit status 0",
                                  f"exit status {status}: {output.strip()[-300:]}", status == 0))
        calls = list(node.calls)
        for method in ("Match", "Describe"):
            count = sum(c.method == method for c in calls)
            results.append(judged(f"calls.{method.lower()}", f"the gateway called {method}", "at least one call",
                                  f"{count} call(s)", count > 0))
        for name, rule in CALL_CHECKS.items():
            bad = [f"{c.method}: {c.problems[name]}" for c in calls if name in c.problems]
            results.append(judged(name, rule, rule, "; ".join(bad[:3]) or f"{len(calls)} call(s) fine",
                                  not bad and bool(calls)))
        node.version = f"{protocol.MAJOR + 1}.0"
        for number, command in enumerate(setup.incompatible_runs, start=1):
            status, output = await _run(command, address, config, setup.timeout)
            used = HIT_REFERENCE in output
            results.append(judged(
                f"incompatible.{number}", f"answers of a node speaking {node.version} are not used",
                f"non-zero exit status, {HIT_REFERENCE} not shown", f"exit status {status}"
                + (f", {HIT_REFERENCE} shown" if used else ""), status != 0 and not used))
    finally:
        await server.stop(None)
    return results
