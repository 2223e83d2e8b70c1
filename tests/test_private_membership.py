"""Private exact matching, the gateway's pure part: blinding, the local membership test
against a node's bucket answers (both encodings), what an answer must look like, which
offers are taken, and how many items one request may carry. No node: an honest node's
answer is computed here with a key of the test's own."""

from __future__ import annotations

import os

import numpy as np
import pytest

from federation import buckets, oprf
from federation.query import QueryItem
from federation.wire import pb
from gateway import private


def _node_answer(key: bytes, blinded: list[private.Blinded], stored: list[bytes], bits: int = 32,
                 prefix_bits: int = 16, encoding: int = buckets.FIXED) -> pb.PrivateMatchResponse:
    """What an honest node holding ``stored`` (OPRF inputs) answers: the evaluations, and each distinct
    bucket's answer once, in the order of its first item."""
    outputs = {data: oprf.evaluate(key, data) for data in stored}
    distinct, _ = buckets.distinct(np.array([entry.item.bucket for entry in blinded], dtype=np.int64))
    answers = []
    for number in distinct.tolist():
        bucket = sorted(o for d, o in outputs.items() if oprf.bucket_of(d, prefix_bits) == number)
        prefixes = np.array([int.from_bytes(o[:8], "big") for o in bucket], dtype=np.uint64)
        answers.append(buckets.encode(prefixes, encoding, bits))
    return pb.PrivateMatchResponse(node_id="FR", key_id=oprf.key_id(key),
                                   output_bytes=bits // 8 if encoding == buckets.FIXED else 0,
                                   prefix_bits=prefix_bits, stored=len(stored), covered=len(stored),
                                   protocol_version="1.1", bucket_encoding=encoding, fingerprint_bits=bits,
                                   evaluated_elements=b"".join(oprf.blind_evaluate(key, entry.item.blinded)
                                                               for entry in blinded),
                                   bucket_answers=b"".join(answers))


@pytest.mark.parametrize(("encoding", "bits"), [(buckets.FIXED, 32), (buckets.FIXED, 24), (buckets.ELIAS_FANO, 24),
                                               (buckets.ELIAS_FANO, 40)])
def test_local_membership_finds_held_digests_only_and_proves_them_with_the_full_output(encoding: int,
                                                                                     bits: int) -> None:
    key = oprf.generate_key()
    held = [QueryItem("sha256", os.urandom(32)), QueryItem("md5", os.urandom(16))]
    # The same digest bytes under another algorithm are another input: not a hit.
    items = [held[0], QueryItem("sha256", os.urandom(32)), held[1], QueryItem("sha1", held[0].digest[:20]),
             QueryItem("sha256", held[1].digest * 2)]
    # A small prefix puts everything in few buckets: non-members share buckets with members.
    blinded = private.blind_items(items, range(len(items)), prefix_bits=1)
    assert all(b.item.blinded != oprf.blind(b.input)[1] for b in blinded), "blinds must be fresh"
    stored = [oprf.digest_input(i.algorithm, i.digest) for i in held]
    stored += [oprf.digest_input("sha256", os.urandom(32)) for _ in range(50)]
    found = private.local_hits(blinded, _node_answer(key, blinded, stored, bits, prefix_bits=1, encoding=encoding))
    assert [entry.position for entry, _ in found] == [0, 2]
    assert [output for _, output in found] == [oprf.evaluate(key, stored[0]), oprf.evaluate(key, stored[1])]


def test_items_carry_no_digest_and_their_bucket_is_the_digests_prefix() -> None:
    item = QueryItem("sha1", os.urandom(20))
    (entry,) = private.blind_items([item], [0], prefix_bits=16)
    assert item.digest not in entry.item.blinded
    assert entry.item.bucket == oprf.bucket_of(oprf.digest_input("sha1", item.digest), 16) < 2**16
    assert (entry.item.algorithm, entry.item.prefix_bits) == ("sha1", 16)


