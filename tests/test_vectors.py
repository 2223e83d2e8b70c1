"""The test vectors in protos/testvectors: regenerated identically, and each one
judged by the code the node and gateway run, at the vector's fixed time.

The query digest is also recomputed here by an independent few lines written
from PROTOCOL.md alone, as another language's implementer would.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import struct
import time
from pathlib import Path
from typing import Any

import grpc
import jwt.api_jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from federation import query, tls, vectors, wire
from federation.query import QueryItem
from node import matcher
from node.auth import Authenticator, AuthError
from node.replay import ReplayGuard

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "protos" / "testvectors"


def _load(name: str) -> dict[str, Any]:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


def test_vector_files_are_what_the_generator_writes() -> None:
    """``python -m federation.vectors --out protos/testvectors`` run again changes nothing."""
    generated = vectors.documents()
    assert sorted(p.name for p in VECTORS.glob("*.json")) == sorted(generated)
    for name, document in generated.items():
        assert (VECTORS / name).read_text(encoding="utf-8") == vectors.render(document), (
            f"{name} is stale: run python -m federation.vectors --out protos/testvectors")


def _spec_encoding(items: list[QueryItem], since_generation: int = 0) -> bytes:
    """PROTOCOL.md's encoding, written from the text alone."""
    out = b"icse.v1.match\x00" + struct.pack(">I", len(items))
    for item in items:
        name = item.algorithm.encode("utf-8")
        out += struct.pack(">I", len(name)) + name + struct.pack(">I", len(item.digest)) + item.digest
        out += struct.pack(">I", item.max_distance)
    if since_generation:
        out += b"since\x00" + struct.pack(">Q", since_generation)
    return out


def _spec_items(items: list[QueryItem], packed: list[tuple[str, bytes]]) -> list[QueryItem]:
    """PROTOCOL.md "Packed exact items", from the text alone: the item list is the items, then each
    group's digests (of the algorithm's size) as items with max_distance 0."""
    sizes = {"md5": 16, "sha1": 20, "sha256": 32}
    listed = list(items)
    for name, digests in packed:
        size = sizes[name]
        listed += [QueryItem(name, digests[at:at + size], 0) for at in range(0, len(digests), size)]
    return listed


def _packed(case: dict[str, Any]) -> list[query.PackedGroup]:
    return [query.PackedGroup(name, digests, wire.packable(name))
            for name, digests in vectors.packed_from_json(case.get("packed", []))]


@pytest.mark.parametrize("case", _load("query_digest.json")["cases"], ids=lambda c: c["name"])
def test_query_digest_vector(case: dict[str, Any]) -> None:
    items = vectors.items_from_json(case["items"])
    packed = _packed(case)
    since = case.get("since_generation", 0)
    encoded = query.canonical_bytes(items, since, packed=packed)
    assert encoded == _spec_encoding(_spec_items(items, vectors.packed_from_json(case.get("packed", []))), since)
    assert len(encoded) == case["encoding_length"]
    if "encoding_hex" in case:
        assert encoded.hex() == case["encoding_hex"]
    assert query.query_sha256(items, since, packed=packed) == hashlib.sha256(encoded).hexdigest() == case["qh"]


def test_since_generation_zero_leaves_the_query_digest_of_protocol_1_0() -> None:
    """0 is "every row", the 1.0 meaning: its qh is the 1.0 one, so 1.0 tokens and vectors stay valid."""
    cases = {c["name"]: c for c in _load("query_digest.json")["cases"]}
    one = vectors.items_from_json(cases["one-md5"]["items"])
    assert query.query_sha256(one, 0) == cases["one-md5"]["qh"]
    assert cases["since-generation"]["qh"] != cases["one-md5"]["qh"]
    assert query.query_sha256(one, 259) != cases["since-generation"]["qh"]


def test_packed_items_have_the_digest_of_their_item_list() -> None:
    cases = {c["name"]: c for c in _load("query_digest.json")["cases"]}
    assert cases["packed"]["encoding_hex"] == cases["packed-listed"]["encoding_hex"]
    assert cases["packed"]["qh"] == cases["packed-listed"]["qh"]


def test_query_digests_differ_where_a_json_rendering_would_not() -> None:
    cases = {c["name"]: c["qh"] for c in _load("query_digest.json")["cases"] if c["name"] != "packed-listed"}
    assert len(set(cases.values())) == len(cases)
    assert cases["describe"] == query.EMPTY_QUERY_SHA256


