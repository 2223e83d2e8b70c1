"""Reports of a directory triage: JSON lines, CSV, and the short summary
printed on stdout (table or JSON); the HTML page is :mod:`gateway.triage.report_html`.

File names come from seized media and are attacker-controlled, as are the
strings nodes return: every value is escaped for where it goes (HTML text and
attributes, CSV cells that a spreadsheet would take for a formula, terminal
control characters). Undecodable bytes in names are shown as ``\\xNN``.

Row fields (JSON lines; CSV has the scalar ones): ``path``, ``status``
(``hashed``, ``unreadable``, ``not_hashed``), ``reason``, ``size``,
``mtime_ns``, the hash fields of :func:`gateway.filehash.hashes_json`
(``md5``, ``sha1``, ``sha256``, ``pdq``, ``pdq_quality``, ``pdq_dihedral``,
``vpdq``, ``vpdq_frames``, …), ``known``, ``countries``,
``best_distance``, ``references`` (country, node, reference, distance,
matched_share, matched_by, variant, category, victim_identified, series,
date_added, contact), ``not_answered_by`` (nodes that did not answer a batch
holding this file's hashes: its "no hit" there means nothing),
``truncated_by``, ``not_sent`` (hashes not sent and why), ``from_cache``,
``notes``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, TextIO

from rich.console import Console
from rich.text import Text

from federation import algorithms
from federation.algorithms import MatchKind
from federation.files import atomic_write
from gateway import filehash
from gateway.textsafe import cell, terminal_safe
from gateway.triage.model import HASHED, NOT_HASHED, UNREADABLE, FileRow
from gateway.triage.result import TriageResult
from gateway.triage.store import RowStore

SCHEMA = "icse.triage-result/1"
ROW_SCHEMA = "icse.triage-file/1"
# Known files listed on stdout; all of them are in the reports.
STDOUT_KNOWN = 20


# --------------------------------------------------------------------------- safe text


def printable(text: str) -> str:
    """A file name as text: bytes that are not UTF-8 become ``\\xNN``."""
    if any("\udc80" <= c <= "\udcff" for c in text):
        return os.fsencode(text).decode("utf-8", "backslashreplace")
    return text


def terminal(text: str) -> str:
    """A file name for a terminal: undecodable bytes as ``\\xNN``, then control,
    format and bidi characters visibly escaped (:mod:`gateway.textsafe`)."""
    return terminal_safe(printable(text))


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not evaluate (OWASP: prefix a quote)."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


# --------------------------------------------------------------------------- rows


def file_json(row: FileRow) -> dict[str, Any]:
    """One file's row; its hash fields are :func:`gateway.filehash.hashes_json`'s."""
    hashes = filehash.hashes_json(row.hashes)
    for skipped in hashes["not_sent"]:
        skipped["reason"] = printable(skipped["reason"])
    return {
        "path": printable(row.path),
        "status": row.status,
        "reason": printable(row.reason),
        "size": row.size,
        "mtime_ns": row.mtime_ns,
        **hashes,
        "known": row.known,
        "countries": row.countries,
        "best_distance": row.best_distance,
        "references": row.references(),
        "not_answered_by": sorted(row.not_answered_by),
        "truncated_by": sorted(row.truncated_by),
        "from_cache": row.from_cache,
        "notes": [printable(n) for n in row.notes],
    }


def write_jsonl(result: TriageResult, path: Path) -> None:
    def write(out: TextIO) -> None:
        for row in result.store.rows():
            out.write(json.dumps(file_json(row), ensure_ascii=False, separators=(",", ":")) + "\n")

    atomic_write(path, write)


def _hash_columns() -> tuple[tuple[str, str, str], ...]:
    """(row field, heading, sort kind) per kind, for tables: each kind's digest, an image kind's quality,
    a video kind's frame count (its digest is too long for a cell)."""
    columns: list[tuple[str, str, str]] = []
    for algorithm in algorithms.all_algorithms():
        name, title = algorithm.name, algorithm.title
        if algorithm.match_kind is MatchKind.FRAMES:
            columns.append((f"{name}_frames", f"{title} frames", "num"))
        elif algorithm.perceptual:
            columns += [(name, title, "text"), (f"{name}_quality", f"{title} quality", "num")]
        else:
            columns.append((name, title, "text"))
    return tuple(columns)


