"""One line per check, and the table a member's developer reads."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TextIO


@dataclass(frozen=True)
class Result:
    name: str  # stable identifier, e.g. "token.replayed"
    title: str  # what is checked, in words
    outcome: str  # "pass", "FAIL" or "skip"
    expected: str
    got: str

    @property
    def failed(self) -> bool:
        return self.outcome == "FAIL"


def passed(name: str, title: str, expected: str, got: str) -> Result:
    return Result(name, title, "pass", expected, got)


def judged(name: str, title: str, expected: str, got: str, ok: bool) -> Result:
    return Result(name, title, "pass" if ok else "FAIL", expected, got)


def skipped(name: str, title: str, why: str) -> Result:
    return Result(name, title, "skip", "-", why)


def _clip(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def write_table(results: Sequence[Result], out: TextIO, heading: str) -> None:
    """Plain text, one line per check (readable in a CI log and by grep)."""
    width = max([len(r.name) for r in results] + [5])
    out.write(f"{heading}\n")
    for r in results:
        out.write(f"{r.outcome:<4}  {r.name:<{width}}  {_clip(r.title, 60)}\n")
        if r.failed:
            out.write(f"{'':<4}  {'':<{width}}  expected: {_clip(r.expected, 200)}\n")
            out.write(f"{'':<4}  {'':<{width}}  got:      {_clip(r.got, 200)}\n")
    counts = {o: sum(r.outcome == o for r in results) for o in ("pass", "FAIL", "skip")}
    out.write(f"{counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped\n")


def write_json(results: Sequence[Result], out: TextIO) -> None:
    out.write(json.dumps({"results": [asdict(r) for r in results]}, indent=2, ensure_ascii=False) + "\n")
