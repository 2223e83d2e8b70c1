"""Bucket answers (federation.buckets): both encodings give back exactly the fingerprints
written, answers concatenate without lengths, membership follows, malformed answers are
refused, Elias-Fano is compact, and the node's compiled writer gives the reference's bytes."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest

from federation import buckets
from federation.wire import pb
from node import private_kernels

ENCODINGS = [(buckets.FIXED, 32), (buckets.FIXED, 64), (buckets.FIXED, 24), (buckets.ELIAS_FANO, 8),
             (buckets.ELIAS_FANO, 16), (buckets.ELIAS_FANO, 19), (buckets.ELIAS_FANO, 24),
             (buckets.ELIAS_FANO, 48)]


def _prefixes(rng: random.Random, count: int) -> np.ndarray:
    """``count`` sorted 64-bit prefixes, the extremes (0 and 2^64 - 1) among them."""
    values = [0, 2**64 - 1] + [rng.getrandbits(64) for _ in range(count)]
    return np.array(sorted(values[:count]), dtype=np.uint64)


def _present(rng: random.Random, group: np.ndarray) -> bytes:
    """An output whose fingerprint is in ``group`` (a random one if the group is empty)."""
    value = int(group[len(group) // 2]) if len(group) else rng.getrandbits(64)
    return value.to_bytes(8, "big") + rng.randbytes(56)


@pytest.mark.parametrize("count", [0, 1, 2, 150, 2000])
@pytest.mark.parametrize(("encoding", "bits"), ENCODINGS)
def test_round_trip(encoding: int, bits: int, count: int) -> None:
    prefixes = _prefixes(random.Random(count * 100 + bits), count)
    blob = buckets.encode(prefixes, encoding, bits)
    assert len(blob) == buckets.answer_length(count, encoding, bits)
    assert (buckets.decode(blob, encoding, bits) == prefixes >> np.uint64(64 - bits)).all()


def test_elias_fano_is_the_specified_bytes() -> None:
    """Three 8-bit fingerprints 3, 5, 200: L = floor(log2(256 / 3)) = 6; low bits 000011 000101
    001000 (18 bits, 3 bytes); bitmap of 3 + 2^2 = 7 bits: highs 0, 0, 3 at bits 0, 1, 5."""
    prefixes = np.array([3 << 56, 5 << 56, 200 << 56], dtype=np.uint64)
    assert buckets.encode(prefixes, buckets.ELIAS_FANO, 8) == bytes([0, 3, 0b00001100, 0b01010010, 0b00000000,
                                                                     0b11000100])
    assert buckets.encode(prefixes[:0], buckets.ELIAS_FANO, 8) == b"\x00\x00"
    assert buckets.encode(prefixes, buckets.FIXED, 24) == bytes([0, 3, 3, 0, 0, 5, 0, 0, 200, 0, 0])


def test_membership_and_false_candidates() -> None:
    rng = random.Random(1)
    prefixes = _prefixes(rng, 150)
    blob = buckets.encode(prefixes, buckets.ELIAS_FANO, 24)
    absent = [rng.randbytes(64) for _ in range(20_000)]
    found = buckets.members(blob, np.zeros(len(absent), dtype=np.int64), 1, buckets.ELIAS_FANO, 24, absent)
    assert found.sum() < 5  # about 150 / 2^24 each: 0.18 expected
    # Same top 24 bits, different rest: a candidate (the disclosure step decides).
    first = int(prefixes[0]).to_bytes(8, "big")
    twin = first[:3] + bytes([first[3] ^ 0xFF]) + first[4:] + bytes(56)
    assert buckets.members(blob, np.zeros(1, dtype=np.int64), 1, buckets.ELIAS_FANO, 24, [twin]).all()


def test_elias_fano_is_compact() -> None:
    """150 fingerprints of 19 bits (a 16-bit bucket at 10 M digests, chosen for a 2^-11 false-candidate
    chance): under 1.8 bytes each, against 2.375 written plainly."""
    assert buckets.choose_bits(152.6, 11) == 19
    prefixes = _prefixes(random.Random(2), 150)
    assert len(buckets.encode(prefixes, buckets.ELIAS_FANO, 19)) < 150 * 1.8
    assert len(buckets.encode(prefixes, buckets.FIXED, 24)) == 2 + 150 * 3


def test_fingerprint_width_follows_the_bucket_size() -> None:
    assert [buckets.choose_bits(mean, 11) for mean in (0.0, 15.3, 152.6, 1526.0)] == [16, 16, 19, 22]
    assert buckets.choose_bits(152.6, 12) == 20
    assert buckets.choose_bits(10.0**12, 20) == 48


@pytest.mark.parametrize(("blob", "encoding", "bits", "message"), [
    (b"\x00\x01\x02\x03", buckets.FIXED, 32, "answers take 6 bytes"),
    (b"\x00", buckets.ELIAS_FANO, 24, "cut short"),
    (b"\x00\x05", buckets.ELIAS_FANO, 24, "answers take"),
    (b"\x00\x01" + bytes(3), buckets.ELIAS_FANO, 16, "bitmap does not hold"),
    (b"\x00\x02" + bytes([0b10000000, 0, 0, 0, 0b11000000]), buckets.ELIAS_FANO, 16, "ascending"),
    (b"", 7, 24, "unknown"),
    (b"\x00\x00", buckets.ELIAS_FANO, 60, "60 bits"),
    (b"\x00\x00", buckets.FIXED, 20, "20 bits"),
])
def test_malformed_answers_are_refused(blob: bytes, encoding: int, bits: int, message: str) -> None:
    with pytest.raises(buckets.BucketError, match=message):
        buckets.decode(blob, encoding, bits)


def test_wire_enum_names_the_same_encodings() -> None:
    assert (pb.PRIVATE_BUCKET_ENCODING_FIXED, pb.PRIVATE_BUCKET_ENCODING_ELIAS_FANO) == (
        buckets.FIXED, buckets.ELIAS_FANO)


def test_distinct_buckets_in_the_order_of_their_first_item() -> None:
    values, which = buckets.distinct(np.array([7, 3, 7, 9, 3, 1], dtype=np.int64))
    assert values.tolist() == [7, 3, 9, 1]
    assert which.tolist() == [0, 1, 0, 2, 1, 3]


@pytest.mark.parametrize(("encoding", "bits"), ENCODINGS)
def test_concatenated_answers_split_and_answer_each_item(encoding: int, bits: int) -> None:
    rng = random.Random(bits + encoding)
    groups = [_prefixes(rng, size) for size in [0, 1, 2, 3, 150, 0, 17, 600, 1, 40]]
    blob = b"".join(buckets.encode(g, encoding, bits) for g in groups)
    offsets = buckets.split(blob, len(groups), encoding, bits)
    assert [blob[a:b] for a, b in itertools.pairwise(offsets)] == [
        buckets.encode(g, encoding, bits) for g in groups]
    which = np.array(list(range(len(groups))) * 2, dtype=np.int64)
    outputs = [_present(rng, g) for g in groups] + [rng.randbytes(64) for _ in groups]
    found = buckets.members(blob, which, len(groups), encoding, bits, outputs)
    assert found[:10].tolist() == [len(g) > 0 for g in groups]
    expected = [int.from_bytes(o[:8], "big") >> (64 - bits) in set((groups[w] >> np.uint64(64 - bits)).tolist())
                for w, o in zip(which.tolist(), outputs, strict=True)]
    assert found.tolist() == expected
    with pytest.raises(buckets.BucketError, match="answers take"):
        buckets.members(blob, which, len(groups) - 1, encoding, bits, outputs)


@pytest.mark.parametrize(("encoding", "bits"), ENCODINGS)
def test_the_nodes_compiled_writer_gives_the_reference_bytes(encoding: int, bits: int) -> None:
    """node.private_kernels: entries gathered from two segments (one with hidden rows), sorted and
    written per bucket, equal ``encode`` of each bucket's live entries."""
    rng = np.random.default_rng(bits)
    sizes = [0, 1, 2, 150, 0, 17, 600, 3]
    segments = []
    for _ in range(2):
        counts = rng.integers(0, 40, size=len(sizes)) + np.array(sizes)
        prefixes = rng.integers(0, 2**63, size=int(counts.sum()), dtype=np.uint64) * np.uint64(2)
        bounds = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        ids = rng.permutation(len(prefixes)).astype(np.uint32)
        segments.append((prefixes, bounds, np.arange(len(prefixes), dtype=np.uint32), ids))
    hidden = [np.zeros(0, dtype=np.uint32), np.sort(rng.choice(segments[1][3], 30, replace=False))]
    asked = np.array([6, 0, 3, 1, 5, 2, 4, 7], dtype=np.int64)
    room = sum(b[asked + 1] - b[asked] for _, b, _, _ in segments)
    base = np.cumsum(room) - room
    values = np.empty(int(room.sum()), dtype=np.uint64)
    cursor = base.copy()
    for (prefixes, bounds, positions, ids), gone in zip(segments, hidden, strict=True):
        private_kernels.collect(prefixes, bounds[asked], bounds[asked + 1], positions, ids, gone, values, cursor)
    counts = cursor - base
    lengths = buckets.lengths(counts, encoding, bits)
    offsets = np.cumsum(lengths) - lengths
    data = np.zeros(int(lengths.sum()), dtype=np.uint8)
    private_kernels.encode(values, base, counts, offsets, encoding, bits, buckets.low_bits_many(counts, bits), data)
    expected = []
    for bucket in asked.tolist():
        live = [p for (prefixes, bounds, _, ids), gone in zip(segments, hidden, strict=True)
                for p, row in zip(prefixes[bounds[bucket]:bounds[bucket + 1]].tolist(),
                                  ids[bounds[bucket]:bounds[bucket + 1]].tolist(), strict=True)
                if row not in set(gone.tolist())]
        expected.append(buckets.encode(np.array(sorted(live), dtype=np.uint64), encoding, bits))
    assert data.tobytes() == b"".join(expected)
    assert counts[asked.tolist().index(3)] > 150  # the hidden rows were left out of some bucket, not all


