"""Exact lookups search each segment's uint64 key prefixes and confirm on the whole key: they
answer exactly as a search of the whole keys does, for keys sharing their first 8 bytes,
zero bytes, short and long digests; a segment written before the prefix file still answers
the same; tombstones and ``since`` restrictions apply to the array path as to the other."""

from __future__ import annotations

import numpy as np
import pytest

from federation import algorithms
from federation.query import PackedGroup, QueryItem
from node import matcher, segment_index
from node.index import SAMPLE_STEP, Candidate, ExactIndex, prefix_of, sample_of
from node.segment_set import LiveSegment, MergedIndex, record_id


def _keys(width: int, count: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (count, width), dtype=np.uint8)
    raw[1::5, :8] = raw[0, :8]  # a fifth of the keys share one prefix, tails differ
    raw[2::7, :8] = 0  # leading zero bytes
    raw[3::11, -4:] = 0  # trailing zero bytes
    return np.unique(raw.view(f"S{width}").ravel())  # a segment's keys: sorted, unique


def _expected(stored: np.ndarray, ids: np.ndarray, queries: np.ndarray) -> dict[int, int]:
    where = {key: int(i) for key, i in zip(stored.tolist(), ids.tolist(), strict=True)}
    return {p: where[q] for p, q in enumerate(queries.tolist()) if q in where}


@pytest.mark.parametrize("algorithm", [algorithms.MD5, algorithms.SHA1, algorithms.SHA256])
def test_prefix_search_answers_as_a_search_of_the_whole_keys(algorithm) -> None:
    width = algorithm.digest_size
    stored = _keys(width, 5_000, width)
    ids = np.arange(10, 10 + len(stored), dtype=np.uint32)[::-1].copy()
    asked = _keys(width, 3_000, width + 1)  # shares the prefix run, and random others
    queries = np.concatenate([stored[::3], asked, stored[:1]])
    np.random.default_rng(0).shuffle(queries)
    index = ExactIndex.from_sorted(stored, ids, prefix_of(stored))
    expected = _expected(stored, ids, queries)
    assert len(expected) > 1_000 and sum(q[:8] == stored[0][:8] for q in queries.tolist()) > 100
    assert index.hits(queries) == {p: [Candidate(i)] for p, i in expected.items()}
    assert list(index.hits(queries)) == sorted(expected)  # in batch order
    found = segment_index.find(stored, ids, queries, prefix_of(stored))
    assert np.array_equal(found, segment_index.find(stored, ids, queries))  # the whole-key search
    assert {p: int(i) for p, i in enumerate(found.tolist()) if i >= 0} == expected


def test_prefix_of_orders_like_the_keys_and_pads_short_ones() -> None:
    keys = np.array([b"\x00\x01", b"\x00\x01\x00", b"\x01", b"\xff" * 9], dtype="S9")
    assert prefix_of(keys).tolist() == [1 << 48, 1 << 48, 1 << 56, (1 << 64) - 1]
    short = np.array([b"\x02\x01", b"\x02\x02"], dtype="S2")
    assert prefix_of(short).tolist() == [0x0201 << 48, 0x0202 << 48]


def test_a_segment_without_its_prefix_file_answers_the_same() -> None:
    """Segments written before the prefix file existed: mapped without it, prefixes computed."""
    stored = _keys(32, 2_000, 5)
    ids = np.arange(1, len(stored) + 1, dtype=np.uint32)
    arrays = segment_index.build_arrays(algorithms.SHA256, ids, [], stored)
    assert np.array_equal(arrays["prefix"], prefix_of(stored)) and arrays["prefix"].dtype == np.uint64
    legacy = {name: array for name, array in arrays.items() if name != "prefix"}
    queries = np.concatenate([stored[::2], _keys(32, 500, 6)])
    new, old = (segment_index.load_index(algorithms.SHA256, a) for a in (arrays, legacy))
    assert new.hits(queries, ()) == old.hits(queries, ()) == {
        p: [Candidate(i)] for p, i in _expected(stored, ids, queries).items()}


