"""Reports of a directory triage: JSON lines, CSV, one self-contained HTML page,
and the short summary printed on stdout (table or JSON).

File names come from seized media and are attacker-controlled, as are the
strings nodes return: every value is escaped for where it goes (HTML text and
attributes, CSV cells that a spreadsheet would take for a formula, terminal
control characters). Undecodable bytes in names are shown as ``\\xNN``.

Row fields (JSON lines; CSV has the scalar ones): ``path``, ``status``
(``hashed``, ``unreadable``, ``not_hashed``), ``reason``, ``size``,
``mtime_ns``, ``md5``, ``sha1``, ``sha256``, ``pdq``, ``pdq_quality``,
``pdq_dihedral``, ``vpdq`` and ``vpdq_frames``, ``known``, ``countries``,
``best_distance``, ``references`` (country, node, reference, distance,
matched_share, matched_by, variant, category, victim_identified, series,
date_added, contact), ``not_answered_by`` (nodes that did not answer a batch
holding this file's hashes: its "no hit" there means nothing),
``truncated_by``, ``not_sent`` (hashes not sent and why), ``from_cache``,
``notes``.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import html
import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from gateway.triage import FileRow, TriageResult

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
    """Also without control characters (escape sequences, newlines) for a terminal."""
    text = printable(text)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not evaluate (OWASP: prefix a quote)."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value


# --------------------------------------------------------------------------- rows


def file_json(row: FileRow) -> dict[str, Any]:
    hashes = row.hashes
    exact = hashes.exact if hashes else {}
    entry: dict[str, Any] = {
        "path": printable(row.path),
        "status": row.status,
        "reason": printable(row.reason),
        "size": row.size,
        "mtime_ns": row.mtime_ns,
        "md5": exact["md5"].hex() if "md5" in exact else None,
        "sha1": exact["sha1"].hex() if "sha1" in exact else None,
        "sha256": exact["sha256"].hex() if "sha256" in exact else None,
        "pdq": hashes.pdq.digest.hex() if hashes and hashes.pdq else None,
        "pdq_quality": hashes.pdq.quality if hashes and hashes.pdq else None,
        "vpdq": hashes.video.digest.hex() if hashes and hashes.video else None,
        "vpdq_frames": len(hashes.video.frames) if hashes and hashes.video else None,
        "known": row.known,
        "countries": row.countries,
        "best_distance": row.best_distance,
        "references": row.references(),
        "not_answered_by": sorted(row.not_answered_by),
        "truncated_by": sorted(row.truncated_by),
        "not_sent": [{"algorithm": s.algorithm, "reason": printable(s.reason)}
                     for s in (hashes.skipped if hashes else ())],
        "from_cache": row.from_cache,
        "notes": [printable(n) for n in row.notes],
    }
    if hashes and hashes.dihedral:
        entry["pdq_dihedral"] = {name: h.digest.hex() for name, h in hashes.dihedral}
    return entry


def _atomic_write(path: Path, write: Callable[[io.TextIOBase], None], newline: str | None = None) -> None:
    """Written next to ``path`` (mode 0600: it names seized files) and renamed into place."""
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline=newline) as out:
            write(out)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_jsonl(result: TriageResult, path: Path) -> None:
    def write(out: io.TextIOBase) -> None:
        for row in result.rows:
            out.write(json.dumps(file_json(row), ensure_ascii=False, separators=(",", ":")) + "\n")

    _atomic_write(path, write)


CSV_COLUMNS = ("path", "status", "reason", "size", "md5", "sha1", "sha256", "pdq", "pdq_quality", "vpdq_frames",
               "known", "countries", "best_distance", "references", "not_answered_by", "not_sent", "from_cache",
               "notes")


def _reference_text(ref: dict[str, Any]) -> str:
    share = f", {ref['matched_share']:.0%} of frames" if ref["matched_share"] is not None else ""
    return f"{ref['country']} {ref['reference']} (distance {ref['distance']}{share}; {'+'.join(ref['matched_by'])})"


def write_csv(result: TriageResult, path: Path) -> None:
    def write(out: io.TextIOBase) -> None:
        writer = csv.writer(out)
        writer.writerow(CSV_COLUMNS)
        for row in result.rows:
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

    _atomic_write(path, write, newline="")


# --------------------------------------------------------------------------- summary (stdout)


def _when(result: TriageResult) -> dict[str, Any]:
    finished = result.finished or result.started
    return {"started": result.started.isoformat(timespec="seconds"),
            "finished": finished.isoformat(timespec="seconds"),
            "seconds": round((finished - result.started).total_seconds(), 1)}


def _nodes_json(result: TriageResult) -> list[dict[str, Any]]:
    return [{"node": t.node_id, "country": t.country, "batches": t.batches, "answered": t.answered,
             "complete": t.complete, "statuses": dict(t.statuses), "messages": t.messages}
            for t in sorted(result.nodes.values(), key=lambda t: t.node_id)]


def summary_json(result: TriageResult, outputs: dict[str, Path] | None = None) -> dict[str, Any]:
    known = result.known
    return {
        "schema": SCHEMA,
        "case": result.case,
        "root": printable(result.root),
        **_when(result),
        "partial": result.partial,
        "summary": {
            "files": len(result.files),
            "files_known": len(known),
            "hashed_now": result.hashed_now,
            "cache_hits": result.cache_hits,
            "unreadable": len(result.of_status("unreadable")),
            "not_hashed": len(result.of_status("not_hashed")),
            "perceptual_not_sent": sum(1 for r in result.files if r.hashes and r.hashes.skipped),
            "items_queried": result.items_queried,
            "batches": result.batches,
            "countries_with_hits": list(result.countries),
            "nodes": len(result.nodes),
            "nodes_complete": sum(1 for t in result.nodes.values() if t.complete),
        },
        "countries": result.countries,
        "known_files": [{"path": printable(r.path), "countries": r.countries, "best_distance": r.best_distance,
                         "references": r.references()} for r in _known_order(known)],
        "unreadable": [{"path": printable(r.path), "reason": printable(r.reason)} for r in result.of_status("unreadable")],
        "not_hashed": [{"path": printable(r.path), "reason": printable(r.reason)} for r in result.of_status("not_hashed")],
        "nodes": _nodes_json(result),
        "cache": result.cache_path,
        "outputs": {name: str(path) for name, path in (outputs or {}).items()},
    }


def _known_order(rows: Iterable[FileRow]) -> list[FileRow]:
    return sorted(rows, key=lambda r: (r.best_distance if r.best_distance is not None else 1 << 30, r.path))


def print_summary(result: TriageResult, console: Console, outputs: dict[str, Path] | None = None) -> None:
    files, known = result.files, result.known
    unreadable, not_hashed = result.of_status("unreadable"), result.of_status("not_hashed")
    console.print(Text(f"Case {terminal(result.case)}: {terminal(result.root)}", style="bold"))
    console.print(Text(
        f"{len(files):,} file(s) hashed ({result.cache_hits:,} from the cache, {result.hashed_now:,} now); "
        f"{len(unreadable):,} unreadable; {len(not_hashed):,} not hashed (links out of the tree, special files); "
        f"{result.items_queried:,} hashes asked in {result.batches:,} batch(es)"))
    countries = result.countries
    where = f" — in {', '.join(countries)}" if countries else ""
    console.print(Text(f"{len(known):,} of {len(files):,} file(s) known to the federation{where}",
                       style="bold green" if known else ""))
    if countries:
        table = Table(title="Known, by country", title_justify="left")
        for column in ("country", "files", "references"):
            table.add_column(column)
        for country, counts in countries.items():
            table.add_row(terminal(country), f"{counts['files']:,}", f"{counts['references']:,}")
        console.print(table)
        listing = Table(title=f"Known files{' (nearest first, first ' + str(STDOUT_KNOWN) + ')' if len(known) > STDOUT_KNOWN else ''}",
                        title_justify="left")
        for column in ("file", "countries", "distance", "references"):
            listing.add_column(column)
        for row in _known_order(known)[:STDOUT_KNOWN]:
            refs = ", ".join(f"{r['country']} {r['reference']}" for r in row.references())
            listing.add_row(Text(terminal(row.path)), " ".join(row.countries), str(row.best_distance),
                            Text(terminal(refs)))
        console.print(listing)
        if len(known) > STDOUT_KNOWN:
            console.print(f"… and {len(known) - STDOUT_KNOWN:,} more known file(s): see the reports")
    for row in unreadable[:10]:
        console.print(Text.assemble(("unreadable: ", "yellow"), terminal(row.path), ": ", terminal(row.reason)))
    if len(unreadable) > 10:
        console.print(f"… and {len(unreadable) - 10:,} more unreadable: see the reports")
    nodes = Table(title="Nodes", title_justify="left")
    for column in ("node", "country", "batches answered", "statuses", "message"):
        nodes.add_column(column)
    for tally in sorted(result.nodes.values(), key=lambda t: t.node_id):
        style = "green" if tally.complete else "yellow"
        nodes.add_row(tally.node_id, tally.country, Text(f"{tally.answered}/{tally.batches}", style=style),
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


# --------------------------------------------------------------------------- HTML


_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#1a1a1a;background:#fff}
h1{font-size:1.4em;margin:0 0 .4em}h2{font-size:1.15em;margin:1.4em 0 .4em}
dl.summary{display:grid;grid-template-columns:max-content auto;gap:.2em 1.2em;margin:0}
dl.summary dt{font-weight:600}dl.summary dd{margin:0}
.warn{background:#fff3cd;border:1px solid #e0c060;padding:.5em .8em;border-radius:4px}
.ok{background:#e8f5e9;border:1px solid #9ccc9c;padding:.5em .8em;border-radius:4px}
table{border-collapse:collapse;margin:.3em 0;width:100%}
th,td{border:1px solid #ccc;padding:.25em .45em;text-align:left;vertical-align:top}
th{background:#f0f0f0;cursor:pointer;user-select:none;white-space:nowrap;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tr.known td{background:#ffecec}
td.path{word-break:break-all;min-width:16em}
td.digest{font:11px/1.3 ui-monospace,monospace;word-break:break-all;max-width:18em}
td.num{text-align:right;white-space:nowrap}
ul.refs{margin:0;padding-left:1.1em}
.muted{color:#666}
.controls{margin:.4em 0}.controls label{margin-right:1.5em}
"""

