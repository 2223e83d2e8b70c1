"""The attack catalogue, against a real node process with its own policy.

Every hostile case is refused with the right status, leaves an audit record
where it reached the node's logic, and leaves the node answering honest
queries. (Token forgeries and malformed items are in test_refusals.py.)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from federation import tokens
from federation.localfed import LocalFederation, LocalNode, NodeSpec, toml_text
from federation.pki import DevPki, Leaf, cert_pem, gateway_leaf, issue, key_pem
from federation.query import QueryItem
from federation.tls import TlsFiles, channel_credentials
from tests.support import Client, claims_for, gateway_client, signing_key

NODE = "PL"
KNOWN = bytes.fromhex("5a" * 32)


@dataclass
class Target:
    node: LocalNode
    pki: DevPki
    jwks: Path  # this node's own copy of the trusted key set

    def client(self, gateway: str = "eu-1") -> Client:
        return gateway_client(self.pki, self.node.address, NODE, gateway)

    def sign(self, items: list[QueryItem], **claims) -> str:
        return signing_key(self.pki).sign(claims_for(self.pki, NODE, items, **claims))

    def audit(self) -> list[dict]:
        done = subprocess.run(self.node.node_command("audit", "export", "--config", str(self.node.config_path)),
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture(scope="module")
def target(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    workdir = tmp_path_factory.mktemp("attacks")
    local = LocalFederation(workdir, pki, [NodeSpec(NODE, NODE, "cyber@policja.example.pl")])
    node = local[NODE]
    jwks = workdir / "trusted-keys.jwks.json"
    shutil.copy(pki.jwks, jwks)
    node.dir.mkdir(parents=True, exist_ok=True)
    node.config_path.write_text(toml_text({
        "node": {"id": NODE, "country": NODE, "federation": pki.federation, "listen": "127.0.0.1:0",
                 "store": str(node.store_path), "contact": "cyber@policja.example.pl"},
        "tls": {"ca": str(pki.ca_cert), "cert": str(pki.node_cert(NODE)), "key": str(pki.node_key(NODE))},
        "trust": {"gateway_keys": str(jwks), "gateways": ["eu-1"]},
        "limits": {"max_items": 500},
        "policy": {"countries": ["FR", "DE"], "tier": "standard", "requests_per_minute": 60,
                   "items_per_day": 100_000},
        "policy.tiers": {"DE": "hit"},
    }))
    known = workdir / "known.csv"
    known.write_text(f"algorithm,digest,reference,category,victim_identified,series\nsha256,{KNOWN.hex()},PL-77,2,true,S-X\n")
    assert node.import_file(known).returncode == 0
    with local:
        yield Target(node, pki, jwks)


HONEST = [QueryItem("sha256", KNOWN)]


async def still_serving(target: Target) -> None:
    response = await target.client().match(HONEST, target.sign(HONEST))
    assert [h.reference for h in response.results[0].hits] == ["PL-77"]


async def refused(client: Client, items: list[QueryItem], token: str | None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.match(items, token)
    return caught.value


def audited(target: Target, status: str, detail: str) -> dict:
    records = [r for r in target.audit() if r["status"] == status and detail in r["detail"]]
    assert records, f"no audit record with {status} and {detail!r}"
    return records[-1]


def _reissued(pki: DevPki, tmp_path: Path, leaf: Leaf, name: str) -> TlsFiles:
    """A certificate from the federation's own CA (its key is in the dev PKI)."""
    ca_key = load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key, cert = issue(ca_key, ca_cert, leaf)
    (tmp_path / f"{name}.pem").write_bytes(cert_pem(cert))
    (tmp_path / f"{name}.key").write_bytes(key_pem(key))
    return TlsFiles(pki.ca_cert, tmp_path / f"{name}.pem", tmp_path / f"{name}.key")


