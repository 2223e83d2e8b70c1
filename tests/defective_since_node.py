"""A node with one planted defect, for showing that the conformance kit's
``match.since-generation`` checks notice: it lists the feature but searches
every row whatever ``since_generation`` says. The real node otherwise
(``python -m tests.defective_since_node serve --config ...``)."""

from __future__ import annotations

import sys

from node import cli
from node.segment_set import Restricted, SegmentSet

_since = SegmentSet.since


def _since_ignored(self: SegmentSet, generation: int) -> Restricted:
    """The defect: every row is searched, as if asked since generation 0."""
    return _since(self, 0)


if __name__ == "__main__":
    SegmentSet.since = _since_ignored  # type: ignore[method-assign]
    sys.exit(cli.main())
