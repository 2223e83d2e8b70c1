"""Pure rules: replay guard, release policy and quotas, the gateway's node health."""

from __future__ import annotations

import pytest

from federation import tokens
from gateway.health import HealthPolicy, NodeHealth
from node.policy import Admission, Policy, PolicyRefusal, Tier
from node.replay import ReplayError, ReplayGuard


def _claims(country: str = "FR", subject: str = "o-1") -> tokens.QueryClaims:
    return tokens.new_claims(issuer="eu-1", subject=subject, org="Police", country=country, audience="DE",
                             rpc="Match", query_sha256="q", case="C", cert_thumbprint="t", now=1_000_000)


def test_replayed_token_id_is_refused_until_it_expires() -> None:
    guard = ReplayGuard(started=0)
    guard.admit("a", issued_at=100, expires_at=130, now=101)
    with pytest.raises(ReplayError, match="already been used"):
        guard.admit("a", issued_at=100, expires_at=130, now=102)
    guard.admit("b", issued_at=200, expires_at=230, now=200)
    assert len(guard) == 1, "expired ids are forgotten"


def test_tokens_from_before_a_restart_are_refused() -> None:
    guard = ReplayGuard(started=1000, skew=5)
    guard.admit("fresh", issued_at=996, expires_at=1020, now=1001)
    with pytest.raises(ReplayError, match="before this node started"):
        guard.admit("old", issued_at=990, expires_at=1020, now=1001)


def test_policy_refuses_countries_and_picks_tiers() -> None:
    admission = Admission(Policy(countries=frozenset({"FR", "US"}), tier=Tier.STANDARD, tiers={"US": Tier.HIT}))
    assert admission.permit(_claims("FR")) is Tier.STANDARD
    assert admission.permit(_claims("US")) is Tier.HIT
    with pytest.raises(PolicyRefusal, match="country 'XX' are not accepted") as refused:
        admission.permit(_claims("XX"))
    assert not refused.value.exhausted


def test_rate_limit_per_officer_refills_over_time() -> None:
    admission = Admission(Policy(requests_per_minute=2))
    claims = _claims()
    admission.consume(claims, 1, now=0)
    admission.consume(claims, 1, now=0)
    with pytest.raises(PolicyRefusal, match="at most 2 requests per minute") as refused:
        admission.consume(claims, 1, now=1)
    assert refused.value.exhausted
    admission.consume(_claims(subject="o-2"), 1, now=1)  # another officer has their own budget
    admission.consume(claims, 1, now=31)  # half a minute later one request is back


def test_daily_item_quota_resets_the_next_day() -> None:
    admission = Admission(Policy(items_per_day=100))
    claims = _claims()
    admission.consume(claims, 60, now=0)
    with pytest.raises(PolicyRefusal, match="60 of 100 items used today; this request has 41"):
        admission.consume(claims, 41, now=10)
    admission.consume(claims, 40, now=20)
    admission.consume(claims, 100, now=86_400 + 5)


def test_breaker_opens_after_repeated_failures_and_probes_after_cooldown() -> None:
    health = NodeHealth(HealthPolicy(failures_to_open=3, cooldown=30))
    for moment in (0, 1, 2):
        assert health.admit(moment)
        health.failed(moment)
    assert not health.admit(10) and "circuit open after 3" in health.reason(10)
    assert health.admit(33), "one probe after the cool-down"
    assert not health.admit(33.5), "and only one at a time"
    health.succeeded(0.01)
    assert health.admit(34)


def test_hedge_delay_follows_recent_latency() -> None:
    health = NodeHealth(HealthPolicy(samples_for_hedging=5, hedge_min_delay=0.05))
    assert health.hedge_delay() is None
    for latency in (0.01, 0.02, 0.02, 0.03, 0.2):
        health.succeeded(latency)
    assert health.hedge_delay() == 0.2
    for _ in range(100):
        health.succeeded(0.01)
    assert health.hedge_delay() == 0.05, "never below the floor"


def test_hedges_are_capped_to_a_share_of_calls() -> None:
    health = NodeHealth(HealthPolicy(hedge_budget=0.1))
    assert health.may_hedge(), "one hedge is allowed to start with"
    assert not health.may_hedge()
    for _ in range(20):
        health.succeeded(0.01)
    assert health.may_hedge() and health.may_hedge()
    assert not health.may_hedge(), "3 hedges for 20 calls is over 10 %"
