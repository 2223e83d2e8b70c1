"""Load on a local federation: throughput, latency, errors and node memory under concurrency,
and the gateway's own fan-out overhead at 49 nodes.

Not a pytest test. Run:

    python tests/bench/load.py [--nodes 5] [--concurrency 1,4,16] [--duration 10] [--batch 1000]
                               [--stored 100000] [--fanout-nodes 49] [--fanout-queries 200]

Part 1 starts ``--nodes`` real node processes on loopback (LocalFederation), each holding
``--stored`` random SHA-256 digests, and for each concurrency level K keeps K gateway queries
of ``--batch`` digests in flight for ``--duration`` seconds, through one in-process
``gateway.fanout.Federation`` (channels reused, hedging and retries as shipped). About 1 % of
each batch is known to the first node, so hits are fetched and returned too. It reports per
level: queries/s, digests/s (digests asked of the federation per second, each sent to every
node), p50/p99 end-to-end latency, errors (node answers that were not hit/no-hit, and failed
queries), extra calls (hedges and retries), and each node's RSS at the start and end of the
run, its peak sampled RSS per level and its VmHWM, so one can see whether memory stays flat.

Part 2 starts ``--fanout-nodes`` node processes with small stores and, for each of
``--fanout-queries`` sequential queries, takes the end-to-end latency minus the slowest node's
own RPC round trip (the time spent in the gateway itself: signing one token per node,
encoding, scheduling, merging the per-node answers). Target: median < 5 ms.

Every node process is stopped on exit, on an exception and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
# gRPC's INFO lines ("skipping fork() handlers") when node processes are started from here.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from scale_support import status_kb  # beside this script: the same /proc reader as the scale benchmark

from federation.localfed import LocalFederation, LocalNode, NodeSpec
from federation.pki import DevPki
from federation.query import QueryItem
from gateway import config as gateway_config
from gateway.fanout import Federation
from gateway.signing import signer_for
from node.records import HashRecord
from node.store import Store

FEDERATION = "load.icse.test"
KNOWN_SHARE = 0.01
# Nodes enforce per-officer rates and daily item quotas; a load test is one officer
# asking far more than any real one would, so its nodes allow it.
POLICY = "\n[policy]\nrequests_per_minute = 100000000\nitems_per_day = 100000000000\n"
MAX_QUERIES_PER_LEVEL = 1_000_000  # a bound besides time
RSS_SAMPLE_INTERVAL = 0.2


# --------------------------------------------------------------------------- memory


class RssSampler:
    """Samples VmRSS of some processes on a thread; keeps the peak since the last reset."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.peak: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL):
            self.sample()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            rss = status_kb(pid, "VmRSS")
            if rss is not None:
                with self._lock:
                    self.peak[name] = max(self.peak.get(name, 0), rss)

    def take_peak(self) -> dict[str, int]:
        self.sample()
        with self._lock:
            peak, self.peak = self.peak, {}
        return peak


def _loadavg() -> str:
    """The machine's load: other processes share the cores with the nodes and this gateway."""
    one, five, _ = os.getloadavg()
    return f"load average {one:.1f} (1 min) {five:.1f} (5 min)"


def _mib(kb: int | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.0f}"


# --------------------------------------------------------------------------- federation


