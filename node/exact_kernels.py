"""The compiled (numba) kernel of exact search: where sorted query prefixes sit in a
segment's sorted ``prefix`` array (``node.index.find_sorted``).

The search is bound by memory, not by comparisons: a segment's 2 M prefixes are
16 MB, beyond the caches, and ``numpy.searchsorted`` bisects all of them for
every query, its last several steps each a miss (about 2.6 ms for 10,000
queries in 2 M keys). Here each query first finds its block of 16 keys in the
segment's sample (``node.index.sample_of``: every 16th prefix, 1 MB, cached),
starting where the query before ended, since the queries are sorted; then the
blocks of eight queries are searched in lockstep, four steps each, so that
their reads from memory overlap instead of waiting for one another. About
0.8 ms for 10,000 queries in 2 M keys, measured on random keys. Apart from the
index so that only a process that searches imports numba; cached like
``node.hamming_kernels`` (``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_LANES = 8  # queries whose blocks are searched together


@njit(cache=True, nogil=True)
def sorted_left(haystack, sample, step, needles, out):  # pragma: no cover - compiled
    """``out[i] = numpy.searchsorted(haystack, needles[i])`` (side "left") for ascending
    ``needles`` in ascending ``haystack``; ``sample`` is ``haystack[::step]``, ``step`` a
    power of two."""
    n = len(haystack)
    m = len(sample)
    low_of = np.empty(_LANES, np.int64)
    start = 0
    for base in range(0, len(needles), _LANES):
        lanes = min(_LANES, len(needles) - base)
        for k in range(lanes):
            # The first sample entry >= the needle: galloping from the previous needle's, then bisecting.
            x = needles[base + k]
            low = start
            high = low
            stride = 1
            while high < m and sample[high] < x:
                low = high + 1
                high = low + stride
                stride <<= 1
            if high > m:
                high = m
            while low < high:
                middle = (low + high) >> 1
                if sample[middle] < x:
                    low = middle + 1
                else:
                    high = middle
            start = low
            # haystack[(low - 1) * step] < x <= haystack[low * step]: the answer is one of the
            # step - 1 keys between them, or the latter.
            low_of[k] = 0 if low == 0 else (low - 1) * step + 1
        size = step - 1
        while size > 0:  # the answer is in [low, low + size], size 2^j - 1, for every lane alike
            half = size >> 1
            for k in range(lanes):
                at = low_of[k] + half
                if at < n and haystack[at] < needles[base + k]:
                    low_of[k] = at + 1
            size >>= 1
        for k in range(lanes):
            out[base + k] = low_of[k]


def search(haystack: np.ndarray, sample: np.ndarray, step: int, needles: np.ndarray) -> np.ndarray:
    """``numpy.searchsorted(haystack, needles)`` for ascending uint64 ``needles``;
    ``sample`` is ``haystack[::step]`` (``node.index.sample_of``)."""
    if step < 1 or step & (step - 1):
        raise ValueError(f"a sample's step is a power of two, not {step}")
    out = np.empty(len(needles), dtype=np.int64)
    # Contiguous (a no-op for the arrays a search has): the layouts ``warm`` compiled for.
    sorted_left(np.ascontiguousarray(haystack), np.ascontiguousarray(sample), step, np.ascontiguousarray(needles),
                out)
    return out


def warm() -> None:
    """Compiles (or loads) the kernel for the arrays a search gives it: a mapped segment's
    prefixes (read-only, which numba types apart) or an index built in memory."""
    needles = np.zeros(1, dtype=np.uint64)
    mapped = np.zeros(1, dtype=np.uint64)
    mapped.flags.writeable = False
    for haystack in (mapped, needles):
        search(haystack, needles.copy(), 1, needles)
