"""``icse-gateway``: ask every country at once whether files are already known."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from rich.console import Console

from federation import grpcenv  # noqa: F401  (first: quiets gRPC's C-core logs before grpc loads)

# isort: split
from federation import algorithms, logs
from federation.config import ConfigError
from federation.query import QueryItem
from federation.wire import pb
from gateway import config as gateway_config, filehash, interrupt, private, selfcheck, watch_cli
from gateway.config import PrivateMode
from gateway.fanout import Federation
from gateway.merge import merge
from gateway.results import NodeStatus, Skipped, Subject
from gateway.signing import Signer, signer_for
from gateway.textsafe import cell
from gateway.triage import DEFAULT_BATCH, MAX_BATCH
from gateway.triage.command import TriageOptions, command as triage_command

if TYPE_CHECKING:
    from rich.text import Text

# Imported where they are used, not here: rich's tables (gateway.render), the metrics
# (prometheus_client). A triage, the command run most, uses neither, and an
# investigator waits for every import at every start.

EXIT_HIT, EXIT_NO_HIT, EXIT_ERROR = 0, 1, 2
MAX_CASE = 128

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _console() -> Console:
    """Full-width tables also when the output goes to a file or a pipe: 160 columns, or COLUMNS if wider."""
    if sys.stdout.isatty():
        return Console()
    columns = os.environ.get("COLUMNS", "")
    return Console(width=max(160, int(columns) if columns.isdigit() else 0))


class UsageError(ValueError):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icse-gateway",
        description="Query the federation: files are hashed here and only their digests are "
        "sent, signed, to every member country's node over mutual TLS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    query = sub.add_parser(
        "query",
        help="ask every node whether digests or files are known",
        description="Ask every node of the federation whether the given digests or files are known.",
        epilog="Exit status: 0 at least one hit; 1 no hit and every node answered; "
        "2 error, or no hit while some node did not answer (the answer is partial).",
    )
    query.add_argument("--config", type=Path, required=True, help="federation configuration (TOML)")
    query.add_argument("--case", required=True, help="case or purpose reference (required; goes into every node's log)")
    query.add_argument("--hash", action="append", default=[], metavar="ALGO:HEX",
                       help=f"a digest to look up; repeatable. Algorithms: {', '.join(algorithms.names())}")
    query.add_argument("--file", action="append", default=[], type=Path, metavar="PATH",
                       help="a file to hash locally and look up (exact digests; PDQ for images, "
                       "frame hashes for videos); repeatable")
    query.add_argument("--dihedral", action="store_true",
                       help="also look up images' 7 rotations and flips (PDQ)")
    query.add_argument("--max-distance", type=int, default=0, metavar="N",
                       help="largest Hamming distance for perceptual matches "
                       "(default: 31; each node caps it at its own maximum)")
    query.add_argument("--format", choices=["table", "json"], default="table")
    query.add_argument("--timeout", type=float, help="per-node deadline in seconds (default: from config)")
    query.add_argument("--deadline", type=float,
                       help="overall deadline of the query in seconds (default: from config)")
    query.add_argument("--officer", help="requesting officer id (default: from config)")
    query.add_argument("--metrics-file", type=Path, metavar="PATH",
                       help="write Prometheus metrics of this query here (textfile collector format)")
    privacy = query.add_mutually_exclusive_group()
    privacy.add_argument("--private", dest="private", action="store_const", const=PrivateMode.ALWAYS,
                         help="exact digests (MD5, SHA-1, SHA-256) only by private matching: a node sees a "
                         "blinded value and a short bucket prefix, never the digest; a node that does not offer "
                         "it is not asked. Default: private with every node that offers it (PDQ and video "
                         "hashes always go in clear)")
    privacy.add_argument("--no-private", dest="private", action="store_const", const=PrivateMode.NEVER,
                         help="exact digests in clear to every node (plain Match)")
    tri = query.add_argument_group(
        "directory triage", "--dir hashes every file of a tree here, in parallel, and asks in batches "
        "(--timeout and --deadline apply to each batch); stdout then summarises, one row per file goes to the "
        "reports. Exit status 2 also when no file is known and some file could not be read, or there was none.")
    tri.add_argument("--dir", type=Path, metavar="PATH", action="append", default=[],
                     help="hash every file under PATH (symlinks are not followed out of it, special files not read); "
                     "repeatable")
    tri.add_argument("--from-list", metavar="FILE",
                     help="also hash the paths listed in FILE, one a line ('-': stdin); a listed directory is walked")
    tri.add_argument("--hashes", metavar="FILE",
                     help="also look up the digests listed in FILE ('-': stdin): hashdeep or md5deep/sha256sum "
                     "output, ALGO:HEX lines, or a CSV with md5/sha1/sha256 columns")
    tri.add_argument("--jobs", type=int, metavar="N", help="hashing processes (default: number of CPUs)")
    tri.add_argument("--batch", type=int, metavar="N",
                     help=f"hashes per request to the nodes (default: {DEFAULT_BATCH:,}; at most "
                     f"{MAX_BATCH:,})")
    tri.add_argument("--jsonl", type=Path, metavar="OUT", help="write one JSON line per file")
    tri.add_argument("--csv", type=Path, metavar="OUT", help="write one CSV row per file")
    tri.add_argument("--html", type=Path, metavar="OUT",
                     help="write a self-contained HTML report (summary and sortable table of files)")
    tri.add_argument("--cache", type=Path, metavar="FILE",
                     help="hash cache for resuming, keyed by path, size and mtime "
                     "(default: $XDG_CACHE_HOME/icse-gateway/triage-cache.sqlite)")
    tri.add_argument("--no-cache", action="store_true", help="neither read nor write the hash cache")
    tri.add_argument("--file-timeout", type=float, metavar="S",
                     help="seconds one file may take to decode and hash (default: 30); a file over it keeps its "
                     "exact digests, or is listed unreadable, with the reason")
    tri.add_argument("--worker-memory", type=int, metavar="MB",
                     help="address space of each hashing process (default: 8192 MB); a decoder asking for more "
                     "fails on that file alone")

    _log_options(query)
    nodes = sub.add_parser("nodes", help="show every node's version, counts and generation")
    _log_options(nodes)
    nodes.add_argument("--config", type=Path, required=True, help="federation configuration (TOML)")
    nodes.add_argument("--format", choices=["table", "json"], default="table")
    nodes.add_argument("--timeout", type=float)

    hashp = sub.add_parser(
        "hash", help="print the hashes of files without querying anyone",
        description="Print each file's exact digests, PDQ hash and quality (images) or frame "
        "hashes (videos), as they would be sent. Nothing leaves this machine.")
    hashp.add_argument("files", type=Path, nargs="+", metavar="FILE")
    hashp.add_argument("--format", choices=["table", "json"], default="table")
    hashp.add_argument("--dihedral", action="store_true", help="also the 7 rotations and flips (PDQ)")
    watch_cli.add_parser(sub, _log_options)
    return parser


def _log_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                         help="log to stderr from this level (default: WARNING)")
    command.add_argument("--log-format", default="text", choices=["text", "json"],
                         help="text, or JSON lines carrying the request id sent to every node")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(getattr(args, "log_level", "WARNING"), getattr(args, "log_format", "text"))
    try:
        if args.command == "hash":
            return _hash(args.files, args.format, args.dihedral)
        if args.command == "watch":
            return watch_cli.main(args, _case)
        config = gateway_config.load(args.config)
        if getattr(args, "private", None) is not None:
            config = replace(config, private=args.private)
        # Before any node is dialled: a certificate the nodes would refuse looks,
        # from here, exactly like a federation that is down.
        selfcheck.check_client(config.tls, selfcheck.ClientIdentity(config.federation, config.gateway_id))
        if args.command == "nodes":
            return interrupt.run(_nodes(config, args.format, args.timeout))
        case = _case(args.case)
        if not 0 <= args.max_distance <= 256:
            raise UsageError("--max-distance must be between 0 and 256")
        for flag, value in (("--timeout", args.timeout), ("--deadline", args.deadline)):
            if value is not None and not 0 < value <= 300:
                raise UsageError(f"{flag} must be between 0 and 300 seconds")
        options = _triage_options(args)
        options.check(with_digests_or_files=bool(args.hash or args.file))
        if options.active and args.metrics_file is not None:
            raise UsageError("--metrics-file applies to single queries, not to --dir triage")
        if options.active:
            return triage_command(options, config, case, lambda: _signer(config, args.officer))
        subjects, skipped = _subjects(args.hash, args.file, args.dihedral, args.max_distance)
        return interrupt.run(_query(config, args, subjects, skipped, case))
    except (ConfigError, UsageError, OSError, ValueError) as exc:
        err.print(cell(f"icse-gateway: {exc}", style="red"))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def _triage_options(args: argparse.Namespace) -> TriageOptions:
    """The triage part of ``query``'s command line, typed."""
    return TriageOptions(
        directories=tuple(args.dir), from_list=args.from_list, hashes=args.hashes, jobs=args.jobs, batch=args.batch,
        jsonl=args.jsonl, csv=args.csv, html=args.html,
        cache=args.cache, no_cache=args.no_cache, dihedral=args.dihedral, max_distance=args.max_distance,
        timeout=args.timeout, deadline=args.deadline, officer=args.officer, json_summary=args.format == "json",
        file_timeout=args.file_timeout, worker_memory=args.worker_memory)


