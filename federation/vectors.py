"""Writes the protocol's test vectors (``protos/testvectors/*.json``).

``python -m federation.vectors --out protos/testvectors`` — deterministic: keys
come from fixed seeds, times are fixed and Ed25519 signatures are
deterministic, so running it again writes the same bytes (the tests compare).
Every value is computed by the code the node and gateway run (``query``,
``tls``, ``tokens``); ``tests/test_vectors.py`` also checks each vector
through those code paths, so PROTOCOL.md, the vectors and the code cannot drift.

How to read a vector's items: ``digest_hex`` is the digest; ``digest_fill``
``{"byte": "5a", "length": n}`` is that byte ``n`` times; ``repeat: n`` means
the item occurs ``n`` times in a row. A case's ``packed`` lists packed exact
groups (``MatchRequest.packed``): ``digests_hex`` (or ``digests_fill``) is the
group's byte string; its items follow the case's ``items`` in the item list.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation import identity, protocol, tls, tokens, vectors_private
from federation.pki import cert_pem, key_pem
from federation.query import PackedGroup, QueryItem, canonical_bytes, query_sha256

FEDERATION = "vectors.icse.test"
NODE = "FR"
NOW = 1767229200  # 2026-01-01T01:00:00Z: the moment every token vector is checked at
VALID_FROM = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
VALID_TO = dt.datetime(2036, 1, 1, tzinfo=dt.UTC)
ITEMS = [QueryItem("sha256", bytes(range(32))), QueryItem("pdq", bytes.fromhex("f0" * 32), 31)]
PACKED = [PackedGroup("sha256", bytes(range(32)) + bytes(range(32, 64)), 32), PackedGroup("md5", b"\x11" * 16, 16)]


def _listed(group: PackedGroup) -> list[QueryItem]:
    return [QueryItem(group.algorithm, group.digest(n)) for n in range(group.count)]


def seeded_key(label: str) -> ed25519.Ed25519PrivateKey:
    """An Ed25519 key from a public seed: for vectors only, never for use."""
    return ed25519.Ed25519PrivateKey.from_private_bytes(hashlib.sha256(f"icse test vector: {label}".encode()).digest())


def item_json(item: QueryItem, repeat: int = 1) -> dict[str, Any]:
    out: dict[str, Any] = {"algorithm": item.algorithm}
    if len(item.digest) > 64 and len(set(item.digest)) == 1:
        out["digest_fill"] = {"byte": item.digest[:1].hex(), "length": len(item.digest)}
    else:
        out["digest_hex"] = item.digest.hex()
    out["max_distance"] = item.max_distance
    if repeat > 1:
        out["repeat"] = repeat
    return out


def items_from_json(entries: Sequence[dict[str, Any]]) -> list[QueryItem]:
    """The inverse of ``item_json`` over a list (what a reader of the vectors does)."""
    items = []
    for entry in entries:
        fill = entry.get("digest_fill")
        digest = bytes.fromhex(fill["byte"]) * fill["length"] if fill else bytes.fromhex(entry["digest_hex"])
        items += [QueryItem(entry["algorithm"], digest, entry["max_distance"])] * entry.get("repeat", 1)
    return items


def packed_json(group: tuple[str, bytes]) -> dict[str, Any]:
    """A packed group as (algorithm name, concatenated digests)."""
    name, digests = group
    if len(digests) > 64 and len(set(digests)) == 1:
        return {"algorithm": name, "digests_fill": {"byte": digests[:1].hex(), "length": len(digests)}}
    return {"algorithm": name, "digests_hex": digests.hex()}


def packed_from_json(entries: Sequence[dict[str, Any]]) -> list[tuple[str, bytes]]:
    """The inverse of ``packed_json`` over a list: (algorithm name, concatenated digests) per group."""
    out = []
    for entry in entries:
        fill = entry.get("digests_fill")
        out.append((entry["algorithm"],
                    bytes.fromhex(fill["byte"]) * fill["length"] if fill else bytes.fromhex(entry["digests_hex"])))
    return out


def _digest_case(name: str, note: str, groups: Sequence[tuple[QueryItem, int]],
                 packed: Sequence[PackedGroup] = (), since_generation: int = 0) -> dict[str, Any]:
    items = [item for item, count in groups for _ in range(count)]
    encoded = canonical_bytes(items, since_generation, packed=packed)
    case: dict[str, Any] = {"name": name, "note": note, "items": [item_json(i, n) for i, n in groups]}
    if packed:
        case["packed"] = [packed_json((g.algorithm, g.digests)) for g in packed]
    if since_generation:
        case["since_generation"] = since_generation
    if len(encoded) <= 512:
        case["encoding_hex"] = encoded.hex()
    case["encoding_length"] = len(encoded)
    case["qh"] = query_sha256(items, since_generation, packed=packed)
    return case


def query_digest_vectors() -> dict[str, Any]:
    one = [(QueryItem("md5", bytes(16)), 1)]
    cases = [
        _digest_case("describe", "no items: the qh of every Describe token", []),
        _digest_case("one-md5", "one exact item, max_distance 0", one),
        _digest_case("two-in-order", "order matters: see two-reversed",
                     [(QueryItem("md5", bytes(16)), 1), (QueryItem("sha1", b"\x01" * 20), 1)]),
        _digest_case("two-reversed", "the same items in the other order: another qh",
                     [(QueryItem("sha1", b"\x01" * 20), 1), (QueryItem("md5", bytes(16)), 1)]),
        _digest_case("pdq-distance", "a perceptual item with max_distance 31", [(ITEMS[1], 1)]),
        _digest_case("non-ascii-algorithm", "the name's UTF-8 bytes as sent (no escaping, no normalisation): "
                     "U+00E9, U+7B97, U+1F525 (4 bytes), U+2028",
                     [(QueryItem("pdq-\u00e9\u7b97\U0001f525\u2028", b"\xff" * 4, 7), 1)]),
        _digest_case("json-lookalike", "a name that would be ambiguous in a JSON rendering; one item",
                     [(QueryItem('md5","00\\"\x00', b""), 1)]),
        _digest_case("json-lookalike-split", "two items whose names and digests concatenate like the one above",
                     [(QueryItem("md5", b""), 1), (QueryItem("00", b""), 1)]),
        _digest_case("empty-fields", "empty algorithm and empty digest are encoded (and later refused)",
                     [(QueryItem("", b""), 1)]),
        _digest_case("max-distance-u32", "the largest max_distance the wire carries (uint32)",
                     [(QueryItem("pdq", bytes(32), 0xFFFF_FFFF), 1)]),
        _digest_case("vpdq-max-frames", "the largest video digest: 4096 frame hashes of 32 bytes",
                     [(QueryItem("vpdq", b"\x5a" * (4096 * 32)), 1)]),
        _digest_case("max-items", "20000 items, the default max_items of a node",
                     [(QueryItem("md5", b"\xab" * 16), 20_000)]),
        _digest_case("since-generation", "one-md5 asked only about rows published after generation 258: "
                     "the trailer 'since' 0x00 u64be(258) follows the items", one, since_generation=258),
        _digest_case("since-generation-u64", "the largest since_generation the wire carries (uint64)",
                     one, since_generation=0xFFFF_FFFF_FFFF_FFFF),
        _digest_case("packed", "a PDQ item, then packed groups of two sha256 and one md5 digests: the same "
                     "encoding and qh as the five items listed one by one (see packed-listed)",
                     [(ITEMS[1], 1)], PACKED),
        _digest_case("packed-listed", "the item list of the packed case, every item a QueryItem",
                     [(ITEMS[1], 1), *((i, 1) for g in PACKED for i in _listed(g))]),
    ]
    return {"description": "qh = lowercase hex SHA-256 of encoding; encoding = 'icse.v1.match' 0x00 u32be(count) "
                           "then per item u32be(len(alg_utf8)) alg_utf8 u32be(len(digest)) digest u32be(max_distance), "
                           "then, only when since_generation is not 0, 'since' 0x00 u64be(since_generation)",
            "protocol_version": protocol.VERSION, "domain_tag_hex": b"icse.v1.match\x00".hex(), "cases": cases}


def _certificate(ca_key: ed25519.Ed25519PrivateKey, ca_name: x509.Name, subject: str, key: ed25519.Ed25519PrivateKey,
                 serial: int, sans: list[x509.GeneralName], usage: x509.ObjectIdentifier) -> x509.Certificate:
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(VALID_FROM).not_valid_after(VALID_TO)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .sign(ca_key, None))


def certificates() -> dict[str, x509.Certificate]:
    """A vector CA and the certificates of node FR and gateways eu-1 and eu-2 (Ed25519, fixed)."""
    ca_key = seeded_key("ca")
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{FEDERATION} federation CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(1).not_valid_before(VALID_FROM).not_valid_after(VALID_TO)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True).sign(ca_key, None))
    out = {"ca": ca, NODE: _certificate(ca_key, ca_name, f"node {NODE}", seeded_key(f"tls {NODE}"), 2, [
        x509.UniformResourceIdentifier(identity.node_uri(FEDERATION, NODE)),
        x509.DNSName(identity.node_tls_name(FEDERATION, NODE))], ExtendedKeyUsageOID.SERVER_AUTH)}
    for serial, gateway in enumerate(("eu-1", "eu-2"), start=3):
        out[gateway] = _certificate(ca_key, ca_name, f"gateway {gateway}", seeded_key(f"tls {gateway}"), serial, [
            x509.UniformResourceIdentifier(identity.gateway_uri(FEDERATION, gateway))], ExtendedKeyUsageOID.CLIENT_AUTH)
    return out


def thumbprint_vectors() -> dict[str, Any]:
    cases = []
    for name, cert in certificates().items():
        pem = cert_pem(cert)
        der = cert.public_bytes(Encoding.DER)
        cases.append({"name": name, "certificate_pem": pem.decode("ascii"),
                      "der_sha256_hex": hashlib.sha256(der).hexdigest(), "x5t#S256": tls.thumbprint(pem)})
    names = {"node_tls_name": identity.node_tls_name(FEDERATION, NODE), "node_uri": identity.node_uri(FEDERATION, NODE),
             "gateway_uri": identity.gateway_uri(FEDERATION, "eu-1")}
    return {"description": "x5t#S256 = base64url (RFC 4648 §5, no padding) of SHA-256 over the certificate's DER",
            "federation": FEDERATION, "names": names, "cases": cases}


def signing_keys() -> dict[str, tokens.SigningKey]:
    return {gateway: tokens.SigningKey(f"{gateway}-1", seeded_key(f"signing {gateway}"))
            for gateway in ("eu-1", "eu-2")}


def _claims(**changes: Any) -> dict[str, Any]:
    thumb = tls.thumbprint(cert_pem(certificates()["eu-1"]))
    claims = tokens.QueryClaims(
        issuer="eu-1", subject="officer-1", org="Vector Police", country="FR", audience=NODE, rpc="Match",
        query_sha256=query_sha256(ITEMS), case="CASE-2026-001", cert_thumbprint=thumb,
        issued_at=NOW - 2, expires_at=NOW + 28, token_id="6f1c0a9e4b7d4d2c9a0b1c2d3e4f5a6b").to_jwt_claims()
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(claims: dict[str, Any], gateway: str = "eu-1", kid: str | None = None, alg: str = "EdDSA") -> str:
    key = signing_keys()[gateway]
    headers = {"kid": kid or key.kid, "typ": "JWT"}
    return jwt.encode(claims, key.private_key, algorithm=alg, headers=headers)


def token_cases() -> list[dict[str, Any]]:
    """(name, what it shows, token, how it is presented, expected outcome)."""
    honest = _claims()
    tampered = _sign(honest).split(".")
    tampered[1] = base64.urlsafe_b64encode(json.dumps(_claims(sub="officer-2")).encode()).rstrip(b"=").decode()
    unsigned = ".".join([base64.urlsafe_b64encode(b'{"alg":"none","kid":"eu-1-1"}').rstrip(b"=").decode(),
                         _sign(honest).split(".")[1], ""])
    eu2_thumb = tls.thumbprint(cert_pem(certificates()["eu-2"]))
    # (name, note, token, what the context changes, expected status, expected message)
    cases: list[tuple[str, str, str, dict[str, Any], str, str]] = [
        ("accepted", "the honest Match token: every check passes", _sign(honest), {}, "OK", ""),
        ("describe-accepted", "a Describe token: rpc Describe, qh of no items, no case",
         _sign(_claims(rpc="Describe", qh=query_sha256([]), case=None)), {"rpc": "Describe", "items": []}, "OK", ""),
        ("key-of-another-gateway", "signed with eu-2's key (kid eu-2-1), iss eu-1, over eu-1's certificate",
         _sign(honest, "eu-2"), {}, "PERMISSION_DENIED",
         "token signed with key 'eu-2-1', which belongs to gateway 'eu-2', not to its issuer 'eu-1'"),
        ("presented-by-another-gateway", "eu-1's token over eu-2's certificate", _sign(honest), {"certificate": "eu-2"},
         "PERMISSION_DENIED", "token issued by 'eu-1' but presented by 'eu-2'"),
        ("cnf-of-another-certificate", "bound to eu-2's certificate, presented over eu-1's",
         _sign(_claims(cnf={"x5t#S256": eu2_thumb})), {}, "PERMISSION_DENIED",
         "token is bound to another client certificate (cnf x5t#S256)"),
        ("other-items", "qh of other items than the request's", _sign(honest), {"items": ITEMS[:1]},
         "PERMISSION_DENIED", "request items differ from those the token was signed for"),
        ("other-rpc", "a Match token on Describe", _sign(_claims(qh=query_sha256([]))),
         {"rpc": "Describe", "items": []}, "PERMISSION_DENIED", "token is for 'Match', not 'Describe'"),
        ("no-case", "a Match token without a case", _sign(_claims(case=None)), {}, "PERMISSION_DENIED",
         "a query needs a case reference ('case' claim)"),
        ("untrusted-gateway", "eu-2 is a member, its key owned by eu-2, but the node trusts only eu-1",
         _sign(_claims(iss="eu-2", cnf={"x5t#S256": eu2_thumb}), "eu-2"), {"certificate": "eu-2"}, "PERMISSION_DENIED",
         "gateway 'eu-2' is not trusted by this node"),
        ("other-audience", "addressed to DE", _sign(_claims(aud="DE")), {}, "UNAUTHENTICATED",
         "token is addressed to another node, not 'FR'"),
        ("audience-case", "aud is compared exactly: 'fr' is not 'FR'", _sign(_claims(aud="fr")), {}, "UNAUTHENTICATED",
         "token is addressed to another node, not 'FR'"),
        ("expired", "checked 6 s after exp (skew is 5 s)", _sign(honest), {"now": NOW + 28 + 6}, "UNAUTHENTICATED",
         "token has expired"),
        ("within-skew", "checked 4 s after exp: still inside the 5 s skew", _sign(honest), {"now": NOW + 28 + 4},
         "OK", ""),
        ("issued-in-future", "iat and nbf 10 s ahead of the node's clock",
         _sign(_claims(iat=NOW + 10, nbf=NOW + 10, exp=NOW + 30)), {}, "UNAUTHENTICATED",
         "token is not valid yet (nbf/iat in the future)"),
        ("lifetime-over-60", "exp - iat = 61 s", _sign(_claims(exp=NOW - 2 + 61)), {}, "UNAUTHENTICATED",
         "token lifetime exceeds 60 s"),
        ("before-node-start", "iat more than 5 s before the node process started",
         _sign(honest), {"node_started": NOW + 4, "now": NOW + 5}, "UNAUTHENTICATED",
         "token was issued before this node started; sign a fresh one"),
        ("unknown-kid", "kid not in the key set", _sign(honest, kid="eu-1-9"), {}, "UNAUTHENTICATED",
         "token signed with unknown key id 'eu-1-9'"),
        ("bad-signature", "payload changed after signing", ".".join(tampered), {}, "UNAUTHENTICATED",
         "token signature does not verify"),
        ("alg-none", "unsigned token", unsigned, {}, "UNAUTHENTICATED", "token algorithm 'none' is not allowed"),
        ("missing-jti", "a required claim left out", _sign(_claims(jti=None)), {}, "UNAUTHENTICATED",
         "token lacks required claim 'jti'"),
        ("wrong-claim-type", "org as an array", _sign(_claims(org=["Police"])), {}, "UNAUTHENTICATED",
         "token claim 'org' must be a string, got a JSON array"),
    ]
    out = []
    for name, note, token, presented, status, message in cases:
        context: dict[str, Any] = {"now": NOW, "node_started": NOW - 3600, "node_id": NODE,
                                   "trusted_gateways": ["eu-1"], "certificate": "eu-1", "rpc": "Match", "items": ITEMS}
        context.update(presented)
        items = context.pop("items")
        context["items"] = [item_json(i) for i in items]
        context["qh"] = query_sha256(items)
        out.append({"name": name, "note": note, "token": token, "context": context,
                    "expected": {"status": status, "message": message}})
    return out


def token_vectors() -> dict[str, Any]:
    keys = signing_keys()
    return {
        "description": "Tokens and how a node must judge them. Check each at context.now, with the node's key set "
                       "'jwks', the node id, the gateways it trusts, the certificate the call came over "
                       "(thumbprints.json) and the request's items. A replay of the same jti is refused too "
                       "(UNAUTHENTICATED, 'token has already been used (replayed jti)'): check 'accepted' twice.",
        "jwks": {"keys": [tokens.public_jwk(key, gateway) for gateway, key in keys.items()]},
        "signing_keys_pem": {gateway: key_pem(key.private_key).decode("ascii") for gateway, key in keys.items()},
        "honest_claims": _claims(),
        "cases": token_cases(),
    }


def request_vectors() -> dict[str, Any]:
    """Request shapes a node with default limits accepts or refuses (after the token is accepted)."""
    cases = [
        ("one-of-each", [QueryItem("md5", bytes(16)), QueryItem("sha1", bytes(20)), QueryItem("sha256", bytes(32)),
                         QueryItem("pdq", bytes(32), 31), QueryItem("vpdq", bytes(64), 20)], "OK", ""),
        ("distance-above-cap", [QueryItem("pdq", bytes(32), 200)], "OK", ""),
        ("empty", [], "INVALID_ARGUMENT", "request has no items"),
        ("too-many", [QueryItem("md5", bytes(16))] * 20_001, "INVALID_ARGUMENT",
         "request has 20001 items; this node accepts at most 20000"),
        ("unknown-algorithm", [QueryItem("md5", bytes(16)), QueryItem("crc32", bytes(4))], "INVALID_ARGUMENT",
         "item 1: unknown algorithm 'crc32'"),
        ("algorithm-case", [QueryItem("MD5", bytes(16))], "INVALID_ARGUMENT", "item 0: unknown algorithm 'MD5'"),
        ("short-digest", [QueryItem("sha1", bytes(19))], "INVALID_ARGUMENT", ""),
        ("distance-on-exact", [QueryItem("sha256", bytes(32), 3)], "INVALID_ARGUMENT",
         "item 0: sha256 is matched exactly; max_distance must be 0"),
        ("vpdq-partial-frame", [QueryItem("vpdq", bytes(33))], "INVALID_ARGUMENT", ""),
    ]
    out = [{"name": n, "items": _grouped(items), "expected": {"status": s, "message": m}} for n, items, s, m in cases]
    # Packed exact items (feature match.packed-exact). A group that is not whole digests of an exact
    # algorithm is refused before the token is judged: it stands for no items a token could be signed for.
    one = [QueryItem("pdq", bytes(32), 31)]
    for name, items, packed, status, message in [
        ("packed-mixed", one, [("sha256", bytes(64)), ("md5", bytes(16))], "OK", ""),
        ("packed-only", [], [("sha1", bytes(20) * 3)], "OK", ""),
        ("packed-too-many", one, [("md5", b"\xab" * 16 * 20_000)], "INVALID_ARGUMENT",
         "request has 20001 items; this node accepts at most 20000"),
        ("packed-partial-digest", one, [("sha256", bytes(33))], "INVALID_ARGUMENT",
         "request is not a valid icse.v1.MatchRequest (packed group 0: "),
        ("packed-perceptual", one, [("pdq", bytes(32))], "INVALID_ARGUMENT",
         "request is not a valid icse.v1.MatchRequest (packed group 0: 'pdq' is not an exact algorithm"),
        ("packed-unknown", one, [("crc32", bytes(4))], "INVALID_ARGUMENT",
         "request is not a valid icse.v1.MatchRequest (packed group 0: 'crc32' is not an exact algorithm"),
    ]:
        out.append({"name": name, "items": _grouped(items), "packed": [packed_json(g) for g in packed],
                    "expected": {"status": status, "message": message}})
    return {"description": "status after authentication, with the default limits (max_items 20000, max_distance 31); "
                           "'message' is how the refusal's message starts (empty: only the status is fixed); "
                           "a packed group that is not whole digests of an exact algorithm is refused before "
                           "the token is judged",
            "cases": out}


def _grouped(items: Sequence[QueryItem]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for item in items:
        if out and items_from_json(out[-1:])[0] == item:
            out[-1]["repeat"] = out[-1].get("repeat", 1) + 1
        else:
            out.append(item_json(item))
    return out


def documents() -> dict[str, dict[str, Any]]:
    return {"query_digest.json": query_digest_vectors(), "thumbprints.json": thumbprint_vectors(),
            "tokens.json": token_vectors(), "requests.json": request_vectors(),
            "oprf.json": vectors_private.oprf_vectors()}


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=2, ensure_ascii=False) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federation.vectors", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="directory to write, e.g. protos/testvectors")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, document in documents().items():
        (args.out / name).write_text(render(document), encoding="utf-8")
    print(f"wrote {len(documents())} vector files to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
