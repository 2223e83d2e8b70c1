"""``icse-conformance node``: the catalogue a node must pass, played as a gateway.

Each check makes one or two real calls over mutual TLS with the identity and
signing key given, and compares the outcome (status code, answer) with what
PROTOCOL.md requires. Messages are shown but never judged: only codes and
answers are normative.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import jwt
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from federation import protocol, tls, tokens
from federation.conformance.packed_checks import PackedChecks
from federation.conformance.private_kit import PrivateChecks
from federation.conformance.report import Result, judged, skipped
from federation.conformance.since_checks import SinceChecks
from federation.conformance.target import NodeTarget, only_hit_at
from federation.query import EMPTY_QUERY_SHA256, QueryItem, query_sha256
from federation.wire import SERVICE_NAME, items_to_pb, pb

OK = "OK"
UNAUTH = grpc.StatusCode.UNAUTHENTICATED.name
DENIED = grpc.StatusCode.PERMISSION_DENIED.name
INVALID = grpc.StatusCode.INVALID_ARGUMENT.name
REFLECTION = {"v1": "grpc.reflection.v1.ServerReflection", "v1alpha": "grpc.reflection.v1alpha.ServerReflection"}


def _random_items() -> list[QueryItem]:
    return [QueryItem("md5", os.urandom(16)), QueryItem("sha1", os.urandom(20)), QueryItem("sha256", os.urandom(32))]


def legacy_json_qh(items: Sequence[QueryItem]) -> str:
    """The query digest of protocol drafts before 1.0 (JSON); a 1.0 node must refuse it."""
    text = json.dumps([[i.algorithm, i.digest.hex(), i.max_distance] for i in items], separators=(",", ":"))
    return hashlib.sha256(b"icse.v1.match\n" + text.encode("ascii")).hexdigest()


class NodeKit:
    def __init__(self, target: NodeTarget):
        self.t = target
        self._thumbprint = tls.thumbprint(target.files.cert.read_bytes())
        self._channel: grpc.aio.Channel | None = None

    # ------------------------------------------------------------------ calls

    def claims(self, items: Sequence[QueryItem], rpc: str = "Match", **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = tokens.QueryClaims(
            issuer=self.t.gateway_id, subject="conformance-officer", org="Conformance Kit", country="ZZ",
            audience=self.t.node_id, rpc=rpc,
            query_sha256=query_sha256(items) if rpc == "Match" else EMPTY_QUERY_SHA256,
            case="CONFORMANCE" if rpc == "Match" else "", cert_thumbprint=self._thumbprint,
            issued_at=now, expires_at=now + 30, token_id=os.urandom(16).hex()).to_jwt_claims()
        claims.update(changes)
        return {k: v for k, v in claims.items() if v is not None}

    def sign(self, claims: dict[str, Any], key: tokens.SigningKey | None = None, kid: str | None = None) -> str:
        key = key or self.t.key
        return jwt.encode(claims, key.private_key, algorithm=key.algorithm,
                          headers={"kid": kid or key.kid, "typ": "JWT"})

    def token(self, items: Sequence[QueryItem], rpc: str = "Match", **changes: Any) -> str:
        return self.sign(self.claims(items, rpc, **changes))

    def _at(self, items: Sequence[QueryItem], **offsets: int) -> str:
        """A Match token whose time claims (iat, nbf, exp) are now plus the offsets given, in seconds."""
        now = int(time.time())
        changes: dict[str, Any] = {claim: now + offset for claim, offset in offsets.items()}
        return self.token(items, **changes)

    def channel(self) -> grpc.aio.Channel:
        if self._channel is None:
            self._channel = grpc.aio.secure_channel(
                self.t.address, tls.channel_credentials(self.t.files),
                options=[("grpc.ssl_target_name_override", self.t.tls_name), ("grpc.enable_retries", 0)])
        return self._channel

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    async def call(self, method: str, request: bytes, token: str | None,
                   metadata: tuple[tuple[str, str], ...] = ()) -> tuple[str, bytes | str]:
        """(status name, response bytes or the refusal's message)."""
        # No (de)serializers: the kit sends and reads raw bytes, so it can send bytes that do not parse.
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel().unary_unary(f"/{SERVICE_NAME}/{method}")
        headers = (tokens.bearer(token) if token is not None else ()) + metadata
        try:
            answer = await stub(request, timeout=self.t.timeout, metadata=headers)
        except grpc.aio.AioRpcError as error:
            return error.code().name, error.details() or ""
        return OK, answer

    async def match(self, items: Sequence[QueryItem], token: str | None, **kw: Any) -> tuple[str, Any]:
        status, body = await self.call("Match", items_to_pb(items).SerializeToString(), token, **kw)
        return (status, pb.MatchResponse.FromString(body)) if isinstance(body, bytes) else (status, body)

    async def describe(self, token: str | None) -> tuple[str, Any]:
        status, body = await self.call("Describe", b"", token)
        return (status, pb.DescribeResponse.FromString(body)) if isinstance(body, bytes) else (status, body)

    # ------------------------------------------------------------------ catalogue

    async def run(self) -> list[Result]:
        results = []
        for name, title, check in self.catalogue():
            # The kit judges a foreign implementation: whatever a check raises on its answers
            # (a malformed field, a refused stream, an error of the kit itself) is that check's
            # failure, reported in words, and the rest of the catalogue still runs.
            try:
                ok, expected, got = await check()
            except Exception as exc:  # noqa: BLE001 - any error of a check is that check's result
                ok, expected, got = False, "the check to run", f"{type(exc).__name__}: {exc}"
            if ok is None:
                results.append(skipped(name, title, got))
            else:
                results.append(judged(name, title, expected, got, ok))
        await self.close()
        return results

    def catalogue(self) -> list[tuple[str, str, Callable[[], Awaitable[tuple[bool | None, str, str]]]]]:
        refusals = [
            ("token.missing", "no authorization metadata", UNAUTH, lambda i: None),
            ("token.not-bearer", "authorization that is not 'Bearer <token>'", UNAUTH, "basic"),
            ("token.alg-none", "unsigned token (alg none)", UNAUTH, self._alg_none),
            ("token.unknown-kid", "kid not in the node's key set", UNAUTH,
             lambda i: self.sign(self.claims(i), kid="conformance-unknown-kid")),
            ("token.bad-signature", "payload altered after signing", UNAUTH, self._tampered),
            ("token.expired", "exp 40 s ago", UNAUTH,
             lambda i: self._at(i, iat=-70, nbf=-70, exp=-40)),
            ("token.future", "iat and nbf 120 s ahead", UNAUTH,
             lambda i: self._at(i, iat=120, nbf=120, exp=150)),
            ("token.lifetime", "lifetime of 61 s", UNAUTH, lambda i: self._at(i, exp=61)),
            ("token.other-audience", "aud names another node", UNAUTH,
             lambda i: self.token(i, aud=self.t.node_id + "X")),
            ("token.audience-case", "aud differs only in letter case", UNAUTH, self._audience_case),
            ("token.missing-claim", "no jti", UNAUTH, lambda i: self.token(i, jti=None)),
            ("token.claim-type", "org as a JSON array", UNAUTH, lambda i: self.token(i, org=["x"])),
            ("auth.other-items", "qh of other items", DENIED, lambda i: self.token(_random_items())),
            ("auth.legacy-qh", "qh in the pre-1.0 JSON encoding", DENIED,
             lambda i: self.token(i, qh=legacy_json_qh(i))),
            ("auth.other-rpc", "a Describe token on Match", DENIED,
             lambda i: self.token(i, rpc="Describe", qh=query_sha256(i))),
            ("auth.other-certificate", "cnf thumbprint of another certificate", DENIED,
             lambda i: self.token(i, cnf={"x5t#S256": base64.urlsafe_b64encode(os.urandom(32)).rstrip(b"=").decode()})),
            ("auth.other-issuer", "iss names a gateway other than the certificate's", DENIED,
             lambda i: self.token(i, iss=self.t.gateway_id + "-other")),
            ("auth.no-case", "a Match token without case", DENIED, lambda i: self.token(i, case=None)),
            ("auth.key-of-another-gateway", "signed with a trusted key that belongs to another gateway", DENIED,
             self._other_key),
        ]
        checks: list[tuple[str, str, Callable[[], Awaitable[tuple[bool | None, str, str]]]]] = [
            ("transport.health", "grpc.health.v1 Check answers SERVING", self._health),
            ("transport.reflection-v1", "reflection grpc.reflection.v1 lists icse.v1.Node",
             lambda: self._reflection("v1")),
            ("transport.reflection-v1alpha", "reflection grpc.reflection.v1alpha lists icse.v1.Node",
             lambda: self._reflection("v1alpha")),
            ("describe.answer", "Describe names the node and protocol major 1", self._describe),
            ("match.no-hit-is-absent", "unknown digests: an answer with no results", self._no_hit),
            ("match.hit-in-place", "a known digest: one result, at its position", self._hit),
            ("token.replayed", "the same token twice: the second refused", self._replay),
        ]
        checks += [(name, title, self._refusal(expected, make)) for name, title, expected, make in refusals]
        checks += [
            ("request.malformed", "bytes that are not a MatchRequest", self._malformed),
            ("request.empty", "no items", self._shape([], INVALID)),
            ("request.unknown-algorithm", "algorithm 'crc32'", self._shape([QueryItem("crc32", bytes(4))], INVALID)),
            ("request.digest-length", "sha1 digest of 19 bytes", self._shape([QueryItem("sha1", bytes(19))], INVALID)),
            ("request.distance-on-exact", "max_distance on an exact algorithm",
             self._shape([QueryItem("sha256", bytes(32), 3)], INVALID)),
            ("request.too-many", "one item more than Describe's max_items_per_request", self._too_many),
            *SinceChecks(self).catalogue(),
            *PackedChecks(self).catalogue(),
        ]
        # Private exact matching (skipped when the node does not offer it), then a last honest query.
        checks += PrivateChecks(self).catalogue()
        checks.append(("after.still-serving", "an honest query after the catalogue is answered", self._still_serving))
        return checks

    # ------------------------------------------------------------------ functional

    async def _health(self) -> tuple[bool, str, str]:
        stub = health_pb2_grpc.HealthStub(self.channel())
        try:
            answer = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.t.timeout)
        except grpc.aio.AioRpcError as error:
            return False, "SERVING", f"{error.code().name}: {error.details()}"
        got = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        return got == "SERVING", "SERVING", got

    async def _reflection(self, version: str) -> tuple[bool, str, str]:
        call = self.channel().stream_stream(
            f"/{REFLECTION[version]}/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)
        try:
            async for answer in call(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                     timeout=self.t.timeout):
                names = [s.name for s in answer.list_services_response.service]
                return SERVICE_NAME in names, f"a list holding {SERVICE_NAME}", ", ".join(names) or "no services"
        except grpc.aio.AioRpcError as error:
            return False, f"a list holding {SERVICE_NAME}", f"{error.code().name}: {error.details()}"
        return False, f"a list holding {SERVICE_NAME}", "no answer"

    async def _describe(self) -> tuple[bool, str, str]:
        status, answer = await self.describe(self.token([], rpc="Describe"))
        expected = f"OK, node_id {self.t.node_id!r}, protocol_version {protocol.MAJOR}.x"
        if status != OK:
            return False, expected, f"{status}: {answer}"
        got = f"node_id {answer.node_id!r}, protocol_version {answer.protocol_version!r}"
        try:
            protocol.check_compatible(answer.protocol_version, "node")
        except protocol.IncompatibleProtocol:
            return False, expected, got
        return answer.node_id == self.t.node_id, expected, got

    async def _no_hit(self) -> tuple[bool, str, str]:
        items = _random_items()
        status, answer = await self.match(items, self.token(items))
        expected = "OK with no results, node_id and protocol_version stated"
        if status != OK:
            return False, expected, f"{status}: {answer}"
        got = (f"{len(answer.results)} result(s), node_id {answer.node_id!r}, "
               f"protocol_version {answer.protocol_version!r}")
        return (not answer.results and answer.node_id == self.t.node_id
                and answer.protocol_version.startswith(f"{protocol.MAJOR}.")), expected, got

    async def _hit(self) -> tuple[bool | None, str, str]:
        if self.t.known is None:
            return None, "", "no --known digest given"
        items = [_random_items()[0], self.t.known, _random_items()[2]]
        status, answer = await self.match(items, self.token(items))
        expected = "OK, one result: item 1, with hits that carry a reference"
        if status != OK:
            return False, expected, f"{status}: {answer}"
        ok, got = only_hit_at(answer.results, 1)
        return ok, expected, got

    async def _replay(self) -> tuple[bool, str, str]:
        items = _random_items()
        token = self.token(items)
        first, _ = await self.match(items, token)
        second, message = await self.match(items, token)
        got = f"{first} then {second} {message if second != OK else ''}"
        return (first, second) == (OK, UNAUTH), f"OK then {UNAUTH}", got

    # ------------------------------------------------------------------ hostile

    def _refusal(self, expected: str, make: Any) -> Callable[[], Awaitable[tuple[bool | None, str, str]]]:
        async def check() -> tuple[bool | None, str, str]:
            items = _random_items()
            if make == "basic":
                basic = (("authorization", "Basic Y29uZm9ybWFuY2U="),)
                status, message = await self.match(items, None, metadata=basic)
            else:
                token = make(items)
                if token is False:
                    return None, expected, "needs --other-signing-key and --other-kid"
                status, message = await self.match(items, token)
            return status == expected, expected, f"{status}: {message if status != OK else 'answered'}"
        return check

    def _alg_none(self, items: Sequence[QueryItem]) -> str:
        header = base64.urlsafe_b64encode(json.dumps({"alg": "none", "kid": self.t.key.kid}).encode()).rstrip(b"=")
        body = base64.urlsafe_b64encode(json.dumps(self.claims(items)).encode()).rstrip(b"=")
        return f"{header.decode()}.{body.decode()}."

    def _tampered(self, items: Sequence[QueryItem]) -> str:
        header, _, signature = self.token(items).split(".")
        body = base64.urlsafe_b64encode(json.dumps(self.claims(items, sub="someone-else")).encode()).rstrip(b"=")
        return f"{header}.{body.decode()}.{signature}"

    def _audience_case(self, items: Sequence[QueryItem]) -> str:
        swapped = self.t.node_id.swapcase()
        return self.token(items, aud=swapped if swapped != self.t.node_id else self.t.node_id + "x")

    def _other_key(self, items: Sequence[QueryItem]) -> str | bool:
        if self.t.other_key is None:
            return False
        return self.sign(self.claims(items), key=self.t.other_key)

    def _shape(self, items: list[QueryItem], expected: str) -> Callable[[], Awaitable[tuple[bool, str, str]]]:
        async def check() -> tuple[bool, str, str]:
            status, message = await self.match(items, self.token(items))
            return status == expected, expected, f"{status}: {message if status != OK else 'answered'}"
        return check

    async def _malformed(self) -> tuple[bool, str, str]:
        # Field 1 (items) as a length-delimited record whose length runs past the end.
        raw = b"\x0a\x7f\x0a\x03md5"
        status, message = await self.call("Match", raw, self.token([]))
        return status == INVALID, INVALID, f"{status}: {message if isinstance(message, str) else 'answered'}"

    async def _too_many(self) -> tuple[bool, str, str]:
        status, answer = await self.describe(self.token([], rpc="Describe"))
        if status != OK or not answer.max_items_per_request:
            return False, INVALID, f"Describe gave no max_items_per_request ({status})"
        items = [QueryItem("md5", os.urandom(16)) for _ in range(answer.max_items_per_request + 1)]
        status, message = await self.match(items, self.token(items))
        return status == INVALID, INVALID, f"{status}: {message if status != OK else 'answered'}"

    async def _still_serving(self) -> tuple[bool, str, str]:
        items = _random_items()
        status, message = await self.match(items, self.token(items))
        return status == OK, OK, status if status == OK else f"{status}: {message}"
