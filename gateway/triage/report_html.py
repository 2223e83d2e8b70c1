"""The triage's HTML report: one self-contained page, sortable, that loads nothing.

The page's style and script are package data (``gateway/triage/static``), read with
:mod:`importlib.resources` and inlined; a Content-Security-Policy allows
exactly them (by hash) and nothing else. Every value on the page is escaped:
file names come from seized media and are attacker-controlled, as are the
strings nodes return.
"""

from __future__ import annotations

import base64
import hashlib
import html
import itertools
import os
from collections.abc import Iterable, Iterator
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, TextIO

from federation.files import atomic_write
from gateway.triage import report
from gateway.triage.model import HASHED, NOT_HASHED, UNREADABLE, FileRow
from gateway.triage.result import TriageResult
from gateway.triage.store import RowStore


@cache
def _asset(name: str) -> str:
    return (resources.files("gateway.triage") / "static" / name).read_text(encoding="utf-8")


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _e(value: Any) -> str:
    """Escaped for HTML text and quoted attributes alike."""
    return html.escape(report.printable(str(value)), quote=True)


def _size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return str(n)


def _references_html(refs: list[dict[str, Any]]) -> str:
    if not refs:
        return ""
    items = []
    for ref in refs:
        share = f", {ref['matched_share']:.0%} of frames" if ref["matched_share"] is not None else ""
        details = [f"distance {ref['distance']}{share}", "+".join(ref["matched_by"])]
        if ref["variant"]:
            details.append(ref["variant"])
        if ref["series"]:
            details.append(f"series {ref['series']}")
        if ref["category"]:
            details.append(f"category {ref['category']}")
        if ref["victim_identified"] is not None:
            details.append("victim identified" if ref["victim_identified"] else "victim not identified")
        if ref["contact"]:
            details.append(f"contact {ref['contact']}")
        items.append(f"<li><b>{_e(ref['country'])}</b> {_e(ref['reference'])} "
                     f"<span class=\"muted\">({_e('; '.join(details))})</span></li>")
    return "<ul class=\"refs\">" + "".join(items) + "</ul>"


def _file_row_html(row: FileRow) -> str:
    entry = report.file_json(row)
    best = entry["best_distance"]
    notes = [f"{s['algorithm']} not sent: {s['reason']}" for s in entry["not_sent"]] + entry["notes"]
    if entry["not_answered_by"]:
        notes.append(f"no answer from {', '.join(entry['not_answered_by'])}")
    cells = [
        f"<td class=\"path\">{_e(entry['path'])}</td>",
        f"<td class=\"num\" data-sort=\"{entry['size'] or 0}\">{_e(_size(entry['size']))}</td>",
        f"<td>{_e(' '.join(entry['countries']))}</td>",
        f"<td class=\"num\" data-sort=\"{'' if best is None else best}\">{'' if best is None else best}</td>",
        f"<td data-sort=\"{len(entry['references'])}\">{_references_html(entry['references'])}</td>",
        f"<td class=\"digest\">{_digests_html(entry)}</td>",
        f"<td>{_e('; '.join(notes))}</td>",
    ]
    css = " class=\"known\"" if row.known else ""
    return f"<tr{css}>{''.join(cells)}</tr>"


_HASH_COLUMNS = report.HASH_COLUMNS
_FILE_HEADERS = (("path", "text"), ("size", "num"), ("countries", "text"), ("best distance", "num"),
                 ("references", "num"), ("hashes", "text"), ("notes", "text"))
# Files listed on the page, known ones first; every file is in the CSV and JSON lines reports.
PAGE_FILES = 5_000


def _digests_html(entry: dict[str, Any]) -> str:
    """A file's hashes, folded until asked for: long hex strings would bury everything else."""
    shown = [(heading, entry[key]) for key, heading, _ in _HASH_COLUMNS if entry[key] is not None]
    if not shown:
        return ""
    items = "".join(f"<dt>{_e(heading)}</dt><dd>{_e(value)}</dd>" for heading, value in shown)
    return f"<details><summary>{len(shown)} value(s)</summary><dl class=\"digests\">{items}</dl></details>"


def _group_html(number: int, key: tuple[str, str, str], rows: list[FileRow]) -> str:
    """The files that matched one reference of one node, nearest first."""
    country, reference, node = key
    details = next(r for r in rows[0].references() if (r["node"], r["reference"]) == (node, reference))
    about = [f"node {node}"]
    about += [f"series {details['series']}"] if details["series"] else []
    about += [f"category {details['category']}"] if details["category"] else []
    if details["victim_identified"] is not None:
        about.append("victim identified" if details["victim_identified"] else "victim not identified")
    about += [f"contact {details['contact']}"] if details["contact"] else []
    lines = []
    for row in rows:
        ref = next(r for r in row.references() if (r["node"], r["reference"]) == (node, reference))
        share = f", {ref['matched_share']:.0%} of frames" if ref["matched_share"] is not None else ""
        lines.append(f"<tr><td class=\"path\">{_e(row.path)}</td><td class=\"num\">{ref['distance']}{_e(share)}</td>"
                     f"<td>{_e('+'.join(ref['matched_by']))}</td></tr>")
    return (f"<details open class=\"reference\"><summary><b>{_e(country)}</b> {_e(reference)} — {len(rows):,} "
            f"file(s) <span class=\"muted\">({_e('; '.join(about))})</span></summary>"
            + _table(f"reference-{number}", (("path", "text"), ("distance", "num"), ("matched by", "text")), lines)
            + "</details>")


