"""The live progress line of a triage, on stderr when it is a terminal.

Apart from the run (:mod:`gateway.triage.run`), which only tells it numbers.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


class LiveProgress:
    """A live line on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, console: Console, enabled: bool):
        self._progress = Progress(
            SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TextColumn("files hashed · [bold]{task.fields[known]}[/] files known "
                       "({task.fields[hits]} hits: one per matching hash) · "
                       "{task.fields[items]} hashes sent · last batch {task.fields[answers]} · "
                       "{task.fields[cached]} from cache"),
            TimeElapsedColumn(), console=console, disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task("walking", total=None, cached=0, items=0, known=0, hits=0,
                                             answers="-")

    def __enter__(self) -> LiveProgress:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, **fields: Any) -> None:
        self._progress.update(self._task, **fields)
