"""Unit tests for the pure core: algorithms, parsing, token claims, merging."""

from __future__ import annotations

import time

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from federation import algorithms, tokens
from federation.query import QueryItem, query_sha256
from gateway.merge import merge
from gateway.results import HitInfo, NodeAnswer, NodeStatus, Subject
from node import formats
from node.records import HashRecord, Rejection


def test_parse_tagged_digest() -> None:
    algorithm, digest = algorithms.parse_tagged(" SHA256:" + "AB" * 32 + "\n")
    assert algorithm is algorithms.SHA256 and digest == b"\xab" * 32


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("md5", "expected ALGORITHM:HEX"),
        ("crc32:0000", "unknown algorithm 'crc32'"),
        ("md5:" + "0" * 31, "md5 digest must be 32 hex characters, got 31"),
        ("sha1:" + "g" * 40, "sha1 digest is not hexadecimal"),
    ],
)
def test_parse_tagged_refuses_bad_input(text: str, message: str) -> None:
    with pytest.raises(algorithms.DigestError, match=message):
        algorithms.parse_tagged(text)


def test_query_digest_is_order_and_value_sensitive() -> None:
    a, b = QueryItem("md5", b"\x00" * 16), QueryItem("sha1", b"\x01" * 20)
    assert query_sha256([a, b]) == query_sha256([QueryItem("md5", b"\x00" * 16), QueryItem("sha1", b"\x01" * 20)])
    assert query_sha256([a, b]) != query_sha256([b, a])
    assert query_sha256([a]) != query_sha256([QueryItem("md5", b"\x00" * 16, max_distance=1)])
    # A name cannot smuggle a second item through the canonical form.
    assert query_sha256([QueryItem('md5","00', b"")]) != query_sha256([QueryItem("md5", b""), QueryItem("00", b"")])


def test_parse_lines_reports_bad_lines_by_number() -> None:
    text = "# known set\nmd5:" + "0" * 32 + "\n\nsha1:xyz\nsha256:" + "f" * 64 + "\n"
    parsed = list(formats.read_text(text, "lines"))
    assert parsed == [
        HashRecord("md5", b"\x00" * 16),
        Rejection(4, "sha1 digest must be 40 hex characters, got 3"),
        HashRecord("sha256", b"\xff" * 32),
    ]


def test_parse_csv_with_header_and_metadata() -> None:
    text = (
        "algo,digest,reference,category,victim_identified,series\n"
        f"md5,{'aa' * 16},FR-1,2,yes,S1\n"
        f"sha1,{'bb' * 20},,,,\n"
        f"sha1,{'cc' * 20},FR-3,1,maybe,\n"
        "crc,00,FR-4,1,,\n"
    )
    parsed = list(formats.read_text(text, "csv"))
    assert parsed[0] == HashRecord("md5", b"\xaa" * 16, "FR-1", "2", True, "S1")
    assert parsed[1] == HashRecord("sha1", b"\xbb" * 20)
    assert parsed[2] == Rejection(4, "victim_identified must be true/false/empty, got 'maybe'")
    assert isinstance(parsed[3], Rejection) and parsed[3].line == 5 and "unknown algorithm 'crc'" in parsed[3].reason


def test_parse_csv_without_header_uses_documented_column_order() -> None:
    parsed = list(formats.read_text(f"sha256,{'01' * 32},REF-9,3,false\n", "csv"))
    assert parsed == [HashRecord("sha256", b"\x01" * 32, "REF-9", "3", False)]


def test_parse_csv_refuses_header_without_digest() -> None:
    parsed = list(formats.read_text("algo,reference\nmd5,x\n", "csv"))
    assert parsed == [Rejection(1, "header lacks column(s): digest")]


