"""One use per token: every accepted ``jti`` is remembered until it expires.

The memory is per process. So that a restart cannot reopen a replay window,
tokens issued before the process started (less the clock-skew allowance) are
refused: gateways sign a fresh token per call, so honest callers never hold
one that old.
"""

from __future__ import annotations

import heapq
import time

from federation.tokens import CLOCK_SKEW_SECONDS


class ReplayError(Exception):
    pass


class ReplayGuard:
    def __init__(self, started: float | None = None, skew: int = CLOCK_SKEW_SECONDS):
        self._started = time.time() if started is None else started
        self._skew = skew
        self._seen: set[str] = set()
        self._expiry: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, token_id: str, issued_at: float, expires_at: float, now: float | None = None) -> None:
        """Accepts a token id once. Check and insert happen without an await
        in between, so concurrent requests on the event loop cannot both pass."""
        current = time.time() if now is None else now
        self._forget_expired(current)
        if issued_at < self._started - self._skew:
            raise ReplayError("token was issued before this node started; sign a fresh one")
        if token_id in self._seen:
            raise ReplayError("token has already been used (replayed jti)")
        self._seen.add(token_id)
        heapq.heappush(self._expiry, (expires_at + self._skew, token_id))

    def _forget_expired(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] < now:
            _, token_id = heapq.heappop(self._expiry)
            self._seen.discard(token_id)