HASH_COLUMNS = _hash_columns()
CSV_COLUMNS = ("path", "status", "reason", "size", *(field for field, _, _ in HASH_COLUMNS), "known", "countries",
               "best_distance", "references", "not_answered_by", "not_sent", "from_cache", "notes")


def _reference_text(ref: dict[str, Any]) -> str:
    share = f", {ref['matched_share']:.0%} of frames" if ref["matched_share"] is not None else ""
    return f"{ref['country']} {ref['reference']} (distance {ref['distance']}{share}; {'+'.join(ref['matched_by'])})"


def write_csv(result: TriageResult, path: Path) -> None:
    def write(out: TextIO) -> None:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for row in result.store.rows():
            entry = file_json(row)
            flat = {
                **entry,
                "known": "yes" if entry["known"] else "no",
                "countries": " ".join(entry["countries"]),
                "references": "; ".join(_reference_text(r) for r in entry["references"]),
                "not_answered_by": " ".join(entry["not_answered_by"]),
                "not_sent": "; ".join(f"{s['algorithm']}: {s['reason']}" for s in entry["not_sent"]),
                "from_cache": "yes" if entry["from_cache"] else "no",
                "notes": "; ".join(entry["notes"]),
            }
            writer.writerow([_cell("" if flat[c] is None else flat[c]) for c in CSV_COLUMNS])

    atomic_write(path, write, newline="")


# --------------------------------------------------------------------------- summary (stdout)


def when(result: TriageResult) -> dict[str, Any]:
    """Start, end and duration of the run, as the reports print them."""
    finished = result.finished or result.started
    return {"started": result.started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "seconds": round((finished - result.started).total_seconds(), 1)}


def _nodes_json(result: TriageResult) -> list[dict[str, Any]]:
    return [{"node": t.node_id, "country": t.country, "batches": t.batches, "answered": t.answered,
             "complete": t.complete, "statuses": dict(t.statuses), "messages": t.messages}
            for t in sorted(result.nodes.values(), key=lambda t: t.node_id)]


def summary_json(result: TriageResult, outputs: dict[str, Path] | None = None) -> dict[str, Any]:
    store = result.store
    return {
        "schema": SCHEMA,
        "case": result.case,
        "root": printable(result.root),
        **when(result),
        "partial": result.partial,
        "summary": {
            "files": result.files,
            "files_known": result.files_known,
            "files_near_duplicates": store.known_near(),
            "references": store.references(),
            "hits": store.hits(),
            "hashed_now": result.hashed_now,
            "cache_hits": result.cache_hits,
            "unreadable": result.count(UNREADABLE),
            "not_hashed": result.count(NOT_HASHED),
            "perceptual_not_sent": store.count(HASHED, skipped=True),
            "items_queried": result.items_queried,
            "batches": result.batches,
            "countries_with_hits": list(result.countries),
            "nodes": len(result.nodes),
            "nodes_complete": sum(1 for t in result.nodes.values() if t.complete),
        },
        "countries": result.countries,
        "known_files": [{"path": printable(r.path), "countries": r.countries, "best_distance": r.best_distance,
                         "references": r.references()} for r in store.known()],
        "unreadable": [{"path": printable(r.path), "reason": printable(r.reason)}
                       for r in store.of_status(UNREADABLE)],
        "not_hashed": [{"path": printable(r.path), "reason": printable(r.reason)}
                       for r in store.of_status(NOT_HASHED)],
        "nodes": _nodes_json(result),
        "cache": result.cache_path,
        "outputs": {name: str(path) for name, path in (outputs or {}).items()},
    }


