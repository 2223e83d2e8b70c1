"""A node at national scale, measured through its command lines: import, restart, latency while the
data changes, exact batches and PDQ batches, each beside its plain reference, in one run.

Builds one node holding --pdq random PDQ hashes and --exact random SHA-256 digests (default
10 M + 10 M), written as one long-format CSV and loaded with ``icse-node import``; starts it with
``icse-node serve --ready-file`` (federation/localfed.py) and asks it over mutual TLS through the
gateway library (no hedging, no circuit breaker: every query reaches the node). Parts (--only):

  import   rows/s of ``icse-node import`` (a child process; its peak RSS from the kernel) vs plain
           SQLite executemany of the same rows, pre-parsed, into a table with primary key
           (algorithm, digest), one transaction, WAL, synchronous=FULL (goal >= 2x)
  restart  seconds from spawning ``serve`` to its ready file, for the first start after the import
           and a restart; the node's VmHWM when ready; VmRSS and VmHWM after the idle queries
  latency  single-item queries (PDQ at distance 31 and exact, alternately, every --pace s, 5 s
           deadline): p50/p99 idle; during an import of --during fresh rows into the serving
           node (and the 5 s after it ends); in the 5 s after a 1-row import (is the new row
           found by the first query?). Queries that were not answered are counted by status.
  exact    batches of --batch SHA-256 digests, 1 % and 50 % known: node over mutual TLS (the median
           of --rounds, after one warm-up batch of the same shape and other digests) vs one
           indexed SQLite SELECT per digest on the plain table (goals >= 5x and >= 2x)
  pdq      one batch of --pdq-batch PDQ queries (half planted near-duplicates) on the node over
           mutual TLS vs faiss (functions of bench_pdq_index.py), with recall of the planted ones

Prints a table, then one JSON line with every figure. Every process it starts is stopped on exit,
on error and on Ctrl-C. The code under test is whatever ``python -m node.cli`` imports: run from
a checkout, or set PYTHONPATH to another one.

    python tests/bench/bench_scale.py [--quick] [--pdq N] [--exact N] [--only import,latency]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parents[1]))  # after PYTHONPATH, so another checkout can be measured
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import numpy as np  # noqa: E402
import scale_support as s  # noqa: E402

from federation.localfed import LocalFederation, NodeSpec  # noqa: E402
from federation.pki import DevPki  # noqa: E402
from federation.query import QueryItem  # noqa: E402
from gateway import config as gateway_config  # noqa: E402
from gateway.fanout import Federation  # noqa: E402
from gateway.health import HealthPolicy  # noqa: E402
from gateway.results import NodeStatus  # noqa: E402
from gateway.signing import signer_for  # noqa: E402

_path = list(sys.path)
import bench_pdq_index as pdq_bench  # noqa: E402  (it puts its own checkout first on sys.path)

sys.path[:] = _path

PARTS = ("import", "restart", "latency", "exact", "pdq")
DISTANCE = pdq_bench.DISTANCE
QUERY_TIMEOUT = 5.0
# One benchmark client asks far more than any officer would: the node allows it.
POLICY = {"requests_per_minute": 100_000_000, "items_per_day": 100_000_000_000}
# Every query goes to the node and is counted: no backup requests, no breaker skipping it.
NO_HEDGING = HealthPolicy(failures_to_open=10**9, samples_for_hedging=10**9)


class Bench:
    """The node under test, its data (regenerated from seeds), and every figure measured."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args, self.workdir = args, workdir
        self.results: dict[str, dict] = {"config": {
            "pdq": args.pdq, "exact": args.exact, "during": args.during, "cores": os.cpu_count(),
            "code": str(Path(sys.modules["federation"].__file__).parents[1])}}
        pki = DevPki(workdir / "pki", "scale.icse.test", ["FR"], ["eu-1"]).create()
        spec = NodeSpec("FR", "FR", "bench@fr.example", tables={"policy": dict(POLICY)})
        self.local = LocalFederation(workdir, pki, [spec])
        self.node = self.local["FR"]
        self.node.write_config()
        # Stored PDQ hashes and planted queries, exactly as bench_pdq_index builds them.
        self.work = pdq_bench._workload(args.pdq, max(args.pdq_batch, args.ref_queries, 2), seed=1)
        self.sha = s.random_digests(args.exact, s.SHA_SEED)
        self.plain = workdir / "plain.sqlite"

    def sources(self) -> list[s.Source]:
        return [s.Source("pdq", self.work.stored, "PDQ"), s.Source("sha256", self.sha, "SHA")]

    # ------------------------------------------------------------------ import

    def build(self) -> None:
        source = self.workdir / "known.csv"
        started = time.perf_counter()
        rows = s.write_csv(source, self.sources())
        print(f"wrote {rows:,} rows ({source.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - started:.1f} s; importing...", flush=True)
        run = s.run_import(self.node.config_path, source, self.workdir / "import.log")
        s.check_added(run, rows)
        source.unlink()
        self.results["import"] = {"rows": rows, "seconds": run.seconds, "rows_per_s": rows / run.seconds,
                                  "peak_rss_kb": run.peak_rss_kb}
        if "import" in self.args.only or "exact" in self.args.only:
            seconds, count = s.plain_insert(self.plain, self.sources())
            self.results["import"].update(sqlite_seconds=seconds, sqlite_rows_per_s=count / seconds,
                                          ratio=seconds / run.seconds)

    # ------------------------------------------------------------------ serving

    def start(self) -> float:
        started = time.monotonic()
        self.local.start(timeout=3600)
        return time.monotonic() - started

    def hwm(self) -> int | None:
        return s.status_kb(self.node.process.pid, "VmHWM")

    def federation(self) -> Federation:
        config = gateway_config.load(self.local.write_gateway_config(node_timeout=QUERY_TIMEOUT))
        return Federation(config, signer_for(config), NO_HEDGING)

    def single_items(self) -> tuple[list[QueryItem], list[QueryItem]]:
        pdq = [QueryItem("pdq", q.tobytes(), DISTANCE) for q in self.work.queries[:200]]
        rng = random.Random(7)
        known = [self.sha[i].tobytes() for i in rng.sample(range(len(self.sha)), min(100, len(self.sha)))]
        unknown = [rng.randbytes(32) for _ in known]
        exact = [QueryItem("sha256", d) for pair in zip(known, unknown, strict=True) for d in pair]
        return pdq, exact

    async def serve_parts(self) -> None:
        only = self.args.only
        restart = self.results.setdefault("restart", {}) if "restart" in only else {}
        first = self.start()
        restart.update(first_start_s=first, first_start_hwm_kb=self.hwm())
        if "restart" in only:
            self.local.stop()
            restart.update(restart_s=self.start(), ready_hwm_kb=self.hwm())
        pdq, exact = self.single_items()
        async with self.federation() as fed:
            idle = await window(fed, pdq, exact, self.args.pace, count=self.args.queries, first=True)
            if "restart" in only:
                restart.update(first_pdq_query_s=idle.pop("first_pdq_s"), steady_queries=self.args.queries,
                               steady_rss_kb=s.status_kb(self.node.process.pid, "VmRSS"), hwm_kb=self.hwm())
            if "latency" in only:
                self.results["latency"] = {"idle": idle}
            if "exact" in only:
                self.results["exact"] = await self.exact_batches(fed)
            if "pdq" in only:
                self.results["pdq"] = await self.pdq_batch(fed)
            if "latency" in only:
                self.results["latency"].update(await self.while_importing(fed, pdq, exact))

    # ------------------------------------------------------------------ latency while data changes

    async def while_importing(self, fed: Federation, pdq: list[QueryItem], exact: list[QueryItem]) -> dict:
        fresh_pdq = s.random_digests(self.args.during // 2, s.FRESH_SEED)
        fresh_sha = s.random_digests(self.args.during - len(fresh_pdq), s.FRESH_SEED + 1)
        large = self.workdir / "fresh.csv"
        s.write_csv(large, [s.Source("pdq", fresh_pdq, "NEWP"), s.Source("sha256", fresh_sha, "NEWS")])
        del fresh_pdq, fresh_sha
        found: dict[str, dict] = {}
        process = s.start_import(self.node.config_path, large, self.workdir / "import-during.log")
        started = time.monotonic()
        try:
            found["during_import"] = await window(fed, pdq, exact, self.args.pace,
                                                  until=lambda: process.poll() is not None)
        finally:
            s.stop_process(process)
        found["during_import"]["import_s"] = time.monotonic() - started
        output = (self.workdir / "import-during.log").read_text(errors="replace")
        if process.returncode != 0 or f"added {self.args.during}," not in output:
            raise RuntimeError(f"the import into the serving node failed (exit {process.returncode}):\n"
                               f"{output[-2000:]}")
        found["after_import_5s"] = await window(fed, pdq, exact, self.args.pace, seconds=5.0)
        one = self.workdir / "one.csv"
        new = s.random_digests(1, s.FRESH_SEED + 2)
        s.write_csv(one, [s.Source("sha256", new, "ONE")])
        s.check_added(s.run_import(self.node.config_path, one, self.workdir / "import-one.log"), 1)
        probe = [QueryItem("sha256", new[0].tobytes()), *exact]
        found["after_one_row_5s"] = await window(fed, pdq, probe, self.args.pace, seconds=5.0, probe=True)
        return found

    # ------------------------------------------------------------------ exact batches

    def exact_batch(self, share: float, seed: int) -> tuple[list[bytes], int]:
        """A batch of --batch SHA-256 digests, ``share`` of them stored, shuffled; how many are stored."""
        rng = random.Random(seed)
        known = [self.sha[i].tobytes() for i in rng.sample(range(len(self.sha)), int(self.args.batch * share))]
        digests = known + [rng.randbytes(32) for _ in range(self.args.batch - len(known))]
        rng.shuffle(digests)
        return digests, len(known)

    async def exact_batches(self, fed: Federation) -> dict:
        figures = {}
        for share in (0.01, 0.5):
            digests, known = self.exact_batch(share, int(share * 100))
            items = [QueryItem("sha256", d) for d in digests]
            # Warm-up: a batch of the same shape, other digests (the timed batch's rows stay unread),
            # so that the rounds measure a serving node, not its first batch of this size.
            warm_up, _ = self.exact_batch(share, 1000 + int(share * 100))
            await fed.match([QueryItem("sha256", d) for d in warm_up], "BENCH-WARMUP", timeout=120, deadline=120)
            times = []
            for _ in range(self.args.rounds):
                started = time.perf_counter()
                (answer,) = await fed.match(items, "BENCH-EXACT", timeout=120, deadline=120)
                times.append(time.perf_counter() - started)
                if not answer.status.answered or sum(1 for h in answer.hits if h) != known:
                    raise RuntimeError(f"exact batch: {answer.status.value} {answer.message!r}, "
                                       f"expected {known} hits")
            lookup, found = s.sqlite_point_lookups(self.plain, "sha256", digests)
            assert found == known, f"SQLite found {found} of {known}"
            node = len(items) / s.median(times)
            figures[f"{share:.0%}"] = {"node_digests_per_s": node, "sqlite_digests_per_s": len(items) / lookup,
                                       "ratio": node * lookup / len(items)}
        return figures

    # ------------------------------------------------------------------ PDQ batches

    async def pdq_batch(self, fed: Federation) -> dict:
        work, count = self.work, self.args.pdq_batch
        items = [QueryItem("pdq", q.tobytes(), DISTANCE) for q in work.queries[:count]]
        await fed.match(items[:8], "BENCH-WARMUP", timeout=60, deadline=60)
        started = time.perf_counter()
        (answer,) = await fed.match(items, "BENCH-PDQ", timeout=300, deadline=300)
        elapsed = time.perf_counter() - started
        if not answer.status.answered:
            raise RuntimeError(f"PDQ batch: {answer.status.value} {answer.message!r}")
        owner, ids, dists = [], [], []
        for n, hits in enumerate(answer.hits):
            for hit in hits:
                if hit.reference.startswith("PDQ-"):
                    owner.append(n)
                    ids.append(work.ids[int(hit.reference[4:])])
                    dists.append(hit.distance)
        found, planted = pdq_bench._found(work, count, np.array(owner, dtype=np.int64),
                                          np.array(ids, dtype=np.int64), np.array(dists, dtype=np.int64))
        figures = {"node": {"queries": count, "per_s": count / elapsed, "recall": found / planted}}
        try:
            import faiss  # noqa: F401, PLC0415  (optional: the faiss reference is skipped without it)
        except ImportError:
            print("faiss is not installed (pip install -e '.[dev]'): no faiss reference", flush=True)
            return figures
        for name, method in (("faiss_mih", pdq_bench._faiss_mih), ("faiss_flat", pdq_bench._faiss_flat)):
            row = method(work, self.args.ref_queries)
            figures[name] = {"queries": row.queries, "per_s": row.per_second, "recall": row.found / row.planted,
                             "build_s": row.build_seconds}
        return figures


async def window(fed: Federation, pdq: list[QueryItem], exact: list[QueryItem], pace: float, *,
                 count: int | None = None, seconds: float | None = None, until=None,
                 first: bool = False, probe: bool = False) -> dict:
    """Single-item queries, PDQ and exact in turn, one every ``pace`` seconds, until ``count``
    were asked, ``seconds`` passed or ``until()`` holds. Unanswered ones are counted by status.
    With ``first``, the first (PDQ) query is timed apart: it may pay the kernel's compilation."""
    latencies: dict[str, list[float]] = {"pdq": [], "exact": []}
    statuses: dict[str, int] = {}
    figures: dict = {}
    asked, ends = 0, None if seconds is None else time.monotonic() + seconds
    while True:
        if (count is not None and asked >= count) or (ends is not None and time.monotonic() >= ends) \
                or (until is not None and until()):
            break
        kind = "exact" if (asked % 2 == 1 or (probe and asked == 0)) else "pdq"
        items = exact if kind == "exact" else pdq
        item = items[(asked // 2) % len(items)] if not (probe and asked == 0) else items[0]
        started = time.perf_counter()
        (answer,) = await fed.match([item], f"BENCH-{asked}", timeout=QUERY_TIMEOUT, deadline=QUERY_TIMEOUT)
        elapsed = time.perf_counter() - started
        if first and asked == 0:
            figures["first_pdq_s"] = elapsed  # a warm-up, reported apart from the percentiles
        elif answer.status.answered:
            latencies[kind].append(elapsed)
        else:
            statuses[answer.status.value] = statuses.get(answer.status.value, 0) + 1
            figures.setdefault("first_error", f"{answer.status.value}: {answer.message[:200]}")
        if probe and asked == 0:
            figures["new_row_found_first_query"] = answer.status.answered and bool(answer.hits[0])
        asked += 1
        await asyncio.sleep(pace)
    for kind, values in latencies.items():
        figures[f"{kind}_p50_s"] = s.percentile(values, 0.5)
        figures[f"{kind}_p99_s"] = s.percentile(values, 0.99)
    figures.update(queries=asked, failed=sum(statuses.values()),
                   timed_out=statuses.get(NodeStatus.TIMED_OUT.value, 0), failures=statuses)
    return figures


# ---------------------------------------------------------------------- report


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f}"


def _x(value: float | None, goal: float | None = None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}x" + ("" if goal is None else f" (goal >= {goal:g}x: {'met' if value >= goal else 'NOT met'})")


def report(results: dict) -> None:
    """The figures as a readable table (the JSON line that follows holds the same and more)."""
    c = results["config"]
    print(f"\nnode with {c['pdq']:,} PDQ + {c['exact']:,} SHA-256 hashes; {c['cores']} cores; code {c['code']}")
    if imp := results.get("import"):
        print(f"import  icse-node import          {_rate(imp['rows_per_s']):>12} rows/s  {imp['seconds']:8.1f} s  "
              f"peak RSS {s.mib(imp['peak_rss_kb'])}")
        if "sqlite_rows_per_s" in imp:
            print(f"        plain SQLite executemany  {_rate(imp['sqlite_rows_per_s']):>12} rows/s  "
                  f"{imp['sqlite_seconds']:8.1f} s")
            print(f"        import / plain            {_x(imp['ratio'], 2)}")
    if (r := results.get("restart")) and "restart_s" in r:
        print(f"restart first start after import  {r['first_start_s']:8.2f} s   VmHWM at ready "
              f"{s.mib(r['first_start_hwm_kb'])}")
        print(f"        restart to ready          {r['restart_s']:8.2f} s   VmHWM at ready {s.mib(r['ready_hwm_kb'])}")
        print(f"        after {r['steady_queries']} queries          VmRSS {s.mib(r['steady_rss_kb'])}  "
              f"VmHWM {s.mib(r['hwm_kb'])}  peak/steady {_x(s.ratio(r['hwm_kb'], r['steady_rss_kb']), None)}")
        print(f"        first PDQ query           {s.ms(r['first_pdq_query_s'])}")
    if lat := results.get("latency"):
        print(f"latency {'window':<22}{'queries':>8}{'failed':>8}{'timeout':>8}"
              f"{'PDQ p50':>11}{'PDQ p99':>11}{'exact p50':>11}{'exact p99':>11}")
        for name, w in lat.items():
            print(f"        {name:<22}{w['queries']:>8}{w['failed']:>8}{w['timed_out']:>8}"
                  f"{s.ms(w['pdq_p50_s']):>11}{s.ms(w['pdq_p99_s']):>11}"
                  f"{s.ms(w['exact_p50_s']):>11}{s.ms(w['exact_p99_s']):>11}")
        for name, w in lat.items():
            if "first_error" in w:
                print(f"        {name}: first failure {w['first_error']}")
        if (d := lat.get("during_import")) and (i := lat.get("idle")) and d["pdq_p50_s"] and i["pdq_p50_s"]:
            print(f"        during import / idle p50: PDQ {_x(d['pdq_p50_s'] / i['pdq_p50_s'])}, exact "
                  f"{_x(s.ratio(d['exact_p50_s'], i['exact_p50_s']))} (goal <= 2x); import took "
                  f"{d['import_s']:.1f} s")
        if (o := lat.get("after_one_row_5s")) is not None:
            print(f"        1-row import: new row found by the first query: {o.get('new_row_found_first_query')}")
    if ex := results.get("exact"):
        print(f"exact   {'known':<8}{'node mTLS digests/s':>22}{'SQLite lookups/s':>20}  ratio")
        for share, e in ex.items():
            goal = 5 if share == "1%" else 2
            print(f"        {share:<8}{_rate(e['node_digests_per_s']):>22}{_rate(e['sqlite_digests_per_s']):>20}"
                  f"  {_x(e['ratio'], goal)}")
    if pdq := results.get("pdq"):
        print(f"pdq     {'method':<24}{'queries':>8}{'queries/s':>12}  recall (planted)")
        for name, p in pdq.items():
            print(f"        {name:<24}{p['queries']:>8,}{_rate(p['per_s']):>12}  {p['recall']:.1%}")
        if "faiss_mih" in pdq:
            print(f"        node / faiss MIH {_x(pdq['node']['per_s'] / pdq['faiss_mih']['per_s'])}  "
                  f"node / faiss flat {_x(pdq['node']['per_s'] / pdq['faiss_flat']['per_s'])}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pdq", type=int, help="stored PDQ hashes (default 10,000,000)")
    parser.add_argument("--exact", type=int, help="stored SHA-256 digests (default 10,000,000)")
    parser.add_argument("--during", type=int, help="fresh rows imported into the serving node (default 2,000,000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200,000 + 200,000, smaller batches")
    parser.add_argument("--only", default=",".join(PARTS), help=f"parts to run, of {','.join(PARTS)}")
    parser.add_argument("--queries", type=int, help="idle single queries (default 200)")
    parser.add_argument("--pace", type=float, default=0.1, help="seconds between single queries")
    parser.add_argument("--batch", type=int, default=10_000, help="digests per exact batch")
    parser.add_argument("--pdq-batch", type=int, help="PDQ queries in the node's batch (default 10,000)")
    parser.add_argument("--ref-queries", type=int, help="queries timed for faiss (default 2,000)")
    parser.add_argument("--rounds", type=int, default=3, help="exact batches timed (the median is kept)")
    parser.add_argument("--workdir", type=Path, help="where to put the run's directory (default: the system's temp)")
    parser.add_argument("--keep", action="store_true", help="keep the run's directory (stores, logs)")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, through the finally blocks that stop every child.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    quick = args.quick
    for name, full, small in (("pdq", 10_000_000, 200_000), ("exact", 10_000_000, 200_000),
                              ("during", 2_000_000, 100_000), ("queries", 200, 60),
                              ("pdq_batch", 10_000, 2_000), ("ref_queries", 2_000, 500)):
        if getattr(args, name) is None:
            setattr(args, name, small if quick else full)
    args.only = {p.strip() for p in args.only.split(",") if p.strip()}
    if unknown := args.only - set(PARTS):
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; parts are {', '.join(PARTS)}")
    if min(args.pdq, args.exact) < 1000 or args.during < 2:
        parser.error("--pdq and --exact must be at least 1000, --during at least 2")

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.workdir)).resolve()
    os.chdir(workdir)  # `python -m node.cli` children import the code under test, not this directory's
    bench = None
    try:
        bench = Bench(args, workdir)
        bench.build()
        if args.only & {"restart", "latency", "exact", "pdq"}:
            try:
                asyncio.run(bench.serve_parts())
            finally:
                bench.local.stop()
        report(bench.results)
        print(json.dumps(bench.results, sort_keys=True))
    finally:
        if bench is not None:
            bench.local.stop()
        if args.keep:
            print(f"kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