def _reference_groups(store: RowStore) -> Iterator[str]:
    """Known files grouped by country and reference, one reference's files at a time in memory."""
    current: tuple[str, str, str] | None = None
    rows: list[FileRow] = []
    number = 0
    for country, reference, node, row in store.known_by_reference():
        if (country, reference, node) != current:
            if current is not None:
                number += 1
                yield _group_html(number, current, rows)
            current, rows = (country, reference, node), []
        rows.append(row)
    if current is not None:
        yield _group_html(number + 1, current, rows)


def _near_row_html(row: FileRow) -> str:
    return (f"<tr><td class=\"path\">{_e(row.path)}</td><td class=\"num\">{row.best_distance}</td>"
            f"<td>{_e(' '.join(row.countries))}</td><td>{_references_html(row.references())}</td></tr>")


def _links(outputs: dict[str, Path], page: Path | None) -> str:
    """Links to the complete listings written beside this page, relative to it."""
    found = []
    for name in ("csv", "jsonl"):
        if name in outputs:
            target = os.path.relpath(outputs[name], page.parent) if page is not None else str(outputs[name])
            found.append(f"<a href=\"{_e(target)}\">{_e(target)}</a>")
    if not found:
        return "ask for --csv or --jsonl to get the complete listing"
    return "every file is in " + " and ".join(found)


def _table_parts(table_id: str, headers: Iterable[tuple[str, str]], rows: Iterable[str]) -> Iterator[str]:
    """A table, piece by piece: its rows are written as they are read, never all in memory."""
    head = "".join(f"<th data-type=\"{kind}\" aria-sort=\"none\">{_e(name)}</th>" for name, kind in headers)
    yield f"<table id=\"{table_id}\" class=\"sortable\"><thead><tr>{head}</tr></thead><tbody>\n"
    for i, row in enumerate(rows):
        yield f"\n{row}" if i else row
    yield "\n</tbody></table>"


def _table(table_id: str, headers: Iterable[tuple[str, str]], rows: Iterable[str]) -> str:
    return "".join(_table_parts(table_id, headers, rows))


def html_report(result: TriageResult, outputs: dict[str, Path] | None = None, page: Path | None = None) -> str:
    """The whole page for ``result`` (tests; :func:`write_html` streams it)."""
    return "".join(html_parts(result, outputs, page))