def _client_with(target: Target, files: TlsFiles) -> Client:
    return Client(target.node.address, NODE, target.pki.federation, channel_credentials(files))


@pytest.mark.parametrize("validity", ["expired", "not yet valid"])
async def test_client_certificate_outside_its_validity_fails_the_handshake(target: Target, tmp_path: Path,
                                                                           validity: str) -> None:
    now = dt.datetime.now(dt.UTC)
    window = ((now - dt.timedelta(days=30), now - dt.timedelta(days=1)) if validity == "expired"
              else (now + dt.timedelta(days=1), now + dt.timedelta(days=30)))
    base = gateway_leaf(target.pki.federation, "eu-1")
    leaf = Leaf(base.common_name, base.uris, client=True, not_before=window[0], not_after=window[1])
    error = await refused(_client_with(target, _reissued(target.pki, tmp_path, leaf, "dated")), HONEST,
                          target.sign(HONEST))
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    await still_serving(target)


async def test_a_nodes_certificate_cannot_act_as_a_gateway(target: Target) -> None:
    pki = target.pki
    as_client = _client_with(target, TlsFiles(pki.ca_cert, pki.node_cert("DE"), pki.node_key("DE")))
    error = await refused(as_client, HONEST, target.sign(HONEST))
    # Refused in the handshake (no clientAuth usage) or by the node's check of the peer's identity.
    assert error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.PERMISSION_DENIED)
    if error.code() == grpc.StatusCode.PERMISSION_DENIED:
        assert "does not name a gateway" in error.details()
        audited(target, "PERMISSION_DENIED", "does not name a gateway")
    await still_serving(target)


async def test_replayed_token_is_refused(target: Target) -> None:
    token = target.sign(HONEST)
    await target.client().match(HONEST, token)
    error = await refused(target.client(), HONEST, token)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "already been used" in error.details()
    audited(target, "UNAUTHENTICATED", "already been used")
    await still_serving(target)


async def test_concurrent_replays_get_exactly_one_answer(target: Target) -> None:
    token = target.sign(HONEST)
    outcomes = await asyncio.gather(*(target.client().match(HONEST, token) for _ in range(8)),
                                    return_exceptions=True)
    answered = [o for o in outcomes if not isinstance(o, Exception)]
    assert len(answered) == 1
    assert all(o.code() == grpc.StatusCode.UNAUTHENTICATED for o in outcomes if isinstance(o, Exception))


async def test_token_over_another_certificate_of_the_same_gateway_is_denied(target: Target, tmp_path: Path) -> None:
    """A token lifted from one connection is useless on any other (RFC 8705 binding)."""
    other_cert = _reissued(target.pki, tmp_path, gateway_leaf(target.pki.federation, "eu-1"), "eu-1-other")
    error = await refused(_client_with(target, other_cert), HONEST, target.sign(HONEST))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "bound to another client certificate" in error.details()
    record = audited(target, "PERMISSION_DENIED", "bound to another client certificate")
    assert record["gateway"] == "eu-1" and record["officer"] == "officer-1"
    await still_serving(target)


async def test_requesting_country_outside_policy_is_denied(target: Target) -> None:
    error = await refused(target.client(), HONEST, target.sign(HONEST, country="US"))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "country 'US' are not accepted" in error.details()
    assert audited(target, "PERMISSION_DENIED", "country 'US'")["country"] == "US"
    await still_serving(target)


async def test_hit_tier_releases_reference_and_contact_only(target: Target) -> None:
    response = await target.client().match(HONEST, target.sign(HONEST, country="DE"))
    (hit,) = response.results[0].hits
    assert (hit.reference, hit.country, hit.contact) == ("PL-77", "PL", "cyber@policja.example.pl")
    assert (hit.category, hit.series, hit.date_added, hit.HasField("victim_identified")) == ("", "", "", False)
    standard = (await target.client().match(HONEST, target.sign(HONEST))).results[0].hits[0]
    assert (standard.category, standard.series, standard.victim_identified) == ("2", "S-X", True)


