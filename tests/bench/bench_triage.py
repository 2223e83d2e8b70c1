"""Directory triage against ``hashdeep``, side by side on the same trees, in the same run.

Generates three trees (small files, large files, drawn images), then for each:
``hashdeep -c md5,sha1,sha256 -r`` twice — with ``-j 1``, one hashing thread,
the reference the triage's goals are set against ("hashdeep (1
thread)"), and with hashdeep's default, one hashing thread per core
(``man hashdeep``, ``-j``), a stricter figure printed beside it — and
``icse-gateway query --dir`` against one real node over mTLS: exact-only work
(``--jobs 2``, no cache), the same with the cache filled, and the fully cached
re-run. Prints files/s, MB/s, peak RSS of the whole process tree (sampled from
/proc) and the ratios against both hashdeep runs; for the images, also Pillow +
``pdqhash`` alone in as many processes, the reference for perceptual hashing.

Not part of ``make test``: ``make bench-triage`` or
``python tests/bench/bench_triage.py [--files N] [--large N] [--images N]``.
``hashdeep`` comes from the Debian package of that name: installed here only
when missing and running as root; otherwise its column is skipped, saying so.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from tests import media as draw

TOTAL_BYTES = 50 << 20  # the tree of large files, whatever their number
# The node's per-officer limits, out of the way: a million-file tree is asked three times over.
POLICY = {"requests_per_minute": 100_000_000, "items_per_day": 100_000_000_000}


@dataclass
class Measure:
    seconds: float
    peak_rss_kb: int
    returncode: int


def _tree_rss_kb(root: int) -> int:
    """Resident memory of ``root`` and every descendant, from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as status:
                fields = dict(line.split(":", 1) for line in status if ":" in line)
        except OSError:
            continue
        pid = int(entry)
        children.setdefault(int(fields.get("PPid", "0").strip()), []).append(pid)
        rss[pid] = int(fields.get("VmRSS", "0 kB").split()[0])
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack += children.get(pid, [])
    return total


def measure(command: list[str]) -> Measure:
    """Runs ``command``; its wall time and the peak RSS of its process tree (sampled every 50 ms)."""
    peak = 0
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss_kb(process.pid))
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode not in (0, 1):
        sys.stderr.write(stderr.decode(errors="replace")[-2000:])
    return Measure(seconds, peak, process.returncode)


def small_tree(root: Path, files: int) -> Path:
    rng = random.Random(1)
    size = 512  # 100,000 of them: 50 MB
    for i in range(files):
        if i % 1000 == 0:
            directory = root / f"d{i // 1000:04d}"
            directory.mkdir(parents=True, exist_ok=True)
        with open(directory / f"f{i:06d}.bin", "wb") as out:
            out.write(rng.randbytes(size))
    return root


def large_tree(root: Path, files: int, total: int = TOTAL_BYTES) -> Path:
    rng = random.Random(2)
    size = total // max(files, 1)
    root.mkdir(parents=True, exist_ok=True)
    block = rng.randbytes(size)
    for i in range(files):
        (root / f"big{i:05d}.bin").write_bytes(block[i % 97:] + block[: i % 97])
    return root


def image_tree(root: Path, files: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        draw.save_jpeg(draw.drawing(i, (320, 240)), root / f"img{i:05d}.jpg", 85)
    return root


def hashdeep() -> str | None:
    found = shutil.which("hashdeep")
    if found or os.geteuid() != 0:
        return found
    done = subprocess.run(["apt-get", "install", "-y", "hashdeep"], capture_output=True, check=False)
    return shutil.which("hashdeep") if done.returncode == 0 else None


def tree_stats(root: Path) -> tuple[int, int]:
    files = size = 0
    for directory, _, names in os.walk(root):
        for name in names:
            files += 1
            size += os.path.getsize(os.path.join(directory, name))
    return files, size


def _raw_pdq(paths: list[Path]) -> int:
    """Pillow decode + ``pdqhash``, nothing else, for each image (in a reference process)."""
    import numpy as np  # noqa: PLC0415 - only the reference processes need them
    import pdqhash  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    for path in paths:
        with Image.open(path) as image:
            pdqhash.compute(np.ascontiguousarray(np.asarray(image.convert("RGB")), dtype=np.uint8))
    return len(paths)


def raw_pdq_seconds(root: Path, jobs: int) -> float:
    """The reference for perceptual hashing: every image of ``root`` through :func:`_raw_pdq` in ``jobs``
    processes started beforehand (spawned: no fork of this process), so that both sides share the cores alike."""
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_raw_pdq, [[]] * jobs))  # started and imported before the clock runs
        started = time.perf_counter()
        done = sum(pool.map(_raw_pdq, [paths[n::jobs] for n in range(jobs)]))
        seconds = time.perf_counter() - started
    assert done == len(paths)
    return seconds


