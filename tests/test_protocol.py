"""Protocol rules that a foreign implementation depends on, checked against a
real node over real mutual TLS: key ownership (RFC 8725 §3.8), the signing key
in the audit, reflection under both service names, the protocol version.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from google.protobuf import descriptor_pool
from grpc_reflection.v1alpha import reflection_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from federation import identity, protocol, tokens
from federation.localfed import LocalNode, environment
from federation.query import QueryItem
from federation.tls import TlsFiles, channel_credentials
from federation.wire import SERVICE_NAME, pb, rpc
from node.auth import ReloadingKeySet
from tests.conftest import RunningFederation
from tests.support import claims_for, gateway_client, signing_key

NODE = "FR"


@pytest.fixture
def node(federation: RunningFederation) -> LocalNode:
    return federation.local[NODE]


def _audit(node: LocalNode) -> list[dict]:
    done = subprocess.run([sys.executable, "-m", "node.cli", "audit", "export", "--config", str(node.config_path)],
                          capture_output=True, text=True, timeout=60, env=environment(), check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _honest(federation: RunningFederation) -> list[QueryItem]:
    return [QueryItem("sha256", bytes.fromhex(federation.data.shared_sha256))]


async def test_token_signed_with_another_gateways_key_is_denied(federation: RunningFederation, node: LocalNode) -> None:
    """Gateway eu-1's certificate, iss eu-1, cnf eu-1 — but signed with eu-2's key (kid eu-2-1).

    eu-2's key is in the node's trusted key set (eu-2 is a member), so the
    signature verifies; the key does not belong to the issuer."""
    pki, items = federation.local.pki, _honest(federation)
    claims = claims_for(pki, NODE, items, issuer="eu-1", case="CASE-KEYOWNER")
    forged = signing_key(pki, "eu-2").sign(claims)
    client = gateway_client(pki, node.address, NODE, gateway_id="eu-1")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await client.match(items, forged)
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == ("token signed with key 'eu-2-1', which belongs to gateway 'eu-2', "
                                      "not to its issuer 'eu-1'")
    record = next(r for r in reversed(_audit(node)) if r["case"] == "CASE-KEYOWNER")
    assert (record["status"], record["gateway"], record["key_id"]) == ("PERMISSION_DENIED", "eu-1", "eu-2-1")
    assert record["references"] == []
    # The same claims signed with eu-1's own key are answered.
    honest = await client.match(items, signing_key(pki, "eu-1").sign(claims_for(pki, NODE, items, case="CASE-OWN")))
    assert [h.reference for h in honest.results[0].hits] == ["FR-SHARED"]


async def test_audit_records_the_signing_key(federation: RunningFederation, node: LocalNode) -> None:
    pki, items = federation.local.pki, _honest(federation)
    key = signing_key(pki)
    await gateway_client(pki, node.address, NODE).match(items, key.sign(claims_for(pki, NODE, items, case="CASE-KID")))
    record = next(r for r in reversed(_audit(node)) if r["case"] == "CASE-KID")
    assert (record["status"], record["key_id"]) == ("OK", key.kid)


async def test_match_and_describe_state_the_protocol_version(federation: RunningFederation, node: LocalNode) -> None:
    pki, items = federation.local.pki, _honest(federation)
    client = gateway_client(pki, node.address, NODE)
    answer = await client.match(items, signing_key(pki).sign(claims_for(pki, NODE, items)))
    assert answer.protocol_version == protocol.VERSION
    token = signing_key(pki).sign(claims_for(pki, NODE, [], rpc_name="Describe", case=""))
    async with client.channel() as channel:
        described = await rpc.NodeStub(channel).Describe(pb.DescribeRequest(), timeout=10,
                                                         metadata=tokens.bearer(token))
    assert described.protocol_version == protocol.VERSION


def _sync_channel(federation: RunningFederation, node: LocalNode) -> grpc.Channel:
    pki = federation.local.pki
    files = TlsFiles(pki.ca_cert, pki.gateway_cert("eu-1"), pki.gateway_key("eu-1"))
    return grpc.secure_channel(node.address, channel_credentials(files), options=[
        ("grpc.ssl_target_name_override", identity.node_tls_name(pki.federation, NODE))])


class _V1Stub:
    """The reflection client's stub, pointed at ``grpc.reflection.v1`` (same messages on the wire)."""

    def __init__(self, channel: grpc.Channel):
        self.ServerReflectionInfo = channel.stream_stream(
            "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString)


@pytest.mark.parametrize("version", ["v1", "v1alpha"])
def test_reflection_answers_under_both_service_names(federation: RunningFederation, node: LocalNode,
                                                     version: str) -> None:
    """grpcio-reflection's own client resolves the Node service's methods over either name."""
    with _sync_channel(federation, node) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        if version == "v1":
            database._stub = _V1Stub(channel)  # the client's one stub, asked under the v1 name
        services = database.get_services()
        assert {SERVICE_NAME, "grpc.reflection.v1.ServerReflection",
                "grpc.reflection.v1alpha.ServerReflection"} <= set(services)
        pool = descriptor_pool.DescriptorPool(database)
        node_service = pool.FindServiceByName(SERVICE_NAME)
        assert [m.name for m in node_service.methods] == ["Match", "Describe"]
        assert "protocol_version" in pool.FindMessageTypeByName("icse.v1.DescribeResponse").fields_by_name
        v1 = pool.FindServiceByName("grpc.reflection.v1.ServerReflection")
        assert v1.methods[0].input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"


# --------------------------------------------------------------------------- trusted key set, as loaded


def _jwk(kid: str, owner: str | None) -> dict:
    entry = tokens.public_jwk(tokens.SigningKey(kid, ed25519.Ed25519PrivateKey.generate()), "eu-1")
    if owner is None:
        del entry[tokens.KEY_OWNER_MEMBER]
    else:
        entry[tokens.KEY_OWNER_MEMBER] = owner
    return entry


@pytest.mark.parametrize(("keys", "message"), [
    ([_jwk("k1", None)], "key 'k1' names no gateway"),
    ([_jwk("k1", "eu/1")], "key 'k1': gateway id 'eu/1' must be"),
    ([_jwk("k1", "eu-1"), _jwk("k1", "eu-2")], "key id 'k1' appears more than once"),
])
def test_key_set_entries_must_name_one_gateway_each(keys: list[dict], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tokens.KeySet.from_jwks({"keys": keys})


def test_a_key_set_that_does_not_load_keeps_the_previous_keys(tmp_path: Path) -> None:
    path = tmp_path / "keys.jwks.json"
    path.write_text(json.dumps({"keys": [_jwk("k1", "eu-1")]}))
    keys = ReloadingKeySet(path)
    assert keys.get().kids() == ("k1",)
    path.write_text(json.dumps({"keys": [_jwk("k1", "eu-1"), _jwk("k2", None)]}))  # a slip while rotating
    assert keys.get().kids() == ("k1",)
    path.write_text(json.dumps({"keys": [_jwk("k1", "eu-1"), _jwk("k2", "eu-1")]}))
    assert keys.get().kids() == ("k1", "k2")
    assert keys.get().owner("k2") == "eu-1"


# --------------------------------------------------------------------------- protocol versions


@pytest.mark.parametrize(("stated", "usable"), [
    ("1.0", True), ("1.7", True), ("1.10", True), ("2.0", False), ("0.9", False),
    ("", False), ("1", False), ("01.0", False), ("1.0.0", False), ("v1.0", False), (" 1.0", False),
])
def test_which_stated_versions_a_gateway_uses(stated: str, usable: bool) -> None:
    if usable:
        assert protocol.check_compatible(stated, "node FR")[0] == protocol.MAJOR
    else:
        with pytest.raises(protocol.IncompatibleProtocol, match="node FR"):
            protocol.check_compatible(stated, "node FR")


def test_an_incompatible_node_is_named_with_both_versions() -> None:
    with pytest.raises(protocol.IncompatibleProtocol) as caught:
        protocol.check_compatible("2.3", "node FR")
    assert str(caught.value) == ("node FR speaks ICSE protocol 2.3, this software speaks 1.1: "
                                 "major versions 2 and 1 are incompatible, its answers are not used")