async def test_requester_over_its_rate_is_refused(target: Target) -> None:
    outcomes = []
    for _ in range(65):
        try:
            await target.client().match(HONEST, target.sign(HONEST, subject="hasty-officer"))
            outcomes.append("ok")
        except grpc.aio.AioRpcError as error:
            outcomes.append(error.code())
    assert outcomes[:60] == ["ok"] * 60
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes[60:]
    assert audited(target, "RESOURCE_EXHAUSTED", "rate limit")["officer"] == "hasty-officer"
    await still_serving(target)


async def test_oversized_batch_is_refused(target: Target) -> None:
    items = [QueryItem("md5", os.urandom(16)) for _ in range(501)]
    error = await refused(target.client(), items, target.sign(items))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "accepts at most 500" in error.details()
    assert audited(target, "INVALID_ARGUMENT", "accepts at most 500")["items"] == 501
    await still_serving(target)


async def test_malformed_protobuf_is_invalid_argument(target: Target) -> None:
    async with target.client().channel() as channel:
        raw = channel.unary_unary("/icse.v1.Node/Match")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"\xff\xff\xff\x07garbage", timeout=5, metadata=tokens.bearer(target.sign(HONEST)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid icse.v1.MatchRequest" in caught.value.details()
    assert audited(target, "INVALID_ARGUMENT", "protobuf did not parse")["gateway"] == "eu-1"
    await still_serving(target)


async def test_huge_metadata_is_refused_before_the_service(target: Target) -> None:
    async with target.client().channel() as channel:
        raw = channel.unary_unary("/icse.v1.Node/Match")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await raw(b"", timeout=5, metadata=(("x-padding", "a" * 100_000),))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await still_serving(target)


async def test_signing_keys_rotate_without_restart(target: Target) -> None:
    original = target.jwks.read_text()
    new_key = tokens.SigningKey("eu-1-2", ed25519.Ed25519PrivateKey.generate())
    new_token = lambda: new_key.sign(claims_for(target.pki, NODE, HONEST))  # noqa: E731
    try:
        error = await refused(target.client(), HONEST, new_token())
        assert "unknown key id 'eu-1-2'" in error.details()
        # The operator publishes the new key next to the old one ...
        document = json.loads(original)
        document["keys"].append(tokens.public_jwk(new_key, "eu-1"))
        target.jwks.write_text(json.dumps(document))
        await target.client().match(HONEST, new_token())
        await target.client().match(HONEST, target.sign(HONEST))
        # ... then withdraws the old one.
        target.jwks.write_text(json.dumps({"keys": [tokens.public_jwk(new_key, "eu-1")]}))
        error = await refused(target.client(), HONEST, target.sign(HONEST))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED and "unknown key id 'eu-1-1'" in error.details()
    finally:
        target.jwks.write_text(original)
    await still_serving(target)


async def test_no_hit_digests_leave_no_trace(target: Target) -> None:
    secret = os.urandom(32)
    items = [QueryItem("sha256", secret), QueryItem("sha256", KNOWN)]
    response = await target.client().match(items, target.sign(items))
    assert [r.item for r in response.results] == [1]
    traces = [target.node.log_path.read_bytes()]
    traces += [p.read_bytes() for p in target.node.dir.rglob("store.sqlite*") if p.is_file()]
    traces.append(json.dumps(target.audit()).encode())
    for blob in traces:
        assert secret not in blob and secret.hex().encode() not in blob
    record = target.audit()[-1]
    assert (record["items"], record["hits"], record["references"], record["status"]) == (2, 1, ["PL-77"], "OK")


def test_audit_chain_verifies_after_the_catalogue(target: Target) -> None:
    done = subprocess.run(target.node.node_command("audit", "verify", "--config", str(target.node.config_path)),
                          capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    assert len(target.audit()) > 20
