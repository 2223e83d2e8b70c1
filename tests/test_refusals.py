"""Hostile and broken requests against a real node over real mutual TLS.

Each is refused with the right status and a message that says what was wrong,
and the node goes on answering honest queries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import time
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from federation import identity, tokens
from federation.pki import cert_pem, gateway_leaf, issue, key_pem, new_ca
from federation.query import QueryItem
from federation.tls import TlsFiles, channel_credentials
from tests.conftest import RunningFederation
from tests.support import Client, claims_for, gateway_client, signing_key

NODE = "FR"


@pytest.fixture
def node(federation: RunningFederation):
    return federation.local[NODE]


@pytest.fixture
def client(federation: RunningFederation, node) -> Client:
    return gateway_client(federation.local.pki, node.address, NODE)


@pytest.fixture
def honest(federation: RunningFederation) -> list[QueryItem]:
    return [QueryItem("sha256", bytes.fromhex(federation.data.shared_sha256))]


async def assert_still_serving(client: Client, federation: RunningFederation, items: list[QueryItem]) -> None:
    key = signing_key(federation.local.pki)
    response = await client.match(items, key.sign(claims_for(federation.local.pki, NODE, items)))
    assert [h.reference for h in response.results[0].hits] == ["FR-SHARED"]


async def refused(client: Client, items: list[QueryItem], token: str | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.match(items, token)
    return caught.value


def _foreign_identity(tmp_path: Path, federation: str) -> TlsFiles:
    """A gateway certificate from a CA that is not the federation's."""
    ca_key, ca_cert = new_ca("rogue CA")
    key, cert = issue(ca_key, ca_cert, gateway_leaf(federation, "eu-1"))
    (tmp_path / "ca.pem").write_bytes(cert_pem(ca_cert))
    (tmp_path / "rogue.pem").write_bytes(cert_pem(cert))
    (tmp_path / "rogue.key").write_bytes(key_pem(key))
    return TlsFiles(tmp_path / "ca.pem", tmp_path / "rogue.pem", tmp_path / "rogue.key")


def _raw_tls_refused(port: int, ca: Path, server_name: str, cert: TlsFiles | None) -> bool:
    """True when the node ends the TLS session instead of speaking HTTP/2."""
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(["h2"])
    if cert is not None:
        context.load_cert_chain(str(cert.cert), str(cert.key))
    try:
        with (socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
              context.wrap_socket(raw, server_hostname=server_name) as conn):
            conn.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            return conn.recv(1024) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True


async def test_client_without_certificate_fails_the_handshake(federation, node, client, honest) -> None:
    pki = federation.local.pki
    assert _raw_tls_refused(node.port, pki.ca_cert, identity.node_tls_name(pki.federation, NODE), None)
    bare = Client(node.address, NODE, pki.federation, grpc.ssl_channel_credentials(pki.ca_cert.read_bytes()))
    token = signing_key(pki).sign(claims_for(federation.local.pki, NODE, honest))
    error = await refused(bare, honest, token)
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    await assert_still_serving(client, federation, honest)


async def test_certificate_from_another_ca_fails_the_handshake(federation, node, client, honest, tmp_path) -> None:
    pki = federation.local.pki
    rogue = _foreign_identity(tmp_path, pki.federation)
    assert _raw_tls_refused(node.port, pki.ca_cert, identity.node_tls_name(pki.federation, NODE), rogue)
    # Trusting the real CA for the server, but presenting the rogue client certificate.
    creds = channel_credentials(TlsFiles(pki.ca_cert, rogue.cert, rogue.key))
    error = await refused(Client(node.address, NODE, pki.federation, creds), honest,
                          signing_key(pki).sign(claims_for(federation.local.pki, NODE, honest)))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    await assert_still_serving(client, federation, honest)


def _sign(federation: RunningFederation, claims: tokens.QueryClaims) -> str:
    return signing_key(federation.local.pki).sign(claims)


