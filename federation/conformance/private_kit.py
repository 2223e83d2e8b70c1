"""Conformance checks for nodes that offer private exact matching (``private.exact.v2``).

The kit cannot know a node's OPRF key, so it checks what a key must make true:
the same input blinded twice, with different blinds, finalizes to the same
output; a digest the node holds (``--known``) finalizes to an output found in
its bucket and is disclosed against that output; a random digest is not found;
a forged proof (64 random bytes) releases nothing; and the inputs a node must
refuse (an element that is no group element, the identity, a prefix length or
bucket out of range, a group whose buckets and elements disagree in number, a
token for another call) are refused with the status
PROTOCOL.md names. A node that does not list the feature has these checks skipped.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from federation import buckets, oprf, protocol
from federation.conformance.target import Kit, only_hit_at
from federation.query import (
    DiscloseItem,
    PrivateGroup,
    PrivateItem,
    PrivateRequest,
    QueryItem,
    bucket_width,
    disclose_sha256,
    private_match_sha256,
    private_request,
)
from federation.wire import disclose_to_pb, pb, private_request_to_pb

FEATURE = protocol.PRIVATE_EXACT_FEATURE
SUITE = "ristretto255-SHA512"
OK = "OK"
INVALID = "INVALID_ARGUMENT"
DENIED = "PERMISSION_DENIED"
Check = Callable[[], Awaitable[tuple[bool | None, str, str]]]


def _fingerprint_bits(answer: pb.PrivateInfo | pb.PrivateMatchResponse) -> int:
    """The fingerprint width of a Describe or PrivateMatch answer (PROTOCOL.md 13.3);
    ``AssertionError`` (the check's failure) for an encoding or width the protocol does not define."""
    bits, encoding = answer.fingerprint_bits, answer.bucket_encoding
    try:
        buckets.check_bits(encoding, bits)
    except buckets.BucketError as exc:
        raise AssertionError(str(exc)) from None
    if encoding == buckets.FIXED and answer.output_bytes * 8 != bits:
        raise AssertionError(f"fixed encoding with fingerprint_bits {bits}, output_bytes {answer.output_bytes}")
    return bits


class PrivateChecks:
    """The private-matching part of the node catalogue; it calls through the node kit's channel and signer."""

    def __init__(self, kit: Kit):
        self.kit = kit
        self._offer: pb.PrivateInfo | None = None
        self._described = False

    # ------------------------------------------------------------------ calls

    async def offer(self) -> pb.PrivateInfo | None:
        """The node's PrivateInfo when its Describe lists the feature (asked once)."""
        if not self._described:
            status, answer = await self.kit.describe(self.kit.token([], rpc="Describe"))
            self._described = True
            if status == OK and FEATURE in answer.features and answer.HasField("private_exact"):
                self._offer = answer.private_exact
        return self._offer

    def _token(self, rpc: str, qh: str, **changes: Any) -> str:
        return self.kit.token([], rpc=rpc, **{"qh": qh, "case": "CONFORMANCE", **changes})

    async def private_match(self, items: Sequence[PrivateItem] | PrivateRequest,
                            token: str | None = None) -> tuple[str, Any]:
        request = items if isinstance(items, PrivateRequest) else private_request(items)
        token = token or self._token("PrivateMatch", private_match_sha256(request))
        status, body = await self.kit.call("PrivateMatch", private_request_to_pb(request).SerializeToString(), token)
        return (status, pb.PrivateMatchResponse.FromString(body)) if isinstance(body, bytes) else (status, body)

    async def disclose(self, key_id: str, items: Sequence[DiscloseItem]) -> tuple[str, Any]:
        token = self._token("Disclose", disclose_sha256(key_id, items))
        status, body = await self.kit.call("Disclose", disclose_to_pb(key_id, items).SerializeToString(), token)
        return (status, pb.DiscloseResponse.FromString(body)) if isinstance(body, bytes) else (status, body)

    async def evaluate(self, item: QueryItem, bits: int) -> tuple[bytes, bytes, bool, pb.PrivateMatchResponse]:
        """One item asked privately: (full output, evaluated element, found in its bucket, the answer)."""
        data = oprf.digest_input(item.algorithm, item.digest)
        blind, element = oprf.blind(data)
        status, answer = await self.private_match([PrivateItem(item.algorithm, oprf.bucket_of(data, bits), bits,
                                                               element)])
        if status != OK:
            raise AssertionError(f"PrivateMatch of an honest item: {status}: {answer}")
        evaluated = bytes(answer.evaluated_elements)
        if len(evaluated) != oprf.ELEMENT_BYTES:
            raise AssertionError(f"{len(evaluated)} bytes of evaluated elements for 1 item")
        output = oprf.finalize(data, blind, evaluated)
        try:
            found = bool(buckets.members(bytes(answer.bucket_answers), np.zeros(1, dtype=np.int64), 1,
                                         answer.bucket_encoding, _fingerprint_bits(answer), [output])[0])
        except buckets.BucketError as exc:
            raise AssertionError(f"bucket answers: {exc}") from None
        return output, evaluated, found, answer

    # ------------------------------------------------------------------ catalogue

    def catalogue(self) -> list[tuple[str, str, Check]]:
        checks: list[tuple[str, str, Check]] = [
            ("private.offer", "Describe's PrivateInfo: suite, prefix_bits 1..32, bucket encoding, key_id",
             self._offer_check),
            ("private.consistent", "the same digest blinded twice finalizes to the same output", self._consistent),
            ("private.known-found", "a held digest is in its bucket and disclosed against its output", self._known),
            ("private.bucket-once", "two items of one bucket: two evaluated elements, the bucket answered once",
             self._bucket_once),
            ("private.unknown-absent", "random digests are not in their buckets", self._unknown),
            ("private.forged-proof", "Disclose with a random 64-byte proof releases nothing", self._forged),
            ("private.malformed-element", "a blinded element that is no group element: INVALID_ARGUMENT",
             self._element(b"\xff" * 32)),
            ("private.identity-element", "the identity as blinded element: INVALID_ARGUMENT",
             self._element(bytes(32))),
            ("private.element-length", "a blinded element of 31 bytes: INVALID_ARGUMENT",
             self._element(os.urandom(31))),
            ("private.prefix-range", "prefix_bits 33: INVALID_ARGUMENT", self._shape(lambda bits: (33, 0))),
            ("private.prefix-other", "prefix_bits other than the node's: INVALID_ARGUMENT",
             self._shape(lambda bits: (bits - 1 if bits > 1 else 2, 0))),
            ("private.bucket-range", "a bucket of 2^prefix_bits (prefix_bits not a multiple of 8): INVALID_ARGUMENT",
             self._bucket_range),
            ("private.group-shape", "a group of 2 buckets and 1 blinded element: INVALID_ARGUMENT", self._ragged),
            ("private.not-exact", "algorithm pdq: INVALID_ARGUMENT", self._shape(lambda bits: (bits, 0), "pdq")),
            ("private.other-rpc", "a Match token on PrivateMatch: PERMISSION_DENIED", self._other_rpc),
            ("private.other-items", "qh of other private items: PERMISSION_DENIED", self._other_items),
        ]
        return [(name, title, self._when_offered(check)) for name, title, check in checks]

    def _when_offered(self, check: Check) -> Check:
        async def guarded() -> tuple[bool | None, str, str]:
            if await self.offer() is None:
                return None, "", f"node does not offer {FEATURE}"
            return await check()
        return guarded

    async def _bits(self) -> int:
        offer = await self.offer()
        assert offer is not None
        return offer.prefix_bits

    async def _offer_check(self) -> tuple[bool, str, str]:
        info = await self.offer()
        assert info is not None
        got = (f"suite {info.suite!r}, prefix_bits {info.prefix_bits}, bucket_encoding {info.bucket_encoding}, "
               f"fingerprint_bits {info.fingerprint_bits}, output_bytes {info.output_bytes}, "
               f"key_id {info.key_id!r}, covered {info.covered} of {info.stored}")
        try:
            _fingerprint_bits(info)
            encoded = True
        except AssertionError:
            encoded = False
        ok = (info.suite == SUITE and 1 <= info.prefix_bits <= oprf.MAX_BUCKET_BITS and encoded
              and bool(info.key_id) and info.covered <= info.stored)
        return ok, (f"suite {SUITE!r}, prefix_bits 1..32, a known bucket_encoding with its fingerprint_bits "
                    "(fixed: 24..64, output_bytes = fingerprint_bits / 8; Elias-Fano: 8..48), a key_id, "
                    "covered <= stored"), got

    async def _consistent(self) -> tuple[bool, str, str]:
        item, bits = QueryItem("sha256", os.urandom(32)), await self._bits()
        first, evaluated_first, _, _ = await self.evaluate(item, bits)
        second, evaluated_second, _, _ = await self.evaluate(item, bits)
        got = (f"outputs {'equal' if first == second else 'differ'}, evaluated elements "
               f"{'equal' if evaluated_first == evaluated_second else 'differ'}")
        return first == second and evaluated_first != evaluated_second, \
            "outputs equal, evaluated elements differ", got

    async def _known(self) -> tuple[bool | None, str, str]:
        known = self.kit.t.known
        if known is None or known.algorithm not in ("md5", "sha1", "sha256"):
            return None, "", "no exact --known digest given"
        output, _, found, answer = await self.evaluate(known, await self._bits())
        expected = "found in its bucket; Disclose: one result, item 0, hits with a reference"
        if not found:
            return False, expected, "not in its bucket"
        status, disclosed = await self.disclose(answer.key_id, [DiscloseItem(known.algorithm, output)])
        if status != OK:
            return False, expected, f"Disclose: {status}: {disclosed}"
        ok, got = only_hit_at(disclosed.results, 0, "nothing disclosed")
        return ok, expected, got

    async def _bucket_once(self) -> tuple[bool, str, str]:
        bits = await self._bits()
        data = oprf.digest_input("sha256", os.urandom(32))
        items = [PrivateItem("sha256", oprf.bucket_of(data, bits), bits, oprf.blind(data)[1]) for _ in range(2)]
        status, answer = await self.private_match(items)
        expected = "OK: 64 bytes of evaluated elements, bucket_answers one answer"
        if status != OK:
            return False, expected, f"{status}: {answer}"
        try:
            buckets.split(bytes(answer.bucket_answers), 1, answer.bucket_encoding, _fingerprint_bits(answer))
            once = "one answer"
        except (buckets.BucketError, AssertionError) as exc:
            once = f"not one answer ({exc})"
        got = f"{status}: {len(answer.evaluated_elements)} bytes of evaluated elements, bucket_answers {once}"
        return got == expected, expected, got

    async def _unknown(self) -> tuple[bool, str, str]:
        bits = await self._bits()
        found = [(await self.evaluate(QueryItem(a, os.urandom(n)), bits))[2]
                 for a, n in (("md5", 16), ("sha1", 20), ("sha256", 32))]
        return not any(found), "none found", f"{sum(found)} of 3 found"

    async def _forged(self) -> tuple[bool, str, str]:
        _, _, _, answer = await self.evaluate(QueryItem("sha256", os.urandom(32)), await self._bits())
        status, disclosed = await self.disclose(answer.key_id, [DiscloseItem("sha256", os.urandom(64))])
        expected = "no hit released (OK with no results, or a refusal)"
        if status != OK:
            return True, expected, f"{status}: {disclosed}"
        return not disclosed.results, expected, f"{len(disclosed.results)} result(s) released"

    def _element(self, element: bytes) -> Check:
        async def check() -> tuple[bool, str, str]:
            bits = await self._bits()
            status, message = await self.private_match([PrivateItem("sha256", 0, bits, element)])
            return status == INVALID, INVALID, f"{status}: {message if status != OK else 'answered'}"
        return check

    def _shape(self, make: Callable[[int], tuple[int, int]], algorithm: str = "sha256") -> Check:
        async def check() -> tuple[bool, str, str]:
            bits, bucket = make(await self._bits())
            _, element = oprf.blind(os.urandom(16))
            status, message = await self.private_match([PrivateItem(algorithm, bucket, bits, element)])
            return status == INVALID, INVALID, f"{status}: {message if status != OK else 'answered'}"
        return check

    async def _bucket_range(self) -> tuple[bool | None, str, str]:
        bits = await self._bits()
        if not bits % 8:
            return None, "", f"prefix_bits {bits}: every {bits // 8}-byte bucket is in range"
        _, element = oprf.blind(os.urandom(16))
        status, message = await self.private_match([PrivateItem("sha256", 1 << bits, bits, element)])
        return status == INVALID, INVALID, f"{status}: {message if status != OK else 'answered'}"

    async def _ragged(self) -> tuple[bool, str, str]:
        bits = await self._bits()
        _, element = oprf.blind(os.urandom(16))
        request = PrivateRequest(bits, (PrivateGroup("sha256", bytes(2 * bucket_width(bits)), element),))
        status, message = await self.private_match(request)
        return status == INVALID, INVALID, f"{status}: {message if status != OK else 'answered'}"

    async def _other_rpc(self) -> tuple[bool, str, str]:
        items = await self._honest()
        status, message = await self.private_match(items, self._token("Match", private_match_sha256(
            private_request(items))))
        return status == DENIED, DENIED, f"{status}: {message if status != OK else 'answered'}"

    async def _other_items(self) -> tuple[bool, str, str]:
        items, others = await self._honest(), await self._honest()
        status, message = await self.private_match(items, self._token("PrivateMatch", private_match_sha256(
            private_request(others))))
        return status == DENIED, DENIED, f"{status}: {message if status != OK else 'answered'}"

    async def _honest(self) -> list[PrivateItem]:
        bits = await self._bits()
        data = oprf.digest_input("sha256", os.urandom(32))
        return [PrivateItem("sha256", oprf.bucket_of(data, bits), bits, oprf.blind(data)[1])]


__all__ = ["FEATURE", "PrivateChecks"]
