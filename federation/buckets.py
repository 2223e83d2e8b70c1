"""Bucket answers of private exact matching (PROTOCOL.md 13.3): how a bucket's outputs
are written, how a gateway reads a PrivateMatch answer's concatenated buckets and
tests its own outputs against them.

A bucket's entries are *fingerprints*: the first ``bits`` bits (big-endian) of
each 64-byte OPRF output, sorted ascending. Every answer starts with ``u16be(n)``
(n = entries) and its length follows from ``n`` and ``bits`` alone, so the
answers of a request's distinct buckets travel as one byte string, one after the
other, without lengths. Two encodings:

- ``FIXED`` (0): ``u16be(n)``, then each fingerprint as ``bits / 8`` bytes;
- ``ELIAS_FANO`` (1): ``u16be(n)``; for ``n > 0`` the ``L`` low bits of every
  fingerprint packed most significant bit first and zero-padded to a byte, then
  the high-part bitmap of ``n + 2^(bits - L)`` bits (bit ``(x_i >> L) + i`` set for
  the i-th fingerprint) zero-padded to a byte, where ``L = floor(log2(2^bits / n))``
  (0 when ``2^bits <= n``): about ``bits - log2(n) + 2.5`` bits per entry.

A false candidate (an absent digest whose fingerprint is in the bucket) has
probability about ``n / 2^bits`` per item; the gateway's disclosure step weeds
it out (and so shows the node that item's output: see ``choose_bits``).
"""

from __future__ import annotations

import math

import numpy as np

FIXED = 0
ELIAS_FANO = 1
MAX_ENTRIES = 0xFFFF
BITS = {FIXED: (24, 64), ELIAS_FANO: (8, 48)}


class BucketError(ValueError):
    """A bucket answer that does not decode."""


def check_bits(encoding: int, bits: int) -> None:
    """``BucketError`` for an encoding or a fingerprint width an answer cannot have."""
    if encoding not in BITS:
        raise BucketError(f"unknown bucket encoding {encoding}")
    low, high = BITS[encoding]
    if not low <= bits <= high or (encoding == FIXED and bits % 8):
        raise BucketError(f"fingerprints of {bits} bits in bucket encoding {encoding}")


def choose_bits(mean_bucket_size: float, false_candidate_bits: int, low: int = 16, high: int = 48) -> int:
    """The fingerprint width that keeps a mean-size bucket's false-candidate chance per item,
    ``mean / 2^bits``, at most ``2^-false_candidate_bits`` (within ``low..high``). Fewer bits,
    smaller answers but more false candidates, each of which the gateway discloses: the node
    then sees one output of a digest it does not hold (it can test guesses against it)."""
    wanted = math.ceil(math.log2(max(mean_bucket_size, 1.0)) + false_candidate_bits)
    return max(low, min(high, wanted))


