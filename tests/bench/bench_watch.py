"""Standing queries: alert latency after an import, and what a re-ask costs a node.

Two real node processes over mutual TLS — FR holding ``--small`` rows, NL
``--large`` rows — and a real ``icse-gateway watch run`` process watching
``--cases`` open cases of ``--digests`` digests each. Then, for each node and
each import size, one import lands a set of fresh rows holding one case's
digest, and the bench measures:

  - the time from the end of the import to the alert in the gateway's
    JSON-lines feed (it includes the wait for the next round: ``--interval``,
    and the case's place in the round's order), and how long the round that
    re-asked every case took (the bound on any case's alert, past the interval);
  - what the node searched for that generation change, from its own audit:
    rows searched per re-ask (the import's rows, whatever the store's size),
    and re-asks received (one per case: the items re-asked are the cases'
    digests, searched against the new rows only);
  - that the other node was not asked at all.

Run with ``make bench-watch`` or ``python tests/bench/bench_watch.py [--cases N] [--digests N]
[--small N] [--large N] [--imports 1000,10000] [--interval S]``; defaults take a few minutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from federation.localfed import LocalFederation, NodeSpec, environment
from federation.pki import DevPki
from federation.query import QueryItem
from gateway.watch_store import CaseStore, Watched
from node.audit import audit_path
from node.records import HashRecord
from node.store import Store
from tests.support import wait_until


def _rows(digests: list[bytes], prefix: str) -> list[list[HashRecord]]:
    records = [HashRecord("sha256", d, f"{prefix}-{i:08d}", "1") for i, d in enumerate(digests)]
    return [records[s:s + 50_000] for s in range(0, len(records), 50_000)]


async def _import(path: Path, digests: list[bytes], prefix: str) -> None:
    async with await Store.open(path) as store:
        await store.add(_rows(digests, prefix))


def _audit(path: Path, since: int) -> list[dict]:
    with sqlite3.connect(f"file:{audit_path(path)}?mode=ro", uri=True) as db:
        entries = [json.loads(row[0]) for row in db.execute("SELECT entry FROM audit ORDER BY seq")]
    return [e for e in entries if e["rpc"] == "Match" and e["since_generation"] == since and e["status"] == "OK"]


def _matches(path: Path) -> int:
    with sqlite3.connect(f"file:{audit_path(path)}?mode=ro", uri=True) as db:
        return db.execute("SELECT count(*) FROM audit WHERE entry LIKE '%\"rpc\":\"Match\"%'").fetchone()[0]


def _rounds(log: Path) -> list[dict]:
    """The ``round done`` records of watch run's JSON log."""
    return [json.loads(line) for line in log.read_text().splitlines() if '"round done"' in line]


def _alerted(feed: Path, reference: str) -> bool:
    return feed.exists() and f'"reference":"{reference}"' in feed.read_text()