@pytest.mark.parametrize("case", _load("thumbprints.json")["cases"], ids=lambda c: c["name"])
def test_thumbprint_vector(case: dict[str, Any]) -> None:
    pem = case["certificate_pem"].encode("ascii")
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    assert hashlib.sha256(der).hexdigest() == case["der_sha256_hex"]
    assert base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode() == case["x5t#S256"]
    assert tls.thumbprint(pem) == case["x5t#S256"]


class _FrozenDatetime(dt.datetime):
    at: float = 0.0

    @classmethod
    def now(cls, tz: dt.tzinfo | None = None) -> dt.datetime:  # type: ignore[override]
        return dt.datetime.fromtimestamp(cls.at, tz)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch):
    """Sets the time every token check reads (ours and PyJWT's) to a vector's ``now``."""
    def set_to(moment: float) -> None:
        _FrozenDatetime.at = moment
        monkeypatch.setattr(time, "time", lambda: moment)
        monkeypatch.setattr(jwt.api_jwt, "datetime", _FrozenDatetime)
    return set_to


def _judge(case: dict[str, Any], tmp_path: Path, authenticator: Authenticator | None = None) -> tuple[str, str]:
    """The node's verdict, through node.auth, as gRPC status name and message."""
    context = case["context"]
    certificates = {c["name"]: c["certificate_pem"].encode() for c in _load("thumbprints.json")["cases"]}
    federation = _load("thumbprints.json")["federation"]
    if authenticator is None:
        keys = tmp_path / "keys.jwks.json"
        keys.write_text(json.dumps(_load("tokens.json")["jwks"]))
        authenticator = Authenticator(context["node_id"], federation, keys, context["trusted_gateways"],
                                      ReplayGuard(started=context["node_started"]))
    pem = certificates[context["certificate"]]
    sans = [n.value.encode() for n in x509.load_pem_x509_certificate(pem).extensions
            .get_extension_for_class(x509.SubjectAlternativeName).value]
    auth_context = {"x509_pem_cert": [pem], "x509_subject_alternative_name": sans}
    items = vectors.items_from_json(context["items"])
    assert query.query_sha256(items) == context["qh"]
    try:
        authenticator.authorize((("authorization", f"Bearer {case['token']}"),), auth_context, context["rpc"],
                                context["qh"])
    except AuthError as exc:
        code = grpc.StatusCode.PERMISSION_DENIED if exc.denied else grpc.StatusCode.UNAUTHENTICATED
        return code.name, str(exc)
    return "OK", ""


@pytest.mark.parametrize("case", _load("tokens.json")["cases"], ids=lambda c: c["name"])
def test_token_vector(case: dict[str, Any], clock, tmp_path: Path) -> None:
    clock(case["context"]["now"])
    assert _judge(case, tmp_path) == (case["expected"]["status"], case["expected"]["message"])


def test_accepted_token_vector_is_refused_when_replayed(clock, tmp_path: Path) -> None:
    case = next(c for c in _load("tokens.json")["cases"] if c["name"] == "accepted")
    clock(case["context"]["now"])
    keys = tmp_path / "keys.jwks.json"
    keys.write_text(json.dumps(_load("tokens.json")["jwks"]))
    node = Authenticator("FR", _load("thumbprints.json")["federation"], keys, ["eu-1"],
                         ReplayGuard(started=case["context"]["node_started"]))
    assert _judge(case, tmp_path, node) == ("OK", "")
    assert _judge(case, tmp_path, node) == ("UNAUTHENTICATED", "token has already been used (replayed jti)")


@pytest.mark.parametrize("case", _load("requests.json")["cases"], ids=lambda c: c["name"])
def test_request_vector(case: dict[str, Any]) -> None:
    items = vectors.items_from_json(case["items"])
    request = wire.items_to_pb(items)
    request.packed.extend(wire.pb.PackedItems(algorithm=name, digests=digests)
                          for name, digests in vectors.packed_from_json(case.get("packed", [])))
    request = wire.pb.MatchRequest.FromString(request.SerializeToString())  # as a node receives it
    try:
        matcher.validate(wire.items_from_pb(request), matcher.Limits(), wire.packed_from_pb(request))
        verdict = ("OK", "")
    except matcher.InvalidRequest as exc:
        verdict = ("INVALID_ARGUMENT", str(exc))
    except wire.BadPacking as exc:  # the node's words for it (node.service, before the token is judged)
        verdict = ("INVALID_ARGUMENT", f"request is not a valid icse.v1.MatchRequest ({exc})")
    expected = case["expected"]
    assert verdict[0] == expected["status"]
    assert verdict[1].startswith(expected["message"]), verdict[1]


