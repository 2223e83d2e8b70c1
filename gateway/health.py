"""What the gateway remembers about each node between queries (pure).

Recent latencies, to decide when a slow node deserves a hedged second
request; consecutive failures, to stop asking a node that keeps failing
(circuit breaker) until a cool-down has passed, then try it once again.

The trial call after a cool-down is the breaker's only way out of the open
state, so it must be settled whatever becomes of it: an answer closes the
circuit, a failure re-opens it for another cool-down, and an outcome that says
nothing about the node's health (a refusal, a cancelled call) gives the place
back so that the next call is again a trial. Otherwise one refused trial would
leave the member skipped for the rest of a long triage.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum


class Admission(Enum):
    """May a call go to a node, and is it the breaker's one trial call?"""

    SKIP = "skip"
    CALL = "call"
    TRIAL = "trial"

    def __bool__(self) -> bool:
        return self is not Admission.SKIP


@dataclass(frozen=True)
class HealthPolicy:
    failures_to_open: int = 3
    cooldown: float = 30.0
    hedge_percentile: float = 0.95
    hedge_min_delay: float = 0.05
    samples_for_hedging: int = 5
    window: int = 64
    # At most this share of calls may be hedges: when every node is slow at
    # once (an overloaded gateway host) hedging must not double the load.
    hedge_budget: float = 0.1


@dataclass
class NodeHealth:
    policy: HealthPolicy = field(default_factory=HealthPolicy)
    latencies: deque[float] = field(default_factory=deque)
    failures: int = 0
    open_until: float = 0.0
    calls: int = 0
    hedges: int = 0
    _probing: bool = False

    def admit(self, now: float | None = None) -> Admission:
        """May a call go to this node now? After the cool-down one trial goes through.

        A ``TRIAL`` admission must end in :meth:`succeeded`, :meth:`failed` or
        :meth:`inconclusive` — whatever happens to the call.
        """
        current = time.monotonic() if now is None else now
        if self.failures < self.policy.failures_to_open:
            return Admission.CALL
        if current < self.open_until or self._probing:
            return Admission.SKIP
        self._probing = True
        return Admission.TRIAL

    @property
    def probing(self) -> bool:
        """A trial call is out and not settled yet."""
        return self._probing

    def inconclusive(self, admission: Admission) -> None:
        """The call ended without telling whether the node works (refused, cancelled).

        Counts neither way; a trial gives its place back, so the next call may try again.
        """
        if admission is Admission.TRIAL:
            self._probing = False

    def reason(self, now: float | None = None) -> str:
        current = time.monotonic() if now is None else now
        return (f"skipped: circuit open after {self.failures} consecutive failures; "
                f"next try in {max(0.0, self.open_until - current):.0f} s")

    def may_hedge(self) -> bool:
        """Spends one hedge from the budget (one is always allowed to start with)."""
        if self.hedges >= 1 + self.policy.hedge_budget * self.calls:
            return False
        self.hedges += 1
        return True

    def succeeded(self, latency: float) -> None:
        self.calls += 1
        self.failures = 0
        self._probing = False
        self.latencies.append(latency)
        while len(self.latencies) > self.policy.window:
            self.latencies.popleft()

    def failed(self, now: float | None = None) -> None:
        current = time.monotonic() if now is None else now
        self.calls += 1
        self.failures += 1
        self._probing = False
        if self.failures >= self.policy.failures_to_open:
            self.open_until = current + self.policy.cooldown

    def hedge_delay(self) -> float | None:
        """When to send a backup request: near this node's recent p95, or never yet."""
        if len(self.latencies) < self.policy.samples_for_hedging:
            return None
        ordered = sorted(self.latencies)
        index = min(len(ordered) - 1, int(self.policy.hedge_percentile * len(ordered)))
        return max(self.policy.hedge_min_delay, ordered[index])


@dataclass
class ReplicaRound:
    """One query's use of one member's replicas (nodes with the same identity and data).

    Replicas are taken in turn, starting at ``start`` (the gateway rotates it
    from query to query, so every replica serves and keeps its latency history
    fresh); one whose breaker is open is passed over while another serves.
    Each replica is admitted at most once per query — its breaker's trial, if
    it is one, covers every call of this query to it — and :meth:`settle`
    settles each admitted replica exactly once, from all its calls together:
    answered, failed, or (refused, cancelled) inconclusive.
    """

    healths: Sequence[NodeHealth]
    start: int = 0
    admitted: dict[int, Admission] = field(default_factory=dict)
    # Why a replica was passed over (its breaker is open), by position.
    passed_over: dict[int, str] = field(default_factory=dict)
    answered: dict[int, float] = field(default_factory=dict)
    failed: set[int] = field(default_factory=set)

    def next(self, now: float) -> int | None:
        """The next replica not yet asked in this query, admitted; None when none is left."""
        count = len(self.healths)
        for step in range(count):
            index = (self.start + step) % count
            if index in self.admitted or index in self.passed_over:
                continue
            admission = self.healths[index].admit(now)
            if admission:
                self.admitted[index] = admission
                return index
            self.passed_over[index] = self.healths[index].reason(now)
        return None

    @property
    def asked(self) -> int:
        return len(self.admitted)

    def record(self, index: int, answered: bool | None, latency: float = 0.0) -> None:
        """One call's outcome: True answered, False failed, None says nothing (refused)."""
        if answered:
            self.answered[index] = latency
        elif answered is False:
            self.failed.add(index)

    def settle(self, now: float) -> None:
        """Tells every admitted replica's health how this query went for it (once)."""
        for index, admission in self.admitted.items():
            health = self.healths[index]
            if index in self.answered:
                health.succeeded(self.answered[index])
            elif index in self.failed:
                health.failed(now)
            else:
                health.inconclusive(admission)
        self.admitted.clear()
