"""The signed query token: claims, signing and verification.

A gateway signs one short-lived JWT per node and call. It names the requesting
officer, agency and case, is addressed to one node (``aud``), names the RPC and
carries the canonical digest of the query's items, so it is worthless for any
other node, method or query. Only asymmetric algorithms are accepted; the
verifier uses the algorithm of the key found by ``kid``, never the one the
token header asks for.

Every key in the trusted key set names the one gateway it belongs to (the JWK
member ``icse_gateway``, PROTOCOL.md "Trusted key set"); a node accepts a token
only when the key that signed it belongs to the gateway named in ``iss``
(RFC 8725 §3.8), so one gateway's key cannot speak for another.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from federation import identity

ALLOWED_ALGORITHMS = frozenset({"EdDSA", "ES256"})
MAX_LIFETIME_SECONDS = 60
CLOCK_SKEW_SECONDS = 5
METADATA_KEY = "authorization"
# JWK member naming the gateway a trusted key belongs to.
KEY_OWNER_MEMBER = "icse_gateway"
REQUIRED_CLAIMS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "org", "country", "rpc", "qh", "cnf")


class TokenError(Exception):
    """A token that is not acceptable; the message says what is wrong."""


@dataclass(frozen=True)
class QueryClaims:
    issuer: str  # gateway id
    subject: str  # requesting officer
    org: str  # requesting agency
    country: str  # requesting agency's country
    audience: str  # the one node this token is for
    rpc: str  # "Match" or "Describe"
    query_sha256: str  # federation.query.query_sha256 of the request
    case: str  # case / purpose reference; required for Match
    # SHA-256 thumbprint of the gateway's TLS client certificate (RFC 8705
    # ``cnf``/``x5t#S256``): the token is only good on that gateway's connections.
    cert_thumbprint: str
    issued_at: int
    expires_at: int
    token_id: str
    # Not claims: what ``KeySet.verify`` learnt about the key that signed the
    # token (its ``kid`` and the gateway the key set says owns it), for the
    # ownership check and the audit record. Empty before verification.
    key_id: str = field(default="", compare=False)
    key_owner: str = field(default="", compare=False)

    def to_jwt_claims(self) -> dict[str, Any]:
        return {
            "iss": self.issuer,
            "sub": self.subject,
            "org": self.org,
            "country": self.country,
            "aud": self.audience,
            "rpc": self.rpc,
            "qh": self.query_sha256,
            "case": self.case,
            "cnf": {"x5t#S256": self.cert_thumbprint},
            "iat": self.issued_at,
            "nbf": self.issued_at,
            "exp": self.expires_at,
            "jti": self.token_id,
        }

    @classmethod
    def from_jwt_claims(cls, claims: dict[str, Any]) -> QueryClaims:
        """The claims of a decoded token; ``TokenError`` naming the first claim
        that is missing or of the wrong type (a signed token is still input)."""
        cnf = claims.get("cnf")
        if not isinstance(cnf, dict) or not isinstance(cnf.get("x5t#S256"), str):
            raise TokenError("token claim 'cnf' must be an object holding the client certificate's "
                             "'x5t#S256' thumbprint")
        audience = claims.get("aud")
        if isinstance(audience, list) and len(audience) == 1:
            audience = audience[0]
        return cls(
            issuer=_text_claim(claims, "iss"),
            subject=_text_claim(claims, "sub"),
            org=_text_claim(claims, "org"),
            country=_text_claim(claims, "country"),
            audience=_text_claim({"aud": audience}, "aud"),
            rpc=_text_claim(claims, "rpc"),
            query_sha256=_text_claim(claims, "qh"),
            case=_text_claim(claims, "case") if "case" in claims else "",
            cert_thumbprint=cnf["x5t#S256"],
            issued_at=_time_claim(claims, "iat"),
            expires_at=_time_claim(claims, "exp"),
            token_id=_text_claim(claims, "jti"),
        )


def _text_claim(claims: dict[str, Any], name: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str):
        got = f"a JSON {_json_type(value)}" if name in claims else "nothing"
        raise TokenError(f"token claim {name!r} must be a string, got {got}")
    return value


def _time_claim(claims: dict[str, Any], name: str) -> int:
    value = claims.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TokenError(f"token claim {name!r} must be a number of seconds since 1970, "
                         f"got a JSON {_json_type(value)}")
    return int(value)


def _json_type(value: object) -> str:
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def new_claims(
    *,
    issuer: str,
    subject: str,
    org: str,
    country: str,
    audience: str,
    rpc: str,
    query_sha256: str,
    case: str,
    cert_thumbprint: str,
    lifetime: int = 30,
    now: float | None = None,
) -> QueryClaims:
    if not 0 < lifetime <= MAX_LIFETIME_SECONDS:
        raise ValueError(f"token lifetime must be 1..{MAX_LIFETIME_SECONDS} s, got {lifetime}")
    issued = int(time.time() if now is None else now)
    return QueryClaims(
        issuer=issuer,
        subject=subject,
        org=org,
        country=country,
        audience=audience,
        rpc=rpc,
        query_sha256=query_sha256,
        case=case,
        cert_thumbprint=cert_thumbprint,
        issued_at=issued,
        expires_at=issued + lifetime,
        token_id=uuid.uuid4().hex,
    )


@dataclass(frozen=True)
class SigningKey:
    kid: str
    private_key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey

    @property
    def algorithm(self) -> str:
        return "EdDSA" if isinstance(self.private_key, ed25519.Ed25519PrivateKey) else "ES256"

    @classmethod
    def load(cls, path: Path, kid: str) -> SigningKey:
        key = load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, ec.EllipticCurvePrivateKey) and not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"{path}: ECDSA signing keys must be on P-256 (ES256)")
        if not isinstance(key, (ed25519.Ed25519PrivateKey, ec.EllipticCurvePrivateKey)):
            raise ValueError(f"{path}: signing key must be Ed25519 or ECDSA P-256")
        return cls(kid=kid, private_key=key)

    def sign(self, claims: QueryClaims) -> str:
        return jwt.encode(
            claims.to_jwt_claims(),
            self.private_key,
            algorithm=self.algorithm,
            headers={"kid": self.kid, "typ": "JWT"},
        )


class KeySet:
    """The gateway public keys a node trusts, by ``kid`` (a JWKS document),
    each with the id of the gateway that owns it."""

    def __init__(self, keys: dict[str, jwt.PyJWK], owners: dict[str, str] | None = None):
        self._keys = keys
        self._owners = owners or {}

    @classmethod
    def from_jwks(cls, document: dict[str, Any]) -> KeySet:
        """``ValueError`` naming the first entry that is not a usable, owned, unique key."""
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise ValueError("key set must be a JSON object with a 'keys' array (RFC 7517 JWKS)")
        keys: dict[str, jwt.PyJWK] = {}
        owners: dict[str, str] = {}
        for position, entry in enumerate(entries):
            kid = entry.get("kid") if isinstance(entry, dict) else None
            if not isinstance(kid, str) or not kid:
                raise ValueError(f"key {position} of the key set needs a 'kid' (a non-empty string)")
            if kid in keys:
                raise ValueError(f"key id {kid!r} appears more than once in the key set")
            jwk = jwt.PyJWK(entry)
            if jwk.algorithm_name not in ALLOWED_ALGORITHMS:
                raise ValueError(f"key {kid!r}: algorithm {jwk.algorithm_name} is not allowed")
            owner = entry.get(KEY_OWNER_MEMBER)
            if not isinstance(owner, str):
                raise ValueError(f"key {kid!r} names no gateway: every key needs "
                                 f"'{KEY_OWNER_MEMBER}': \"<gateway id>\"")
            identity.check_member_id(owner, f"key {kid!r}: gateway id")
            keys[kid] = jwk
            owners[kid] = owner
        return cls(keys, owners)

    @classmethod
    def load(cls, path: Path) -> KeySet:
        return cls.from_jwks(json.loads(path.read_text()))

    def kids(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def owner(self, kid: str) -> str:
        """The gateway id that owns key ``kid`` ('' for an unknown key)."""
        return self._owners.get(kid, "")

    def verify(self, token: str, audience: str, now: float | None = None) -> QueryClaims:
        """Checks signature, algorithm, audience, times and required claims.

        The claims returned carry the signing key's ``kid`` and owner; whether
        that owner is the issuer is the caller's check (a refusal of its own).
        """
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise TokenError(f"malformed token: {exc}") from None
        alg = header.get("alg")
        if alg not in ALLOWED_ALGORITHMS:
            raise TokenError(f"token algorithm {str(alg)[:20]!r} is not allowed")
        kid = header.get("kid")
        if kid is None:
            raise TokenError("token header names no signing key ('kid' is missing)")
        key = self._keys.get(kid)  # a string: jwt refused any other type as malformed
        if key is None:
            raise TokenError(f"token signed with unknown key id {kid[:64]!r}")
        if key.algorithm_name != alg:
            raise TokenError(f"token algorithm {alg} does not match key {kid!r}")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.algorithm_name],
                audience=audience,
                leeway=CLOCK_SKEW_SECONDS,
                options={"require": list(REQUIRED_CLAIMS), "verify_iat": True},
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenError("token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise TokenError(f"token is addressed to another node, not {audience!r}") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenError(f"token lacks required claim {exc.claim!r}") from None
        except jwt.InvalidSignatureError:
            raise TokenError("token signature does not verify") from None
        except jwt.PyJWTError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        current = time.time() if now is None else now
        if claims["iat"] > current + CLOCK_SKEW_SECONDS:
            raise TokenError("token issued in the future")
        if claims["exp"] - claims["iat"] > MAX_LIFETIME_SECONDS:
            raise TokenError(f"token lifetime exceeds {MAX_LIFETIME_SECONDS} s")
        return replace(QueryClaims.from_jwt_claims(claims), key_id=kid, key_owner=self.owner(kid))


def public_jwk(key: SigningKey, gateway: str) -> dict[str, Any]:
    """The JWKS entry nodes need to verify tokens signed with ``key``, which
    belongs to gateway ``gateway``."""
    algorithm = jwt.get_algorithm_by_name(key.algorithm)
    entry = json.loads(algorithm.to_jwk(key.private_key.public_key()))
    entry.update({"kid": key.kid, "alg": key.algorithm, "use": "sig",
                  KEY_OWNER_MEMBER: identity.check_member_id(gateway, "gateway id")})
    return entry


def bearer(token: str) -> tuple[tuple[str, str]]:
    return ((METADATA_KEY, f"Bearer {token}"),)


def token_from_metadata(metadata: Any) -> str:
    """Extracts the bearer token from gRPC invocation metadata."""
    values = [v for k, v in (metadata or ()) if k == METADATA_KEY]
    if not values:
        raise TokenError("missing 'authorization: Bearer' token")
    if len(values) > 1:
        raise TokenError("more than one authorization header")
    value = values[0]
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise TokenError("authorization header must be 'Bearer <token>'")
    return token.strip()