def html_parts(result: TriageResult, outputs: dict[str, Path] | None = None,
               page: Path | None = None) -> Iterator[str]:
    """The page for ``result``, piece by piece, the long tables read from the store as they are written."""
    store = result.store
    files, known = result.files, result.files_known
    unreadable, not_hashed = result.count(UNREADABLE), result.count(NOT_HASHED)
    when = report.when(result)
    countries = result.countries
    incomplete = [t for t in sorted(result.nodes.values(), key=lambda t: t.node_id) if not t.complete]
    summary = [
        ("Case", result.case),
        ("Directory", result.root),
        ("When", f"{when['started']} to {when['finished']} (UTC; {when['seconds']} s)"),
        ("Requested by", f"{result.requester} via gateway {result.gateway}".strip()),
        ("Files hashed", f"{files:,} ({result.cache_hits:,} from the cache, {result.hashed_now:,} hashed now)"),
        ("Known files", f"{known:,}"),
        ("Countries with hits", ", ".join(f"{c} ({n['files']:,} file(s))" for c, n in countries.items()) or "none"),
        ("Hashes asked", f"{result.items_queried:,} in {result.batches:,} batch(es) of at most "
                         f"{result.batch_size:,}; {len(result.nodes)} node(s)"),
        ("Partial answers", "yes — " + "; ".join(
            f"{t.node_id} ({t.country}) answered {t.answered} of {t.batches} batch(es)"
            + (f": {'; '.join(t.messages)}" if t.messages else "") for t in incomplete)
         if incomplete else "no — every node answered every batch"),
        ("Unreadable files", f"{unreadable:,}"),
        ("Not hashed", f"{not_hashed:,} (links out of the tree, special files)"),
        ("Perceptual hashes not sent", f"{store.count(HASHED, skipped=True):,}"),
        ("Options", f"max distance {result.max_distance or 'node default'}; "
                    f"rotations/flips {'yes' if result.dihedral else 'no'}; {result.jobs} hashing process(es)"),
    ]
    summary_html = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in summary)
    if incomplete:
        banner = (f"<p class=\"warn\"><b>Partial answer.</b> {_e(', '.join(t.country for t in incomplete))} did "
                  "not answer every batch: the absence of a hit there means nothing for the files in those "
                  "batches (see their notes).</p>")
    else:
        banner = "<p class=\"ok\">Complete answer: every node answered every batch.</p>"
    if unreadable:
        banner += (f"<p class=\"warn\"><b>{unreadable:,} file(s) could not be read</b> and were not looked "
                   "up (listed below).</p>")
    country_rows = [f"<tr><td>{_e(c)}</td><td class=\"num\">{n['files']:,}</td>"
                    f"<td class=\"num\">{n['references']:,}</td></tr>" for c, n in countries.items()]
    node_rows = [f"<tr><td>{_e(t.node_id)}</td><td>{_e(t.country)}</td><td class=\"num\" data-sort=\"{t.answered}\">"
                 f"{t.answered}/{t.batches}</td><td>{_e(', '.join(f'{k} {v}' for k, v in sorted(t.statuses.items())))}"
                 f"</td><td>{_e('; '.join(t.messages))}</td></tr>"
                 for t in sorted(result.nodes.values(), key=lambda t: t.node_id)]
    sections = [
        f"<h1>ICSE triage report — case {_e(result.case)}</h1>",
        banner,
        f"<section id=\"summary\"><h2>Summary</h2><dl class=\"summary\">{summary_html}</dl></section>",
    ]
    if countries:
        sections.append("<section id=\"countries\"><h2>Known, by country</h2>" + _table(
            "countries-table", (("country", "text"), ("files", "num"), ("references", "num")), country_rows)
            + "</section>")
    nodes_html = "<section id=\"nodes\"><h2>Nodes</h2>" + _table(
        "nodes-table", (("node", "text"), ("country", "text"), ("batches answered", "num"), ("statuses", "text"),
                        ("message", "text")), node_rows) + "</section>"
    style, script = _asset("report.css"), _asset("report.js")
    policy = (f"default-src 'none'; style-src {_csp_hash(style)}; script-src {_csp_hash(script)}; "
              "img-src 'none'; base-uri 'none'; form-action 'none'")
    yield (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>ICSE triage — case {_e(result.case)}</title>\n<style>{style}</style></head>\n<body>\n"
        + "\n".join(sections) + "\n")
    if known:
        yield "<section id=\"known-by-reference\"><h2>Known files, by country and reference</h2>"
        yield from _reference_groups(store)
        yield "</section>\n"
    near = store.known_near()
    if near:
        yield (f"<section id=\"near-duplicates\"><h2>Near-duplicates ({near:,}): perceptual matches at "
               "distance &gt; 0, nearest first</h2>")
        yield from _table_parts("near-table", (("path", "text"), ("distance", "num"), ("countries", "text"),
                                               ("references", "text")),
                                (_near_row_html(r) for r in store.known(near=True)))
        yield "</section>\n"
    for section, title, count, status in (("unreadable", "Unreadable", unreadable, UNREADABLE),
                                          ("not-hashed", "Not hashed", not_hashed, NOT_HASHED)):
        if not count:
            continue
        yield f"\n<section id=\"{section}\"><h2>{title} ({count:,})</h2>"
        yield from _table_parts(f"{section}-table", (("path", "text"), ("reason", "text")),
                                (f"<tr><td class=\"path\">{_e(r.path)}</td><td>{_e(r.reason)}</td></tr>"
                                 for r in store.of_status(status)))
        yield "</section>"
    yield "\n" + nodes_html + "\n"
    listed = min(files, PAGE_FILES)
    more = (f"<p class=\"muted\">The first {listed:,} of {files:,} files, known ones first; "
            f"{_links(outputs or {}, page)}.</p>") if files > listed else ""
    yield (f"<section id=\"files-section\"><h2>Files ({files:,}; known first)</h2>{more}"
           "<div class=\"controls\"><label><input type=\"checkbox\" id=\"known-only\"> known files only</label>"
           "<label>path contains <input type=\"search\" id=\"filter\"></label></div>")
    yield from _table_parts("files", _FILE_HEADERS,
                            (_file_row_html(r) for r in itertools.islice(store.files_known_first(), PAGE_FILES)))
    yield "</section>"
    yield ("\n<footer><p class=\"muted\">Generated by icse-gateway. Only digests of these files left this "
           "machine; this page loads nothing from anywhere.</p></footer>")
    yield f"\n<script>{script}</script>\n</body></html>\n"


def write_html(result: TriageResult, path: Path, outputs: dict[str, Path] | None = None) -> None:
    """The page, written atomically as it is read from the store (0600: it names seized files);
    ``outputs`` are the other reports, linked from it."""

    def write(out: TextIO) -> None:
        for part in html_parts(result, outputs, path):
            out.write(part)

    atomic_write(path, write)
