"""Helpers for ``bench_scale.py``: synthetic hash sets written as CSV at disk speed, the plain
SQLite baseline, the node's command line run as a measured child process, and figures.

Everything here reaches the node only through its command line and files, so the benchmark
runs unchanged against any store design that keeps ``icse-node import`` and ``serve``.
"""

from __future__ import annotations

import os
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK = 500_000  # rows generated, written or bound at a time: memory stays flat at any N
HEADER = b"algorithm,digest,reference,category\n"
SHA_SEED = 2
FRESH_SEED = 3

# Two ASCII hex characters per byte value: a (n, 32) digest array becomes (n, 64) text in one gather.
_HEX = np.frombuffer(b"".join(f"{i:02x}".encode() for i in range(256)), dtype=np.uint8).reshape(256, 2)


@dataclass(frozen=True)
class Source:
    """One block of rows of a CSV: an algorithm, its digests, and the prefix of their references."""

    algorithm: str
    digests: np.ndarray  # (n, 32) uint8
    prefix: str  # reference of row i is f"{prefix}-{i:09d}"


def random_digests(count: int, seed: int) -> np.ndarray:
    """``count`` random 32-byte digests, the same for the same seed."""
    return np.random.default_rng(seed).integers(0, 256, (count, 32), dtype=np.uint8)


def reference(prefix: str, row: int) -> str:
    return f"{prefix}-{row:09d}"


def _const(text: str, rows: int) -> np.ndarray:
    return np.broadcast_to(np.frombuffer(text.encode(), dtype=np.uint8), (rows, len(text)))


def _csv_block(source: Source, start: int, stop: int) -> bytes:
    """Rows ``start:stop`` of a source as long-format CSV lines, built as one byte matrix."""
    rows = stop - start
    numbers = np.arange(start, stop, dtype=np.int64)[:, None] // 10 ** np.arange(8, -1, -1, dtype=np.int64)
    digits = (numbers % 10 + ord("0")).astype(np.uint8)
    lines = np.concatenate([
        _const(source.algorithm + ",", rows),
        _HEX[source.digests[start:stop]].reshape(rows, -1),
        _const(f",{source.prefix}-", rows),
        digits,
        _const(",1\n", rows),
    ], axis=1)
    return lines.tobytes()


def write_csv(path: Path, sources: Iterable[Source]) -> int:
    """A long-format CSV (algorithm, digest, reference, category) that ``icse-node import`` reads."""
    count = 0
    with path.open("wb") as handle:
        handle.write(HEADER)
        for source in sources:
            for start in range(0, len(source.digests), CHUNK):
                stop = min(start + CHUNK, len(source.digests))
                handle.write(_csv_block(source, start, stop))
                count += stop - start
    return count


PLAIN_SCHEMA = """
CREATE TABLE hashes (
    algorithm TEXT NOT NULL,
    digest BLOB NOT NULL,
    reference TEXT,
    category TEXT,
    PRIMARY KEY (algorithm, digest)
)"""


def plain_insert(path: Path, sources: Iterable[Source]) -> tuple[float, int]:
    """Plain SQLite: ``executemany`` of the same rows, already parsed (digests as bytes), into
    a table whose primary key is (algorithm, digest), in one transaction, WAL and
    synchronous=FULL like the node. Only the executemany calls and the commit are timed;
    building each chunk's Python tuples is not. Returns (seconds, rows)."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute(PLAIN_SCHEMA)
        elapsed, count = 0.0, 0
        db.execute("BEGIN IMMEDIATE")
        for source in sources:
            for start in range(0, len(source.digests), CHUNK):
                block = source.digests[start:start + CHUNK]
                rows = [(source.algorithm, digest.tobytes(), reference(source.prefix, start + i), "1")
                        for i, digest in enumerate(block)]
                started = time.perf_counter()
                db.executemany("INSERT OR IGNORE INTO hashes (algorithm, digest, reference, category) "
                               "VALUES (?, ?, ?, ?)", rows)
                elapsed += time.perf_counter() - started
                count += len(rows)
        started = time.perf_counter()
        db.execute("COMMIT")
        elapsed += time.perf_counter() - started
        stored = db.execute("SELECT COUNT(*) FROM hashes").fetchone()[0]
        assert stored == count, f"plain insert stored {stored} of {count} rows"
        return elapsed, count
    finally:
        db.close()


def sqlite_point_lookups(path: Path, algorithm: str, digests: list[bytes]) -> tuple[float, int]:
    """One indexed SELECT per digest on the plain table: (seconds, rows found)."""
    db = sqlite3.connect(path)
    try:
        found = 0
        started = time.perf_counter()
        for digest in digests:
            row = db.execute("SELECT reference, category FROM hashes WHERE algorithm = ? AND digest = ?",
                             (algorithm, digest)).fetchone()
            found += row is not None
        return time.perf_counter() - started, found
    finally:
        db.close()


# --------------------------------------------------------------------------- the node's command line


def node_command(*args: str) -> list[str]:
    """``icse-node`` as the interpreter running us sees it (PYTHONPATH picks the code under test)."""
    return [sys.executable, "-m", "node.cli", *args]


@dataclass(frozen=True)
class ImportRun:
    seconds: float
    peak_rss_kb: int
    exit_code: int
    output: str


def start_import(config: Path, source: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as handle:
        return subprocess.Popen(node_command("import", "--config", str(config), str(source)),
                                stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Kills a child still running (a failed or interrupted benchmark) and reaps it."""
    if process.returncode is None and process.poll() is None:
        process.kill()
        process.wait()


def run_import(config: Path, source: Path, log: Path) -> ImportRun:
    """Runs ``icse-node import`` to completion; the peak RSS is the kernel's for that child (wait4)."""
    started = time.perf_counter()
    process = start_import(config, source, log)
    try:
        _, status, usage = os.wait4(process.pid, 0)
    except BaseException:
        stop_process(process)
        raise
    elapsed = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    return ImportRun(elapsed, usage.ru_maxrss, process.returncode, log.read_text(errors="replace"))


def check_added(run: ImportRun, expected: int) -> None:
    if run.exit_code != 0 or f"added {expected}," not in run.output:
        raise RuntimeError(f"icse-node import did not add {expected} rows (exit {run.exit_code}):\n"
                           f"{run.output[-2000:]}")


def status_kb(pid: int, key: str) -> int | None:
    """A ``/proc/PID/status`` figure in kB (VmRSS, VmHWM), or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (p99 of 50 samples is the largest): None without samples."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:,.0f} MiB"


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:,.1f} ms"


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return numerator / denominator
