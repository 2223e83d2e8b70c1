"""The node under test, and what the feature checks (``since_checks``, ``packed_checks``,
``private_kit``) need of the kit that runs them: a :class:`Kit`, so that they do not
import ``node_kit``, which lists them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from google.protobuf.internal.containers import RepeatedCompositeFieldContainer

from federation import tls, tokens
from federation.query import QueryItem
from federation.wire import pb


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


def only_hit_at(results: RepeatedCompositeFieldContainer[pb.ItemResult], item: int,
                nothing: str = "no results") -> tuple[bool, str]:
    """Whether ``results`` (a Match or Disclose answer's) are one result, at ``item``, whose hits all
    carry a reference; and what they are, in words."""
    got = "; ".join(f"item {r.item}: {len(r.hits)} hit(s)" for r in results) or nothing
    ok = [r.item for r in results] == [item] and bool(results[0].hits) and all(h.reference for h in results[0].hits)
    return ok, got
