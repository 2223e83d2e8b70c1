"""Files written whole or not at all.

A report, an export or a ready file is written next to its final name and
renamed into place, so a reader never sees half of one and an interrupted
write leaves the previous file (or none) behind. Written 0600: what the
gateway and the nodes write names seized files or holds hash sets.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TextIO


def atomic_write(path: Path, write: Callable[[TextIO], object], *, newline: str | None = None) -> None:
    """Calls ``write`` with a text file (UTF-8, mode 0600) that becomes ``path`` once ``write`` returns."""
    directory = path.parent if str(path.parent) else Path(".")
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline=newline) as out:
            write(out)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """``text`` as the whole content of ``path``, written atomically."""
    atomic_write(path, lambda out: out.write(text))