def _node_ids(count: int) -> list[tuple[str, str]]:
    """(node id, country) pairs: N01/AA, N02/AB, ... (country codes only need the ISO shape)."""
    return [(f"N{i + 1:02d}", chr(65 + i // 26) + chr(65 + i % 26)) for i in range(count)]


async def _fill(node: LocalNode, digests: list[bytes]) -> None:
    node.store_path.parent.mkdir(parents=True, exist_ok=True)
    async with await Store.open(node.store_path) as store:
        batches = ([HashRecord("sha256", d, f"{node.node_id}-{i:08d}", "1")
                    for i, d in enumerate(digests[s:s + 50_000], s)]
                   for s in range(0, len(digests), 50_000))
        await store.add(batches)


def _make_federation(workdir: Path, pki: DevPki, count: int, stored: int,
                     seed: int) -> tuple[LocalFederation, list[bytes]]:
    """Node configs and filled stores (not started). Returns the first node's digests."""
    local = LocalFederation(workdir, pki, [NodeSpec(i, c, f"desk@{i.lower()}.example") for i, c in _node_ids(count)])
    first: list[bytes] = []
    for n, node in enumerate(local.nodes.values()):
        node.write_config()
        with node.config_path.open("a") as handle:
            handle.write(POLICY)
        rng = random.Random(seed + n)
        digests = [rng.randbytes(32) for _ in range(stored)]
        asyncio.run(_fill(node, digests))
        if n == 0:
            first = digests
    return local, first


def _pids(local: LocalFederation) -> dict[str, int]:
    return {node.node_id: node.process.pid for node in local.nodes.values() if node.process is not None}


# --------------------------------------------------------------------------- part 1: load


@dataclass
class Level:
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    node_errors: int = 0
    failed_queries: int = 0
    calls: int = 0
    hits: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    peak_rss: dict[str, int] = field(default_factory=dict)


def _batches(first: list[bytes], size: int, count: int, seed: int) -> list[list[QueryItem]]:
    rng = random.Random(seed)
    known = max(1, int(size * KNOWN_SHARE)) if first else 0
    batches = []
    for _ in range(count):
        items = [QueryItem("sha256", d) for d in rng.sample(first, known)]
        items += [QueryItem("sha256", rng.randbytes(32)) for _ in range(size - known)]
        rng.shuffle(items)
        batches.append(items)
    return batches


def _count_calls(fed: Federation) -> list[int]:
    """Counts RPCs the gateway makes (primary calls, hedges, retries) without changing them."""
    counter = [0]
    original = fed._call

    async def counting(*args, **kwargs):
        counter[0] += 1
        return await original(*args, **kwargs)

    fed._call = counting  # type: ignore[method-assign]
    return counter


async def _run_level(fed: Federation, calls: list[int], batches: list[list[QueryItem]],
                     concurrency: int, duration: float) -> Level:
    level = Level(concurrency)
    calls_before = calls[0]
    end = time.monotonic() + duration
    issued = 0

    async def worker(w: int) -> None:
        nonlocal issued
        n = w
        while time.monotonic() < end and issued < MAX_QUERIES_PER_LEVEL:
            issued += 1
            batch = batches[n % len(batches)]
            n += concurrency
            started = time.perf_counter()
            try:
                answers = await fed.match(batch, f"LOAD-K{concurrency}-{w}-{n}")
            except Exception as exc:  # noqa: BLE001 - counted and reported, the run goes on
                level.failed_queries += 1
                kind = f"exception {type(exc).__name__}"
                level.error_kinds[kind] = level.error_kinds.get(kind, 0) + 1
                continue
            level.latencies.append(time.perf_counter() - started)
            for answer in answers:
                if not answer.status.answered:
                    level.node_errors += 1
                    kind = f"{answer.status.value}: {answer.message[:60]}"
                    level.error_kinds[kind] = level.error_kinds.get(kind, 0) + 1
                else:
                    level.hits += sum(1 for h in answer.hits if h)

    started = time.monotonic()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    level.seconds = time.monotonic() - started
    level.calls = calls[0] - calls_before
    return level


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def load_test(args: argparse.Namespace, workdir: Path, pki: DevPki) -> None:
    print(f"part 1: {args.nodes} nodes x {args.stored:,} stored sha256; batches of {args.batch:,} "
          f"(~{KNOWN_SHARE:.0%} known to N01); {args.duration:.0f} s per level; {os.cpu_count()} cores; "
          f"{_loadavg()}", flush=True)
    started = time.monotonic()
    local, first = _make_federation(workdir / "load", pki, args.nodes, args.stored, seed=100)
    print(f"  stores filled in {time.monotonic() - started:.1f} s", flush=True)
    batches = _batches(first, args.batch, 64, seed=7)
    with local:
        pids = _pids(local)
        config = gateway_config.load(local.write_gateway_config(node_timeout=30.0))
        config = dataclasses.replace(config, deadline=60.0)
        levels: list[Level] = []

        async def run() -> tuple[dict[str, int], dict[str, int]]:
            async with Federation(config, signer_for(config)) as fed:
                calls = _count_calls(fed)
                # Connected, indexes loaded, latency history: like a gateway in service.
                for n in range(8):
                    answers = await fed.match(batches[n], f"LOAD-WARM-{n}")
                    bad = [a for a in answers if not a.status.answered]
                    if bad:
                        raise RuntimeError(f"warm-up failed: {bad[0].node_id} {bad[0].status.value} {bad[0].message}")
                rss_start = {name: status_kb(pid, "VmRSS") or 0 for name, pid in pids.items()}
                with RssSampler(pids) as sampler:
                    for k in args.concurrency:
                        sampler.take_peak()
                        level = await _run_level(fed, calls, batches, k, args.duration)
                        level.peak_rss = sampler.take_peak()
                        levels.append(level)
                        q = len(level.latencies)
                        print(f"  K={k:>3}: {q} queries in {level.seconds:.1f} s", flush=True)
                rss_end = {name: status_kb(pid, "VmRSS") or 0 for name, pid in pids.items()}
                return rss_start, rss_end

        rss_start, rss_end = asyncio.run(run())
        hwm = {name: status_kb(pid, "VmHWM") for name, pid in pids.items()}
        gateway_hwm = status_kb(os.getpid(), "VmHWM")

    print()
    print(f"{'K':>4} {'queries/s':>10} {'digests/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'queries':>8} "
          f"{'node errs':>9} {'failed':>7} {'calls/node/q':>12} {'hits/q':>7}  peak RSS per node (MiB)")
    for level in levels:
        q = len(level.latencies)
        qps = q / level.seconds if level.seconds else 0.0
        per_node_calls = level.calls / (q * args.nodes) if q else float("nan")
        peaks = " ".join(_mib(level.peak_rss.get(n)) for n in pids)
        print(f"{level.concurrency:>4} {qps:>10.1f} {qps * args.batch:>11,.0f} "
              f"{_quantile(level.latencies, 0.5) * 1000:>8.1f} {_quantile(level.latencies, 0.99) * 1000:>8.1f} "
              f"{q:>8} {level.node_errors:>9} {level.failed_queries:>7} {per_node_calls:>12.2f} "
              f"{level.hits / q if q else 0:>7.1f}  {peaks}")
        for kind, count in sorted(level.error_kinds.items(), key=lambda kv: -kv[1])[:5]:
            print(f"       {count:>6} x {kind}")
    print()
    print(f"{'node':>6} {'RSS start MiB':>14} {'RSS end MiB':>12} {'change':>8} {'VmHWM MiB':>10}")
    for name in pids:
        delta = (rss_end[name] - rss_start[name]) / 1024
        print(f"{name:>6} {_mib(rss_start[name]):>14} {_mib(rss_end[name]):>12} {delta:>+8.1f} {_mib(hwm[name]):>10}")
    print(f"gateway (this process) VmHWM: {_mib(gateway_hwm)} MiB")
    print(f"after part 1: {_loadavg()}")
    print("calls/node/q: RPCs per node and query (1.00 = no hedges or retries); "
          "digests/s counts each digest once (it is sent to every node)", flush=True)


# --------------------------------------------------------------------------- part 2: fan-out


def _record_calls(fed: Federation) -> list[tuple[float, float]]:
    """Records (start, end) of every RPC the gateway makes, signing included (perf_counter)."""
    spans: list[tuple[float, float]] = []
    original = fed._call

    async def recording(*args, **kwargs):
        started = time.perf_counter()
        try:
            return await original(*args, **kwargs)
        finally:
            spans.append((started, time.perf_counter()))

    fed._call = recording  # type: ignore[method-assign]
    return spans


def fanout_test(args: argparse.Namespace, workdir: Path, pki: DevPki) -> None:
    count = args.fanout_nodes
    print(f"\npart 2: fan-out overhead at {count} nodes x {args.fanout_stored:,} stored; "
          f"{args.fanout_queries} sequential queries of {args.fanout_batch} digests, "
          f"{args.fanout_pause * 1000:.0f} ms apart; {_loadavg()}", flush=True)
    started = time.monotonic()
    local, first = _make_federation(workdir / "fanout", pki, count, args.fanout_stored, seed=1000)
    # 49 members share these 2 cores with the gateway; in a federation each has
    # its own machine. Lower their CPU priority so the gateway's own cost is
    # what is measured, not its wait for a core.
    for node in local.nodes.values():
        node.prefix = ["nice", "-n", "15"]
    batches = _batches(first, args.fanout_batch, 32, seed=9)
    with local:
        print(f"  {count} nodes filled and started in {time.monotonic() - started:.1f} s", flush=True)
        config = gateway_config.load(local.write_gateway_config(node_timeout=30.0))
        config = dataclasses.replace(config, deadline=60.0)
        rows: list[dict[str, float]] = []
        failures = 0

        async def run() -> None:
            nonlocal failures
            async with Federation(config, signer_for(config)) as fed:
                for n in range(10):
                    answers = await fed.match(batches[n % len(batches)], f"FANOUT-WARM-{n}")
                    bad = [a for a in answers if not a.status.answered]
                    if bad:
                        raise RuntimeError(f"warm-up failed: {bad[0].node_id} {bad[0].status.value} {bad[0].message}")
                spans = _record_calls(fed)
                for n in range(args.fanout_queries):
                    await asyncio.sleep(args.fanout_pause)
                    spans.clear()
                    cpu = time.process_time()
                    begun = time.perf_counter()
                    answers = await fed.match(batches[n % len(batches)], f"FANOUT-{n}")
                    ended = time.perf_counter()
                    cpu = time.process_time() - cpu
                    if not all(a.status.answered for a in answers):
                        failures += 1
                        continue
                    total = (ended - begun) * 1000
                    # A node's own latency: its RPC's round trip (NodeAnswer.latency_ms is
                    # what the gateway waited, start-up of the fan-out included).
                    slowest = max(end - start for start, end in spans) * 1000
                    primaries = sorted(spans)[:count]  # hedges start a p95 later, retries after a failure
                    rows.append({
                        "end-to-end ms": total,
                        "slowest node ms": slowest,
                        "overhead ms": total - slowest,
                        "  last primary call begun after ms": (primaries[-1][0] - begun) * 1000,
                        "  returned after last answer ms": (ended - max(e for _, e in spans)) * 1000,
                        "gateway CPU per query ms": cpu * 1000,
                        "extra calls (hedges, retries)": len(spans) - count,
                    })

        asyncio.run(run())
    print()
    print(f"{'':>32} {'median':>8} {'p90':>8} {'p99':>8}")
    for name in rows[0] if rows else ():
        values = [r[name] for r in rows]
        print(f"{name:>32} {statistics.median(values):>8.2f} {_quantile(values, 0.9):>8.2f} "
              f"{_quantile(values, 0.99):>8.2f}")
    plain = [r["overhead ms"] for r in rows if r["extra calls (hedges, retries)"] == 0]
    if plain:
        print(f"{'overhead ms, queries w/o hedges':>32} {statistics.median(plain):>8.2f} {_quantile(plain, 0.9):>8.2f} "
              f"{_quantile(plain, 0.99):>8.2f}   ({len(plain)} of {len(rows)} queries)")
    # With a hedge the loser's span ends when it is cancelled: those queries understate the overhead.
    overhead = statistics.median(plain) if plain else float("nan")
    verdict = "meets" if overhead < 5.0 else "MISSES"
    print(f"fan-out overhead at {count} nodes (end-to-end minus the slowest node's own RPC round trip, "
          f"queries without hedges): median {overhead:.2f} ms ({verdict} the < 5 ms target); "
          f"{len(rows)} queries measured, {failures} not complete; after part 2: {_loadavg()}", flush=True)


# --------------------------------------------------------------------------- main


def _levels(text: str) -> list[int]:
    levels = [int(part) for part in text.split(",") if part.strip()]
    if not levels or any(k < 1 or k > 256 for k in levels):
        raise argparse.ArgumentTypeError("concurrency levels must be integers between 1 and 256")
    return levels


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--concurrency", type=_levels, default=[1, 4, 16], help="comma-separated, e.g. 1,4,16")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per concurrency level")
    parser.add_argument("--batch", type=int, default=1000, help="digests per query")
    parser.add_argument("--stored", type=int, default=100_000, help="digests stored per node (part 1)")
    parser.add_argument("--fanout-nodes", type=int, default=49)
    parser.add_argument("--fanout-stored", type=int, default=1000)
    parser.add_argument("--fanout-batch", type=int, default=10)
    parser.add_argument("--fanout-queries", type=int, default=200)
    parser.add_argument("--fanout-pause", type=float, default=0.05,
                        help="seconds between fan-out queries, so each one meets settled nodes")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-fanout", action="store_true")
    args = parser.parse_args(argv)
    if not 1 <= args.nodes <= 99 or not 1 <= args.fanout_nodes <= 99:
        parser.error("--nodes and --fanout-nodes must be between 1 and 99")
    if not 0 < args.duration <= 600 or not 1 <= args.batch <= 20_000 or not 1 <= args.fanout_batch <= 20_000:
        parser.error("--duration must be in (0, 600] s and batches between 1 and 20,000 digests")
    if not 0 <= args.fanout_pause <= 10:
        parser.error("--fanout-pause must be between 0 and 10 s")
    if not 1 <= args.fanout_queries <= 100_000:
        parser.error("--fanout-queries must be between 1 and 100,000")

    node_ids = [i for i, _ in _node_ids(max(args.nodes, args.fanout_nodes))]
    try:
        with tempfile.TemporaryDirectory(prefix="icse-load-") as tmp:
            workdir = Path(tmp)
            pki = DevPki(workdir / "pki", FEDERATION, node_ids, ["eu-1"]).create()
            if not args.skip_load:
                load_test(args, workdir, pki)
            if not args.skip_fanout:
                fanout_test(args, workdir, pki)
    except KeyboardInterrupt:
        print("\ninterrupted; every node stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
