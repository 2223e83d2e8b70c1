"""What a directory triage produces: one row per file, and a tally per node.

Shared by the run that fills it (:mod:`gateway.triage.run`) and the reports
that show it (:mod:`gateway.triage.report`, :mod:`gateway.triage.report_html`); it imports
neither, so neither imports the other.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from federation import algorithms
from gateway import filehash
from gateway.filehash import FileHashes
from gateway.results import HitInfo, NodeAnswer

DEFAULT_BATCH = 2000
# A node refuses larger requests by default (node ``[limits] max_items``).
MAX_BATCH = 20_000

HASHED, UNREADABLE, NOT_HASHED = "hashed", "unreadable", "not_hashed"


@dataclass(frozen=True)
class Task:
    """A regular file to hash: ``path`` as found in the tree, ``real`` the file opened."""

    path: str
    real: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Hashed:
    """A worker's answer for one file: its hashes, or why it could not be read."""

    hashes: FileHashes | None
    size: int
    mtime_ns: int
    reason: str = ""
    # False when the file changed while it was read: the hashes are not cached.
    stable: bool = True
    notes: tuple[str, ...] = ()
    # The hashes as :func:`gateway.filehash.hashes_text` renders them, encoded where they were
    # computed (a hashing process) or read (the cache), so the run's main process does not encode them.
    text: str | None = None


class Done(NamedTuple):
    """A file's hashing as the run's main process takes it: plain values, no object tree.

    What a hashing process sends back per file, as a plain tuple of these
    fields (it pickles in a few microseconds; a tree of dataclasses holding a
    path took tens, in the one process every file goes through); the main
    process puts it in the row and asks the nodes ``items`` without decoding
    anything.
    """

    size: int
    mtime_ns: int
    # Why the file could not be read; "" when it was.
    reason: str
    # The hashes as :func:`gateway.filehash.hashes_text` renders them; None when not read.
    text: str | None
    # What to ask the nodes: (algorithm, digest, max_distance, variant) per hash.
    items: tuple[tuple[str, bytes, int, str], ...]
    # Some perceptual hash was not sent (the row's ``not_sent`` is not empty).
    skipped: bool
    stable: bool
    notes: tuple[str, ...]


def compact(hashed: Hashed, max_distance: int) -> Done:
    """A :class:`Hashed` as the main process takes it."""
    hashes = hashed.hashes
    if hashes is None:
        return Done(hashed.size, hashed.mtime_ns, hashed.reason, None, (), False, hashed.stable, hashed.notes)
    # As filehash.subjects orders them: the exact digests (never a distance), then the perceptual hashes.
    items = tuple((name, digest, 0, "") for name, digest in hashes.exact.items())
    if hashes.perceptual:
        items += tuple((s.item.algorithm, s.item.digest, s.item.max_distance, s.variant)
                       for s in filehash.subjects(hashes, max_distance)[len(hashes.exact):])
    text = hashed.text if hashed.text is not None else filehash.hashes_text(hashes)
    return Done(hashed.size, hashed.mtime_ns, hashed.reason, text, items, bool(hashes.skipped), hashed.stable,
                hashed.notes)


@functools.lru_cache(maxsize=4)
def _kinds(names: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The exact kinds' names and the perceptual kinds' names, for the registry holding ``names``."""
    kinds = [algorithms.get(name) for name in names]
    return tuple(a.name for a in kinds if not a.perceptual), tuple(a.name for a in kinds if a.perceptual)


def from_record(text: str, real: str, size: int, mtime_ns: int, max_distance: int) -> Done:
    """A cache record (:func:`gateway.filehash.hashes_text`) as the main process takes it.

    A record of exact digests alone — most of a device — is read without building
    its :class:`FileHashes`. ``ValueError``, ``KeyError``, ``TypeError`` or
    ``IndexError`` for a damaged record (the file is then hashed again).
    """
    entry = json.loads(text)
    exact, perceptual = _kinds(algorithms.names())
    if any(entry.get(name) is not None for name in perceptual):
        hashes = filehash.hashes_from_json(entry, real)
        return compact(Hashed(hashes, size, mtime_ns, text=text), max_distance)
    items = tuple((name, bytes.fromhex(entry[name]), 0, "") for name in exact if entry.get(name) is not None)
    skipped = [(s["algorithm"], s["reason"]) for s in entry["not_sent"]]
    return Done(size, mtime_ns, "", text, items, bool(skipped), True, ())


@dataclass
class Match:
    """One hit for one of a file's hashes: which algorithm and variant found it."""

    algorithm: str
    variant: str
    hit: HitInfo


@dataclass
class FileRow:
    """Everything a report says about one entry of the tree."""

    path: str
    status: str  # HASHED, UNREADABLE or NOT_HASHED
    reason: str = ""
    size: int | None = None
    mtime_ns: int | None = None
    hashes: FileHashes | None = None
    from_cache: bool = False
    matches: list[Match] = field(default_factory=list)
    # Nodes that did not answer a batch holding some of this file's hashes.
    not_answered_by: set[str] = field(default_factory=set)
    truncated_by: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    # While a run holds the row, its hashes may be only here, as the hashing process rendered them
    # (:func:`gateway.filehash.hashes_text`), with ``not_sent`` saying whether some hash was not sent;
    # a row read back from the store has ``hashes`` too.
    hashes_text: str | None = None
    not_sent: bool = False

    @property
    def known(self) -> bool:
        return bool(self.matches)

    @property
    def countries(self) -> list[str]:
        return sorted({m.hit.country for m in self.matches})

    @property
    def best_distance(self) -> int | None:
        return min((m.hit.distance for m in self.matches), default=None)

    def references(self) -> list[dict[str, Any]]:
        """One entry per (node, reference), nearest first; which hashes matched it."""
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for m in sorted(self.matches, key=lambda m: (m.hit.distance, m.hit.country, m.hit.node_id)):
            key = (m.hit.node_id, m.hit.reference)
            entry = found.get(key)
            if entry is None:
                found[key] = {
                    "country": m.hit.country, "node": m.hit.node_id, "reference": m.hit.reference,
                    "distance": m.hit.distance, "matched_share": m.hit.matched_share,
                    "matched_by": [m.algorithm], "variant": m.variant,
                    "category": m.hit.category, "victim_identified": m.hit.victim_identified,
                    "series": m.hit.series, "date_added": m.hit.date_added, "contact": m.hit.contact,
                }
            elif m.algorithm not in entry["matched_by"]:
                entry["matched_by"].append(m.algorithm)
        return list(found.values())


@dataclass
class NodeTally:
    """How one node answered the batches of a run."""

    node_id: str
    country: str
    batches: int = 0
    answered: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    messages: list[str] = field(default_factory=list)

    def record(self, answer: NodeAnswer) -> None:
        self.batches += 1
        self.answered += answer.status.answered
        self.statuses[answer.status.value] += 1
        if answer.message and answer.message not in self.messages and len(self.messages) < 5:
            self.messages.append(answer.message)

    @property
    def complete(self) -> bool:
        return self.answered == self.batches
