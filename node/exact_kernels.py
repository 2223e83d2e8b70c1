"""The compiled (numba) kernel of exact search: where sorted query prefixes sit in a
segment's sorted ``prefix`` array (``node.index.find_sorted``).

``numpy.searchsorted`` bisects the whole array for every query: at 2 M stored
keys (16 MB of prefixes) that is 21 steps, the last several missing the cache,
about 2.6 ms for 10,000 queries. The queries are sorted, so each search here
starts where the one before ended and gallops (1, 2, 4, ... entries) before it
bisects: with 10,000 queries in 2 M keys, a gap of ~200 entries, ~16 steps
mostly within cache lines already read, about 0.9 ms. Apart from the index so
that only a process that searches imports numba; cached like
``node.hamming_kernels`` (``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def sorted_left(haystack, needles, out):  # pragma: no cover - compiled
    """``out[i] = numpy.searchsorted(haystack, needles[i])`` (side "left") for ascending
    ``needles`` in ascending ``haystack``."""
    n = len(haystack)
    start = 0
    for i in range(len(needles)):
        x = needles[i]
        low = start  # every haystack[:low] < x (it was < the previous, smaller or equal, needle)
        high = low
        step = 1
        while high < n and haystack[high] < x:
            low = high + 1
            high = low + step
            step <<= 1
        if high > n:
            high = n
        while low < high:  # the answer is in [low, high]: haystack[high] >= x, or high == n
            middle = (low + high) >> 1
            if haystack[middle] < x:
                low = middle + 1
            else:
                high = middle
        out[i] = low
        start = low


def search(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """``numpy.searchsorted(haystack, needles)`` for ascending uint64 ``needles``."""
    out = np.empty(len(needles), dtype=np.int64)
    # Contiguous (a no-op for the arrays a search has): the layouts ``warm`` compiled for.
    sorted_left(np.ascontiguousarray(haystack), np.ascontiguousarray(needles), out)
    return out


def warm() -> None:
    """Compiles (or loads) the kernel for the arrays a search gives it: a mapped segment's
    prefixes (read-only, which numba types apart) or an index built in memory."""
    needles = np.zeros(1, dtype=np.uint64)
    mapped = np.zeros(1, dtype=np.uint64)
    mapped.flags.writeable = False
    for haystack in (mapped, needles):
        search(haystack, needles)
