"""Hamming-distance search over PDQ hashes: the scan and the multi-index agree with brute force."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest

from federation.algorithms import PDQ, SHA1
from node.hamming_index import SCAN_BELOW, MultiIndexHammingIndex, ScanHammingIndex, build_hamming_index

KINDS = [ScanHammingIndex, MultiIndexHammingIndex]


def _random(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, 32), dtype=np.uint8)


def _flip(digest: np.ndarray, distance: int, rng: np.random.Generator) -> np.ndarray:
    """digest with exactly ``distance`` of its 256 bits flipped."""
    bits = np.unpackbits(digest)
    bits[rng.choice(256, distance, replace=False)] ^= 1
    return np.packbits(bits)


def _as_bytes(rows: np.ndarray) -> list[bytes]:
    return [row.tobytes() for row in rows]


def _brute_force(stored: np.ndarray, ids: np.ndarray, queries: np.ndarray,
                 limits: list[int]) -> list[list[tuple[int, int]]]:
    distances = np.bitwise_count(queries[:, None, :] ^ stored[None, :, :]).sum(axis=2, dtype=np.int64)
    return [sorted((int(d), int(i)) for d, i in zip(row[row <= limit], ids[row <= limit], strict=True))
            for row, limit in zip(distances, limits, strict=True)]


def _pairs(results) -> list[list[tuple[int, int]]]:
    return [[(c.distance, c.record_id) for c in candidates] for candidates in results]


@pytest.fixture(scope="module")
def corpus() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    stored = _random(rng, 3000)
    return stored, rng.permutation(len(stored)).astype(np.int64) * 5 + 11


@pytest.mark.parametrize("kind", KINDS)
def test_planted_near_duplicates_are_found_at_their_exact_distance(kind, corpus) -> None:
    stored, ids = corpus
    rng = np.random.default_rng(1)
    index = kind(PDQ, ids.tolist(), _as_bytes(stored))
    planted = [(row, distance) for distance in (0, 1, 15, 31) for row in rng.choice(len(stored), 5)]
    queries = np.array([_flip(stored[row], distance, rng) for row, distance in planted])
    results = index.search(_as_bytes(queries), [31] * len(queries))
    for (row, distance), candidates in zip(planted, results, strict=True):
        assert [(c.record_id, c.distance) for c in candidates] == [(int(ids[row]), distance)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("radius", [0, 1, 2])
def test_worst_cases_of_the_pigeonhole(kind, radius, corpus) -> None:
    # d = 16 * radius + 15, the most a radius serves: substring t differs by
    # radius bits and each other one by radius + 1, so only table t finds the
    # hash, through one flip mask. Every table, every mask of that weight.
    stored, ids = corpus
    rng = np.random.default_rng(10 + radius)
    rows, queries = [], []
    for t in range(16):
        for chosen in itertools.combinations(range(16), radius):
            flips = [16 * t + b for b in chosen]
            for u in set(range(16)) - {t}:
                flips += [16 * u + b for b in rng.choice(16, radius + 1, replace=False)]
            bits = np.unpackbits(stored[row := int(rng.integers(len(stored)))])
            bits[flips] ^= 1
            rows.append(row)
            queries.append(np.packbits(bits))
    distance = 16 * radius + 15
    found = kind(PDQ, ids, stored).search(np.array(queries), [distance] * len(queries))
    assert _pairs(found) == [[(distance, int(ids[row]))] for row in rows]


@pytest.mark.parametrize("kind", KINDS)
def test_a_hash_beyond_the_limit_is_not_returned(kind, corpus) -> None:
    stored, ids = corpus
    rng = np.random.default_rng(2)
    index = kind(PDQ, ids, stored)
    queries = np.array([_flip(stored[9], distance, rng) for distance in (32, 33, 40, 64)])
    assert index.search(queries, [31] * 4) == [[], [], [], []]
    found = index.search(queries, [64] * 4)
    assert [[(c.record_id, c.distance) for c in f] for f in found] == [
        [(int(ids[9]), d)] for d in (32, 33, 40, 64)]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("limit", [0, 8, 31, 40])
def test_matches_brute_force(kind, limit, corpus) -> None:
    stored, ids = corpus
    rng = np.random.default_rng(limit)
    # 40 within the limit, 20 just beyond it.
    distances = np.concatenate([rng.integers(0, limit + 1, 40), rng.integers(limit + 1, limit + 9, 20)])
    near = [_flip(stored[row], int(d), rng) for row, d in zip(rng.choice(len(stored), 60), distances, strict=True)]
    queries = np.concatenate([np.array(near), _random(rng, 20)])
    index = kind(PDQ, ids, stored)
    expected = _brute_force(stored, ids, queries, [limit] * len(queries))
    assert _pairs(index.search(_as_bytes(queries), [limit] * len(queries))) == expected
    assert sum(map(len, expected)) >= 40, "the planted hashes make the comparison meaningful"


@pytest.mark.parametrize("kind", KINDS)
def test_per_query_limits_in_one_batch(kind, corpus) -> None:
    # Mixed limits: none (-1), exact, multi-index radii 0..2, and the scan beyond (>= 48).
    stored, ids = corpus
    rng = np.random.default_rng(3)
    limits = [-1, 0, 5, 16, 31, 32, 47, 48, 60, 70] * 4
    queries = np.array([_flip(stored[rng.integers(len(stored))], int(rng.integers(0, 72)), rng)
                        for _ in limits])
    index = kind(PDQ, ids, stored)
    assert _pairs(index.search(queries, limits)) == _brute_force(stored, ids, queries, limits)


@pytest.mark.parametrize("kind", KINDS)
def test_duplicate_hashes_with_different_ids_are_all_returned(kind) -> None:
    # 100 copies: more hits than a query's (or a table's) first-pass slots.
    rng = np.random.default_rng(4)
    shared = _random(rng, 1)[0]
    stored = np.concatenate([_random(rng, 500), np.repeat(shared[None], 100, axis=0)])
    ids = list(range(1000, 1000 + len(stored)))
    index = kind(PDQ, ids, _as_bytes(stored))
    [twin_hits, near_hits] = index.search([shared.tobytes(), _flip(shared, 3, rng).tobytes()], [31, 31])
    assert [(c.record_id, c.distance) for c in twin_hits] == [(i, 0) for i in range(1500, 1600)]
    assert [(c.record_id, c.distance) for c in near_hits] == [(i, 3) for i in range(1500, 1600)]


@pytest.mark.parametrize("kind", KINDS)
def test_empty_index_and_empty_batch(kind) -> None:
    index = kind(PDQ, [], [])
    assert len(index) == 0
    assert index.search([bytes(32), bytes(range(32))], [31, 64]) == [[], []]
    assert kind(PDQ, [1], [bytes(32)]).search([], []) == []


def test_ids_beyond_32_bits_and_wrong_sizes() -> None:
    rng = np.random.default_rng(5)
    stored = _random(rng, 50)
    ids = [2**40 + 3 * i for i in range(50)]
    index = MultiIndexHammingIndex(PDQ, ids, _as_bytes(stored))
    assert [c.record_id for c in index.search([stored[7].tobytes()], [0])[0]] == [2**40 + 21]
    with pytest.raises(ValueError):
        MultiIndexHammingIndex(SHA1, [1], [bytes(20)])
    with pytest.raises(ValueError):
        index.search([bytes(31)], [31])
    with pytest.raises(ValueError):
        index.search([bytes(32)], [31, 31])


def test_factory_scans_small_sets_and_sizes_the_multi_index() -> None:
    rng = np.random.default_rng(6)
    small = build_hamming_index(PDQ, list(range(100)), _as_bytes(_random(rng, 100)))
    assert type(small) is ScanHammingIndex
    count = SCAN_BELOW
    large = build_hamming_index(PDQ, np.arange(count), _random(rng, count))
    assert type(large) is MultiIndexHammingIndex
    # Per hash: 32 (hash) + 15 * 4 (positions) + 4 (uint32 id); plus 16 x 65,537 offsets.
    assert large.nbytes == count * 96 + 16 * 65537 * 4


def test_concurrent_builds_and_searches() -> None:
    # numba's workqueue layer aborts the process on concurrent parallel launches; the index serialises them.
    rng = np.random.default_rng(8)
    stored = _random(rng, 2000)
    index = MultiIndexHammingIndex(PDQ, np.arange(2000), stored)
    failures: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            for _ in range(5):
                MultiIndexHammingIndex(PDQ, np.arange(300), _random(np.random.default_rng(seed), 300))
                found = index.search(stored[:50], [31] * 50)
                assert [c[0].record_id for c in found] == list(range(50))
        except BaseException as error:  # noqa: BLE001 - reported below
            failures.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