@pytest.mark.parametrize(
    ("case", "code", "message"),
    [
        ("missing token", grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization: Bearer' token"),
        ("other audience", grpc.StatusCode.UNAUTHENTICATED, "addressed to another node"),
        ("expired", grpc.StatusCode.UNAUTHENTICATED, "token has expired"),
        ("not yet valid", grpc.StatusCode.UNAUTHENTICATED, "not valid yet"),
        ("too long-lived", grpc.StatusCode.UNAUTHENTICATED, "lifetime exceeds 60 s"),
        ("unknown key", grpc.StatusCode.UNAUTHENTICATED, "unknown key id 'rogue-1'"),
        ("alg none", grpc.StatusCode.UNAUTHENTICATED, "token algorithm 'none' is not allowed"),
        ("hs256 with public key", grpc.StatusCode.UNAUTHENTICATED, "token algorithm 'HS256' is not allowed"),
        ("garbage", grpc.StatusCode.UNAUTHENTICATED, "malformed token"),
        ("items altered", grpc.StatusCode.PERMISSION_DENIED, "request items differ"),
        ("describe token", grpc.StatusCode.PERMISSION_DENIED, "token is for 'Describe', not 'Match'"),
        ("no case", grpc.StatusCode.PERMISSION_DENIED, "needs a case reference"),
    ],
)
async def test_bad_tokens_are_refused(federation, client, honest, case: str, code, message: str) -> None:
    now = time.time()
    token: str | None
    match case:
        case "missing token":
            token = None
        case "other audience":
            token = _sign(federation, claims_for(federation.local.pki, "DE", honest))
        case "expired":
            token = _sign(federation, claims_for(federation.local.pki, NODE, honest, now=now - 120))
        case "not yet valid":
            token = _sign(federation, claims_for(federation.local.pki, NODE, honest, now=now + 120))
        case "too long-lived":
            long_lived = claims_for(federation.local.pki, NODE, honest)
            claims = long_lived.to_jwt_claims() | {"exp": long_lived.issued_at + 3600}
            key = signing_key(federation.local.pki)
            token = jwt.encode(claims, key.private_key, algorithm="EdDSA", headers={"kid": key.kid})
        case "unknown key":
            rogue = tokens.SigningKey("rogue-1", ed25519.Ed25519PrivateKey.generate())
            token = rogue.sign(claims_for(federation.local.pki, NODE, honest))
        case "alg none":
            token = jwt.encode(claims_for(federation.local.pki, NODE, honest).to_jwt_claims(), None, algorithm="none",
                               headers={"kid": signing_key(federation.local.pki).kid})
        case "hs256 with public key":
            public = federation.local.pki.jwks.read_bytes()
            token = _forge_hs256(claims_for(federation.local.pki, NODE, honest).to_jwt_claims(), public,
                                 signing_key(federation.local.pki).kid)
        case "garbage":
            token = "not.a.jwt"
        case "items altered":
            token = _sign(federation, claims_for(federation.local.pki, NODE, [QueryItem("md5", b"\x01" * 16)]))
        case "describe token":
            token = _sign(federation, claims_for(federation.local.pki, NODE, honest, rpc_name="Describe"))
        case "no case":
            token = _sign(federation, claims_for(federation.local.pki, NODE, honest, case=""))
    error = await refused(client, honest, token)
    assert error.code() == code
    assert message in error.details()
    await assert_still_serving(client, federation, honest)


def _forge_hs256(claims: dict, secret: bytes, kid: str) -> str:
    """The classic confusion attack: HMAC-sign with the verifier's public key."""
    def b64(data: bytes) -> bytes:
        return base64.urlsafe_b64encode(data).rstrip(b"=")

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    body = b64(json.dumps(claims).encode())
    signature = b64(hmac.new(secret, head + b"." + body, hashlib.sha256).digest())
    return (head + b"." + body + b"." + signature).decode()


async def test_gateway_the_node_does_not_trust_is_denied(federation, node, client, honest) -> None:
    pki = federation.local.pki
    other = gateway_client(pki, node.address, NODE, gateway_id="eu-2")
    token = signing_key(pki, "eu-2").sign(claims_for(federation.local.pki, NODE, honest, issuer="eu-2"))
    error = await refused(other, honest, token)
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "gateway 'eu-2' is not trusted" in error.details()
    await assert_still_serving(client, federation, honest)


async def test_token_presented_over_another_gateways_connection_is_denied(federation, node, client, honest) -> None:
    pki = federation.local.pki
    other = gateway_client(pki, node.address, NODE, gateway_id="eu-2")
    error = await refused(other, honest, _sign(federation, claims_for(federation.local.pki, NODE, honest)))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "presented by 'eu-2'" in error.details()


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([QueryItem("sha256", b"\x00" * 32), QueryItem("sha256", b"\x00" * 31)],
         "item 1: sha256 digest must be 32 bytes (64 hex characters), got 31"),
        ([QueryItem("crc32", b"\x00" * 4)], "item 0: unknown algorithm 'crc32' (known: md5, sha1, sha256, pdq, vpdq)"),
        ([QueryItem("md5", b"\x00" * 16, max_distance=3)], "item 0: md5 is matched exactly; max_distance must be 0"),
        ([], "request has no items"),
        ([QueryItem("md5", b"\x00" * 16)] * 20_001, "request has 20001 items; this node accepts at most 20000"),
    ],
    ids=["short digest", "unknown algorithm", "distance on exact", "empty", "oversized batch"],
)
async def test_malformed_items_are_invalid_argument(federation, client, honest, items, message: str) -> None:
    error = await refused(client, items, _sign(federation, claims_for(federation.local.pki, NODE, items)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error.details() == message
    await assert_still_serving(client, federation, honest)


def test_raw_tls_probe_accepts_a_member_certificate(federation, node) -> None:
    """Control for the handshake tests above: a gateway certificate gets HTTP/2 back."""
    pki = federation.local.pki
    member = TlsFiles(pki.ca_cert, pki.gateway_cert("eu-1"), pki.gateway_key("eu-1"))
    assert not _raw_tls_refused(node.port, pki.ca_cert, identity.node_tls_name(pki.federation, NODE), member)
