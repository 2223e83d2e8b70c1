"""``icse-node``: run a country node and manage its hash set."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from federation import logs
from federation.config import ConfigError
from node import config as node_config
from node.audit_cli import add_audit_parser, run_audit
from node import server
from node.importer import ImportAborted, ImportReport, import_file
from node.store import Store

err = Console(stderr=True, soft_wrap=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="icse-node",
        description="A country node of the hash-matching federation: holds this country's "
        "hashes and answers signed hit/no-hit queries from federation gateways over mutual TLS.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the node's gRPC service until SIGTERM/SIGINT")
    serve.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    serve.add_argument("--ready-file", type=Path, help="write {port, pid} here once serving")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.add_argument("--log-format", default="json", choices=["json", "text"],
                       help="JSON lines (default) or text, both with the request id of every call")

    imp = sub.add_parser(
        "import",
        help="add hashes from files to the store",
        description="Add hashes to the node's store. Formats: 'lines' (one ALGORITHM:HEX per line, "
        "'#' comments) and 'csv' (algo,digest,reference,category,victim_identified; header optional). "
        "Each file is one transaction: a crash leaves the store as before. Bad rows are reported "
        "with their line numbers and skipped, or abort the file with --strict.",
    )
    imp.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    imp.add_argument("files", type=Path, nargs="+", metavar="FILE")
    imp.add_argument("--format", default="auto", choices=["auto", "lines", "csv"],
                     help="input format (auto: .csv is CSV, anything else lines)")
    imp.add_argument("--strict", action="store_true", help="import nothing from a file with a bad row")

    add_audit_parser(sub)

    stats = sub.add_parser("stats", help="show what the store holds")
    stats.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    stats.add_argument("--format", default="table", choices=["table", "json"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        return run_audit(args)
    try:
        if args.command == "serve":
            logs.configure(args.log_level, args.log_format)
            asyncio.run(server.serve(node_config.load(args.config), args.ready_file))
            return 0
        config = node_config.load(args.config, for_serving=False)
        if args.command == "import":
            return asyncio.run(_import(config, args.files, args.format, args.strict))
        return asyncio.run(_stats(config, args.format))
    except (ConfigError, ImportAborted, OSError, ValueError) as exc:
        err.print(f"icse-node: {exc}", style="red", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


async def _import(config: node_config.NodeConfig, files: list[Path], format_name: str, strict: bool) -> int:
    for path in files:
        if not path.is_file():
            raise OSError(f"{path}: no such file")
    status = 0
    async with await Store.open(config.store) as store:
        for path in files:
            with Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                console=err, transient=True, disable=not err.is_terminal,
            ) as progress:
                task = progress.add_task(path.name, total=path.stat().st_size)
                report = await import_file(
                    store, path, country=config.country, format_name=format_name, strict=strict,
                    advance=lambda n: progress.advance(task, n),
                )
            _print_report(report)
            status = status or (1 if report.rejected else 0)
    return status


def _print_report(report: ImportReport) -> None:
    print(f"{report.path}: added {report.added}, already present {report.already_present}, "
          f"rejected {len(report.rejected)}")
    for rejection in report.rejected[:50]:
        print(f"  line {rejection.line}: {rejection.reason}")
    if len(report.rejected) > 50:
        print(f"  ... and {len(report.rejected) - 50} more rejected rows")


async def _stats(config: node_config.NodeConfig, format_name: str) -> int:
    async with await Store.open(config.store) as store:
        counts = await store.counts()
        generation = await store.generation()
    if format_name == "json":
        print(json.dumps({"node_id": config.node_id, "country": config.country, "store": str(config.store),
                          "generation": generation, "counts": counts}, indent=2))
        return 0
    table = Table(title=f"node {config.node_id} ({config.country}) — generation {generation}")
    table.add_column("algorithm")
    table.add_column("hashes", justify="right")
    for algorithm, count in counts.items():
        table.add_row(algorithm, f"{count:,}")
    table.add_row("[bold]total", f"[bold]{sum(counts.values()):,}")
    Console().print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
