"""The compiled (numba) kernels of private exact matching: a request's bucket answers.

A PrivateMatch answer carries ~150 fingerprints per distinct bucket at 10 M
stored and 16-bit buckets: reading and encoding them element by element in
numpy costs more than the scalar multiplication of the item. Here each
bucket's fingerprints are copied from a segment's bucket-ordered slice
(node.private_view.BucketTable), sorted and written straight into the answer
bytes (federation.buckets defines the format; its ``encode`` is the reference
these kernels are tested against). Compiled on first use and cached like
node.hamming_kernels (``NUMBA_CACHE_DIR``).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _hidden(hidden, row):
    low, high = 0, len(hidden)
    while low < high:
        middle = (low + high) >> 1
        if hidden[middle] < row:
            low = middle + 1
        else:
            high = middle
    return low < len(hidden) and hidden[low] == row


@njit(cache=True, nogil=True)
def collect(prefixes, lo, hi, positions, ids, hidden, out, cursor):  # pragma: no cover - compiled
    """Appends entries ``lo[u]:hi[u]`` of one segment's bucket-ordered ``prefixes`` to bucket u's
    region of ``out`` at ``cursor[u]`` (advanced), leaving out rows whose id is in ``hidden``
    (sorted; the entry's row is ``ids[positions[k]]``)."""
    check = len(hidden) > 0
    for u in range(len(lo)):
        at = cursor[u]
        for k in range(lo[u], hi[u]):
            if check and _hidden(hidden, np.uint32(ids[positions[k]])):
                continue
            out[at] = prefixes[k]
            at += 1
        cursor[u] = at


@njit(cache=True, nogil=True)
def encode(values, base, counts, offsets, encoding, bits, low, answer):  # pragma: no cover - compiled
    """Writes bucket u's answer at ``answer[offsets[u]:]`` from ``values[base[u]:base[u] + counts[u]]``
    (64-bit output prefixes, sorted here in place): the count, then the fixed-width
    fingerprints (``encoding`` 0) or the Elias-Fano low bits and bitmap with ``low[u]`` low bits
    (1). ``answer`` starts zeroed."""
    shift = np.uint64(64 - bits)
    for u in range(len(base)):
        n = counts[u]
        at = offsets[u]
        answer[at] = np.uint8(n >> 8)
        answer[at + 1] = np.uint8(n & 0xFF)
        if n == 0:
            continue
        entries = values[base[u]:base[u] + n]
        entries.sort()
        at += 2
        if encoding == 0:
            width = bits // 8
            for i in range(n):
                value = entries[i] >> shift
                for j in range(width):
                    answer[at + j] = np.uint8((value >> np.uint64(8 * (width - 1 - j))) & np.uint64(0xFF))
                at += width
            continue
        width = low[u]
        mask = (np.uint64(1) << np.uint64(width)) - np.uint64(1)
        held = np.uint64(0)  # bits not yet written, in the low `pending` bits
        pending = 0
        for i in range(n):
            held = (held << np.uint64(width)) | ((entries[i] >> shift) & mask)
            pending += width
            while pending >= 8:
                pending -= 8
                answer[at] = np.uint8((held >> np.uint64(pending)) & np.uint64(0xFF))
                at += 1
        if pending:
            answer[at] = np.uint8((held << np.uint64(8 - pending)) & np.uint64(0xFF))
            at += 1
        for i in range(n):
            bit = np.int64((entries[i] >> shift) >> np.uint64(width)) + i
            answer[at + (bit >> 3)] |= np.uint8(0x80 >> (bit & 7))


def warm() -> None:
    """Compiles (or loads) both kernels with the types a request uses: a segment's row arrays
    are read-only memory maps, which numba types apart from writable arrays."""
    prefixes = np.zeros(1, dtype=np.uint64)
    index = np.zeros(1, dtype=np.int64)
    mapped = np.zeros(1, dtype=np.uint32)
    mapped.flags.writeable = False
    for hidden in (np.zeros(0, np.uint32), np.ones(1, np.uint32)):
        collect(prefixes, index, index + 1, mapped, mapped, hidden, np.zeros(1, np.uint64), index.copy())
    encode(np.zeros(1, np.uint64), index, index + 1, index, 1, 16, np.full(1, 15, np.int64), np.zeros(8, np.uint8))
