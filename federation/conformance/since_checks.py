"""Conformance checks of the ``match.since-generation`` feature (PROTOCOL.md section 12).

Played against a node that lists the feature in Describe; skipped (in words)
for one that does not. What the kit can drive from outside: the generation an
answer states, a known digest hidden when asked since the current generation
and found when asked since 0, a generation ahead of the node refused, and the
generation bound into ``qh``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from federation.conformance.target import Kit
from federation.query import SINCE_GENERATION_FEATURE, QueryItem, query_sha256
from federation.wire import items_to_pb, pb

Check = Callable[[], Awaitable[tuple[bool | None, str, str]]]
OK = "OK"


class SinceChecks:
    def __init__(self, kit: Kit):
        self.kit = kit

    def catalogue(self) -> list[tuple[str, str, Check]]:
        return [
            ("since.generation-stated", "a Match answer states the generation searched (not below Describe's)",
             self._stated),
            ("since.current-hides-known", "the known digest asked since the current generation: no result",
             self._current_hides),
            ("since.zero-finds-known", "the known digest asked since generation 0: its hit", self._zero_finds),
            ("since.ahead-refused", "since a generation the node has not reached: FAILED_PRECONDITION",
             self._ahead),
            ("since.bound-into-qh", "a token whose qh leaves since_generation out: PERMISSION_DENIED",
             self._unbound),
        ]

    async def match(self, items: list[QueryItem], since: int, qh_since: int | None = None) -> tuple[str, Any]:
        token = self.kit.token(items, qh=query_sha256(items, since if qh_since is None else qh_since))
        status, body = await self.kit.call("Match", items_to_pb(items, since).SerializeToString(), token)
        return (status, pb.MatchResponse.FromString(body)) if isinstance(body, bytes) else (status, body)

    async def _generation(self) -> tuple[int | None, str]:
        """The node's generation if it offers the feature, else None and why the check is skipped."""
        status, answer = await self.kit.describe(self.kit.token([], rpc="Describe"))
        if status != OK:
            return None, f"Describe failed: {status}: {answer}"
        if SINCE_GENERATION_FEATURE not in answer.features:
            return None, f"the node does not list {SINCE_GENERATION_FEATURE!r} in Describe features"
        return answer.generation, ""

    async def _stated(self) -> tuple[bool | None, str, str]:
        generation, why = await self._generation()
        if generation is None:
            return None, "", why
        items = [QueryItem("md5", os.urandom(16))]
        status, answer = await self.match(items, 0)
        expected = f"OK with generation >= {generation}"
        if status != OK:
            return False, expected, f"{status}: {answer}"
        return answer.generation >= generation, expected, f"generation {answer.generation}"

    async def _current_hides(self) -> tuple[bool | None, str, str]:
        generation, why = await self._generation()
        if generation is None or self.kit.t.known is None:
            return None, "", why or "no --known digest given"
        items = [QueryItem("md5", os.urandom(16)), self.kit.t.known]
        status, answer = await self.match(items, generation)
        if status != OK:
            return False, "OK, no results", f"{status}: {answer}"
        return not answer.results, "OK, no results", f"{len(answer.results)} result(s)"

    async def _zero_finds(self) -> tuple[bool | None, str, str]:
        generation, why = await self._generation()
        if generation is None or self.kit.t.known is None:
            return None, "", why or "no --known digest given"
        items = [QueryItem("md5", os.urandom(16)), self.kit.t.known]
        status, answer = await self.match(items, 0)
        if status != OK:
            return False, "OK, one result: item 1", f"{status}: {answer}"
        got = "; ".join(f"item {r.item}: {len(r.hits)} hit(s)" for r in answer.results) or "no results"
        return [r.item for r in answer.results] == [1], "OK, one result: item 1", got

    async def _ahead(self) -> tuple[bool | None, str, str]:
        generation, why = await self._generation()
        if generation is None:
            return None, "", why
        items = [QueryItem("md5", os.urandom(16))]
        status, message = await self.match(items, generation + 1_000_000)
        return status == "FAILED_PRECONDITION", "FAILED_PRECONDITION", _said(status, message)

    async def _unbound(self) -> tuple[bool | None, str, str]:
        generation, why = await self._generation()
        if generation is None:
            return None, "", why
        items = [QueryItem("md5", os.urandom(16))]
        status, message = await self.match(items, max(generation, 1), qh_since=0)
        return status == "PERMISSION_DENIED", "PERMISSION_DENIED", _said(status, message)


def _said(status: str, message: object) -> str:
    return f"{status}: {message if status != OK else 'answered'}"
