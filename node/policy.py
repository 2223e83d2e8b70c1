"""What this node releases, and to whom: its own rules, applied after a
requester is authenticated and before the store is searched (pure; no gRPC).

- which requesting countries may ask at all;
- a release tier per requesting country: ``hit`` (Prüm-style: that there is a
  hit, the reference and whom to contact) or ``standard`` (also category,
  victim-identified flag, series and date added);
- per requesting officer, a rate of requests per minute and a daily quota of
  items. Counters live in memory and restart with the node.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from enum import Enum

from federation.tokens import QueryClaims


class Tier(Enum):
    HIT = "hit"
    STANDARD = "standard"


class PolicyRefusal(Exception):
    """``exhausted`` marks a quota or rate refusal (try later) versus a ban."""

    def __init__(self, message: str, *, exhausted: bool = False):
        super().__init__(message)
        self.exhausted = exhausted


@dataclass(frozen=True)
class Policy:
    # None: any requesting country.
    countries: frozenset[str] | None = None
    tier: Tier = Tier.STANDARD
    tiers: dict[str, Tier] = field(default_factory=dict)
    requests_per_minute: int = 600
    items_per_day: int = 1_000_000

    def tier_for(self, claims: QueryClaims) -> Tier:
        return self.tiers.get(claims.country, self.tier)


def requester(claims: QueryClaims) -> str:
    """One officer of one agency, as seen through one gateway."""
    return f"{claims.issuer}/{claims.country}/{claims.org}/{claims.subject}"


class Admission:
    def __init__(self, policy: Policy):
        self.policy = policy
        self._buckets: dict[str, tuple[float, float]] = {}  # requester -> (tokens, last refill)
        self._daily: dict[str, tuple[dt.date, int]] = {}

    def permit(self, claims: QueryClaims) -> Tier:
        """May this requester ask at all, and at which release tier?"""
        allowed = self.policy.countries
        if allowed is not None and claims.country not in allowed:
            raise PolicyRefusal(f"requests from country {claims.country!r} are not accepted by this node")
        return self.policy.tier_for(claims)

    def consume(self, claims: QueryClaims, items: int, now: float | None = None) -> None:
        """Charges one request and ``items`` items, or refuses without charging."""
        current = time.time() if now is None else now
        who = requester(claims)
        rate = self.policy.requests_per_minute
        tokens, last = self._buckets.get(who, (float(rate), current))
        tokens = min(float(rate), tokens + (current - last) * rate / 60.0)
        if tokens < 1.0:
            raise PolicyRefusal(f"rate limit: at most {rate} requests per minute per officer", exhausted=True)
        today = dt.datetime.fromtimestamp(current, dt.UTC).date()
        day, used = self._daily.get(who, (today, 0))
        if day != today:
            used = 0
        if used + items > self.policy.items_per_day:
            raise PolicyRefusal(
                f"daily quota: {used} of {self.policy.items_per_day} items used today; "
                f"this request has {items}", exhausted=True)
        self._buckets[who] = (tokens - 1.0, current)
        self._daily[who] = (today, used + items)
