"""Signing one token per node and call, bound to that node and those items."""

from __future__ import annotations

from collections.abc import Sequence

from federation import tokens
from federation.query import QueryItem, query_sha256
from gateway.config import Requester


class Signer:
    def __init__(self, key: tokens.SigningKey, gateway_id: str, requester: Requester, lifetime: int = 30):
        self._key = key
        self._gateway_id = gateway_id
        self._requester = requester
        self._lifetime = lifetime

    def token(self, node_id: str, rpc: str, items: Sequence[QueryItem], case: str) -> str:
        claims = tokens.new_claims(
            issuer=self._gateway_id,
            subject=self._requester.officer,
            org=self._requester.org,
            country=self._requester.country,
            audience=node_id,
            rpc=rpc,
            query_sha256=query_sha256(items),
            case=case,
            lifetime=self._lifetime,
        )
        return self._key.sign(claims)
