"""PDQ near-match search at distance 31: our index against faiss and a NumPy scan.

For each size N: N random 256-bit hashes are stored; the queries alternate
between a planted near-duplicate of a stored hash (exactly d bits flipped,
d spread over 0..31) and a random hash (no match). Measured in the same run,
one method after another:

  ours            node.hamming_index.build_hamming_index (multi-index at these sizes),
                  one batch of --queries digests as bytes, Candidate lists out
  ours, 100/batch the same queries in batches of 100
  faiss MIH       IndexBinaryMultiHash(256, 16, 16), nflip = 1, in an IndexBinaryIDMap,
                  range_search (faiss keeps distance < radius, so radius 32)
  faiss flat      IndexBinaryFlat range_search, batched
  numpy scan      np.bitwise_count over uint64 XOR, one query at a time (slow:
                  timed on --scan-queries queries only)

Recall is the share of the planted near-duplicates each method returned with
their exact distance. Bytes/hash: ours is the index's own arrays (nbytes);
faiss is the growth of the process's resident memory over its build.

Run: python tests/bench/bench_pdq_index.py [--sizes 1000000,10000000] [--queries 10000]
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from federation.algorithms import PDQ
from node.hamming_index import build_hamming_index

DISTANCE = 31


@dataclass
class Row:
    method: str
    queries: int
    per_second: float
    build_seconds: float | None
    found: int
    planted: int
    bytes_per_hash: float | None
    bytes_how: str = ""  # nbytes: the index's arrays; RSS: resident growth over the build; codes: stored codes


@dataclass
class Workload:
    stored: np.ndarray  # (n, 32) uint8
    ids: np.ndarray  # int64, the id of each stored row
    queries: np.ndarray  # (q, 32) uint8
    source: np.ndarray  # id a query was planted from, -1 for random queries
    distance: np.ndarray  # its planted distance


def _workload(size: int, count: int, seed: int) -> Workload:
    rng = np.random.default_rng(seed)
    stored = rng.integers(0, 256, (size, 32), dtype=np.uint8)
    ids = np.arange(size, dtype=np.int64) * 7 + 1000  # not positions, so a lost id mapping shows
    queries = rng.integers(0, 256, (count, 32), dtype=np.uint8)
    planted = np.arange(0, count, 2)
    rows = rng.integers(0, size, len(planted))
    # 0, 7, 14, ... mod 32: every prefix of the queries spreads over 0..31.
    distance = np.full(count, -1)
    distance[planted] = (np.arange(len(planted)) * 7) % (DISTANCE + 1)
    # Flip exactly d random bits: those whose random rank is below d.
    rank = np.argsort(np.argsort(rng.random((len(planted), 256)), axis=1), axis=1)
    bits = np.unpackbits(stored[rows], axis=1) ^ (rank < distance[planted, None])
    queries[planted] = np.packbits(bits.astype(np.uint8), axis=1)
    source = np.full(count, -1)
    source[planted] = ids[rows]
    check = np.bitwise_count(queries[planted] ^ stored[rows]).sum(axis=1)
    assert (check == distance[planted]).all()
    return Workload(stored, ids, queries, source, distance)


def _found(work: Workload, count: int, owner: np.ndarray, ids: np.ndarray, dists: np.ndarray) -> tuple[int, int]:
    """(planted queries among the first count answered with their source at its distance, planted)."""
    hit = (ids == work.source[owner]) & (dists == work.distance[owner])
    return len(np.unique(owner[hit])), int((work.source[:count] >= 0).sum())


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _ours(work: Workload, count: int) -> list[Row]:
    size = len(work.stored)
    digests = [q.tobytes() for q in work.queries[:count]]
    started = time.perf_counter()
    index = build_hamming_index(PDQ, work.ids, work.stored)
    build = time.perf_counter() - started
    index.search(digests[:8], [DISTANCE] * 8)  # compiles on a first run (cached afterwards)
    rows = []
    for label, batch in (("ours", count), ("ours, 100/batch", 100)):
        results = []
        started = time.perf_counter()
        for start in range(0, count, batch):
            results += index.search(digests[start : start + batch], [DISTANCE] * len(digests[start : start + batch]))
        elapsed = time.perf_counter() - started
        owner = np.repeat(np.arange(count), [len(r) for r in results])
        ids = np.array([c.record_id for r in results for c in r], dtype=np.int64)
        dists = np.array([c.distance for r in results for c in r], dtype=np.int64)
        rows.append(Row(label, count, count / elapsed, build if batch == count else None,
                        *_found(work, count, owner, ids, dists), index.nbytes / size, "nbytes"))
    print(f"  ours: {type(index).__name__}, {index.nbytes / 2**20:.0f} MiB", flush=True)
    return rows


def _faiss_row(label: str, work: Workload, count: int, make, labels_are_positions: bool,
               codes_only: bool = False) -> Row:
    gc.collect()
    before = _rss()
    started = time.perf_counter()
    index, _keep = make()  # the MIH inside stays alive while the index is searched
    build = time.perf_counter() - started
    grown = _rss() - before
    started = time.perf_counter()
    lims, dists, labels = index.range_search(work.queries[:count], DISTANCE + 1)
    elapsed = time.perf_counter() - started
    owner = np.repeat(np.arange(count), np.diff(lims).astype(np.int64))
    ids = work.ids[labels] if labels_are_positions else labels.astype(np.int64)
    found = _found(work, count, owner, ids, dists.astype(np.int64))
    if codes_only:  # a flat index holds only the codes: exact, where RSS is noisy at small sizes
        return Row(label, count, count / elapsed, build, *found, index.code_size, "codes")
    return Row(label, count, count / elapsed, build, *found, grown / len(work.stored), "RSS")


def _faiss_mih(work: Workload, count: int) -> Row:
    import faiss  # noqa: PLC0415  (optional: bench_scale imports this module without faiss)

    def make():
        mih = faiss.IndexBinaryMultiHash(256, 16, 16)
        mih.nflip = 1  # probe every 1-bit flip of each 16-bit substring: exact up to 31
        index = faiss.IndexBinaryIDMap(mih)
        index.add_with_ids(work.stored, work.ids)
        return index, mih

    return _faiss_row("faiss MIH", work, count, make, labels_are_positions=False)


def _faiss_flat(work: Workload, count: int) -> Row:
    import faiss  # noqa: PLC0415  (optional: bench_scale imports this module without faiss)

    def make():
        index = faiss.IndexBinaryFlat(256)
        index.add(work.stored)
        return index, None

    return _faiss_row("faiss flat", work, count, make, labels_are_positions=True, codes_only=True)


def _numpy_scan(work: Workload, count: int) -> Row:
    stored = work.stored.view(np.uint64)  # (n, 4)
    queries = work.queries.view(np.uint64)
    owner, ids, dists = [], [], []
    started = time.perf_counter()
    for i in range(count):  # per query: one vectorised pass over every stored hash
        distance = np.bitwise_count(stored ^ queries[i]).sum(axis=1, dtype=np.int16)
        hits = np.flatnonzero(distance <= DISTANCE)
        owner.append(np.full(len(hits), i))
        ids.append(work.ids[hits])
        dists.append(distance[hits].astype(np.int64))
    elapsed = time.perf_counter() - started
    found = _found(work, count, np.concatenate(owner), np.concatenate(ids), np.concatenate(dists))
    return Row("numpy scan", count, count / elapsed, None, *found, stored.nbytes / len(stored), "array")


def _print(size: int, rows: list[Row]) -> None:
    print(f"\n{size:,} stored PDQ hashes, max distance {DISTANCE}, {os.cpu_count()} cores")
    print(f"{'method':<17}{'queries':>9}{'queries/s':>12}{'build s':>9}{'recall (planted)':>24}{'bytes/hash':>18}")
    for row in rows:
        build = f"{row.build_seconds:.2f}" if row.build_seconds is not None else "-"
        recall = f"{row.found / row.planted:.1%} ({row.found}/{row.planted})"
        size_text = f"{row.bytes_per_hash:.1f} ({row.bytes_how})"
        rate = f"{row.per_second:,.0f}" if row.per_second >= 100 else f"{row.per_second:.1f}"
        print(f"{row.method:<17}{row.queries:>9,}{rate:>12}{build:>9}{recall:>24}{size_text:>18}")
    by_name = {row.method: row.per_second for row in rows}
    print(f"ours / faiss MIH: {by_name['ours'] / by_name['faiss MIH']:.1f}x   "
          f"ours / faiss flat: {by_name['ours'] / by_name['faiss flat']:.1f}x   "
          f"ours / numpy scan: {by_name['ours'] / by_name['numpy scan']:.0f}x", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1000000,10000000", help="stored hash counts, comma separated")
    parser.add_argument("--queries", type=int, default=10_000, help="queries timed for our index (one batch)")
    parser.add_argument("--ref-queries", type=int, default=2_000, help="queries timed for the faiss methods")
    parser.add_argument("--scan-queries", type=int, default=0,
                        help="queries timed for the numpy scan (default: 2e8 / size, at least 10)")
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        count = max(args.queries, args.ref_queries)
        print(f"{size:,} hashes: generating, then ours, faiss MIH, faiss flat, numpy scan...", flush=True)
        work = _workload(size, count, seed=size)
        rows = _ours(work, args.queries)
        gc.collect()
        ref = min(args.ref_queries, count)
        rows.append(_faiss_mih(work, ref))
        rows.append(_faiss_flat(work, ref))
        scan = args.scan_queries or max(10, min(ref, int(2e8 // size)))
        rows.append(_numpy_scan(work, scan))
        _print(size, rows)
        del work
        gc.collect()


if __name__ == "__main__":
    main()
