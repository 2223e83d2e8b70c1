"""Bucket answers of private exact matching (PROTOCOL.md 13.3): how a node writes the
outputs of one bucket, and how a gateway tests its own output against them.

A bucket's entries are *fingerprints*: the first ``bits`` bits (big-endian) of
each 64-byte OPRF output, sorted ascending. Two encodings:

- ``FIXED`` (0): each fingerprint as ``bits / 8`` bytes, concatenated (the
  outputs cut to ``output_bytes``);
- ``ELIAS_FANO`` (1): the sorted fingerprints Elias-Fano coded, about
  ``bits - log2(n) + 2`` bits each instead of ``bits`` (n = entries in the
  bucket): ``u16be(n)``, then the ``L`` low bits of every fingerprint packed
  most significant bit first and padded to a byte, then the high-part bitmap
  (bit ``(f >> L) + i`` set for the i-th fingerprint, up to its last set bit)
  padded to a byte, where ``L = floor(log2(2^bits / n))`` (0 when n = 0 or
  ``2^bits <= n``).

A false candidate (an absent digest whose fingerprint is in the bucket) has
probability about ``n / 2^bits`` per item; the gateway's disclosure step
weeds it out.
"""

from __future__ import annotations

import numpy as np

FIXED = 0
ELIAS_FANO = 1
MAX_ENTRIES = 0xFFFF


class BucketError(ValueError):
    """A bucket answer that does not decode."""


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


def encode(prefixes: np.ndarray, encoding: int, bits: int) -> bytes:
    """One bucket's answer from its entries' 64-bit prefixes (uint64, sorted ascending)."""
    values = prefixes >> np.uint64(64 - bits)
    if encoding == FIXED:
        width = bits // 8
        return np.ascontiguousarray(values.astype(">u8").view(np.uint8).reshape(-1, 8)[:, 8 - width:]).tobytes()
    count = len(values)
    if count > MAX_ENTRIES:
        raise BucketError(f"a bucket of {count} entries does not fit the encoding (at most {MAX_ENTRIES})")
    low = low_bits(count, bits)
    if low:
        shifts = np.arange(low - 1, -1, -1, dtype=np.uint64)
        lows = np.packbits(((values[:, None] >> shifts) & np.uint64(1)).astype(np.uint8).ravel()).tobytes()
    else:
        lows = b""
    if count:
        positions = (values >> np.uint64(low)) + np.arange(count, dtype=np.uint64)
        bitmap = np.zeros(int(positions[-1]) + 1, dtype=np.uint8)
        bitmap[positions.astype(np.int64)] = 1
        highs = np.packbits(bitmap).tobytes()
    else:
        highs = b""
    return count.to_bytes(2, "big") + lows + highs