def _case(text: str) -> str:
    case = text.strip()
    if not case:
        raise UsageError("--case must not be empty: every query belongs to a case")
    if len(case) > MAX_CASE or not case.isprintable():
        raise UsageError(f"--case must be at most {MAX_CASE} printable characters")
    return case


def _subjects(hashes: Sequence[str], files: Sequence[Path], dihedral: bool,
              max_distance: int) -> tuple[list[Subject], list[Skipped]]:
    subjects: list[Subject] = []
    skipped: list[Skipped] = []
    for text in hashes:
        try:
            algorithm, digest = algorithms.parse_tagged(text)
        except algorithms.DigestError as exc:
            raise UsageError(f"--hash {text[:80]}: {exc}") from None
        distance = max_distance if algorithm.perceptual else 0
        subjects.append(Subject(QueryItem(algorithm.name, digest, distance), ""))
    for path in files:
        if not path.is_file():
            raise UsageError(f"--file {path}: not a readable file")
        hashes_of_file = filehash.hash_file(path, dihedral=dihedral)
        subjects += filehash.subjects(hashes_of_file, max_distance)
        skipped += hashes_of_file.skipped
    if not subjects:
        raise UsageError("nothing to look up: give --hash ALGO:HEX or --file PATH")
    return subjects, skipped


