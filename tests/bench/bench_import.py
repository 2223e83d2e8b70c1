"""Import throughput: ``icse-node import`` of a large CSV against a plain SQLite batch insert.

Writes a CSV of N rows (md5, sha1 and sha256 digests with reference, category,
victim-identified flag, series and date), then, in the same run and on the same
disk, alternately:

  - imports it through the real import path (``icse-node import``, in-process:
    CSV parsing and validation, new segments written and indexed, published in
    one catalog transaction);
  - inserts the same rows, already parsed, with a plain ``executemany`` in one
    transaction into a fresh table with primary key (algorithm, digest)
    (WAL, synchronous=FULL, SQLite's default page cache).

Prints rows/s for both and their ratio (goal at 10 M rows: import >= 2x the
plain insert; ``bench_scale.py --only import`` measures it through the CLI).

Run with `python tests/bench/bench_import.py [--rows N] [--rounds N]`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node import cli

PLAIN_SCHEMA = """CREATE TABLE hashes (algorithm TEXT NOT NULL, digest BLOB NOT NULL, reference TEXT NOT NULL,
    category TEXT NOT NULL, victim_identified INTEGER, series TEXT NOT NULL, date_added TEXT NOT NULL,
    PRIMARY KEY (algorithm, digest))"""

_ALGORITHMS = (("md5", 16), ("sha1", 20), ("sha256", 32))


def write_csv(path: Path, rows: int, seed: int) -> list[tuple]:
    """The file to import, and the same rows as the plain insert binds them."""
    rng = random.Random(seed)
    parsed = []
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["algorithm", "digest", "reference", "category", "victim_identified", "series",
                         "date_added"])
        for n in range(rows):
            algorithm, size = _ALGORITHMS[n % 3]
            digest = rng.randbytes(size)
            reference = f"FR-{n:09d}"
            category = str(n % 4)
            victim = (None, True, False)[n % 3]
            series = f"SERIES-{n % 97}" if n % 5 == 0 else ""
            date = f"20{10 + n % 15}-0{1 + n % 9}-1{n % 10}"
            writer.writerow([algorithm, digest.hex(), reference, category,
                             "" if victim is None else str(victim).lower(), series, date])
            parsed.append((algorithm, digest, reference, category, None if victim is None else int(victim),
                           series, date))
    return parsed


def plain_insert(path: Path, rows: list[tuple]) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(PLAIN_SCHEMA)
    started = time.perf_counter()
    db.execute("BEGIN IMMEDIATE")
    db.executemany(
        "INSERT OR IGNORE INTO hashes (algorithm, digest, reference, category, victim_identified, series, "
        "date_added) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.execute("COMMIT")
    elapsed = time.perf_counter() - started
    assert db.execute("SELECT COUNT(*) FROM hashes").fetchone()[0] == len(rows)
    db.close()
    return elapsed


def real_import(workdir: Path, source: Path, rows: int) -> float:
    store = workdir / "imported.sqlite"
    config = workdir / "node.toml"
    config.write_text(f'[node]\nid = "FR"\ncountry = "FR"\nfederation = "bench"\nstore = "{store}"\n')
    output = io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(output):
        status = cli.main(["import", "--config", str(config), str(source)])
    elapsed = time.perf_counter() - started
    assert status == 0, output.getvalue()
    assert f"added {rows}, already present 0, rejected 0" in output.getvalue(), output.getvalue()
    with sqlite3.connect(store) as db:  # the catalog: rows of the published segments
        assert db.execute("SELECT SUM(rows) FROM segments WHERE state = 'published'").fetchone()[0] == rows
    return elapsed


def _clean(directory: Path) -> None:
    for name in ("imported.sqlite", "plain.sqlite"):
        for suffix in ("", "-wal", "-shm", ".audit", ".audit-wal", ".audit-shm", ".lock"):
            (directory / (name + suffix)).unlink(missing_ok=True)
    shutil.rmtree(directory / "imported.sqlite.segments", ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the best of each is kept")
    parser.add_argument("--dir", type=Path, help="where to write the files (default: a temporary directory)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        workdir = Path(tmp)
        source = workdir / "known.csv"
        rows = write_csv(source, args.rows, seed=1)
        ours, plain = [], []
        for _ in range(args.rounds):
            _clean(workdir)
            ours.append(real_import(workdir, source, args.rows))
            _clean(workdir)
            plain.append(plain_insert(workdir / "plain.sqlite", rows))
        size = source.stat().st_size

    best_ours, best_plain = min(ours), min(plain)
    print(f"import throughput: {args.rows:,} CSV rows (md5/sha1/sha256 + metadata, {size / 1e6:.0f} MB), "
          f"best of {args.rounds} alternating rounds; "
          f"{os.cpu_count()} cores")
    print(f"  icse-node import (parse + validate + segments + publish) {best_ours:6.2f} s  "
          f"{args.rows / best_ours:10,.0f} rows/s   (rounds: {', '.join(f'{t:.2f}' for t in ours)} s)")
    print(f"  plain SQLite executemany of pre-parsed rows (PK table)   {best_plain:6.2f} s  "
          f"{args.rows / best_plain:10,.0f} rows/s   (rounds: {', '.join(f'{t:.2f}' for t in plain)} s)")
    ratio = best_plain / best_ours
    print(f"  ratio import / plain insert                              {ratio:6.2f}x  "
          f"(goal >= 2x at 10 M rows: {'met' if ratio >= 2 else 'not met'} at {args.rows:,})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
