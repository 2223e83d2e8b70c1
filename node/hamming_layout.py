"""The multi-index's layout, shared by the index (``node.hamming_index``) and its kernels.

16 substrings of 16 bits: a substring indexes a 65,536-bucket offsets array
directly. The flip masks list, by weight, the buckets probed around a query's
substring: 1 at radius 0, 17 at radius 1, 137 at radius 2.
"""

from __future__ import annotations

import numpy as np

DIGEST_SIZE = 32
TABLES = 16  # substrings of 16 bits: a key indexes a 65,536-bucket offsets array directly
BUCKETS = 1 << 16
# Radius 2 probes 137 buckets per table and reaches ~3 % of the rows (d <= 47);
# radius 3 would reach ~17 % of them by random access, slower than reading
# every row in order, so larger distances scan.
MAX_RADIUS = 2
# A scan counts hits over blocks of rows and records them only in a block that has some.
SCAN_BLOCK = 1024

# Substring flip masks by weight: the first PROBES[r] are those of weight <= r.
FLIPS = np.array([0] + [1 << i for i in range(16)]
                 + [1 << i | 1 << j for i in range(16) for j in range(i + 1, 16)], dtype=np.int64)
PROBES = (1, 17, 137)