def prefix64(outputs: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each output ((n, >=8) uint8) as big-endian uint64."""
    return np.ascontiguousarray(outputs[:, :8]).view(">u8").ravel().astype(np.uint64)


def fingerprint(output: bytes, bits: int) -> int:
    """The first ``bits`` bits of an output."""
    return int.from_bytes(output[:8], "big") >> (64 - bits)


def low_bits(count: int, bits: int) -> int:
    if count == 0 or (1 << bits) <= count:
        return 0
    return ((1 << bits) // count).bit_length() - 1


def answer_length(count: int, encoding: int, bits: int) -> int:
    """Bytes of an answer of ``count`` fingerprints."""
    if encoding == FIXED:
        return 2 + count * (bits // 8)
    if count == 0:
        return 2
    low = low_bits(count, bits)
    return 2 + (count * low + 7) // 8 + (count + (1 << (bits - low)) + 7) // 8


def lengths(counts: np.ndarray, encoding: int, bits: int) -> np.ndarray:
    """``answer_length`` of many counts (int64)."""
    counts = counts.astype(np.int64)
    if encoding == FIXED:
        return 2 + counts * (bits // 8)
    low = low_bits_many(counts, bits)
    lengths = 2 + (counts * low + 7) // 8 + (counts + (np.int64(1) << (bits - low)) + 7) // 8
    return np.where(counts > 0, lengths, 2)


def low_bits_many(counts: np.ndarray, bits: int) -> np.ndarray:
    """``low_bits`` of every count (exact: the quotients are below 2^53, so frexp's exponent is
    their bit length). Zero for widths above Elias-Fano's (fixed answers have no low bits)."""
    counts = counts.astype(np.int64)
    if bits > BITS[ELIAS_FANO][1]:
        return np.zeros(len(counts), dtype=np.int64)
    quotients = np.where(counts > 0, (1 << bits) // np.maximum(counts, 1), 0)
    _, exponents = np.frexp(quotients.astype(np.float64))
    return np.where((counts > 0) & (quotients >= 2), exponents - 1, 0).astype(np.int64)


def encode(prefixes: np.ndarray, encoding: int, bits: int) -> bytes:
    """One bucket's answer from its entries' 64-bit prefixes (uint64, sorted ascending).

    The reference writer, plain and per bucket (tests, vectors); a node writes a
    request's answers with its compiled kernel (node.private_kernels), which must
    give the same bytes."""
    check_bits(encoding, bits)
    values = [int(v) >> (64 - bits) for v in prefixes.tolist()]
    count = len(values)
    if count > MAX_ENTRIES:
        raise BucketError(f"a bucket of {count} entries does not fit the encoding (at most {MAX_ENTRIES})")
    head = count.to_bytes(2, "big")
    if encoding == FIXED:
        return head + b"".join(v.to_bytes(bits // 8, "big") for v in values)
    if not count:
        return head
    low = low_bits(count, bits)
    low_field = 0
    for value in values:
        low_field = (low_field << low) | (value & ((1 << low) - 1))
    low_bytes = (count * low + 7) // 8
    low_field <<= low_bytes * 8 - count * low
    map_bits = count + (1 << (bits - low))
    map_bytes = (map_bits + 7) // 8
    bitmap = 0
    for rank, value in enumerate(values):
        bitmap |= 1 << (map_bytes * 8 - 1 - ((value >> low) + rank))
    return head + low_field.to_bytes(low_bytes, "big") + bitmap.to_bytes(map_bytes, "big")


def split(blob: bytes, count: int, encoding: int, bits: int) -> np.ndarray:
    """Where each of ``count`` concatenated answers starts, and the end (``count + 1`` offsets);
    ``BucketError`` unless the answers fill ``blob`` exactly."""
    check_bits(encoding, bits)
    data = memoryview(blob)
    offsets = np.empty(count + 1, dtype=np.int64)
    at = 0
    length = answer_length
    for number in range(count):
        offsets[number] = at
        if at + 2 > len(data):
            raise BucketError(f"bucket answer {number} is cut short (no room for its 2-byte count)")
        at += length((data[at] << 8) | data[at + 1], encoding, bits)
    offsets[count] = at
    if at != len(data):
        raise BucketError(f"the bucket answers take {at:,} bytes but the answer carries {len(data):,}")
    return offsets


def decode(blob: bytes, encoding: int, bits: int) -> np.ndarray:
    """The fingerprints of one bucket answer (uint64, ascending); ``BucketError`` if malformed."""
    values, _ = _decode_all(blob, split(blob, 1, encoding, bits), encoding, bits)
    return values


def _words(data: np.ndarray, byte_offsets: np.ndarray) -> np.ndarray:
    """The big-endian 64-bit word starting at each byte offset (``data`` padded with 8 zero bytes)."""
    padded = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    windows = np.lib.stride_tricks.sliding_window_view(padded, 8)[byte_offsets]
    return np.ascontiguousarray(windows).view(">u8").ravel().astype(np.uint64)


def _decode_all(blob: bytes, offsets: np.ndarray, encoding: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Every fingerprint of the answers at ``offsets`` (from ``split``), and the answer each is in:
    (values, owners), grouped by answer in order and ascending within each. Vectorised.
    ``BucketError`` for an answer whose entries are not ascending or whose bitmap is not its count's."""
    data = np.frombuffer(blob, dtype=np.uint8)
    starts = offsets[:-1]
    if not len(starts):
        return np.empty(0, dtype=np.uint64), np.empty(0, dtype=np.int64)
    counts = (data[starts].astype(np.int64) << 8) | data[starts + 1]
    owner = np.repeat(np.arange(len(starts)), counts)
    rank = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    if encoding == FIXED:
        width = bits // 8
        word = _words(data, starts[owner] + 2 + rank * width)
        values = word >> np.uint64(64 - bits)
    else:
        low = low_bits_many(counts, bits)
        entry_low = low[owner].astype(np.uint64)
        position = (starts[owner] + 2) * 8 + rank * low[owner]
        word = _words(data, position >> 3)
        lows = (word << (position & 7).astype(np.uint64)) >> (np.uint64(64) - entry_low)
        lows = np.where(entry_low > 0, lows, np.uint64(0))  # a shift by 64 is not 0 in numpy
        map_start = starts + 2 + (counts * low + 7) // 8  # each bitmap's first byte
        map_end = offsets[1:]
        inside = np.zeros(len(data) + 1, dtype=np.int64)
        np.add.at(inside, map_start, 1)
        np.add.at(inside, map_end, -1)
        in_map = np.cumsum(inside[:-1]) > 0
        ones = np.flatnonzero(np.unpackbits(data) & np.repeat(in_map, 8).astype(np.uint8))
        found = np.searchsorted(map_start * 8, ones, side="right") - 1
        if len(ones) != len(owner) or (found != owner).any():
            raise BucketError("an Elias-Fano bucket's bitmap does not hold its count of entries")
        highs = (ones - map_start[owner] * 8 - rank).astype(np.uint64)
        values = (highs << entry_low) | lows
    if len(values) > 1:
        same = owner[1:] == owner[:-1]
        if (values[1:][same] < values[:-1][same]).any():
            raise BucketError("a bucket's fingerprints are not in ascending order")
    return values, owner


def distinct(buckets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct buckets of a request in the order of their first item, and for each item
    the index of its bucket among them (an answer carries each distinct bucket once)."""
    values, first, inverse = np.unique(buckets, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return values[order], rank[inverse.ravel()]


def members(blob: bytes, which: np.ndarray, count: int, encoding: int, bits: int, outputs: list[bytes]) -> np.ndarray:
    """For each output, whether its fingerprint is in answer ``which[i]`` of the ``count``
    concatenated answers in ``blob`` (a candidate hit). Vectorised over the whole batch:
    every answer is decoded once, and each output looked up by binary search.
    ``BucketError`` if the answers are malformed."""
    if len(which) != len(outputs):
        raise ValueError("one bucket per output")
    offsets = split(blob, count, encoding, bits)
    values, owner = _decode_all(blob, offsets, encoding, bits)
    if not len(outputs):
        return np.zeros(0, dtype=bool)
    shift = np.uint64(64 - bits)
    wanted = np.frombuffer(b"".join(o[:8] for o in outputs), dtype=">u8").astype(np.uint64) >> shift
    # The entries are grouped by answer in order and ascending within each (checked by _decode_all).
    keys_owner, keys_value = owner, values
    which = which.astype(np.int64)
    left = np.searchsorted(keys_owner, which, side="left")
    right = np.searchsorted(keys_owner, which, side="right")
    found = np.zeros(len(outputs), dtype=bool)
    # Within each answer's range, binary search for the fingerprint (ranges are small: a few rounds).
    low, high = left.copy(), right.copy()
    while True:
        active = low < high
        if not active.any():
            break
        middle = (low + high) // 2
        probe = keys_value[np.minimum(middle, len(keys_value) - 1)] if len(keys_value) else np.zeros_like(wanted)
        less = active & (probe < wanted)
        low = np.where(less, middle + 1, low)
        high = np.where(active & ~less, middle, high)
    inside = low < right
    if len(keys_value):
        found[inside] = keys_value[low[inside]] == wanted[inside]
    return found
