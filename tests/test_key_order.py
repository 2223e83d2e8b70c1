"""The fast sort of fixed-width keys orders exactly as numpy's stable sort of the keys
does: repeats, keys sharing their first 8 bytes, zero bytes at either end, every width."""

from __future__ import annotations

import numpy as np
import pytest

from node.segment_index import key_order


@pytest.mark.parametrize("width", [16, 20, 32])
def test_key_order_is_the_stable_sort_of_the_keys(width: int) -> None:
    rng = np.random.default_rng(width)
    raw = rng.integers(0, 256, (20_000, width), dtype=np.uint8)
    raw[::7] = raw[3]  # repeats of one key
    raw[1::11, :8] = raw[5, :8]  # a shared prefix, different tails
    raw[2::13, -4:] = 0  # trailing zero bytes
    raw[4::17, :8] = 0  # leading zero bytes
    raw[6::19, 8:] = raw[6, 8:]  # shared tails, different prefixes
    keys = raw.view(f"S{width}").ravel()
    assert np.array_equal(key_order(keys), np.argsort(keys, kind="stable"))
    assert np.array_equal(key_order(keys[:1]), [0]) and len(key_order(keys[:0])) == 0