@pytest.mark.parametrize("bits", [8, 12, 16, 19, 24, 33, 48])
def test_membership_agrees_with_the_fingerprints_for_near_misses(bits: int) -> None:
    """Outputs whose fingerprints share a stored one's high part (the entries a gateway compares low
    bits with), its neighbours, the extremes, and exact members, against every answer of a batch."""
    rng = random.Random(bits * 7)
    groups = [_prefixes(rng, size) for size in [0, 1, 2, 5, 150, 153, 300, 0, 1000, 3]]
    blob = b"".join(buckets.encode(g, buckets.ELIAS_FANO, bits) for g in groups)
    shift = 64 - bits
    which, outputs = [], []
    for number, group in enumerate(groups):
        values = sorted({int(v) >> shift for v in group.tolist()})
        for value in [*values[:40], 0, (1 << bits) - 1, rng.getrandbits(bits)]:
            for near in (value - 1, value, value + 1, value ^ 1, value ^ (1 << (bits // 2))):
                if 0 <= near < 1 << bits:
                    which.append(number)
                    outputs.append((near << shift).to_bytes(8, "big") + rng.randbytes(56))
    found = buckets.members(blob, np.array(which), len(groups), buckets.ELIAS_FANO, bits, outputs)
    expected = [(int.from_bytes(o[:8], "big") >> shift) in {int(v) >> shift for v in groups[w].tolist()}
                for w, o in zip(which, outputs, strict=True)]
    assert found.tolist() == expected
    assert 0 < sum(expected) < len(expected)


def test_membership_refuses_a_bitmap_that_does_not_hold_its_count() -> None:
    good = buckets.encode(_prefixes(random.Random(9), 5), buckets.ELIAS_FANO, 24)
    bad = good[:-1] + bytes([good[-1] | 1])  # a padding bit set: six set bits for five entries
    assert len(bad) == len(good)
    with pytest.raises(buckets.BucketError, match="bitmap does not hold"):
        buckets.members(good + bad, np.array([0, 1]), 2, buckets.ELIAS_FANO, 24, [bytes(64), bytes(64)])
