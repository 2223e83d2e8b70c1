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
    size = len(data)
    found = [0] * (count + 1)
    at = 0
    known: dict[int, int] = {}  # length by count: a batch's answers have few distinct counts
    for number in range(count):
        found[number] = at
        if at + 2 > size:
            raise BucketError(f"bucket answer {number} is cut short (no room for its 2-byte count)")
        entries = (data[at] << 8) | data[at + 1]
        length = known.get(entries)
        if length is None:
            length = known[entries] = answer_length(entries, encoding, bits)
        at += length
    found[count] = at
    offsets = np.array(found, dtype=np.int64)
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
    concatenated answers in ``blob`` (a candidate hit). Vectorised over the whole batch.
    ``BucketError`` if the answers are malformed."""
    if len(which) != len(outputs):
        raise ValueError("one bucket per output")
    offsets = split(blob, count, encoding, bits)
    shift = np.uint64(64 - bits)
    wanted = np.frombuffer(b"".join(o[:8] for o in outputs), dtype=">u8").astype(np.uint64) >> shift
    which = which.astype(np.int64)
    if encoding == ELIAS_FANO:
        return _members_elias_fano(blob, offsets, bits, which, wanted)
    values, owner = _decode_all(blob, offsets, encoding, bits)
    found = np.zeros(len(outputs), dtype=bool)
    if not len(values) or not len(outputs):
        return found
    # The entries are grouped by answer in order and ascending within each (checked by _decode_all):
    # a binary search within each item's answer (a few rounds, all items at once).
    left = np.searchsorted(owner, which, side="left")
    right = np.searchsorted(owner, which, side="right")
    low, high = left.copy(), right.copy()
    while True:
        active = low < high
        if not active.any():
            break
        middle = (low + high) // 2
        less = active & (values[np.minimum(middle, len(values) - 1)] < wanted)
        low = np.where(less, middle + 1, low)
        high = np.where(active & ~less, middle, high)
    inside = low < right
    found[inside] = values[low[inside]] == wanted[inside]
    return found


_POPCOUNT = np.array([bin(byte).count("1") for byte in range(256)], dtype=np.int64)
# _SELECT0[byte, j]: the place (0 = most significant bit) of the j-th zero bit of a byte, -1 if none.
_SELECT0 = np.array([[([p for p in range(8) if not byte >> (7 - p) & 1] + [-1] * 8)[j] for j in range(8)]
                     for byte in range(256)], dtype=np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The indices ``starts[i] .. starts[i] + lengths[i] - 1`` of every range, concatenated."""
    total = int(lengths.sum())
    return np.arange(total) - np.repeat(np.cumsum(lengths) - lengths - starts, lengths)


def _members_elias_fano(blob: bytes, offsets: np.ndarray, bits: int, which: np.ndarray,
                        wanted: np.ndarray) -> np.ndarray:
    """``members`` for Elias-Fano answers without decoding them: per item, the entries whose high
    part is the item's lie between the bitmap's zeros number ``h - 1`` and ``h`` (an entry of high
    part ``h`` has ``h`` zeros before it), found from per-byte zero counts; only their low bits are
    read. ``BucketError`` for a bitmap that does not hold its count of set bits."""
    data = np.frombuffer(blob, dtype=np.uint8)
    starts = offsets[:-1]
    counts = (data[starts].astype(np.int64) << 8) | data[starts + 1] if len(starts) else np.zeros(0, np.int64)
    low = low_bits_many(counts, bits)
    map_start = starts + 2 + (counts * low + 7) // 8
    map_length = offsets[1:] - map_start
    maps = data[_ranges(map_start, map_length)]
    ones_before = np.concatenate([[0], np.cumsum(_POPCOUNT[maps])])
    map_first = np.cumsum(map_length) - map_length  # each bitmap's first byte among the bitmaps
    if ((ones_before[map_first + map_length] - ones_before[map_first]) != counts).any():
        raise BucketError("an Elias-Fano bucket's bitmap does not hold its count of entries")
    zeros_before = np.arange(len(maps) + 1) * 8 - ones_before

    def select0(answer: np.ndarray, number: np.ndarray) -> np.ndarray:
        """The place in its bitmap of zero ``number`` of each answer's bitmap (it has enough zeros)."""
        wanted_zero = zeros_before[map_first[answer]] + number
        byte = np.searchsorted(zeros_before, wanted_zero, side="right") - 1
        return byte * 8 + _SELECT0[maps[byte], wanted_zero - zeros_before[byte]] - map_first[answer] * 8

    found = np.zeros(len(which), dtype=bool)
    asked = np.flatnonzero(counts[which] > 0)  # an empty answer holds nothing
    answer = which[asked]
    width = low[answer]
    high = (wanted[asked] >> width.astype(np.uint64)).astype(np.int64)
    end = select0(answer, high) - high
    start = np.where(high > 0, select0(answer, np.maximum(high - 1, 0)) - (high - 1), 0)
    matches = np.maximum(end - start, 0)
    item = np.repeat(np.arange(len(asked)), matches)
    rank = _ranges(start, matches)
    entry_width = width[item]
    position = (starts[answer[item]] + 2) * 8 + rank * entry_width
    word = _words(data, position >> 3)
    lows = (word << (position & 7).astype(np.uint64)) >> (np.uint64(64) - entry_width.astype(np.uint64))
    lows = np.where(entry_width > 0, lows, np.uint64(0))  # a shift by 64 is not 0 in numpy
    masks = (np.uint64(1) << entry_width.astype(np.uint64)) - np.uint64(1)
    found[asked[item[lows == (wanted[asked[item]] & masks)]]] = True
    return found
