"""Private vs ordinary exact matching, side by side in one run, against one real node.

A node holding --stored random SHA-256 digests (default 1 M; ``--stored 10000000`` for 10 M),
imported with ``icse-node import`` (which computes each digest's OPRF output) and served over
mutual TLS with private exact matching on (``[private] enabled``, --prefix-bits, default 16).
The same --batch digests (default 10,000; --known share held by the node) are asked, --rounds
times each, through the gateway library (no hedging, no breaker):

  ordinary  plain Match: the node sees every digest
  private   PrivateMatch (bucket prefix + blinded element per item), then Disclose for the local
            hits: the node never sees a digest, and learns a hit only when it is disclosed

Per mode: median latency of the whole batch (as the investigator waits: gateway blinding and
unblinding included), node CPU per item (user + system time of the node process from
/proc/PID/stat, before and after the rounds), and bytes on the wire per item (serialized
request and response messages of every call, summed). Then the anonymity set per prefix length
(8..24 bits): how many stored digests share an item's bucket (mean, smallest and largest bucket
over the stored set), and what a bucket costs on the wire at the node's output width.

    python tests/bench/bench_private.py [--stored N] [--batch N] [--known SHARE] [--rounds N]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.append(str(HERE.parents[1]))
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import numpy as np  # noqa: E402
import scale_support as s  # noqa: E402

from federation import buckets, oprf  # noqa: E402
from federation.localfed import LocalFederation, NodeSpec  # noqa: E402
from federation.pki import DevPki  # noqa: E402
from federation.query import QueryItem  # noqa: E402
from gateway import config as gateway_config, private  # noqa: E402
from gateway.config import PrivateMode  # noqa: E402
from gateway.fanout import Attempt, Federation, Strategy, ordinary  # noqa: E402
from gateway.health import HealthPolicy  # noqa: E402
from gateway.results import NodeAnswer  # noqa: E402
from gateway.signing import signer_for  # noqa: E402

POLICY = {"requests_per_minute": 100_000_000, "items_per_day": 100_000_000_000}
NO_HEDGING = HealthPolicy(failures_to_open=10**9, samples_for_hedging=10**9)
TIMEOUT = 600.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Wire:
    """Serialized bytes of every request and response message, and calls, by method."""

    sent: int = 0
    received: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    # Seconds spent waiting for each method's answers (the node's work and the network).
    waited: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.sent + self.received


class _CountingStub:
    """A node stub whose every call adds its messages' serialized sizes to a :class:`Wire`."""

    def __init__(self, stub: Any, wire: Wire):
        self._stub, self._wire = stub, wire

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._stub, name)

        async def call(request: Any, **kwargs: Any) -> Any:
            self._wire.sent += request.ByteSize()
            started = time.perf_counter()
            response = await method(request, **kwargs)
            self._wire.waited[name] = self._wire.waited.get(name, 0.0) + time.perf_counter() - started
            self._wire.received += response.ByteSize()
            self._wire.calls[name] = self._wire.calls.get(name, 0) + 1
            return response
        return call


@dataclass
class Mode:
    name: str
    latencies: list[float] = field(default_factory=list)
    node_cpu: float = 0.0
    gateway_cpu: float = 0.0
    wire: Wire = field(default_factory=Wire)
    hits: int = 0