@pytest.mark.parametrize("private", [ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256R1())])
def test_token_round_trip_with_each_allowed_algorithm(private) -> None:
    key = tokens.SigningKey("k1", private)
    keyset = tokens.KeySet.from_jwks({"keys": [tokens.public_jwk(key, "gw")]})
    claims = tokens.new_claims(issuer="gw", subject="o", org="a", country="FR", audience="DE",
                               rpc="Match", query_sha256="q", case="C-1", cert_thumbprint="t")
    assert keyset.verify(key.sign(claims), audience="DE") == claims


def test_token_claims_cannot_outlive_sixty_seconds() -> None:
    with pytest.raises(ValueError, match=r"lifetime must be 1\.\.60"):
        tokens.new_claims(issuer="gw", subject="o", org="a", country="FR", audience="DE",
                          rpc="Match", query_sha256="q", case="C", cert_thumbprint="t", lifetime=61)


def test_token_missing_required_claim_is_refused() -> None:
    key = tokens.SigningKey("k1", ed25519.Ed25519PrivateKey.generate())
    keyset = tokens.KeySet.from_jwks({"keys": [tokens.public_jwk(key, "gw")]})
    now = int(time.time())
    token = jwt.encode({"iss": "gw", "aud": "DE", "iat": now, "exp": now + 10}, key.private_key,
                       algorithm="EdDSA", headers={"kid": "k1"})
    with pytest.raises(tokens.TokenError, match="lacks required claim 'sub'"):
        keyset.verify(token, audience="DE")


def test_keyset_refuses_symmetric_keys() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        tokens.KeySet.from_jwks({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "h", "alg": "HS256"}]})


def _answer(node: str, status: NodeStatus, hits=(), truncated=()) -> NodeAnswer:
    return NodeAnswer(node, node, status, hits=tuple(hits), truncated=tuple(truncated))


def test_merge_orders_hits_and_marks_partial() -> None:
    subjects = [Subject(QueryItem("md5", b"\x00" * 16)), Subject(QueryItem("md5", b"\x01" * 16))]
    fr = HitInfo("FR", "FR", "FR-1")
    de = HitInfo("DE", "DE", "DE-1")
    near = HitInfo("NL", "NL", "NL-1", distance=0)
    answers = [
        _answer("FR", NodeStatus.HIT, [(fr,), ()], [False, False]),
        _answer("DE", NodeStatus.HIT, [(de,), ()], [True, False]),
        _answer("NL", NodeStatus.HIT, [(), (near,)], [False, False]),
        _answer("IT", NodeStatus.TIMED_OUT),
    ]
    result = merge("C-1", subjects, answers)
    assert [h.country for h in result.items[0].hits] == ["DE", "FR"]
    assert result.items[0].truncated_by == ("DE",)
    assert [h.country for h in result.items[1].hits] == ["NL"]
    assert result.partial and result.countries_with_hits == ("DE", "FR", "NL")
    assert [n.node_id for n in result.nodes] == ["DE", "FR", "IT", "NL"]
    assert result.exit_status() == 0


def test_merge_orders_by_distance_before_country() -> None:
    subjects = [Subject(QueryItem("pdq", b"\x00" * 32))]
    answers = [
        _answer("AT", NodeStatus.HIT, [(HitInfo("AT", "AT", "A", distance=20),)], [False]),
        _answer("SE", NodeStatus.HIT, [(HitInfo("SE", "SE", "S", distance=3),)], [False]),
    ]
    assert [h.country for h in merge("C", subjects, answers).items[0].hits] == ["SE", "AT"]


def test_exit_status_distinguishes_no_hit_from_incomplete() -> None:
    subjects = [Subject(QueryItem("md5", b"\x00" * 16))]
    complete = merge("C", subjects, [_answer("FR", NodeStatus.NO_HIT, [()], [False])])
    assert (complete.partial, complete.exit_status()) == (False, 1)
    partial = merge("C", subjects, [_answer("FR", NodeStatus.NO_HIT, [()], [False]),
                                    _answer("DE", NodeStatus.REFUSED)])
    assert (partial.partial, partial.exit_status()) == (True, 2)
