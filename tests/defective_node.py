"""A node with one planted defect, for showing that the conformance kit notices:
it forgets to refuse replayed tokens. Runs the real node otherwise
(``python -m tests.defective_node serve --config ...``)."""

from __future__ import annotations

import sys

from node import cli, replay


def _admit_without_memory(self, token_id: str, issued_at: float, expires_at: float, now: float | None = None) -> None:
    """The defect: every jti is admitted, however often it was seen."""


if __name__ == "__main__":
    replay.ReplayGuard.admit = _admit_without_memory  # type: ignore[method-assign]
    sys.exit(cli.main())