def _low_bits_many(sizes: np.ndarray, bits: int) -> np.ndarray:
    """``low_bits`` of every bucket size (exact: the quotients are below 2^53, so frexp's
    exponent is their bit length)."""
    sizes = sizes.astype(np.int64)
    quotients = np.where(sizes > 0, (1 << bits) // np.maximum(sizes, 1), 0)
    _, exponents = np.frexp(quotients.astype(np.float64))
    return np.where((sizes > 0) & (quotients >= 2), exponents - 1, 0).astype(np.int64)


def _pack_low_bits(offsets: np.ndarray, widths: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    """``size`` bytes holding each value's ``widths`` low bits (most significant first) at bit
    ``offsets``; the fields do not overlap and are at most 48 bits wide. Written as big-endian
    64-bit words: a field falls into one word or spills into the next."""
    keep = widths > 0
    offsets, widths, values = offsets[keep], widths[keep].astype(np.uint64), values[keep]
    words = np.zeros(size // 8 + 2, dtype=np.uint64)
    word, bit = offsets >> 6, (offsets & 63).astype(np.uint64)
    end = bit + widths
    fits = end <= 64
    np.bitwise_or.at(words, word[fits], values[fits] << (np.uint64(64) - end[fits]))
    spill = ~fits
    np.bitwise_or.at(words, word[spill], values[spill] >> (end[spill] - np.uint64(64)))
    np.bitwise_or.at(words, word[spill] + 1, values[spill] << (np.uint64(128) - end[spill]))
    return words.astype(">u8").view(np.uint8)[:size]


def encode_many(prefixes: np.ndarray, sizes: np.ndarray, encoding: int, bits: int) -> list[bytes]:
    """``encode`` of consecutive buckets at once: ``prefixes`` holds each bucket's entries in
    turn (sorted within it), ``sizes`` how many each has. Vectorised over all buckets: every
    answer is written into one byte string, then cut (each is a whole number of bytes)."""
    sizes = sizes.astype(np.int64)
    ends = np.cumsum(sizes)
    starts = ends - sizes
    if encoding == FIXED:
        width = bits // 8
        blob = encode(prefixes, FIXED, bits)
        return [blob[a * width:b * width] for a, b in zip(starts.tolist(), ends.tolist(), strict=True)]
    if len(sizes) and int(sizes.max()) > MAX_ENTRIES:
        raise BucketError(f"a bucket of {int(sizes.max())} entries does not fit the encoding (at most {MAX_ENTRIES})")
    values = prefixes >> np.uint64(64 - bits)
    low = _low_bits_many(sizes, bits)
    owner = np.repeat(np.arange(len(sizes)), sizes)  # the bucket of each entry
    rank = np.arange(len(values)) - starts[owner]  # its place within the bucket
    entry_low = low[owner]
    highs = (values >> entry_low.astype(np.uint64)).astype(np.int64) + rank
    last = np.full(len(sizes), -1, dtype=np.int64)
    filled = sizes > 0
    last[filled] = highs[ends[filled] - 1]
    low_bytes = (sizes * low + 7) // 8
    lengths = 2 + low_bytes + (last + 8) // 8
    first_byte = np.cumsum(lengths) - lengths
    size = int(lengths.sum())
    masks = (np.uint64(1) << entry_low.astype(np.uint64)) - np.uint64(1)
    out = _pack_low_bits((first_byte[owner] + 2) * 8 + rank * entry_low, entry_low, values & masks, size)
    out[first_byte] = sizes >> 8  # the count, big-endian
    out[first_byte + 1] = sizes & 0xFF
    bitmap = np.zeros(size * 8, dtype=np.uint8)
    bitmap[(first_byte[owner] + 2 + low_bytes[owner]) * 8 + highs] = 1  # bit (x >> L) + i of each bitmap
    out |= np.packbits(bitmap)
    packed = out.tobytes()
    return [packed[a:a + n] for a, n in zip(first_byte.tolist(), lengths.tolist(), strict=True)]


def decode(blob: bytes, encoding: int, bits: int) -> np.ndarray:
    """The fingerprints of one bucket answer (uint64, ascending); ``BucketError`` if malformed."""
    if encoding == FIXED:
        width = bits // 8
        if len(blob) % width:
            raise BucketError(f"bucket of {len(blob)} bytes is not a whole number of {width}-byte outputs")
        padded = np.zeros((len(blob) // width, 8), dtype=np.uint8)
        padded[:, 8 - width:] = np.frombuffer(blob, dtype=np.uint8).reshape(-1, width)
        return padded.view(">u8").ravel().astype(np.uint64)
    if encoding != ELIAS_FANO:
        raise BucketError(f"unknown bucket encoding {encoding}")
    if len(blob) < 2:
        raise BucketError("Elias-Fano bucket shorter than its 2-byte count")
    count = int.from_bytes(blob[:2], "big")
    low = low_bits(count, bits)
    low_bytes = (count * low + 7) // 8
    if len(blob) < 2 + low_bytes:
        raise BucketError("Elias-Fano bucket shorter than its low bits")
    if low:
        packed = np.unpackbits(np.frombuffer(blob[2:2 + low_bytes], dtype=np.uint8))[:count * low]
        weights = np.uint64(1) << np.arange(low - 1, -1, -1, dtype=np.uint64)
        lows = (packed.reshape(count, low).astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)
    else:
        lows = np.zeros(count, dtype=np.uint64)
    ones = np.flatnonzero(np.unpackbits(np.frombuffer(blob[2 + low_bytes:], dtype=np.uint8)))
    if len(ones) != count:
        raise BucketError(f"Elias-Fano bucket names {count} entries but its bitmap holds {len(ones)}")
    highs = (ones - np.arange(count)).astype(np.uint64)
    return (highs << np.uint64(low)) | lows


def contains(blob: bytes, encoding: int, bits: int, output: bytes) -> bool:
    """Whether an output's fingerprint is among a bucket answer's (a candidate hit)."""
    values = decode(blob, encoding, bits)
    wanted = np.uint64(fingerprint(output, bits))
    at = int(np.searchsorted(values, wanted))
    return at < len(values) and values[at] == wanted


def contains_many(blobs: list[bytes], encoding: int, bits: int, outputs: list[bytes]) -> list[bool]:
    """``contains`` for many items at once (a gateway's whole batch): each output against its
    own bucket answer. Vectorised: Elias-Fano answers are not decoded whole; only the entries
    whose high part equals the output's are compared."""
    if len(blobs) != len(outputs):
        raise ValueError("one bucket answer per output")
    if not blobs:
        return []
    wanted = np.array([fingerprint(o, bits) for o in outputs], dtype=np.uint64)
    if encoding == FIXED:
        members = []
        for blob, value in zip(blobs, wanted.tolist(), strict=True):
            values = decode(blob, FIXED, bits)
            at = int(np.searchsorted(values, value))
            members.append(at < len(values) and int(values[at]) == value)
        return members
    if encoding != ELIAS_FANO:
        raise BucketError(f"unknown bucket encoding {encoding}")
    if any(len(b) < 2 for b in blobs):
        raise BucketError("Elias-Fano bucket shorter than its 2-byte count")
    sizes = np.array([int.from_bytes(b[:2], "big") for b in blobs], dtype=np.int64)
    low = _low_bits_many(sizes, bits)
    low_bytes = (sizes * low + 7) // 8
    lengths = np.array([len(b) for b in blobs], dtype=np.int64)
    if (lengths < 2 + low_bytes).any():
        raise BucketError("Elias-Fano bucket shorter than its low bits")
    first_byte = np.cumsum(lengths) - lengths
    everything = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    # The bitmaps alone, unpacked: their set bits, whose owner, rank and high part follow.
    maps = [blob[2 + skip:] for blob, skip in zip(blobs, low_bytes.tolist(), strict=True)]
    map_bits = np.array([len(m) for m in maps], dtype=np.int64) * 8
    map_start = np.cumsum(map_bits) - map_bits
    ones = np.flatnonzero(np.unpackbits(np.frombuffer(b"".join(maps), dtype=np.uint8)))
    owner = np.searchsorted(map_start, ones, side="right") - 1
    counted = np.bincount(owner, minlength=len(blobs))
    if (counted != sizes).any():
        raise BucketError("an Elias-Fano bucket's bitmap does not hold its count of entries")
    rank = np.arange(len(ones)) - (np.cumsum(counted) - counted)[owner]
    highs = (ones - map_start[owner]) - rank
    target_high = (wanted >> low.astype(np.uint64)).astype(np.int64)
    candidate = highs == target_high[owner]
    found = np.zeros(len(blobs), dtype=bool)
    who, where = owner[candidate], rank[candidate]
    if len(who):
        width = int(low[who].max())
        lows = np.zeros(len(who), dtype=np.uint64)
        if width:
            column = np.arange(width)
            entry_low = low[who]
            valid = column < entry_low[:, None]
            spots = np.where(valid, (first_byte[who] + 2)[:, None] * 8 + where[:, None] * entry_low[:, None] + column,
                             0)
            bit = (everything[spots >> 3] >> (7 - (spots & 7)).astype(np.uint8)) & 1
            shift = np.where(valid, entry_low[:, None] - 1 - column, 0).astype(np.uint64)
            lows = (np.where(valid, bit, 0).astype(np.uint64) << shift).sum(axis=1, dtype=np.uint64)
        masks = (np.uint64(1) << low[who].astype(np.uint64)) - np.uint64(1)
        hit = lows == (wanted[who] & masks)
        found[who[hit]] = True
    return found.tolist()