_SCRIPT = """
(function () {
  "use strict";
  function keyOf(row, column, numeric) {
    var cell = row.cells[column];
    var value = cell.hasAttribute("data-sort") ? cell.getAttribute("data-sort") : cell.textContent;
    if (numeric) { return value === "" ? Infinity : parseFloat(value); }
    return value.toLowerCase();
  }
  function sortable(table) {
    var heads = table.tHead.rows[0].cells, body = table.tBodies[0], current = -1, ascending = true;
    function sortBy(column) {
      ascending = current === column ? !ascending : true;
      current = column;
      var numeric = heads[column].getAttribute("data-type") === "num";
      var keyed = Array.prototype.map.call(body.rows, function (row, i) { return [keyOf(row, column, numeric), i, row]; });
      keyed.sort(function (a, b) {
        var order = a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : a[1] - b[1];
        return ascending ? order : -order;
      });
      var fragment = document.createDocumentFragment();
      keyed.forEach(function (k) { fragment.appendChild(k[2]); });
      body.appendChild(fragment);
      Array.prototype.forEach.call(heads, function (h, j) {
        h.setAttribute("aria-sort", j === column ? (ascending ? "ascending" : "descending") : "none");
      });
    }
    Array.prototype.forEach.call(heads, function (head, column) {
      head.tabIndex = 0;
      head.title = "sort by this column";
      head.addEventListener("click", function () { sortBy(column); });
      head.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(column); }
      });
    });
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), sortable);
  var files = document.getElementById("files"), knownOnly = document.getElementById("known-only"),
      filter = document.getElementById("filter");
  if (files && knownOnly && filter) {
    var apply = function () {
      var text = filter.value.toLowerCase(), onlyKnown = knownOnly.checked;
      Array.prototype.forEach.call(files.tBodies[0].rows, function (row) {
        row.hidden = (onlyKnown && !row.classList.contains("known")) ||
                     (text !== "" && row.cells[0].textContent.toLowerCase().indexOf(text) < 0);
      });
    };
    knownOnly.addEventListener("change", apply);
    filter.addEventListener("input", apply);
  }
})();
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


def _e(value: Any) -> str:
    """Escaped for HTML text and quoted attributes alike."""
    return html.escape(printable(str(value)), quote=True)


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
    entry = file_json(row)
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
        f"<td class=\"digest\">{_e(entry['md5'] or '')}</td>",
        f"<td class=\"digest\">{_e(entry['sha1'] or '')}</td>",
        f"<td class=\"digest\">{_e(entry['sha256'] or '')}</td>",
        f"<td class=\"digest\">{_e(entry['pdq'] or '')}</td>",
        f"<td class=\"num\">{'' if entry['pdq_quality'] is None else entry['pdq_quality']}</td>",
        f"<td>{_e('; '.join(notes))}</td>",
    ]
    css = " class=\"known\"" if row.known else ""
    return f"<tr{css}>{''.join(cells)}</tr>"


_FILE_HEADERS = (("path", "text"), ("size", "num"), ("countries", "text"), ("best distance", "num"),
                 ("references", "num"), ("md5", "text"), ("sha1", "text"), ("sha256", "text"), ("pdq", "text"),
                 ("quality", "num"), ("notes", "text"))


def _table(table_id: str, headers: Iterable[tuple[str, str]], rows: Iterable[str]) -> str:
    head = "".join(f"<th data-type=\"{kind}\" aria-sort=\"none\">{_e(name)}</th>" for name, kind in headers)
    return (f"<table id=\"{table_id}\" class=\"sortable\"><thead><tr>{head}</tr></thead>"
            f"<tbody>\n{chr(10).join(rows)}\n</tbody></table>")


def html_report(result: TriageResult) -> str:
    files, known = result.files, result.known
    unreadable, not_hashed = result.of_status("unreadable"), result.of_status("not_hashed")
    when = _when(result)
    countries = result.countries
    incomplete = [t for t in sorted(result.nodes.values(), key=lambda t: t.node_id) if not t.complete]
    summary = [
        ("Case", result.case),
        ("Directory", result.root),
        ("When", f"{when['started']} to {when['finished']} (UTC; {when['seconds']} s)"),
        ("Requested by", f"{result.requester} via gateway {result.gateway}".strip()),
        ("Files hashed", f"{len(files):,} ({result.cache_hits:,} from the cache, {result.hashed_now:,} hashed now)"),
        ("Known files", f"{len(known):,}"),
        ("Countries with hits", ", ".join(f"{c} ({n['files']:,} file(s))" for c, n in countries.items()) or "none"),
        ("Hashes asked", f"{result.items_queried:,} in {result.batches:,} batch(es) of at most "
                         f"{result.batch_size:,}; {len(result.nodes)} node(s)"),
        ("Partial answers", "yes — " + "; ".join(
            f"{t.node_id} ({t.country}) answered {t.answered} of {t.batches} batch(es)"
            + (f": {'; '.join(t.messages)}" if t.messages else "") for t in incomplete)
         if incomplete else "no — every node answered every batch"),
        ("Unreadable files", f"{len(unreadable):,}"),
        ("Not hashed", f"{len(not_hashed):,} (links out of the tree, special files)"),
        ("Perceptual hashes not sent", f"{sum(1 for r in files if r.hashes and r.hashes.skipped):,}"),
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
        banner += (f"<p class=\"warn\"><b>{len(unreadable):,} file(s) could not be read</b> and were not looked "
                   "up (listed below).</p>")
    country_rows = [f"<tr><td>{_e(c)}</td><td class=\"num\">{n['files']:,}</td>"
                    f"<td class=\"num\">{n['references']:,}</td></tr>" for c, n in countries.items()]
    node_rows = [f"<tr><td>{_e(t.node_id)}</td><td>{_e(t.country)}</td><td class=\"num\" data-sort=\"{t.answered}\">"
                 f"{t.answered}/{t.batches}</td><td>{_e(', '.join(f'{k} {v}' for k, v in sorted(t.statuses.items())))}"
                 f"</td><td>{_e('; '.join(t.messages))}</td></tr>"
                 for t in sorted(result.nodes.values(), key=lambda t: t.node_id)]
    ordered = _known_order(known) + sorted((r for r in files if not r.known), key=lambda r: r.path)
    sections = [
        f"<h1>ICSE triage report — case {_e(result.case)}</h1>",
        banner,
        f"<section id=\"summary\"><h2>Summary</h2><dl class=\"summary\">{summary_html}</dl></section>",
    ]
    if countries:
        sections.append("<section id=\"countries\"><h2>Known, by country</h2>" + _table(
            "countries-table", (("country", "text"), ("files", "num"), ("references", "num")), country_rows)
            + "</section>")
    sections.append("<section id=\"nodes\"><h2>Nodes</h2>" + _table(
        "nodes-table", (("node", "text"), ("country", "text"), ("batches answered", "num"), ("statuses", "text"),
                        ("message", "text")), node_rows) + "</section>")
    sections.append(
        f"<section id=\"files-section\"><h2>Files ({len(files):,}; known first)</h2>"
        "<div class=\"controls\"><label><input type=\"checkbox\" id=\"known-only\"> known files only</label>"
        "<label>path contains <input type=\"search\" id=\"filter\"></label></div>"
        + _table("files", _FILE_HEADERS, (_file_row_html(r) for r in ordered)) + "</section>")
    if unreadable:
        sections.append(f"<section id=\"unreadable\"><h2>Unreadable ({len(unreadable):,})</h2>" + _table(
            "unreadable-table", (("path", "text"), ("reason", "text")),
            (f"<tr><td class=\"path\">{_e(r.path)}</td><td>{_e(r.reason)}</td></tr>" for r in unreadable))
            + "</section>")
    if not_hashed:
        sections.append(f"<section id=\"not-hashed\"><h2>Not hashed ({len(not_hashed):,})</h2>" + _table(
            "not-hashed-table", (("path", "text"), ("reason", "text")),
            (f"<tr><td class=\"path\">{_e(r.path)}</td><td>{_e(r.reason)}</td></tr>" for r in not_hashed))
            + "</section>")
    sections.append("<footer><p class=\"muted\">Generated by icse-gateway. Only digests of these files left this "
                    "machine; this page loads nothing from anywhere.</p></footer>")
    policy = (f"default-src 'none'; style-src {_csp_hash(_STYLE)}; script-src {_csp_hash(_SCRIPT)}; "
              "img-src 'none'; base-uri 'none'; form-action 'none'")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{policy}\">\n"
        "<meta name=\"referrer\" content=\"no-referrer\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>ICSE triage — case {_e(result.case)}</title>\n<style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(sections)
        + f"\n<script>{_SCRIPT}</script>\n</body></html>\n"
    )


def write_html(result: TriageResult, path: Path) -> None:
    text = html_report(result)
    _atomic_write(path, lambda out: out.write(text))


WRITERS: dict[str, Callable[[TriageResult, Path], None]] = {
    "jsonl": write_jsonl, "csv": write_csv, "html": write_html,
}
