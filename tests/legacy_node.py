"""A node as protocol 1.0 had it, for packed exact items: it lists no features in
Describe and ignores ``MatchRequest.packed`` (field 3 unknown to it, as protobuf
skips unknown fields). Runs the real node otherwise
(``python -m tests.legacy_node serve --config ...``)."""

from __future__ import annotations

import sys

from node import cli, service


def _unknown_field(_request: object) -> list:
    """What a node without the feature reads of ``packed``: nothing."""
    return []


if __name__ == "__main__":
    service.FEATURES = []
    service.packed_from_pb = _unknown_field  # type: ignore[assignment]
    sys.exit(cli.main())