def _signer(config: gateway_config.GatewayConfig, officer: str | None = None) -> Signer:
    requester = config.requester
    if officer:
        requester = gateway_config.Requester(officer, requester.org, requester.country)
    if not requester.officer:
        raise UsageError("no requesting officer: set [requester] officer in the config or pass --officer")
    return signer_for(config, requester)


async def _query(config: gateway_config.GatewayConfig, args: argparse.Namespace, subjects: list[Subject],
                 skipped: list[Skipped], case: str) -> int:
    from gateway import render  # noqa: PLC0415 - see the imports
    from gateway.metrics import GatewayMetrics  # noqa: PLC0415

    request_id = uuid.uuid4().hex
    async with private.federation(config, _signer(config, args.officer)) as federation:
        answers = await federation.match([s.item for s in subjects], case, args.timeout, args.deadline, request_id)
    result = merge(case, subjects, answers, skipped, request_id)
    if args.metrics_file:
        metrics = GatewayMetrics()
        metrics.record(len(subjects), answers)
        metrics.write(args.metrics_file)
    if args.format == "json":
        print(json.dumps(render.to_json(result), indent=2))
    else:
        render.print_table(result, _console())
    return result.exit_status()


class _NodeRow(TypedDict):
    """One row of ``icse-gateway nodes``: what a node (replica) says about itself."""

    node: str
    replica: str
    status: str
    message: str
    latency_ms: float
    country: str | None
    version: str | None
    generation: int | None
    counts: dict[str, int]
    # Private exact matching as the node offers it (None: not offered).
    private: dict[str, object] | None


async def _nodes(config, format_name: str, timeout: float | None) -> int:
    async with Federation(config, _signer(config, officer=config.requester.officer or "operator")) as federation:
        described = await federation.describe(timeout)
    rows: list[_NodeRow] = []
    for d in described:
        info = d.description
        rows.append({
            "node": d.node_id,
            "replica": d.replica,
            "status": "ok" if info else (d.failure or NodeStatus.ERROR).value,
            "message": d.message,
            "latency_ms": round(d.latency_ms, 1),
            "country": info.country if info else None,
            "version": info.software_version if info else None,
            "generation": info.generation if info else None,
            "counts": {c.algorithm: c.count for c in info.counts} if info else {},
            "private": _private_row(info),
        })
    if format_name == "json":
        print(json.dumps({"nodes": rows}, indent=2))
    else:
        from rich.table import Table  # noqa: PLC0415 - see the imports

        table = Table(title="Federation nodes", title_justify="left")
        for column in ("node", "replica", "status", "country", "version", "generation", "hashes", "private", "ms",
                       "message"):
            table.add_column(column)
        for r in rows:
            counts = ", ".join(f"{a} {n:,}" for a, n in r["counts"].items())
            # What a node says about itself is data: shown literally (textsafe).
            table.add_row(cell(r["node"]), cell(r["replica"]), cell(r["status"]), cell(r["country"] or "-"),
                          cell(r["version"] or "-"), str(r["generation"] if r["generation"] is not None else "-"),
                          cell(counts or "-"), _private_cell(r["private"]), f"{r['latency_ms']:.0f}",
                          cell(r["message"]))
        _console().print(table)
    return EXIT_HIT if all(r["status"] == "ok" for r in rows) else EXIT_ERROR


def _private_row(info: pb.DescribeResponse | None) -> dict[str, object] | None:
    offer = private.offer_of(info) if info else None
    if offer is None:
        return None
    return {"prefix_bits": offer.prefix_bits, "key_id": offer.key_id, "algorithms": sorted(offer.algorithms),
            "stored": offer.stored, "covered": offer.covered, "mean_bucket_size": round(offer.mean_bucket_size, 1)}


def _private_cell(row: dict[str, object] | None) -> Text | str:
    """Whether the node offers private exact matching, and each item's anonymity set there."""
    if row is None:
        return "-"
    return cell(f"{row['prefix_bits']}-bit buckets, ~{row['mean_bucket_size']:,.0f} each")


def _hash(files: Sequence[Path], format_name: str, dihedral: bool) -> int:
    from gateway import render  # noqa: PLC0415 - see the imports

    results = []
    for path in files:
        if not path.is_file():
            raise UsageError(f"{path}: not a readable file")
        results.append({"path": str(path), **filehash.hashes_json(filehash.hash_file(path, dihedral=dihedral))})
    if format_name == "json":
        print(json.dumps(results, indent=2))
    else:
        for entry in results:
            render.print_hashes(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
