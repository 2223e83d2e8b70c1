"""Bucket answers (federation.buckets): both encodings give back exactly the fingerprints
written, membership follows, malformed answers are refused, and Elias-Fano is compact."""

from __future__ import annotations

import random

import numpy as np
import pytest

from federation import buckets
from federation.wire import pb


def _prefixes(rng: random.Random, count: int) -> np.ndarray:
    """``count`` sorted 64-bit prefixes, the extremes (0 and 2^64 - 1) among them."""
    values = [0, 2**64 - 1] + [rng.getrandbits(64) for _ in range(count)]
    return np.array(sorted(values[:count]), dtype=np.uint64)


@pytest.mark.parametrize("count", [0, 1, 2, 150, 2000])
@pytest.mark.parametrize(("encoding", "bits"), [(buckets.FIXED, 32), (buckets.FIXED, 64), (buckets.FIXED, 24),
                                                (buckets.ELIAS_FANO, 16), (buckets.ELIAS_FANO, 24),
                                                (buckets.ELIAS_FANO, 48)])
def test_round_trip(encoding: int, bits: int, count: int) -> None:
    prefixes = _prefixes(random.Random(count * 100 + bits), count)
    blob = buckets.encode(prefixes, encoding, bits)
    assert (buckets.decode(blob, encoding, bits) == prefixes >> np.uint64(64 - bits)).all()
    for prefix in prefixes[:20].tolist():
        output = int(prefix).to_bytes(8, "big") + bytes(56)
        assert buckets.contains(blob, encoding, bits, output)


def test_membership_and_false_candidates() -> None:
    rng = random.Random(1)
    prefixes = _prefixes(rng, 150)
    blob = buckets.encode(prefixes, buckets.ELIAS_FANO, 24)
    absent = [rng.randbytes(64) for _ in range(20_000)]
    false = sum(buckets.contains(blob, buckets.ELIAS_FANO, 24, out) for out in absent)
    assert false < 5  # about 150 / 2^24 each: 0.18 expected
    # Same top 24 bits, different rest: a candidate (the disclosure step decides).
    first = int(prefixes[0]).to_bytes(8, "big")
    twin = first[:3] + bytes([first[3] ^ 0xFF]) + first[4:] + bytes(56)
    assert buckets.contains(blob, buckets.ELIAS_FANO, 24, twin)


def test_elias_fano_is_compact() -> None:
    """150 fingerprints of 24 bits (a 16-bit bucket at 10 M digests): under 2.4 bytes each,
    against 3 for the fixed encoding at the same false-candidate rate."""
    prefixes = _prefixes(random.Random(2), 150)
    assert len(buckets.encode(prefixes, buckets.ELIAS_FANO, 24)) < 150 * 2.4
    assert len(buckets.encode(prefixes, buckets.FIXED, 24)) == 150 * 3


@pytest.mark.parametrize(("blob", "encoding", "message"), [
    (b"\x01\x02\x03", buckets.FIXED, "whole number"),
    (b"\x00", buckets.ELIAS_FANO, "count"),
    (b"\x00\x05", buckets.ELIAS_FANO, "low bits"),
    (b"\x00\x01" + bytes(2) + b"\x00", buckets.ELIAS_FANO, "bitmap holds 0"),
    (b"", 7, "unknown"),
])
def test_malformed_answers_are_refused(blob: bytes, encoding: int, message: str) -> None:
    with pytest.raises(buckets.BucketError, match=message):
        buckets.decode(blob, encoding, 32 if encoding != buckets.ELIAS_FANO else 24)


def test_wire_enum_names_the_same_encodings() -> None:
    assert (pb.PRIVATE_BUCKET_ENCODING_FIXED, pb.PRIVATE_BUCKET_ENCODING_ELIAS_FANO) == (
        buckets.FIXED, buckets.ELIAS_FANO)


@pytest.mark.parametrize(("encoding", "bits"), [(buckets.FIXED, 32), (buckets.ELIAS_FANO, 16),
                                                (buckets.ELIAS_FANO, 24), (buckets.ELIAS_FANO, 48)])
def test_many_buckets_at_once_encode_as_each_alone(encoding: int, bits: int) -> None:
    rng = random.Random(bits)
    groups = [_prefixes(rng, size) for size in [0, 1, 2, 3, 150, 0, 17, 600, 1, 0]]
    sizes = np.array([len(g) for g in groups])
    together = buckets.encode_many(np.concatenate(groups), sizes, encoding, bits)
    assert together == [buckets.encode(g, encoding, bits) for g in groups]
    assert buckets.encode_many(np.empty(0, np.uint64), np.zeros(0, np.int64), encoding, bits) == []


@pytest.mark.parametrize(("encoding", "bits"), [(buckets.FIXED, 32), (buckets.ELIAS_FANO, 16),
                                                (buckets.ELIAS_FANO, 24), (buckets.ELIAS_FANO, 48)])
def test_contains_many_agrees_with_contains(encoding: int, bits: int) -> None:
    rng = random.Random(bits + encoding)
    groups = [_prefixes(rng, size) for size in [0, 1, 2, 3, 150, 0, 17, 600, 1, 40]]
    blobs = [buckets.encode(g, encoding, bits) for g in groups]
    outputs = []
    for group in groups:  # a present output (when the bucket has one), and an absent one
        present = int(group[len(group) // 2]) if len(group) else rng.getrandbits(64)
        outputs.append(present.to_bytes(8, "big") + rng.randbytes(56))
    outputs += [rng.randbytes(64) for _ in groups]
    found = buckets.contains_many(blobs + blobs, encoding, bits, outputs)
    assert found == [buckets.contains(b, encoding, bits, o) for b, o in zip(blobs + blobs, outputs, strict=True)]
    assert found[:10] == [len(g) > 0 for g in groups]
    with pytest.raises(ValueError, match="one bucket answer per output"):
        buckets.contains_many(blobs, encoding, bits, outputs)


def test_contains_many_refuses_malformed_answers() -> None:
    good = buckets.encode(_prefixes(random.Random(9), 5), buckets.ELIAS_FANO, 24)
    for bad, message in [(good[:1], "count"), (b"\x00\x05", "low bits"), (good[:-1] + b"\x00", "bitmap")]:
        with pytest.raises(buckets.BucketError, match=message):
            buckets.contains_many([good, bad], buckets.ELIAS_FANO, 24, [bytes(64), bytes(64)])
