"""Who may ask this node, and for what: the checks before the store is touched.

A call is accepted when the TLS peer is a gateway of the federation (its
certificate's URI names it), and its bearer token verifies against the trusted
key set with a key that belongs to that same gateway (the key set names each
key's owner), is addressed to this node, was issued by that same gateway for
that very certificate (``cnf`` thumbprint), names the RPC being called, carries the
digest of exactly this request's items, and has not been used before.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt

from federation import identity, tls, tokens
from federation.tokens import QueryClaims
from node.replay import ReplayError, ReplayGuard

log = logging.getLogger("icse.node")


class AuthError(Exception):
    """Refusal. ``denied`` separates "who are you?" from "not allowed".

    ``gateway`` and ``claims`` carry what was learnt before the refusal, for
    the audit record.
    """

    def __init__(self, message: str, *, denied: bool = False, gateway: str = "",
                 claims: QueryClaims | None = None):
        super().__init__(message)
        self.denied = denied
        self.gateway = gateway
        self.claims = claims


class ReloadingKeySet:
    """The trusted key set, re-read when its file changes (key rotation).

    At start a key set that does not load stops the node (the error names the
    entry). Later, a file that does not load (half-written, a key naming no
    gateway) keeps the last good key set in force and is logged: a slip during
    rotation must not turn every call into an internal error.
    """

    def __init__(self, path: Path):
        self._path = path
        self._stamp: tuple[int, int] | None = None
        self._keys = tokens.KeySet({})
        stat = os.stat(self._path)
        self._keys = tokens.KeySet.load(self._path)
        self._stamp = (stat.st_mtime_ns, stat.st_size)

    def get(self) -> tokens.KeySet:
        try:
            stat = os.stat(self._path)
            stamp = (stat.st_mtime_ns, stat.st_size)
        except OSError:
            stamp = (-1, -1)
        if stamp != self._stamp:
            self._stamp = stamp
            try:
                self._keys = tokens.KeySet.load(self._path)
            except (OSError, ValueError, jwt.PyJWTError) as exc:
                log.error("trusted key set not reloaded; the previous keys stay in force",
                          extra={"path": str(self._path), "reason": str(exc)})
            else:
                log.info("trusted key set reloaded", extra={"path": str(self._path), "kids": list(self._keys.kids())})
        return self._keys


class Authenticator:
    def __init__(self, node_id: str, federation: str, keys: Path, gateways: Sequence[str],
                 replay: ReplayGuard | None = None):
        self._node_id = node_id
        self._federation = federation
        self._keys = ReloadingKeySet(keys)
        self._gateways = frozenset(gateways)
        self._replay = replay if replay is not None else ReplayGuard()  # an empty guard is falsy (len 0)

    def authorize(
        self,
        metadata: Any,
        auth_context: Mapping[str, Iterable[bytes]],
        rpc: str,
        query_sha256: str,
    ) -> QueryClaims:
        gateway = self.peer_gateway(auth_context)
        try:
            token = tokens.token_from_metadata(metadata)
            claims = self._keys.get().verify(token, audience=self._node_id)
        except tokens.TokenError as exc:
            raise AuthError(str(exc), gateway=gateway) from None
        try:
            self._check(claims, gateway, auth_context, rpc, query_sha256)
        except AuthError as exc:
            raise AuthError(str(exc), denied=exc.denied, gateway=gateway, claims=claims) from None
        return claims

    def _check(self, claims: QueryClaims, gateway: str, auth_context: Mapping[str, Iterable[bytes]],
               rpc: str, query_sha256: str) -> None:
        if claims.issuer not in self._gateways:
            raise AuthError(f"gateway {claims.issuer!r} is not trusted by this node", denied=True)
        if claims.issuer != gateway:
            raise AuthError(f"token issued by {claims.issuer!r} but presented by {gateway!r}", denied=True)
        if claims.key_owner != claims.issuer:
            raise AuthError(f"token signed with key {claims.key_id!r}, which belongs to gateway "
                            f"{claims.key_owner!r}, not to its issuer {claims.issuer!r}", denied=True)
        if claims.cert_thumbprint != tls.peer_thumbprint(auth_context):
            raise AuthError("token is bound to another client certificate (cnf x5t#S256)", denied=True)
        if claims.rpc != rpc:
            raise AuthError(f"token is for {claims.rpc!r}, not {rpc!r}", denied=True)
        if claims.query_sha256 != query_sha256:
            raise AuthError("request items differ from those the token was signed for", denied=True)
        if rpc in ("Match", "PrivateMatch", "Disclose") and not claims.case.strip():
            raise AuthError("a query needs a case reference ('case' claim)", denied=True)
        try:
            # Last: only tokens that pass every other check take a place in memory.
            self._replay.admit(claims.token_id, claims.issued_at, claims.expires_at)
        except ReplayError as exc:
            raise AuthError(str(exc)) from None

    def peer_gateway(self, auth_context: Mapping[str, Iterable[bytes]]) -> str:
        """The gateway id the verified client certificate names, or AuthError."""
        for uri in tls.peer_uris(auth_context):
            gateway = identity.gateway_id_from_uri(self._federation, uri)
            if gateway is not None:
                return gateway
        raise AuthError("client certificate does not name a gateway of this federation", denied=True)
