"""Signing one token per node and call, bound to that node and those items."""

from __future__ import annotations

from federation import tls, tokens
from gateway.config import GatewayConfig, Requester


class Signer:
    def __init__(self, key: tokens.SigningKey, gateway_id: str, requester: Requester, cert_thumbprint: str,
                 lifetime: int = 30):
        self._key = key
        self._thumbprint = cert_thumbprint
        self._gateway_id = gateway_id
        self._requester = requester
        self._lifetime = lifetime

    def token(self, node_id: str, rpc: str, query_digest: str, case: str) -> str:
        """A token for one call to one node. ``query_digest`` is the request's
        ``query_sha256``, computed once however many nodes are asked."""
        claims = tokens.new_claims(
            issuer=self._gateway_id,
            subject=self._requester.officer,
            org=self._requester.org,
            country=self._requester.country,
            audience=node_id,
            rpc=rpc,
            query_sha256=query_digest,
            case=case,
            cert_thumbprint=self._thumbprint,
            lifetime=self._lifetime,
        )
        return self._key.sign(claims)


def signer_for(config: GatewayConfig, requester: Requester | None = None) -> Signer:
    """The signer a gateway configuration describes, bound to its client certificate."""
    key = tokens.SigningKey.load(config.signing_key, config.signing_kid)
    thumbprint = tls.thumbprint(config.tls.cert.read_bytes())
    return Signer(key, config.gateway_id, requester or config.requester, thumbprint)