def test_protocol_md_states_the_values_the_code_computes() -> None:
    """The specification's literal values are the code's: the Describe digest, the domain tag, the version."""
    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    assert query.EMPTY_QUERY_SHA256 in text
    assert query.DOMAIN_TAG == b"icse.v1.match\x00" and '"icse.v1.match" 0x00' in text
    assert f"version **{vectors.protocol.VERSION}**" in text


def test_private_request_digests_from_the_specification() -> None:
    """oprf.json's PrivateMatch and Disclose encodings, rebuilt from PROTOCOL.md 13.5's text alone."""
    document = _load("oprf.json")
    u32 = struct.Struct(">I").pack
    # Three digests of three algorithms: three groups of one item, 16-bit buckets as 2 bytes.
    match = b"icse.v1.private-match.v2\x00" + u32(16) + u32(len(document["digests"]))
    groups = []
    disclose = b"icse.v1.disclose\x00" + u32(16) + document["key_id"].encode() + u32(len(document["digests"]))
    for case in document["digests"]:
        name = case["algorithm"].encode()
        element = bytes.fromhex(case["blinded_element"])
        bucket = case["bucket_16"].to_bytes(2, "big")
        match += u32(len(name)) + name + u32(len(bucket)) + bucket + u32(len(element)) + element
        groups.append({"algorithm": case["algorithm"], "buckets_hex": bucket.hex(),
                       "blinded_elements_hex": element.hex()})
        output = bytes.fromhex(case["output"])
        disclose += u32(len(name)) + name + u32(len(output)) + output
        # The input and bucket, also from the text: A 0x00 D, and the first bits of SHA-256("icse.v1.bucket" 0x00 I).
        data = name + b"\x00" + bytes.fromhex(case["digest_hex"])
        assert case["input"] == data.hex()
        assert case["bucket_32"] == int.from_bytes(hashlib.sha256(b"icse.v1.bucket\x00" + data).digest()[:4], "big")
        assert case["bucket_16"] == case["bucket_32"] >> 16
    assert document["private_match"] == {"prefix_bits": 16, "groups": groups, "canonical_hex": match.hex(),
                                         "qh": hashlib.sha256(match).hexdigest()}
    assert document["disclose"] == {"key_id": document["key_id"], "canonical_hex": disclose.hex(),
                                    "qh": hashlib.sha256(disclose).hexdigest()}
    text = (ROOT / "PROTOCOL.md").read_text(encoding="utf-8")
    assert '"icse.v1.private-match.v2" 0x00' in text and '"icse.v1.disclose" 0x00' in text
    assert '"icse.v1.bucket" 0x00' in text and '"icse.v1.oprf-key" 0x00' in text


def _spec_fingerprints(outputs: list[bytes], bits: int) -> list[int]:
    return sorted(int.from_bytes(o[:8], "big") >> (64 - bits) for o in outputs)


def _spec_elias_fano(values: list[int], bits: int) -> bytes:
    """PROTOCOL.md 13.3's Elias-Fano form, written from the text with Python integers."""
    n = len(values)
    low = 0 if n == 0 or 2**bits <= n else (2**bits // n).bit_length() - 1
    low_bits = "".join(format(v & (2**low - 1), f"0{low}b") for v in values) if low else ""
    positions = {(v >> low) + i for i, v in enumerate(values)}
    bitmap = "".join("1" if p in positions else "0" for p in range(n + 2 ** (bits - low))) if values else ""

    def pack(text: str) -> bytes:
        text += "0" * (-len(text) % 8)
        return bytes(int(text[i:i + 8], 2) for i in range(0, len(text), 8))

    return n.to_bytes(2, "big") + pack(low_bits) + pack(bitmap)


def test_bucket_answers_from_the_specification() -> None:
    document = _load("oprf.json")["bucket_answers"]
    outputs = [bytes.fromhex(o) for o in document["outputs"]]
    fixed, *coded = document["answers"]
    assert fixed["bucket_answer_hex"] == (len(outputs).to_bytes(2, "big") + b"".join(
        v.to_bytes(4, "big") for v in _spec_fingerprints(outputs, 32))).hex()
    assert [c["fingerprint_bits"] for c in coded] == [24, 19]
    for case in coded:
        bits = case["fingerprint_bits"]
        assert case["bucket_answer_hex"] == _spec_elias_fano(_spec_fingerprints(outputs, bits), bits).hex()