@pytest.mark.parametrize("damage", ["count", "width", "ragged", "encoding", "short", "element"])
def test_an_answer_that_does_not_fit_the_request_is_malformed(damage: str) -> None:
    key = oprf.generate_key()
    items = [QueryItem("md5", os.urandom(16)) for _ in range(3)]
    blinded = private.blind_items(items, range(3), prefix_bits=4)
    response = _node_answer(key, blinded, [oprf.digest_input("md5", items[0].digest)], prefix_bits=4)
    if damage == "count":
        response.evaluated_elements = response.evaluated_elements[:-32]
    elif damage == "width":
        response.fingerprint_bits = 65
    elif damage == "ragged":
        response.bucket_answers += b"\x00"
    elif damage == "encoding":
        response.bucket_encoding = 7  # type: ignore[assignment]
    elif damage == "short":
        response.bucket_encoding, response.fingerprint_bits = buckets.ELIAS_FANO, 24
        response.bucket_answers = response.bucket_answers[:1]
    else:
        response.evaluated_elements = response.evaluated_elements[:32] + bytes(32) + response.evaluated_elements[64:]
    with pytest.raises(ValueError):
        private.local_hits(blinded, response)


def test_offer_is_only_taken_for_the_suite_this_gateway_speaks() -> None:
    info = pb.PrivateInfo(suite="ristretto255-SHA512", prefix_bits=16, key_id="00" * 8, output_bytes=0,
                          stored=10, covered=10, mean_bucket_size=0.1, algorithms=["md5", "sha256", "pdq"],
                          bucket_encoding=buckets.ELIAS_FANO, fingerprint_bits=24)
    offered = pb.DescribeResponse(features=[private.FEATURE], private_exact=info)
    offer = private.offer_of(offered)
    assert offer is not None and offer.algorithms == {"md5", "sha256"} and offer.prefix_bits == 16
    assert (offer.encoding, offer.fingerprint_bits) == (buckets.ELIAS_FANO, 24)
    assert private.offer_of(pb.DescribeResponse(private_exact=info)) is None  # feature not listed
    other = pb.PrivateInfo()
    other.CopyFrom(info)
    other.suite = "P256-SHA256"
    assert private.offer_of(pb.DescribeResponse(features=[private.FEATURE], private_exact=other)) is None
    other.suite, other.prefix_bits = info.suite, 33
    assert private.offer_of(pb.DescribeResponse(features=[private.FEATURE], private_exact=other)) is None
    other.prefix_bits, other.bucket_encoding = 16, 5  # type: ignore[assignment]
    assert private.offer_of(pb.DescribeResponse(features=[private.FEATURE], private_exact=other)) is None


def test_the_parts_are_sized_by_the_nodes_bucket_sizes() -> None:
    def offer(mean: float, encoding: int = buckets.FIXED, bits: int = 32) -> private.Offer:
        return private.Offer(16, "00" * 8, encoding, bits, frozenset({"md5"}), 0, 0, mean)
    assert private.items_per_request(offer(15)) > 20_000  # 1 M stored, 16 bits: a whole batch at once
    assert private.items_per_request(offer(39_063)) == private.ANSWER_BUDGET // (32 + 2 * (2 + 39_063 * 4))
    assert private.items_per_request(offer(153, buckets.ELIAS_FANO, 24)) > private.items_per_request(offer(153))
    assert private.items_per_request(offer(10**9)) == 1


def test_a_large_batch_is_blinded_and_finalized_on_threads_in_order() -> None:
    """Above a few hundred items the blinds and finalizations run on several threads: the items
    keep their positions and the held ones are found where they are."""
    assert private.WORKERS >= 1
    key = oprf.generate_key()
    items = [QueryItem("sha256", os.urandom(32)) for _ in range(private._SPREAD_FROM + 88)]
    held = [3, 250, 599]
    blinded = private.blind_items(items, range(len(items)), prefix_bits=16)
    assert [entry.position for entry in blinded] == list(range(len(items)))
    assert all(entry.input == oprf.digest_input("sha256", item.digest) for entry, item in zip(blinded, items,
                                                                                            strict=True))
    stored = [oprf.digest_input("sha256", items[p].digest) for p in held]
    found = private.local_hits(blinded, _node_answer(key, blinded, stored, 32, encoding=buckets.ELIAS_FANO))
    assert [entry.position for entry, _ in found] == held
    assert [output for _, output in found] == [oprf.evaluate(key, data) for data in stored]
