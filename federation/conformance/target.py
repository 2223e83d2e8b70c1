"""The node under test, and what the feature checks (``since_checks``, ``packed_checks``,
``private_kit``) need of the kit that runs them: a :class:`Kit`, so that they do not
import ``node_kit``, which lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from federation import tls, tokens
from federation.query import QueryItem


@dataclass(frozen=True)
class NodeTarget:
    """The node under test and the gateway identity the kit speaks with."""

    address: str
    node_id: str
    tls_name: str
    files: tls.TlsFiles  # the federation CA, a gateway certificate the node trusts, its key
    gateway_id: str
    key: tokens.SigningKey  # that gateway's signing key (its kid in the node's key set)
    other_key: tokens.SigningKey | None = None  # a key the node trusts that belongs to ANOTHER gateway
    known: QueryItem | None = None  # an item the node holds, for the hit check
    timeout: float = 10.0


class Kit(Protocol):
    """What a feature's checks ask of the node kit."""

    t: NodeTarget

    def token(self, items: Sequence[QueryItem], rpc: str = "Match", **changes: Any) -> str: ...

    async def call(self, method: str, request: bytes, token: str | None,
                   metadata: tuple[tuple[str, str], ...] = ()) -> tuple[str, bytes | str]: ...

    async def describe(self, token: str | None) -> tuple[str, Any]: ...