# The two hashdeep runs: the reference the goals are judged against, and hashdeep's own default.
REFERENCE = "hashdeep -j 1 (one hashing thread)"
PER_CORE = "hashdeep, one thread per core"


def row(label: str, files: int, size: int, m: Measure | None, bases: dict[str, Measure | None]) -> str:
    """One line of the table; against each hashdeep run measured, the ratio of speeds (above 1: faster)."""
    if m is None:
        return f"  {label:<40} skipped"
    short = {REFERENCE: "hashdeep -j 1", PER_CORE: "hashdeep per core"}
    ratios = "".join(f"  {base.seconds / m.seconds:5.2f}x {short[name]}" for name, base in bases.items() if base)
    return (f"  {label:<40} {m.seconds:8.2f} s {files / m.seconds:10,.0f} files/s {size / m.seconds / 1e6:8.1f} MB/s "
            f"peak RSS {m.peak_rss_kb / 1024:7.1f} MiB{ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=100_000, help="small files (default 100,000)")
    parser.add_argument("--large", type=int, default=2_000, help="large files (default 2,000; --large-mb in all)")
    parser.add_argument("--large-mb", type=int, default=TOTAL_BYTES >> 20,
                        help=f"MiB in all of the large files (default {TOTAL_BYTES >> 20}; the start of a run, "
                        "about a second, weighs less on a larger total)")
    parser.add_argument("--images", type=int, default=5_000, help="drawn JPEG images (default 5,000)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the trees are generated (default: the system's temporary directory; a million "
                        "files need a few GB) — removed afterwards")
    args = parser.parse_args()
    tool = hashdeep()
    if tool is None:
        print("hashdeep: not installed (Debian package 'hashdeep'; installed here only as root): column skipped")
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-triage-", dir=args.workdir) as tmp:
        work = Path(tmp)
        pki = DevPki(work / "pki", "bench.icse.test", ["FR"], ["eu-1"]).create()
        local = LocalFederation(work / "nodes", pki, [NodeSpec("FR", "FR", "bench", tables={"policy": POLICY})])
        started = time.perf_counter()
        trees = {"small files": small_tree(work / "small", args.files),
                 "large files": large_tree(work / "large", args.large, args.large_mb << 20),
                 "drawn images": image_tree(work / "images", args.images)}
        print(f"trees generated in {time.perf_counter() - started:.1f} s")
        with local:
            config = local.write_gateway_config()
            for name, root in trees.items():
                files, size = tree_stats(root)
                print(f"{name}: {files:,} files, {size / 1e6:,.1f} MB")
                command = [tool, "-c", "md5,sha1,sha256", "-r", str(root)] if tool else None
                bases = {REFERENCE: measure([*command[:1], "-j", "1", *command[1:]]) if command else None,
                         PER_CORE: measure(command) if command else None}
                for label, base in bases.items():
                    print(row(label, files, size, base, {}))
                cache = work / f"cache-{name.replace(' ', '-')}.sqlite"
                query = [sys.executable, "-m", "gateway.cli", "query", "--config", str(config), "--case", "BENCH",
                         "--format", "json", "--dir", str(root), "--jobs", str(args.jobs)]
                first = measure([*query, "--no-cache"])
                print(row(f"ours, --jobs {args.jobs}, no cache", files, size, first, bases))
                print(row(f"ours, --jobs {args.jobs}, filling the cache", files, size,
                          measure([*query, "--cache", str(cache)]), bases))
                print(row("ours, fully cached re-run", files, size, measure([*query, "--cache", str(cache)]), bases))
                if name == "drawn images":
                    raw = files / raw_pdq_seconds(root, args.jobs)
                    ours = files / first.seconds
                    print(f"  raw Pillow + pdqhash, {args.jobs} processes {raw:10,.0f} files/s; ours, no cache, "
                          f"{ours:,.0f} files/s with exact digests, queries and rows = {ours / raw:.2f}x raw")


if __name__ == "__main__":
    main()
