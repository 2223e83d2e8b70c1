"""The compiled (numba) kernels of ``node.hamming_index``: popcount distance, scan and probe.

Apart from the index so that only a process that searches imports numba
(~0.6 s) and loads or compiles these (their cache: ``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np
from numba import njit, prange, types
from numba.extending import intrinsic

from node.hamming_layout import BUCKETS, FLIPS, PROBES, SCAN_BLOCK, TABLES


def _ctpop(typingctx, x):
    """POPCNT (LLVM ctpop) of a uint64, as an int64."""
    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])
    return types.int64(types.uint64), codegen


# What compiled code calls: numba's stubs type an intrinsic as its typing
# function, (typingctx, x), returning Never; kernels call it with x alone.
_popcount = cast(Callable[[Any], int], intrinsic(_ctpop))


@njit(cache=True, nogil=True, inline="always")
def _distance(hashes, row, q0, q1, q2, q3):
    # The query's words as scalars, so that they stay in registers.
    return (_popcount(hashes[row, 0] ^ q0) + _popcount(hashes[row, 1] ^ q1)
            + _popcount(hashes[row, 2] ^ q2) + _popcount(hashes[row, 3] ^ q3))


@njit(cache=True, nogil=True, inline="always")
def _substring(words, t):
    # Bits 16 * (t % 4) .. of word t // 4 (column t of the row viewed as uint16).
    return np.int64((words[t >> 2] >> np.uint64((t & 3) * 16)) & np.uint64(0xFFFF))


@njit(cache=True, nogil=True, inline="always")
def _row(positions, t, k):
    # Rows are sorted by substring 0: table 0's bucket is a row range itself.
    return k if t == 0 else np.int64(positions[t - 1, k])


@njit(cache=True, nogil=True, inline="always")
def _count_hits(hashes, positions, t, lo, hi, q0, q1, q2, q3, limit):
    """How many rows of table t's entries lo:hi are within limit.

    Nearly every bucket (or scan block) holds no hit. This loop has no stores,
    so LLVM vectorises it (gathers, VPOPCNTQ) with many row loads in flight;
    a bucket with hits is then gone through again, from L1, to record them.
    """
    hits = 0
    if t == 0:
        for row in range(lo, hi):
            hits += _distance(hashes, row, q0, q1, q2, q3) <= limit
    else:
        for k in range(lo, hi):
            hits += _distance(hashes, np.int64(positions[t - 1, k]), q0, q1, q2, q3) <= limit
    return hits


@njit(cache=True, nogil=True, inline="always")
def _reached_before(stored, query, t, radius):
    """Whether a table before t also probed this hash (and so reported it)."""
    for u in range(t):  # noqa: SIM110 - numba compiles this loop, not any() over a generator
        if _popcount(np.uint64(_substring(stored, u) ^ _substring(query, u))) <= radius:
            return True
    return False


@njit(cache=True, nogil=True)
def _record(hashes, positions, t, lo, hi, queries, i, limit, found, slot, start,
            out_query, out_row, out_dist):
    """Record query i's hits among table t's entries lo:hi; the unit's new hit count.

    Writes hit number n at start + n while n < slot; counts past it.
    """
    q0, q1, q2, q3 = queries[i, 0], queries[i, 1], queries[i, 2], queries[i, 3]
    for k in range(lo, hi):
        row = _row(positions, t, k)
        distance = _distance(hashes, row, q0, q1, q2, q3)
        # A hash can sit in probed buckets of several tables: report it from
        # the first one only, which needs no visited set.
        if distance <= limit and not _reached_before(hashes[row], queries[i], t, limit // TABLES):
            if found < slot:
                out_query[start + found] = i
                out_row[start + found] = row
                out_dist[start + found] = distance
            found += 1
    return found


# Both search kernels run "units" in parallel: unit u writes up to slots[u]
# hits from starts[u] and sets counts[u] to how many it found, even beyond.


@njit(cache=True, nogil=True, parallel=True)
def scan(hashes, positions, queries, limits, units, starts, slots, out_query, out_row, out_dist, counts):
    """Unit u: query units[u] against every stored row (as table 0's row ranges)."""
    for u in prange(len(units)):
        i = units[u]
        q0, q1, q2, q3, limit = queries[i, 0], queries[i, 1], queries[i, 2], queries[i, 3], limits[i]
        found = 0
        for lo in range(0, len(hashes), SCAN_BLOCK):
            hi = min(lo + SCAN_BLOCK, len(hashes))
            if _count_hits(hashes, positions, 0, lo, hi, q0, q1, q2, q3, limit):
                found = _record(hashes, positions, 0, lo, hi, queries, i, limit, found,
                                slots[u], starts[u], out_query, out_row, out_dist)
        counts[u] = found


@njit(cache=True, nogil=True, parallel=True)
def probe(hashes, offsets, positions, queries, limits, units, starts, slots,
           out_query, out_row, out_dist, counts):
    """Unit u: table units[u] for every query (limits 0 .. 16 * (MAX_RADIUS + 1) - 1).

    Bucket by bucket rather than query by query: a bucket's rows are random
    accesses into hashes (what a search costs), and in a batch of thousands
    a bucket is probed by several queries; taken together, its rows come from
    memory once and from L1 for the others.
    """
    for u in prange(len(units)):
        t = units[u]
        # Counting sort of the batch's (bucket, query) probes of table t:
        # probers[first[b]:first[b + 1]] are the queries that probe bucket b.
        first = np.zeros(BUCKETS + 1, np.int64)
        for i in range(len(queries)):
            key = _substring(queries[i], t)
            for f in range(PROBES[limits[i] // TABLES]):
                first[(key ^ FLIPS[f]) + 1] += 1
        first = np.cumsum(first)
        fill = first.copy()
        probers = np.empty(first[BUCKETS], np.int64)
        for i in range(len(queries)):
            key = _substring(queries[i], t)
            for f in range(PROBES[limits[i] // TABLES]):
                bucket = key ^ FLIPS[f]
                probers[fill[bucket]] = i
                fill[bucket] += 1
        found = 0
        for bucket in range(BUCKETS):
            lo, hi = np.int64(offsets[t, bucket]), np.int64(offsets[t, bucket + 1])
            for p in range(first[bucket], first[bucket + 1]):
                i = probers[p]
                limit = limits[i]
                if _count_hits(hashes, positions, t, lo, hi,
                               queries[i, 0], queries[i, 1], queries[i, 2], queries[i, 3], limit):
                    found = _record(hashes, positions, t, lo, hi, queries, i, limit, found,
                                    slots[u], starts[u], out_query, out_row, out_dist)
        counts[u] = found
