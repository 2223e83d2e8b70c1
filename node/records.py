"""Rows of a node's hash set, as they cross from parsers to the store and back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HashRecord:
    """One known item. ``reference`` is the node's opaque handle for follow-up."""

    algorithm: str
    digest: bytes
    reference: str = ""
    category: str = ""
    victim_identified: bool | None = None
    series: str = ""
    date_added: str = ""  # ISO date; the store fills today's date when empty


@dataclass(frozen=True)
class StoredRecord:
    id: int
    record: HashRecord


@dataclass(frozen=True)
class Rejection:
    """An input row that was not imported, with where it was and why."""

    line: int
    reason: str


class ImportAborted(Exception):
    """A strict import met a bad row, or the file itself is unreadable; nothing was written."""
