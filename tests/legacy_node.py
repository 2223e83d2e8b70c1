"""A node as protocol 1.0 had it, for packed exact items: it lists no features in
Describe and ignores ``MatchRequest.packed`` (field 3 unknown to it, as protobuf
skips unknown fields). Runs the real node otherwise
(``python -m tests.legacy_node serve --config ...``).

With ``ICSE_TEST_CLAIMS_PACKED=1`` in its environment it is a defective node
instead: it lists ``match.packed-exact`` but still ignores the packed groups."""

from __future__ import annotations

import os
import sys

from node import cli, service


def _unknown_field(_request: object) -> list:
    """What a node without the feature reads of ``packed``: nothing."""
    return []


if __name__ == "__main__":
    if os.environ.get("ICSE_TEST_CLAIMS_PACKED") != "1":
        service.FEATURES = []
    service.packed_from_pb = _unknown_field  # type: ignore[assignment]
    sys.exit(cli.main())
