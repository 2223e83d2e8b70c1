"""Imports a hash-set file into the store: streamed, one transaction, reported."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from node import formats
from node.records import HashRecord, Rejection
from node.store import Store

BATCH_ROWS = 10_000


class ImportAborted(Exception):
    """A strict import met a bad row; nothing was written."""


@dataclass
class ImportReport:
    path: Path
    added: int = 0
    already_present: int = 0
    rejected: list[Rejection] = field(default_factory=list)


def new_reference(country: str) -> str:
    """An opaque reference for rows imported without one: reveals nothing."""
    return f"{country}-{uuid.uuid4().hex[:16].upper()}"


def _lines(handle, advance: Callable[[int], None] | None) -> Iterator[str]:
    for line in handle:
        if advance is not None:
            advance(len(line))
        yield line


async def import_file(
    store: Store,
    path: Path,
    *,
    country: str,
    format_name: str = "auto",
    strict: bool = False,
    advance: Callable[[int], None] | None = None,
) -> ImportReport:
    """Adds the file's valid rows in one transaction; bad rows are reported.

    With ``strict``, any bad row aborts the whole import and nothing is written.
    """
    parser = formats.parser_for(path, format_name)
    report = ImportReport(path)

    async def batches() -> AsyncIterator[list[HashRecord]]:
        batch: list[HashRecord] = []
        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            try:
                for parsed in parser(_lines(handle, advance)):
                    if isinstance(parsed, Rejection):
                        if strict:
                            raise ImportAborted(f"{path}: line {parsed.line}: {parsed.reason}")
                        report.rejected.append(parsed)
                        continue
                    if not parsed.reference:
                        parsed = replace(parsed, reference=new_reference(country))
                    batch.append(parsed)
                    if len(batch) >= BATCH_ROWS:
                        yield batch
                        batch = []
            except UnicodeDecodeError as exc:
                raise ImportAborted(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        if batch:
            yield batch

    counts = await store.add(batches())
    report.added, report.already_present = counts.added, counts.already_present
    return report
