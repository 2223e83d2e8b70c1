"""``icse-node``: run a country node and manage its hash set."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from federation import logs
from federation.config import ConfigError
from node import config as node_config, formats, lifeline, readiness, stderr_relay, vics
from node.alerts_cli import add_alerts_parser, run_alerts
from node.audit_cli import add_audit_parser, run_audit
from node.records import ImportAborted, Rejection
from node.unix import stdout_closed

if TYPE_CHECKING:
    from node import importer, store as store_module

# node.server, node.importer, node.store and node.describe import numba (through
# the indexes), which reads NUMBA_CACHE_DIR once, when first imported: they are
# imported in main(), after the configuration says where the state directory is.

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
    serve.add_argument("--parent-pid", type=int, metavar="PID",
                       help="stop when process PID, the node's parent, dies (even by SIGKILL; Linux)")
    serve.add_argument("--stop-on-stdin-eof", action="store_true",
                       help="stop when standard input reaches end of file (a supervisor's pipe closed)")

    imp = sub.add_parser(
        "import",
        help="add hashes from files to the store",
        description="Add hashes to the node's store. Formats: 'lines' (one ALGORITHM:HEX per line, "
        "'#' comments), 'csv' (algo,digest,reference,category,victim_identified[,series,date_added]; "
        "header optional; or one column per algorithm) and 'vics' (Project VIC VICS JSON: each MD5/SHA1 "
        "of a media item becomes a row; PhotoDNA is counted as not supported and skipped; file paths "
        "are never stored). Each file is one transaction: a crash, or malformed JSON, leaves the store "
        "as before. Bad rows are reported with their line number (media item number for VICS) and "
        "skipped, or abort the file with --strict. Re-importing a file changes nothing. "
        "Exit status: 0 all imported, 1 some rows rejected, 2 a file could not be imported.",
    )
    imp.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    imp.add_argument("files", type=Path, nargs="+", metavar="FILE")
    imp.add_argument("--format", default="auto", choices=["auto", *formats.FORMATS],
                     help="input format (auto: .csv is CSV, .json is VICS, anything else lines)")
    imp.add_argument("--strict", action="store_true", help="import nothing from a file with a bad row")

    retract = sub.add_parser(
        "retract",
        help="remove hashes from the store",
        description="Remove hashes from the node's store, in one transaction: those listed in FILEs "
        "(any import format; rows are matched by algorithm and digest, metadata is ignored), or every "
        "row holding one of the given --reference values. A running node stops matching them on its "
        "next query. Prints how many rows were removed and how many were not present. "
        "Exit status: 0 done, 1 some rows of a file rejected, 2 error (nothing removed).",
    )
    retract.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    retract.add_argument("files", type=Path, nargs="*", metavar="FILE", help="hash files to retract")
    retract.add_argument("--reference", action="append", default=[], metavar="REF",
                         help="retract every row with this reference (repeatable)")
    retract.add_argument("--format", default="auto", choices=["auto", *formats.FORMATS],
                         help="format of the FILEs (auto: .csv is CSV, .json is VICS, anything else lines)")
    retract.add_argument("--strict", action="store_true", help="remove nothing if a file has a bad row")

    export = sub.add_parser(
        "export",
        help="write the store's hash set to a file",
        description="Write the node's own hash set, streamed, in a form 'import' reads back identically: "
        "'csv' (every column), 'vics' (Project VIC JSON; a row's reference in the IcseReference field) "
        "or 'lines' (digests only, no metadata). The file is written next to --out and renamed into "
        "place when complete, readable by its owner only.",
    )
    export.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    export.add_argument("--format", choices=list(formats.FORMATS),
                        help="output format (default: from --out's suffix as for import, else csv)")
    export.add_argument("--out", type=Path, help="output file (default: standard output)")

    add_audit_parser(sub)
    add_alerts_parser(sub)

    describe = sub.add_parser(
        "describe", help="version, listening state, counts, generation and audit head of this node",
        description="What an on-call operator asks first, read from this node's own files and a probe "
        "of its listening port (no federation certificate needed).")
    describe.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    describe.add_argument("--format", default="table", choices=["table", "json"])

    compact = sub.add_parser(
        "compact", help="merge the store's segments into one, dropping retracted rows",
        description="Each import adds a segment; a serving node merges small ones in the background. "
        "This merges them all now, leaving out retracted rows. Queries of a running node go on "
        "meanwhile; a compaction that is interrupted leaves the store as it was.")
    compact.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")

    stats = sub.add_parser("stats", help="show what the store holds")
    stats.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    stats.add_argument("--format", default="table", choices=["table", "json"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "audit":
        return run_audit(args)
    if args.command == "alerts":
        return run_alerts(args)
    try:
        if args.command == "serve":
            _tie_to_supervisor(args.parent_pid, args.stop_on_stdin_eof)
        config = node_config.load(args.config, for_serving=args.command == "serve")
        os.environ.setdefault(readiness.CACHE_VARIABLE, str(readiness.numba_cache_dir(config.store)))
        if args.command == "serve":
            from node import server  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
            from node.segment import SegmentCorrupt  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
            stderr_relay.start(args.log_level, args.log_format)  # gRPC's own log lines in the same format
            logs.configure(args.log_level, args.log_format)
            try:
                asyncio.run(server.serve(config, args.ready_file))
            except SegmentCorrupt as exc:
                err.print(f"icse-node: not starting: {exc}", style="red", markup=False, highlight=False)
                return 2
            return 0
        if args.command == "compact":
            return asyncio.run(_compact(config))
        if args.command == "import":
            return asyncio.run(_import(config, args.files, args.format, args.strict))
        if args.command == "retract":
            return asyncio.run(_retract(config, args.files, args.reference, args.format, args.strict))
        if args.command == "export":
            return asyncio.run(_export(config, args.format, args.out))
        if args.command == "describe":
            if not config.store.is_file():
                raise OSError(f"{config.store}: no store here (has the node imported or served yet?)")
            from node.describe import describe, render as render_description  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
            print(render_description(asyncio.run(describe(config)), args.format))
            return 0
        return asyncio.run(_stats(config, args.format))
    except BrokenPipeError:
        return stdout_closed()
    except (ConfigError, ImportAborted, OSError, ValueError, lifeline.ParentGone) as exc:
        err.print(f"icse-node: {exc}", style="red", markup=False, highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


def _tie_to_supervisor(parent_pid: int | None, stdin_eof: bool) -> None:
    """Armed first, before anything slow: a supervisor may die while we start."""
    if parent_pid is not None:
        lifeline.die_with_parent(parent_pid)
    if stdin_eof:
        lifeline.stop_on_stdin_eof()


async def _compact(config: node_config.NodeConfig) -> int:
    from node.merge import merge  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
    from node.store import Store  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
    async with await Store.open(config.store) as store:
        result = await merge(store)
    if result is None:
        print("nothing to compact: one segment or none, and nothing retracted")
    else:
        print(f"merged {len(result.merged)} segments into "
              f"{'segment ' + str(result.segment_id) if result.segment_id else 'none'}: "
              f"{result.rows} rows kept, {result.dropped} retracted rows dropped")
    return 0


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
        console=err, transient=True, disable=not err.is_terminal,
    )


def _check_files(files: list[Path]) -> None:
    for path in files:
        if path.is_dir():
            raise OSError(f"{path}: is a directory; name the hash files in it")
        if not path.exists():
            raise OSError(f"{path}: no such file")
        if not path.is_file():
            raise OSError(f"{path}: not a regular file")


async def _import(config: node_config.NodeConfig, files: list[Path], format_name: str, strict: bool) -> int:
    from node.importer import import_file  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
    from node.store import Store  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
    _check_files(files)
    for path in files:
        formats.resolve_format(path, format_name)
    status = 0
    async with await Store.open(config.store) as store:
        for path in files:
            with _progress() as progress:
                task = progress.add_task(path.name, total=path.stat().st_size)
                try:
                    report = await import_file(
                        store, path, country=config.country, format_name=format_name, strict=strict,
                        advance=functools.partial(progress.advance, task) if err.is_terminal else None,
                    )
                except ImportAborted as exc:
                    progress.stop()
                    err.print(f"icse-node: {exc}", style="red", markup=False, highlight=False)
                    status = 2
                    continue
            _print_report(report)
            status = status or (1 if report.rejected_total else 0)
    return status


def _print_rejections(rejected: list[tuple[str, Rejection]], total: int, limit: int = 50) -> None:
    for unit, rejection in rejected[:limit]:
        print(f"  {unit} {rejection.line}: {rejection.reason}")
    if total > limit:
        print(f"  ... and {total - limit} more rejected rows")


def _unsupported_text(unsupported: Counter[str]) -> str:
    if not unsupported:
        return "unsupported 0"
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(unsupported.items()))
    return f"unsupported {sum(unsupported.values())} (not supported, skipped: {kinds})"


def _print_report(report: importer.ImportReport) -> None:
    print(f"{report.path}: added {report.added}, already present {report.already_present}, "
          f"rejected {report.rejected_total}, {_unsupported_text(report.unsupported)}")
    _print_rejections([(report.unit, r) for r in report.rejected], report.rejected_total)


async def _retract(config: node_config.NodeConfig, files: list[Path], references: list[str],
                   format_name: str, strict: bool) -> int:
    from node.importer import retract_files  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
    from node.store import Store  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
    if bool(files) == bool(references):
        raise ValueError("retract: give hash FILEs or --reference REF, not both and not neither")
    if references:
        async with await Store.open(config.store) as store:
            result = await store.remove_references(references)
        print(f"references: removed {result.removed} rows, not present {len(result.references_missing)} "
              f"of {result.references_found + len(result.references_missing)} references")
        for missing in result.references_missing[:50]:
            print(f"  not present: {missing}")
        if len(result.references_missing) > 50:
            print(f"  ... and {len(result.references_missing) - 50} more")
        return 0
    _check_files(files)
    for path in files:
        formats.resolve_format(path, format_name)
    async with await Store.open(config.store) as store:
        with _progress() as progress:
            def advance(path: Path):
                if not err.is_terminal:
                    return None
                task = progress.add_task(path.name, total=path.stat().st_size)
                return lambda n: progress.advance(task, n)

            report = await retract_files(store, files, country=config.country, format_name=format_name,
                                         strict=strict, advance=advance)
    names = ", ".join(str(p) for p in files) if len(files) <= 3 else f"{len(files)} files"
    print(f"{names}: removed {report.removed}, not present {report.not_present}, "
          f"rejected {report.rejected_total}, {_unsupported_text(report.unsupported)}")
    _print_rejections([(f"{path.name} {unit}" if len(files) > 1 else unit, r)
                       for path, unit, r in report.rejected], report.rejected_total)
    return 1 if report.rejected_total else 0


async def _export(config: node_config.NodeConfig, format_name: str | None, out: Path | None) -> int:
    from node.store import Store  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
    if format_name is None:
        format_name = formats.detect_format(out) if out is not None and out.suffix.lower() in (
            ".csv", ".json", ".txt", ".lst") else "csv"
    async with await Store.open(config.store) as store:
        if out is None:
            count = await _write_export(store, format_name, sys.stdout, config)
            sys.stdout.flush()
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
            try:
                descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as handle:
                    count = await _write_export(store, format_name, handle, config)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(partial, out)
            finally:
                partial.unlink(missing_ok=True)
    err.print(f"exported {count} rows ({format_name}) to {out or 'standard output'}",
              markup=False, highlight=False)
    return 0


async def _write_export(store: store_module.Store, format_name: str, handle, config: node_config.NodeConfig) -> int:
    """Streams the store into ``handle``: a chunk of rows at a time, never the whole set."""
    writer: vics.VicsWriter | formats.CsvWriter | formats.LinesWriter
    if format_name == "vics":
        writer = vics.VicsWriter(handle, case_number=f"icse-node {config.node_id} export")
    else:
        writers: dict[str, type[formats.CsvWriter | formats.LinesWriter]] = {
            "csv": formats.CsvWriter, "lines": formats.LinesWriter}
        writer = writers[format_name](handle)
    # aclosing: a failed write (a closed pipe) ends the query before the store closes.
    async with contextlib.aclosing(store.iter_rows(by_reference=format_name == "vics")) as batches:
        async for batch in batches:
            writer.write(batch)
    writer.close()
    return writer.count


async def _stats(config: node_config.NodeConfig, format_name: str) -> int:
    from node.store import Store  # noqa: PLC0415 - imports numba: only once NUMBA_CACHE_DIR is set
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
