"""Conformance checks of the ``match.packed-exact`` feature (PROTOCOL.md section 14).

Played against a node that lists the feature in Describe; skipped (in words)
for one that does not. A node offering it must answer a packed request exactly
as the same item list sent unpacked, find a known digest at its packed
position, and refuse a group that is not whole digests of an exact algorithm.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

from federation.conformance.target import Kit
from federation.query import PACKED_EXACT_FEATURE, PackedGroup, QueryItem
from federation.wire import packable, pb, request_to_pb

Check = Callable[[], Awaitable[tuple[bool | None, str, str]]]
OK = "OK"
INVALID = "INVALID_ARGUMENT"


def _answer(response: pb.MatchResponse) -> list[tuple[int, list[str]]]:
    return [(r.item, sorted(h.reference for h in r.hits)) for r in response.results]


class PackedChecks:
    def __init__(self, kit: Kit):
        self.kit = kit

    def catalogue(self) -> list[tuple[str, str, Check]]:
        return [
            ("packed.same-answer", "packed and unpacked forms of one item list: the same answer",
             self._same_answer),
            ("packed.partial-digest", "a packed sha256 group of 33 bytes: INVALID_ARGUMENT",
             self._refused(pb.PackedItems(algorithm="sha256", digests=bytes(33)))),
            ("packed.not-exact", "a packed group of pdq digests: INVALID_ARGUMENT",
             self._refused(pb.PackedItems(algorithm="pdq", digests=bytes(32)))),
        ]

    async def _offered(self) -> str:
        """'' if the node lists the feature, else why the check is skipped."""
        status, answer = await self.kit.describe(self.kit.token([], rpc="Describe"))
        if status != OK:
            return f"Describe failed: {status}: {answer}"
        if PACKED_EXACT_FEATURE not in answer.features:
            return f"the node does not list {PACKED_EXACT_FEATURE!r} in Describe features"
        return ""

    async def _send(self, request: pb.MatchRequest, listed: list[QueryItem]) -> tuple[str, Any]:
        status, body = await self.kit.call("Match", request.SerializeToString(), self.kit.token(listed))
        return (status, pb.MatchResponse.FromString(body)) if isinstance(body, bytes) else (status, body)

    async def _same_answer(self) -> tuple[bool | None, str, str]:
        if why := await self._offered():
            return None, "", why
        known = self.kit.t.known
        items = [QueryItem("pdq", os.urandom(32), 31), QueryItem("md5", os.urandom(16))]
        groups = [PackedGroup("sha256", os.urandom(32 * 3), 32), PackedGroup("sha1", os.urandom(20 * 2), 20)]
        at = None
        if known is not None and (size := packable(known.algorithm)) and len(known.digest) == size:
            groups.append(PackedGroup(known.algorithm, os.urandom(size) + known.digest + os.urandom(size), size))
            at = len(items) + 5 + 1  # its position in the item list: after the items and 3 + 2 packed digests
        listed = items + [QueryItem(g.algorithm, g.digest(n)) for g in groups for n in range(g.count)]
        expected = "the same results for both forms" + (f", a hit at item {at}" if at is not None else "")
        packed_status, packed = await self._send(request_to_pb(items, groups), listed)
        plain_status, plain = await self._send(request_to_pb(listed), listed)
        if (packed_status, plain_status) != (OK, OK):
            return False, expected, f"packed {packed_status}: {packed}; unpacked {plain_status}: {plain}"
        got = f"packed {_answer(packed)}, unpacked {_answer(plain)}"
        ok = _answer(packed) == _answer(plain) and (at is None or [r.item for r in packed.results] == [at])
        return ok, expected, got

    def _refused(self, group: pb.PackedItems) -> Check:
        async def check() -> tuple[bool | None, str, str]:
            if why := await self._offered():
                return None, "", why
            items = [QueryItem("md5", os.urandom(16))]
            request = request_to_pb(items)
            request.packed.append(group)
            status, message = await self._send(request, items)
            return status == INVALID, INVALID, f"{status}: {message if status != OK else 'answered'}"
        return check
