"""Presenting a merged result: a table for people, stable JSON for programs.

The JSON layout is versioned by its ``schema`` field and documented in the
README; fields are only ever added to it.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from federation import algorithms
from federation.algorithms import MatchKind
from gateway.results import HitInfo, MergedResult, NodeStatus, Subject
from gateway.textsafe import cell, terminal_safe

SCHEMA = "icse.query-result/1"


def _hit_json(hit: HitInfo) -> dict[str, Any]:
    return {
        "country": hit.country,
        "node": hit.node_id,
        "reference": hit.reference,
        "category": hit.category,
        "victim_identified": hit.victim_identified,
        "series": hit.series,
        "date_added": hit.date_added,
        "contact": hit.contact,
        "distance": hit.distance,
        "matched_share": hit.matched_share,
    }


def to_json(result: MergedResult) -> dict[str, Any]:
    answered = sum(1 for n in result.nodes if n.status.answered)
    known_files, files, _, _ = _known(result)
    return {
        "schema": SCHEMA,
        "case": result.case,
        "request_id": result.request_id,
        "partial": result.partial,
        "summary": {
            "items": len(result.items),
            "items_with_hits": sum(1 for i in result.items if i.hits),
            "files": files,
            "files_with_hits": known_files,
            "countries_with_hits": list(result.countries_with_hits),
            "nodes": len(result.nodes),
            "nodes_answered": answered,
        },
        "items": [
            {
                "source": item.subject.source,
                "variant": item.subject.variant,
                "algorithm": item.subject.item.algorithm,
                "digest": item.subject.item.digest.hex(),
                "hits": [_hit_json(h) for h in item.hits],
                "truncated_by": list(item.truncated_by),
            }
            for item in result.items
        ],
        "skipped": [{"source": k.source, "algorithm": k.algorithm, "reason": k.reason} for k in result.skipped],
        "nodes": [
            {
                "node": n.node_id,
                "country": n.country,
                "status": n.status.value,
                "message": n.message,
                "latency_ms": round(n.latency_ms, 1),
                "replica": n.replica,
            }
            for n in result.nodes
        ],
    }


_STATUS_STYLE = {
    NodeStatus.HIT: "bold green",
    NodeStatus.NO_HIT: "green",
    NodeStatus.TIMED_OUT: "yellow",
    NodeStatus.UNAVAILABLE: "yellow",
    NodeStatus.REFUSED: "red",
    NodeStatus.ERROR: "red",
    NodeStatus.SKIPPED: "yellow",
}


def _flag(value: bool | None) -> str:
    return "unknown" if value is None else ("yes" if value else "no")


def _known(result: MergedResult) -> tuple[int, int, int, int]:
    """(files known, files, given hashes known, given hashes): files count once."""
    files: dict[str, bool] = {}
    given = known_given = 0
    for item in result.items:
        if item.subject.source:
            files[item.subject.source] = files.get(item.subject.source, False) or bool(item.hits)
        else:
            given += 1
            known_given += bool(item.hits)
    return sum(files.values()), len(files), known_given, given


def _summary_line(result: MergedResult) -> str:
    known_files, files, known_given, given = _known(result)
    parts = []
    if files:
        parts.append(f"{known_files} of {files} file(s)")
    if given:
        parts.append(f"{known_given} of {given} given hash(es)")
    where = f" — in {', '.join(result.countries_with_hits)}" if result.countries_with_hits else ""
    return f"{' and '.join(parts)} known to the federation{where}"


def _label(subject: Subject) -> Text:
    digest = subject.item.digest.hex()
    tagged = f"{subject.item.algorithm}:{digest[:16]}{'…' if len(digest) > 16 else ''}"
    if not subject.source:
        return cell(tagged)
    variant = f" ({subject.variant})" if subject.variant else ""
    return Text.assemble(cell(subject.source + variant), "\n", tagged)


def _closeness(hit: HitInfo) -> str:
    if hit.matched_share is not None:
        return f"{hit.matched_share:.0%} frames, d {hit.distance}"
    return str(hit.distance)


def print_table(result: MergedResult, console: Console) -> None:
    """Every value from a node or a file name is shown literally (see gateway.textsafe)."""
    hits = Table(title=Text.assemble("Case ", cell(result.case), ": hits"), title_justify="left")
    for column in ("item", "country", "distance", "reference", "category", "victim identified", "series",
                   "added", "contact"):
        hits.add_column(column)
    for item in result.items:
        for hit in item.hits:
            hits.add_row(_label(item.subject), cell(hit.country), _closeness(hit), cell(hit.reference),
                         cell(hit.category or "-"), _flag(hit.victim_identified), cell(hit.series or "-"),
                         cell(hit.date_added), cell(hit.contact or "-"))
    if any(item.hits for item in result.items):
        console.print(hits)
    console.print(cell(_summary_line(result)))
    for skipped in result.skipped:
        console.print(Text.assemble(("not sent:", "yellow"), " ",
                                    cell(f"{skipped.source} {skipped.algorithm}: {skipped.reason}")))

    nodes = Table(title="Nodes", title_justify="left")
    for column in ("node", "country", "status", "ms", "message"):
        nodes.add_column(column)
    for node in result.nodes:
        nodes.add_row(cell(node.node_id), cell(node.country), cell(node.status.value, _STATUS_STYLE[node.status]),
                      f"{node.latency_ms:.0f}", cell(node.message))
    console.print(nodes)
    console.print(_completeness(result))


def _completeness(result: MergedResult) -> Text:
    """Whether the answer is complete; when nobody answered, what to check."""
    if not result.partial:
        return Text("Complete answer: every node answered.")
    missing = [n.country for n in result.nodes if not n.status.answered]
    if len(missing) == len(result.nodes):
        return Text.assemble(
            ("NO node answered", "bold red"),
            f" ({len(missing)} asked): this is not a \"no hit\". Check the node addresses in the configuration, "
            "this gateway's certificate and key (and the CA file), and the network path to the nodes "
            "(firewall, VPN, DNS); each node's message above says what its call met.")
    return Text.assemble(("PARTIAL answer:", "bold yellow"),
                         " ", cell(f"no answer from {', '.join(missing)}; absence of a hit there means nothing."))


def print_hashes(entry: dict[str, Any]) -> None:
    """One file of ``icse-gateway hash``: ``entry`` is its :func:`gateway.filehash.hashes_json` and path.

    The path and the reasons are data (escaped); a hash below its quality
    floor is printed, marked "not sent".
    """
    print(terminal_safe(entry["path"]))
    for algorithm in algorithms.all_algorithms():
        name = algorithm.name
        if entry.get(name) is None:
            continue
        if algorithm.match_kind is MatchKind.FRAMES:
            print(f"  {name}: {entry[name][:64]}… ({entry[f'{name}_frames']} frames)")
            print(f"  {name}_frames_sampled: {entry[f'{name}_frames_sampled']}")
            continue
        unsent = " (not sent: quality too low)" if entry.get(f"{name}_sent") is False else ""
        print(f"  {name}: {entry[name]}{unsent}")
        if algorithm.perceptual:
            print(f"  {name}_quality: {entry[f'{name}_quality']}")
        for variant, digest in entry.get(f"{name}_dihedral", {}).items():
            print(f"  {name} ({variant}): {digest}")
    for skipped in entry["not_sent"]:
        print(terminal_safe(f"  not sent: {skipped['algorithm']}: {skipped['reason']}"))