def _listing(console: Console, store: RowStore, near: bool, count: int, title: str) -> None:
    """Known files of one kind, the first :data:`STDOUT_KNOWN`, each with its distance and references."""
    if not count:
        return
    from rich.table import Table  # noqa: PLC0415 - see print_summary

    shown = f", first {STDOUT_KNOWN} of {count:,}" if count > STDOUT_KNOWN else ""
    listing = Table(title=f"{title[:-1]}{shown})", title_justify="left")
    for column in ("file", "countries", "distance", "references"):
        listing.add_column(column)
    for row in store.known(STDOUT_KNOWN, near=near):
        refs = ", ".join(f"{r['country']} {r['reference']} (distance {r['distance']})" for r in row.references())
        listing.add_row(Text(terminal(row.path)), " ".join(row.countries), str(row.best_distance),
                        Text(terminal(refs)))
    console.print(listing)
    if count > STDOUT_KNOWN:
        console.print(f"… and {count - STDOUT_KNOWN:,} more: see the reports")


def print_summary(result: TriageResult, console: Console, outputs: dict[str, Path] | None = None) -> None:
    # rich's tables only for the terminal's summary: not with --format json, the form scripts ask for.
    from rich.table import Table  # noqa: PLC0415

    files, known = result.files, result.files_known
    unreadable, not_hashed = result.count(UNREADABLE), result.count(NOT_HASHED)
    console.print(Text(f"Case {terminal(result.case)}: {terminal(result.root)}", style="bold"))
    console.print(Text(
        f"{files:,} file(s) hashed ({result.cache_hits:,} from the cache, {result.hashed_now:,} now); "
        f"{unreadable:,} unreadable; {not_hashed:,} not hashed (links out of the tree, special files); "
        f"{result.items_queried:,} hashes asked in {result.batches:,} batch(es)"))
    countries = result.countries
    where = f" — in {', '.join(countries)}" if countries else ""
    console.print(Text(f"{known:,} of {files:,} file(s) known to the federation{where}",
                       style="bold green" if known else ""))
    store = result.store
    if known:
        near = store.known_near()
        console.print(Text(
            f"  {known - near:,} exact cop{'y' if known - near == 1 else 'ies'} (distance 0) and {near:,} "
            f"near-duplicate(s) (perceptual match, distance > 0); {store.references():,} reference(s): a file counts "
            f"once per node and reference it matched; {store.hits():,} hit(s): one per hash that matched, so one "
            "file's MD5, SHA-1, SHA-256 and PDQ can each hit the same reference"))
    if countries:
        table = Table(title="Known, by country", title_justify="left")
        for column in ("country", "files", "references"):
            table.add_column(column)
        for country, counts in countries.items():
            table.add_row(terminal(country), f"{counts['files']:,}", f"{counts['references']:,}")
        console.print(table)
        near = store.known_near()
        _listing(console, store, True, near, "Near-duplicates (perceptual match, distance > 0; nearest first)")
        _listing(console, store, False, known - near, "Exact copies (distance 0)")
    for row in result.store.of_status(UNREADABLE, limit=10):
        console.print(Text.assemble(("unreadable: ", "yellow"), terminal(row.path), ": ", terminal(row.reason)))
    if unreadable > 10:
        console.print(f"… and {unreadable - 10:,} more unreadable: see the reports")
    nodes = Table(title="Nodes", title_justify="left")
    for column in ("node", "country", "batches answered", "statuses", "message"):
        nodes.add_column(column)
    for tally in sorted(result.nodes.values(), key=lambda t: t.node_id):
        style = "green" if tally.complete else "yellow"
        nodes.add_row(cell(tally.node_id), cell(tally.country), Text(f"{tally.answered}/{tally.batches}", style=style),
                      ", ".join(f"{k} {v}" for k, v in sorted(tally.statuses.items())),
                      Text(terminal("; ".join(tally.messages))))
    console.print(nodes)
    if result.partial:
        missing = [t.country for t in result.nodes.values() if not t.complete]
        console.print(Text.assemble(("PARTIAL answer: ", "bold yellow"),
                                    f"{', '.join(missing)} did not answer every batch; absence of a hit there "
                                    "means nothing for the files in those batches (see not_answered_by)."))
    elif result.batches:
        console.print("Complete answer: every node answered every batch.")
    for name, path in (outputs or {}).items():
        console.print(Text(f"{name} report: {terminal(str(path))}"))
