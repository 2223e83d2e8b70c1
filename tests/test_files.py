"""Files written whole or not at all (reports, ready files)."""

from __future__ import annotations

from pathlib import Path
from typing import TextIO

import pytest

from federation.files import atomic_write, atomic_write_text


def test_a_failed_write_leaves_the_previous_file_and_no_debris(tmp_path: Path) -> None:
    target = tmp_path / "report.csv"
    atomic_write_text(target, "first\n")
    assert target.stat().st_mode & 0o777 == 0o600

    def half(out: TextIO) -> None:
        out.write("half of a rep")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, half)
    assert target.read_text() == "first\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv"]
