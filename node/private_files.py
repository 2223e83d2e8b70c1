"""The node's SQLite files readable by their owner only, whatever the umask.

The store holds the member's hash set and the audit log of every query: it must
not be world-readable because the operator's umask is the common 022. SQLite
creates its ``-wal`` and ``-shm`` files with the mode of the database file, so
creating the database 0600 before SQLite opens it is enough for new stores;
files left with a wider mode (by an older version, or a copy) are narrowed.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import IO

_COMPANIONS = ("", "-wal", "-shm", "-journal")


def make_private(path: Path) -> None:
    """Creates ``path`` empty with mode 0600 if missing (SQLite takes an empty
    file as a new database) and removes group and other access from it and its
    existing companion files (those this user owns: only the owner may chmod)."""
    descriptor = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.close(descriptor)
    for suffix in _COMPANIONS:
        companion = Path(f"{path}{suffix}")
        try:
            status = companion.stat()
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(status.st_mode)
        if mode & 0o077 and status.st_uid == os.geteuid():
            os.chmod(companion, mode & 0o700)


def make_private_directory(path: Path) -> None:
    """Creates ``path`` (and missing parents) 0700, or narrows it if this user owns
    it: a segment directory holds rows and index arrays of the hash set."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    status = path.stat()
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o077 and status.st_uid == os.geteuid():
        os.chmod(path, mode & 0o700)


def open_private(path: Path, mode: str = "wb") -> IO:
    """``path`` opened for writing (truncated), created 0600 whatever the umask."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    return os.fdopen(descriptor, mode)


def open_private_append(path: Path) -> IO:
    """``path`` opened for appending (not truncated), created 0600 if missing."""
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return os.fdopen(descriptor, "a")
