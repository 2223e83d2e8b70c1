"""A segment's per-algorithm indexes: built once, in bulk, as arrays; loaded back
from (memory-mapped) arrays without any work.

Every algorithm has *keys*: its digests as fixed-width byte strings, sorted,
with the segment row id of each (``keys``/``ids``). For exact kinds they are
the index, with ``prefix``, each key's first 8 bytes as a uint64 (searched
instead of the keys: ``node.index.find_sorted``); for every kind they are what
an import deduplicates against and what a retraction finds rows by (a video's
key is the SHA-256 of its frames).
Perceptual kinds add their Hamming index's arrays (``hamming.*``), and videos
the owner (row id) of every frame (``owners``).

This module is where the index kinds meet: ``node.index``, ``node.hamming_index``
and ``node.frame_index`` do not import one another beyond ``Candidate``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from federation.algorithms import Algorithm, MatchKind
from node.frame_index import FrameIndex, split_frames
from node.hamming_index import build_hamming_index, load_hamming_index
from node.index import ExactIndex, Index, Probe, find_sorted, prefix_of

KEY_SIZE = 32  # the key of a variable-length (video) digest: its SHA-256

Arrays = dict[str, np.ndarray]


def key_dtype(algorithm: Algorithm) -> np.dtype:
    return np.dtype(f"S{algorithm.digest_size if algorithm.max_frames == 1 else KEY_SIZE}")


def keys_of(algorithm: Algorithm, digests: Sequence[bytes]) -> np.ndarray:
    """The keys of these digests, one fixed-width byte string each (not sorted)."""
    if algorithm.max_frames == 1:
        return np.array(digests, dtype=key_dtype(algorithm)) if len(digests) else np.empty(0, key_dtype(algorithm))
    return np.array([hashlib.sha256(d).digest() for d in digests], dtype=key_dtype(algorithm)) \
        if len(digests) else np.empty(0, key_dtype(algorithm))


def key_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` of fixed-width byte keys, three to four times
    faster: a radix sort of each key's first 8 bytes (as a big-endian integer, which
    orders like the bytes), then the keys sharing a prefix (repeats, mostly) sorted
    again by the whole key, in place among themselves."""
    if not len(keys):
        return np.empty(0, dtype=np.int64)
    prefix = np.ascontiguousarray(keys.view(np.uint8).reshape(len(keys), -1)[:, :8]).view(">u8").ravel()
    order = np.argsort(prefix, kind="stable")
    ranked = prefix[order]
    tied = np.zeros(len(keys), dtype=bool)
    tied[1:] = ranked[1:] == ranked[:-1]
    tied[:-1] |= tied[1:]
    if tied.any():
        slots = np.flatnonzero(tied)  # runs of one prefix, in prefix order, each in input order
        order[slots] = order[slots][np.argsort(keys[order[slots]], kind="stable")]
    return order


def sorted_keys(keys: np.ndarray, ids: np.ndarray) -> Arrays:
    order = key_order(keys)
    return {"keys": keys[order], "ids": ids[order]}


def find(keys: np.ndarray, ids: np.ndarray, wanted: np.ndarray, prefix: np.ndarray | None = None,
         sample: np.ndarray | None = None) -> np.ndarray:
    """The row id of each wanted key in sorted ``keys``, or -1: one vectorised search
    (of ``prefix``, the keys' ``prefix_of``, when there is one; ``sample``, its
    ``sample_of``, made for the search when not given)."""
    if not len(keys) or not len(wanted):
        return np.full(len(wanted), -1, dtype=np.int64)
    if prefix is not None:
        probe = Probe.of(wanted)
        where, at = find_sorted(keys, prefix, probe, sample)
        found = np.full(len(wanted), -1, dtype=np.int64)
        found[probe.order[where]] = ids[at]
        return found
    positions = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
    return np.where(keys[positions] == wanted, ids[positions].astype(np.int64), -1)


def build_arrays(algorithm: Algorithm, ids: np.ndarray, digests: Sequence[bytes], keys: np.ndarray) -> Arrays:
    """Every array of one algorithm's index over these rows (``keys`` as ``keys_of`` gave)."""
    arrays = sorted_keys(keys, ids)
    if algorithm.match_kind is MatchKind.EXACT:
        arrays["prefix"] = prefix_of(arrays["keys"])
    elif algorithm.match_kind is MatchKind.HAMMING:
        # A PDQ digest is its own key: the (n, 32) bytes, no bytes objects.
        raw = keys.view(np.uint8).reshape(len(keys), algorithm.digest_size)
        index = build_hamming_index(algorithm, ids, raw)
        arrays.update({f"hamming.{name}": array for name, array in index.arrays().items()})
    elif algorithm.match_kind is MatchKind.FRAMES:
        frames: list[bytes] = []
        owners: list[np.ndarray] = []
        for record_id, digest in zip(ids.tolist(), digests, strict=True):
            video = split_frames(algorithm, digest)
            frames += video
            owners.append(np.full(len(video), record_id, dtype=np.int64))
        index = build_hamming_index(algorithm, np.arange(len(frames)), frames)
        arrays.update({f"hamming.{name}": array for name, array in index.arrays().items()})
        arrays["owners"] = np.concatenate(owners) if owners else np.empty(0, np.int64)
    return arrays


def load_index(algorithm: Algorithm, arrays: Arrays) -> Index:
    """The searchable index over arrays that ``build_arrays`` made (mapped, not copied)."""
    if algorithm.match_kind is MatchKind.EXACT:
        # A segment written before the prefix file: its prefixes are computed as it is mapped.
        return ExactIndex.from_sorted(arrays["keys"], arrays["ids"], arrays.get("prefix"))
    hamming = load_hamming_index({name.split(".", 1)[1]: array for name, array in arrays.items()
                                  if name.startswith("hamming.")})
    if algorithm.match_kind is MatchKind.HAMMING:
        return hamming
    return FrameIndex.from_parts(algorithm, len(arrays["keys"]), arrays["owners"], hamming)


def build(algorithm: Algorithm, ids: Sequence[int], digests: Sequence[bytes]) -> Index:
    """The in-memory index that serves ``algorithm``'s match kind (tests, benchmarks)."""
    if algorithm.match_kind is MatchKind.HAMMING:
        return build_hamming_index(algorithm, ids, digests)
    if algorithm.match_kind is MatchKind.FRAMES:
        return FrameIndex(algorithm, ids, digests, build_hamming_index)
    return ExactIndex(algorithm, ids, digests)
