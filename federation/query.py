"""Query items and their canonical digest.

The digest binds a signed token to exactly the items it was issued for. It is
computed from the items' values, never from protobuf bytes (whose encoding is
not canonical), so gateway and node arrive at the same value independently.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import NamedTuple


class QueryItem(NamedTuple):
    """One digest to look up. ``algorithm`` is as received, not yet validated.

    A named tuple because batches hold tens of thousands of them.
    """

    algorithm: str
    digest: bytes
    max_distance: int = 0

    def tagged(self) -> str:
        return f"{self.algorithm}:{self.digest.hex()}"


def query_sha256(items: Sequence[QueryItem]) -> str:
    """Hex SHA-256 over an unambiguous JSON rendering of the items, in order."""
    canonical = json.dumps(
        [[item.algorithm, item.digest.hex(), item.max_distance] for item in items],
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.sha256(b"icse.v1.match\n" + canonical.encode("ascii")).hexdigest()
