"""Exact matching throughput: a 10,000-digest batch against 1,000,000 stored digests.

Prints, measured in the same run:
  - the node's matcher in-process (index search + one SQL fetch for the hits),
  - a real node process answering over mutual TLS (signed query, gRPC, merge),
  - and, for comparison, raw SQLite indexed point lookups (one SELECT per digest).

Run with `make bench` or `python tests/bench/bench_exact.py [--stored N] [--batch N]`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from federation.query import QueryItem
from gateway import config as gateway_config
from gateway.fanout import Federation
from gateway.signing import signer_for
from node import matcher
from node.live_index import LiveIndexes
from node.records import HashRecord
from node.store import Store


def _digests(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(count)]


async def _fill(store: Store, stored: list[bytes]) -> float:
    started = time.perf_counter()
    batches = ([HashRecord("sha256", d, f"FR-{i:08d}", "1") for i, d in enumerate(stored[s : s + 50_000], s)]
               for s in range(0, len(stored), 50_000))
    await store.add(batches)
    return time.perf_counter() - started


async def _in_process(store: Store, batch: list[QueryItem], rounds: int) -> tuple[float, float, int]:
    live = LiveIndexes(store)
    started = time.perf_counter()
    await live.start()  # maps the segments (checksums verified), as a starting node does
    load = time.perf_counter() - started
    limits = matcher.Limits()
    times, hits = [], 0
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            valid = matcher.validate(batch, limits)
            current = await live.current()
            found = matcher.match(valid, current.indexes, limits)
            records = current.records(c.record_id for m in found for c in m.candidates)
            times.append(time.perf_counter() - started)
            hits = len(records)
    finally:
        await live.stop()
    return load, statistics.median(times), hits


def _plain_table(path: Path, stored: list[bytes]) -> None:
    """The reference: the same rows in one SQLite table with a primary key (algorithm, digest)."""
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE hashes (algorithm TEXT NOT NULL, digest BLOB NOT NULL, reference TEXT, "
                   "category TEXT, PRIMARY KEY (algorithm, digest))")
        db.executemany("INSERT INTO hashes VALUES ('sha256', ?, ?, '1')",
                       ((d, f"FR-{i:08d}") for i, d in enumerate(stored)))


def _sqlite_point_lookups(path: Path, batch: list[QueryItem]) -> float:
    with sqlite3.connect(path) as db:
        started = time.perf_counter()
        for item in batch:
            db.execute(
                "SELECT reference, category FROM hashes WHERE algorithm = ? AND digest = ?",
                (item.algorithm, item.digest),
            ).fetchone()
        return time.perf_counter() - started


async def _over_grpc(local: LocalFederation, batch: list[QueryItem], rounds: int) -> tuple[float, int]:
    config = gateway_config.load(local.write_gateway_config())
    signer = signer_for(config)
    times, hits = [], 0
    async with Federation(config, signer) as federation:
        await federation.match(batch[:1], "BENCH-WARMUP", timeout=60)
        for _ in range(rounds):
            started = time.perf_counter()
            (answer,) = await federation.match(batch, "BENCH-1", timeout=60)
            times.append(time.perf_counter() - started)
            assert answer.status.answered, answer.message
            hits = sum(1 for h in answer.hits if h)
    return statistics.median(times), hits


def _batch(stored: list[bytes], size: int, known_share: float, seed: int) -> tuple[list[QueryItem], int]:
    rng = random.Random(seed)
    known = rng.sample(stored, int(size * known_share))
    batch = [QueryItem("sha256", d) for d in known + _digests(size - len(known), seed=seed + 1)]
    rng.shuffle(batch)
    return batch, len(known)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    stored = _digests(args.stored, seed=1)
    # A seized device is mostly unknown files; half known is the costly case (every hit fetched).
    batches = {share: _batch(stored, args.batch, share, seed=10 + n) for n, share in enumerate((0.01, 0.5))}
    results: dict[float, dict[str, float]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pki = DevPki(workdir / "pki", "bench.icse.test", ["FR"], ["eu-1"]).create()
        local = LocalFederation(workdir, pki, [NodeSpec("FR", "FR", "bench")])
        store_path = local["FR"].store_path
        store_path.parent.mkdir(parents=True)

        async def build() -> tuple[float, float]:
            async with await Store.open(store_path) as store:
                fill = await _fill(store, stored)
                for share, (batch, known) in batches.items():
                    load, median, hits = await _in_process(store, batch, args.rounds)
                    assert hits == known, f"in-process matcher found {hits} of {known} planted digests"
                    results[share] = {"matcher": median}
            return fill, load

        fill, load = asyncio.run(build())
        plain = workdir / "plain.sqlite"
        _plain_table(plain, stored)
        for share, (batch, _) in batches.items():
            results[share]["sqlite"] = _sqlite_point_lookups(plain, batch)
        with local:
            for share, (batch, known) in batches.items():
                median, hits = asyncio.run(_over_grpc(local, batch, args.rounds))
                assert hits == known, f"node found {hits} of {known} planted digests"
                results[share]["grpc"] = median

    print(f"exact matching: batches of {args.batch:,} sha256 digests against {args.stored:,} stored; "
          f"median of {args.rounds} rounds; {os.cpu_count()} cores")
    print(f"  store fill (one segment)      {fill:7.2f} s  {args.stored / fill:10,.0f} rows/s")
    print(f"  index load at node start      {load:7.2f} s")
    names = {"matcher": "node matcher, in-process", "grpc": "node over mutual TLS (gRPC)",
             "sqlite": "raw SQLite point lookups"}
    for share, timings in results.items():
        print(f"  {share:.0%} of the batch known:")
        for key, name in names.items():
            seconds = timings[key]
            print(f"    {name:<30} {seconds * 1000:8.1f} ms  {args.batch / seconds:10,.0f} digests/s")
        print(f"    ratio matcher / SQLite point lookups       {timings['sqlite'] / timings['matcher']:5.1f}x")
        print(f"    ratio node over gRPC / SQLite point lookups {timings['sqlite'] / timings['grpc']:5.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
