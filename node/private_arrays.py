"""A segment's OPRF outputs for private exact matching: built in bulk, mapped, searched.

Per exact algorithm and per OPRF key, a segment holds four arrays (files
``<algorithm>.private-<key id>.<array>.npy``, checksummed like the others):

- ``outputs``: every row's 64-byte OPRF output (``oprf.evaluate`` of
  ``oprf.digest_input``), sorted: a disclosure proof is found by binary search;
- ``ids``: the row id of each output (tombstones hide rows by id);
- ``buckets``: the 32-bit bucket hash (``oprf.bucket_of(input, 32)``) of each
  output, sorted; a ``prefix_bits`` bucket is one contiguous range of it, so
  changing the node's prefix length needs no rebuild;
- ``positions``: for each entry of ``buckets``, the index of its output.

Computing an output is one scalar multiplication (tens of microseconds in
libsodium); ``evaluate_all`` spreads rows over threads, since libsodium runs
without the GIL. A merge hands the outputs it already has (``Known``) so that
only rows without one are computed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from federation import oprf
from federation.algorithms import Algorithm
from node import segment_index

ARRAYS = ("outputs", "ids", "buckets", "positions")
PREFIX = "private-"
OUTPUT_DTYPE = np.dtype(f"S{oprf.OUTPUT_BYTES}")
CHUNK = 4096
WORKERS = 2


def array_name(key_id: str, array: str) -> str:
    """The name within an algorithm's arrays (file ``<algorithm>.<name>.npy``)."""
    return f"{PREFIX}{key_id}.{array}"


def split_name(name: str) -> tuple[str, str] | None:
    """(key id, array) of a private array's name, None for another array."""
    if not name.startswith(PREFIX):
        return None
    key_id, _, array = name.removeprefix(PREFIX).partition(".")
    return (key_id, array) if array in ARRAYS else None


def inputs_of(algorithm: Algorithm, keys: np.ndarray) -> list[bytes]:
    """The OPRF input of each key of an exact algorithm (its digest, fixed width)."""
    size = keys.dtype.itemsize
    data = np.ascontiguousarray(keys).tobytes()
    prefix = oprf.digest_input(algorithm.name, b"")
    return [prefix + data[i:i + size] for i in range(0, len(data), size)]


def _evaluate_chunk(secret: bytes, inputs: Sequence[bytes]) -> bytes:
    evaluate = oprf.evaluate
    return b"".join([evaluate(secret, data) for data in inputs])


def evaluate_all(secret: bytes, inputs: Sequence[bytes], workers: int = WORKERS) -> np.ndarray:
    """The outputs of these inputs, (n, 64) uint8, computed on ``workers`` threads."""
    if not inputs:
        return np.empty((0, oprf.OUTPUT_BYTES), dtype=np.uint8)
    chunks = [inputs[i:i + CHUNK] for i in range(0, len(inputs), CHUNK)]
    with ThreadPoolExecutor(max(1, min(workers, len(chunks))), thread_name_prefix="oprf") as pool:
        data = b"".join(pool.map(lambda chunk: _evaluate_chunk(secret, chunk), chunks))
    return np.frombuffer(data, dtype=np.uint8).reshape(len(inputs), oprf.OUTPUT_BYTES)


def buckets_of(inputs: Sequence[bytes]) -> np.ndarray:
    """The 32-bit bucket hash of each input (``oprf.bucket_of(input, 32)``)."""
    tag = oprf.BUCKET_TAG
    sha256 = hashlib.sha256
    data = b"".join([sha256(tag + data).digest()[:4] for data in inputs])
    return np.frombuffer(data, dtype=">u4").astype(np.uint32)


@dataclass(frozen=True)
class Known:
    """Outputs already computed under one key, by key (a merge's inputs): sorted keys."""

    keys: np.ndarray
    outputs: np.ndarray  # (n, 64) uint8, aligned with keys

    @classmethod
    def gather(cls, pairs: Sequence[tuple[np.ndarray, np.ndarray]]) -> Known:
        keys = np.concatenate([k for k, _ in pairs])
        outputs = np.concatenate([o for _, o in pairs])
        order = segment_index.key_order(keys)
        return cls(keys[order], outputs[order])


def build(algorithm: Algorithm, keys: np.ndarray, ids: np.ndarray, secret: bytes,
          known: Known | None = None, workers: int = WORKERS) -> dict[str, np.ndarray]:
    """The four arrays of one algorithm's rows (``keys`` and row ``ids`` aligned) under one key."""
    inputs = inputs_of(algorithm, keys)
    outputs = np.empty((len(keys), oprf.OUTPUT_BYTES), dtype=np.uint8)
    missing = np.ones(len(keys), dtype=bool)
    if known is not None and len(known.keys) and len(keys):
        where = np.minimum(np.searchsorted(known.keys, keys), len(known.keys) - 1)
        found = known.keys[where] == keys
        outputs[found] = known.outputs[where[found]]
        missing = ~found
    todo = np.flatnonzero(missing)
    if len(todo):
        outputs[todo] = evaluate_all(secret, [inputs[i] for i in todo.tolist()], workers)
    as_keys = np.ascontiguousarray(outputs).view(OUTPUT_DTYPE).ravel()
    order = segment_index.key_order(as_keys)
    buckets = buckets_of(inputs)[order]
    positions = np.argsort(buckets, kind="stable")
    return {"outputs": as_keys[order], "ids": ids[order].astype(np.uint32),
            "buckets": buckets[positions], "positions": positions.astype(np.uint32)}


@dataclass(frozen=True)
class PrivatePart:
    """One algorithm's outputs under one key in one segment, mapped read-only."""

    outputs: np.ndarray
    ids: np.ndarray
    buckets: np.ndarray
    positions: np.ndarray

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> PrivatePart:
        return cls(arrays["outputs"], arrays["ids"], arrays["buckets"], arrays["positions"])

    def __len__(self) -> int:
        return len(self.outputs)

    def raw(self) -> np.ndarray:
        """The outputs as (n, 64) bytes (a view of the mapping)."""
        return self.outputs.view(np.uint8).reshape(len(self.outputs), oprf.OUTPUT_BYTES)

    def known(self, keys: np.ndarray, key_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(digest keys, outputs) of these outputs' rows, given the segment's (keys, ids) of the algorithm."""
        order = np.argsort(key_ids)
        where = order[np.searchsorted(key_ids[order], self.ids)]
        return keys[where], np.array(self.raw())


def find_outputs(part: PrivatePart, wanted: Sequence[bytes]) -> list[int]:
    """The row id holding each wanted output exactly (compared in constant time), or -1."""
    if not len(part) or not wanted:
        return [-1] * len(wanted)
    at = np.minimum(np.searchsorted(part.outputs, np.array(wanted, dtype=OUTPUT_DTYPE)), len(part) - 1)
    raw = part.raw()
    found = []
    for proof, position in zip(wanted, at.tolist(), strict=True):
        stored = raw[position].tobytes()
        found.append(int(part.ids[position]) if oprf.same_output(stored, proof) else -1)
    return found