def _one_import(local: LocalFederation, node_id: str, other: str, rows: int, size: int, digest: bytes,
                reference: str, feed: Path, log: Path, cases: int, rng: random.Random) -> str:
    """Imports ``size`` rows (one of them a watched digest) into a running node; the table line."""
    path = local[node_id].store_path
    other_before = _matches(local[other].store_path)
    before = asyncio.run(_generation(path))
    rounds = len(_rounds(log))
    records = [HashRecord("sha256", digest, reference, "1")]
    records += [HashRecord("sha256", rng.randbytes(32), f"{reference}-{i}", "1") for i in range(1, size)]
    asyncio.run(_add(path, records))
    ended = time.perf_counter()
    wait_until(lambda: _alerted(feed, reference), 600, f"the alert of {reference}")
    latency = time.perf_counter() - ended
    wait_until(lambda: any(r["queries"] for r in _rounds(log)[rounds:]), 600, "the round that re-asked every case")
    round_s = next(r for r in _rounds(log)[rounds:] if r["queries"])["ms"] / 1000
    reasks = _audit(path, before)
    searched = statistics.median(e["rows_searched"] for e in reasks)
    items = sum(e["items"] for e in reasks)
    asked_other = _matches(local[other].store_path) - other_before
    return (f"{node_id:>4} {rows:>11,} {size:>8,} {latency:>12.1f} s {round_s:>10.1f} s {len(reasks):>8,} "
            f"{items:>15,} {searched:>21,.0f} {asked_other:>17}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--digests", type=int, default=1000, help="digests per case")
    parser.add_argument("--small", type=int, default=100_000, help="rows FR holds")
    parser.add_argument("--large", type=int, default=1_000_000, help="rows NL holds")
    parser.add_argument("--imports", default="1000,10000", help="import sizes, comma-separated")
    parser.add_argument("--interval", type=float, default=2.0, help="watch run --interval (seconds)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.imports.split(",")]
    rng = random.Random(13)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        pki = DevPki(workdir / "pki", "bench.icse.test", ["FR", "NL"], ["eu-1"]).create()
        # A node's default policy (600 requests a minute, 1,000,000 items a day per officer) is sized for
        # people: every generation change costs a standing-query service one request per case.
        policy = {"policy": {"requests_per_minute": 1_000_000, "items_per_day": 1_000_000_000}}
        local = LocalFederation(workdir, pki, [NodeSpec("FR", "FR", "desk@fr", tables=policy),
                                               NodeSpec("NL", "NL", "desk@nl", tables=policy)])
        started = time.perf_counter()
        for node_id, count in (("FR", args.small), ("NL", args.large)):
            local[node_id].store_path.parent.mkdir(parents=True)
            asyncio.run(_import(local[node_id].store_path, [rng.randbytes(32) for _ in range(count)], f"{node_id}-OLD"))
        print(f"stores filled: FR {args.small:,} rows, NL {args.large:,} rows ({time.perf_counter() - started:.1f} s)")
        cases = [(f"CASE-{c:05d}", [Watched(QueryItem("sha256", rng.randbytes(32)), "bench")
                                    for _ in range(args.digests)]) for c in range(args.cases)]
        with CaseStore(workdir / "watch-cases.sqlite") as store:
            started = time.perf_counter()
            store.add_many(cases)
            took = time.perf_counter() - started
            print(f"case store: {args.cases:,} cases x {args.digests:,} digests ({took:.1f} s)")
        feed, log = workdir / "watch-alerts.jsonl", workdir / "watch.log"
        with local:
            config = local.write_gateway_config()  # the nodes' ports are known once they run
            with config.open("a") as handle:
                handle.write(f"[watch]\ninterval = {max(1.0, args.interval)}\n")
            with log.open("ab") as sink:
                watcher = subprocess.Popen(
                    [sys.executable, "-m", "gateway.cli", "watch", "run", "--config", str(config),
                     "--interval", str(args.interval), "--log-format", "json"],
                    stdout=sink, stderr=sink, env=environment())
            try:
                started = time.perf_counter()
                wait_until(lambda: any(r["queries"] and not r["failures"] for r in _rounds(log)), 1800,
                      "the first, complete round")
                print(f"first round (every case asked everywhere, since 0): {time.perf_counter() - started:.1f} s "
                      f"(includes the process start)")
                print()
                print(f"{'node':>4} {'store rows':>11} {'import':>8} {'alert after':>14} {'re-ask round':>12} "
                      f"{'re-asks':>8} {'items re-asked':>15} {'rows searched/re-ask':>21} {'other node asked':>17}")
                n = 0
                for node_id, other, held in (("FR", "NL", args.small), ("NL", "FR", args.large)):
                    rows = held
                    for size in sizes:
                        # The watched case sits anywhere in a round's order: its alert comes that far in.
                        digest = cases[(n * 389 + 500) % len(cases)][1][args.digests // 2].item.digest
                        n += 1
                        print(_one_import(local, node_id, other, rows, size, digest, f"{node_id}-NEW-{n}", feed,
                                          log, args.cases, rng), flush=True)
                        rows += size
            except BaseException:
                tail = "\n".join(log.read_text().splitlines()[-15:])
                print(f"watch run's log, last lines:\n{tail}", file=sys.stderr)
                raise
            finally:
                watcher.send_signal(signal.SIGTERM)
                watcher.wait(timeout=60)
        rounds = _rounds(log)
        if rounds:
            print()
            print("round durations (ms, rounds that re-asked a node): "
                  + ", ".join(f"{r['ms']:.0f}" for r in rounds if r.get("queries")))
    return 0


async def _generation(path: Path) -> int:
    async with await Store.open(path) as store:
        return await store.generation()


async def _add(path: Path, records: list[HashRecord]) -> None:
    async with await Store.open(path) as store:
        await store.add([records])


if __name__ == "__main__":
    sys.exit(main())