def test_merged_exact_search_drops_tombstoned_rows_and_rows_born_before_since() -> None:
    first, second = _keys(32, 1_000, 7), _keys(32, 1_000, 8)
    ids = np.arange(1, 1_001, dtype=np.uint32)
    a = ExactIndex.from_sorted(first, ids[:len(first)])
    b = ExactIndex.from_sorted(second, ids[:len(second)])
    hidden = frozenset({5, 6})
    # Segment 2 was merged: its rows 1-400 were first published at generation 3, the rest at 9.
    mixed = LiveSegment(segment=None, deleted={}, born=((1, 3), (401, 9)))  # type: ignore[arg-type]
    queries = np.concatenate([first[:10], second[:800], first[:3]])
    merged = MergedIndex([(1, a, hidden, None), (2, b, frozenset(), mixed)], after=5)
    found = merged.hits(queries, ())
    want: dict[int, list[Candidate]] = {}
    for p, q in enumerate(queries.tolist()):
        if q in first.tolist():
            row = first.tolist().index(q) + 1
            if row not in hidden:
                want.setdefault(p, []).append(Candidate(record_id(1, row)))
        if q in second.tolist():
            row = second.tolist().index(q) + 1
            if row > 400:
                want.setdefault(p, []).append(Candidate(record_id(2, row)))
    assert found == want and len(want) > 400
    every = MergedIndex([(1, a, hidden, None), (2, b, frozenset(), None)])
    assert len(every.hits(queries, ())) == len(queries) - 2  # only the hidden rows 5 and 6 miss


def test_an_exact_item_live_in_more_segments_than_the_cap_is_ranked_and_truncated() -> None:
    """The array path keeps the per-item cap: an item found in more segments than
    ``max_hits_per_item`` is answered with the cap's lowest record ids and marked truncated."""
    shared = _keys(32, 50, 9)
    parts = [(segment, ExactIndex.from_sorted(shared, np.arange(1, len(shared) + 1, dtype=np.uint32)),
              frozenset(), None) for segment in (3, 1, 2)]
    alone = _keys(32, 20, 10)
    parts.append((4, ExactIndex.from_sorted(alone, np.arange(1, len(alone) + 1, dtype=np.uint32)), frozenset(), None))
    limits = matcher.Limits(max_hits_per_item=2)
    asked = [QueryItem("sha256", alone[5:6].tobytes()), QueryItem("sha256", shared[7:8].tobytes())]
    batch = matcher.validate([], limits, [PackedGroup("sha256", b"".join(i.digest for i in asked), 32)])
    found, exact = matcher.search(batch, {"sha256": MergedIndex(parts)}, limits)
    assert exact.positions.tolist() == [0] and exact.record_ids.tolist() == [record_id(4, 6)]
    assert found == {1: matcher.ItemMatches([Candidate(record_id(1, 8)), Candidate(record_id(2, 8))], True)}
    assert matcher.hits(batch, {"sha256": MergedIndex(parts)}, limits) == {0: matcher.ItemMatches(
        [Candidate(record_id(4, 6))]), **found}


@pytest.mark.parametrize("stored, asked", [(0, 50), (1, 50), (7, 7), (16, 40), (2_000, 10), (2_000, 5_000),
                                           (300, 30_000), (100_003, 10_000)])
def test_the_sampled_search_places_sorted_queries_as_searchsorted_does(stored: int, asked: int) -> None:
    """``exact_kernels.search`` (a sample of every 16th key, then blocks searched eight at a
    time) against ``numpy.searchsorted``: repeated prefixes in the keys and in the queries,
    queries below, between and above every key, on and next to the sample's keys, sparse and
    dense batches, key counts that are and are not a multiple of 16, a read-only (mapped)
    array of keys, samples of other steps."""
    from node import exact_kernels  # noqa: PLC0415 - imports numba

    rng = np.random.default_rng(stored * 7 + asked)
    prefix = np.sort(rng.integers(0, 1 << 40, stored, dtype=np.uint64) * np.uint64(1 << 20))
    prefix[1::9] = prefix[::9][:len(prefix[1::9])]  # runs of an equal prefix
    prefix.sort()
    sampled = prefix[::16]
    queries = np.concatenate([rng.choice(prefix, asked // 3) if stored else np.zeros(0, np.uint64),
                              sampled, sampled + np.uint64(1), sampled - np.uint64(1),
                              rng.integers(0, 1 << 61, asked - asked // 3, dtype=np.uint64),
                              np.array([0, np.iinfo(np.uint64).max], dtype=np.uint64)])
    queries.sort()
    mapped = prefix.copy()
    mapped.flags.writeable = False
    for keys in (prefix, mapped):
        expected = np.searchsorted(keys, queries)
        assert np.array_equal(exact_kernels.search(keys, sample_of(keys), SAMPLE_STEP, queries), expected)
        for step in (1, 2, 64):
            assert np.array_equal(exact_kernels.search(keys, keys[::step], step, queries), expected)
    with pytest.raises(ValueError, match="power of two"):
        exact_kernels.search(prefix, prefix[::3], 3, queries)
