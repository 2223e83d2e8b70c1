"""The live progress line of a triage, on stderr when it is a terminal.

Apart from the run (:mod:`gateway.triage.run`), which only tells it numbers.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress

REFRESH = 0.1


class LiveProgress:
    """A live line on stderr when it is a terminal; nothing otherwise."""

    def __init__(self, console: Console, enabled: bool):
        # rich's progress display only when shown: a run whose stderr is not a terminal does not import it.
        self._progress: Progress | None = _progress(console) if enabled else None
        self._task = self._progress.add_task("walking", total=None, cached=0, items=0, known=0, hits=0,
                                             answers="-") if self._progress is not None else None
        self._enabled = enabled
        # Fields not shown yet: the run reports every file, the line shows ten times a second.
        self._fields: dict[str, Any] = {}
        self._shown = 0.0

    def __enter__(self) -> LiveProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._show()
            self._progress.stop()

    def update(self, **fields: Any) -> None:
        """Costs nothing when disabled; otherwise shown at most every :data:`REFRESH` seconds."""
        if not self._enabled:
            return
        self._fields.update(fields)
        if "description" in fields or time.monotonic() - self._shown >= REFRESH:
            self._show()

    def _show(self) -> None:
        if self._fields and self._progress is not None and self._task is not None:
            self._progress.update(self._task, **self._fields)
            self._fields = {}
        self._shown = time.monotonic()


def _progress(console: Console) -> Progress:
    from rich import progress as bar  # noqa: PLC0415 - see LiveProgress

    return bar.Progress(
        bar.SpinnerColumn(), bar.TextColumn("[bold]{task.description}"), bar.BarColumn(bar_width=20),
        bar.MofNCompleteColumn(),
        bar.TextColumn("files hashed · [bold]{task.fields[known]}[/] files known "
                       "({task.fields[hits]} hits: one per matching hash) · "
                       "{task.fields[items]} hashes sent · last batch {task.fields[answers]} · "
                       "{task.fields[cached]} from cache"),
        bar.TimeElapsedColumn(), console=console, transient=False,
    )
