"""A node with one planted defect in private matching, for showing that the
conformance kit notices: Disclose releases a stored row whatever proof it is
shown, so a gateway that never found a hit (a forged proof) is told one. Runs
the real node otherwise (``python -m tests.defective_private_node serve --config ...``)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from node import cli
from node.private_view import PrivateView
from node.segment_set import record_id


def _disclose_anything(self: PrivateView, key_id: str, items: Sequence[tuple[str, bytes]]) -> list[int | None]:
    """The defect: the first stored row of the item's algorithm, for any proof."""
    found: list[int | None] = []
    for name, _ in items:
        holding = next((h for h in self.by_key.get(key_id, ()) if h.algorithm == name), None)
        found.append(None if holding is None or not len(holding.part) else
                     record_id(holding.segment_id, int(holding.part.ids[0])))
    return found


if __name__ == "__main__":
    PrivateView.disclose = _disclose_anything  # type: ignore[method-assign]
    sys.exit(cli.main())