def counted(strategy: Strategy, mode: Mode) -> Strategy:
    """``strategy`` with every call's bytes added to ``mode.wire`` (as it is at the time of the call)."""
    async def ask(attempt: Attempt) -> NodeAnswer:
        return await strategy(replace(attempt, stub=_CountingStub(attempt.stub, mode.wire)))  # type: ignore[arg-type]
    return ask


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (``/proc/PID/stat`` fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def measure(local: LocalFederation, mode: Mode, strategy: Strategy, items: list[QueryItem],
                  rounds: int) -> private.Offer | None:
    """``rounds`` batches asked with ``strategy``; returns the node's private offer (from its Describe)."""
    config = gateway_config.load(local.write_gateway_config(node_timeout=120))
    config = replace(config, node_timeout=TIMEOUT, deadline=TIMEOUT)
    pid = local["FR"].process.pid  # type: ignore[union-attr]
    async with Federation(config, signer_for(config), NO_HEDGING, strategy=counted(strategy, mode)) as fed:
        (described,) = await fed.describe()
        # Warm-up (and, for private mode, the Describe that learns the node's offer): not measured.
        await fed.match(items[:10], "BENCH-WARMUP", timeout=TIMEOUT, deadline=TIMEOUT)
        mode.wire = Wire()
        before, gateway_before = cpu_seconds(pid), time.process_time()
        for _ in range(rounds):
            started = time.perf_counter()
            (answer,) = await fed.match(items, "BENCH-1", timeout=TIMEOUT, deadline=TIMEOUT)
            mode.latencies.append(time.perf_counter() - started)
            if not answer.status.answered:
                raise RuntimeError(f"{mode.name}: node did not answer: {answer.status.value} {answer.message}")
            mode.hits = sum(1 for h in answer.hits if h)
        mode.node_cpu = cpu_seconds(pid) - before
        mode.gateway_cpu = time.process_time() - gateway_before
    return private.offer_of(described.description) if described.description else None


def bucket_table(stored: np.ndarray) -> list[tuple[int, float, int, int]]:
    """Per prefix length 8..24: (bits, mean, smallest, largest bucket)."""
    # One bucket hash per stored digest (oprf.bucket_of's 32 bits), then every prefix length from it.
    tops = np.fromiter((int.from_bytes(hashlib.sha256(oprf.BUCKET_TAG + b"sha256\x00" + row.tobytes()).digest()[:4],
                                       "big") for row in stored), dtype=np.uint64, count=len(stored))
    table = []
    for bits in range(8, 25, 2):
        sizes = np.bincount((tops >> np.uint64(32 - bits)).astype(np.int64), minlength=1 << bits)
        mean = len(stored) / (1 << bits)
        table.append((bits, mean, int(sizes.min()), int(sizes.max())))
    return table


def print_anonymity(stored: np.ndarray) -> None:
    """The anonymity set per prefix length over ``stored``, and a bucket answer's bytes per item
    (per the encoding's definition, for the bucket of mean size) in the node's encodings."""
    print(f"\nanonymity set per prefix length (stored digests per bucket, of {len(stored):,}), and bucket answer "
          "bytes: fixed 4-byte outputs / Elias-Fano with 24-bit fingerprints / Elias-Fano as the node chooses "
          "(false candidates at most 2^-11 per item: bits, bytes)")
    print(f"  {'bits':>4} {'mean':>12} {'smallest':>9} {'largest':>9} {'fixed 4 B':>10} {'EF 24':>8} "
          f"{'EF auto':>8} {'bytes':>8}")
    for bits, mean, smallest, largest in bucket_table(stored):
        auto = buckets.choose_bits(mean, 11)
        sizes = [private.answer_bytes(mean, buckets.FIXED, 32), private.answer_bytes(mean, buckets.ELIAS_FANO, 24),
                 auto, private.answer_bytes(mean, buckets.ELIAS_FANO, auto)]
        print(f"  {bits:>4} {mean:>12,.1f} {smallest:>9,} {largest:>9,} " + " ".join(
            f"{size:>{w},.0f}" for size, w in zip(sizes, (10, 8, 8, 8), strict=True)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stored", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--known", type=float, default=0.01, help="share of the batch the node holds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefix-bits", type=int, default=16)
    parser.add_argument("--encoding", choices=["fixed", "elias-fano"], default="elias-fano",
                        help="the node's bucket encoding (default: elias-fano, the node's default)")
    parser.add_argument("--output-bytes", type=int, default=4, help="fixed encoding: bytes per output")
    parser.add_argument("--fingerprint-bits", type=int, default=0,
                        help="Elias-Fano: bits per fingerprint (default 0: the node chooses from its bucket size)")
    parser.add_argument("--anonymity-only", action="store_true",
                        help="only the anonymity table for --stored digests (no node, no import: seconds)")
    args = parser.parse_args()

    stored = s.random_digests(args.stored, s.SHA_SEED)
    if args.anonymity_only:
        print_anonymity(stored)
        return 0
    rng = np.random.default_rng(5)
    known = stored[rng.choice(len(stored), int(args.batch * args.known), replace=False)]
    fresh = s.random_digests(args.batch - len(known), s.FRESH_SEED)
    digests = [d.tobytes() for d in np.concatenate([known, fresh])]
    random.Random(5).shuffle(digests)
    items = [QueryItem("sha256", d) for d in digests]

    with tempfile.TemporaryDirectory(prefix="icse-bench-private-") as tmp:
        workdir = Path(tmp)
        pki = DevPki(workdir / "pki", "bench.icse.test", ["FR"], ["eu-1"]).create()
        spec = NodeSpec("FR", "FR", "bench@fr.example", tables={
            "policy": dict(POLICY), "private": {
                "enabled": True, "prefix_bits": args.prefix_bits, "encoding": args.encoding,
                "output_bytes": args.output_bytes, "fingerprint_bits": args.fingerprint_bits}})
        local = LocalFederation(workdir, pki, [spec])
        local["FR"].write_config()
        # The key first, so that the import computes every stored digest's output.
        done = subprocess.run(local["FR"].node_command("private-key", "init", "--config",
                                                       str(local["FR"].config_path)),
                              capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"icse-node private-key init failed: {done.stdout}{done.stderr}")
        source = workdir / "stored.csv"
        s.write_csv(source, [s.Source("sha256", stored, "SHA")])
        print(f"importing {args.stored:,} digests (OPRF outputs computed at import)...", flush=True)
        run = s.run_import(local["FR"].config_path, source, workdir / "import.log")
        s.check_added(run, args.stored)
        source.unlink()
        modes = {"ordinary": Mode("ordinary"), "private": Mode("private")}
        with local:
            asyncio.run(measure(local, modes["ordinary"], ordinary, items, args.rounds))
            offer = asyncio.run(measure(local, modes["private"], private.Chooser(PrivateMode.ALWAYS), items,
                                        args.rounds))
        if offer is None:
            raise RuntimeError("the node does not offer private exact matching")
    for mode in modes.values():
        if mode.hits != len(known):
            raise RuntimeError(f"{mode.name} found {mode.hits} of {len(known)} held digests")

    per_item = args.batch * args.rounds
    print(f"\nexact matching, private vs ordinary: a batch of {args.batch:,} sha256 digests ({len(known):,} held) "
          f"against {args.stored:,} stored; {args.rounds} rounds; prefix {args.prefix_bits} bits; buckets "
          f"{args.encoding}, {offer.fingerprint_bits}-bit fingerprints; "
          f"import {run.seconds:.0f} s ({args.stored / run.seconds:,.0f} rows/s); {os.cpu_count()} cores")
    print(f"  {'':<34}{'ordinary':>14}{'private':>14}{'ratio':>9}")
    rows = [
        ("latency per batch (median)", lambda m: statistics.median(m.latencies) * 1000, "{:,.0f} ms"),
        ("digests/s (whole query)", lambda m: args.batch / statistics.median(m.latencies), "{:,.0f}"),
        ("node CPU per item", lambda m: m.node_cpu / per_item * 1e6, "{:,.1f} µs"),
        ("digests/s per node core", lambda m: per_item / m.node_cpu if m.node_cpu else float("inf"), "{:,.0f}"),
        ("gateway CPU per item", lambda m: m.gateway_cpu / per_item * 1e6, "{:,.1f} µs"),
        ("bytes on the wire per item", lambda m: m.wire.total / per_item, "{:,.1f} B"),
        ("  of which sent", lambda m: m.wire.sent / per_item, "{:,.1f} B"),
        ("  of which received", lambda m: m.wire.received / per_item, "{:,.1f} B"),
    ]
    for title, value, form in rows:
        ordinary_value, private_value = value(modes["ordinary"]), value(modes["private"])
        share = private_value / ordinary_value if ordinary_value else float("nan")
        print(f"  {title:<34}{form.format(ordinary_value):>14}{form.format(private_value):>14}{share:>8.1f}x")
    for mode in modes.values():
        calls = ", ".join(f"{name} x{count // args.rounds} ({mode.wire.waited[name] / args.rounds * 1000:,.0f} ms)"
                          for name, count in sorted(mode.wire.calls.items()))
        print(f"  {mode.name} calls per batch (time waiting for the node): {calls}")
    print_anonymity(stored)
    return 0


if __name__ == "__main__":
    sys.exit(main())
