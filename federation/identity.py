"""Names of federation members in certificates.

A member's certificate carries a SPIFFE-style URI naming its role and id, and a
node's server certificate also carries a DNS name that gateways verify instead
of the dialled address — so a gateway knows it reached France, not merely some
member, whatever address France listens on.
"""

from __future__ import annotations

import re

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")


def check_member_id(value: str, what: str = "id") -> str:
    if not _ID.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} must be 1-63 letters, digits, '-' or '_', starting with a letter or digit"
        )
    return value


def node_uri(federation: str, node_id: str) -> str:
    return f"spiffe://{federation}/node/{node_id}"


def gateway_uri(federation: str, gateway_id: str) -> str:
    return f"spiffe://{federation}/gateway/{gateway_id}"


def node_tls_name(federation: str, node_id: str) -> str:
    """DNS name every node certificate carries and every gateway checks."""
    return f"{node_id.lower()}.nodes.{federation}"


def gateway_id_from_uri(federation: str, uri: str) -> str | None:
    prefix = f"spiffe://{federation}/gateway/"
    if uri.startswith(prefix) and _ID.fullmatch(uri[len(prefix):]):
        return uri[len(prefix):]
    return None
