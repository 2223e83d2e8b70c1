"""Walking a seized tree: every entry listed once, nothing followed out of it, nothing fatal.

Symbolic links are never followed out of the tree, nor into directories (the
directories inside the tree are walked anyway, and loops are impossible); a
link to a regular file inside the tree is hashed as that file. FIFOs, sockets
and devices are listed and never opened. What cannot be read (permission
denied, vanished, broken link, link loop, name too long, I/O error) is listed
with the reason.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from gateway.triage.model import NOT_HASHED, UNREADABLE, FileRow, Task

# Regular files of one directory handed over at once by :func:`walk_files`.
FILES_AT_ONCE = 256


@dataclass(frozen=True)
class Files:
    """Regular files of one directory, consecutive in walk order, not yet looked at: a hashing
    process stats, reads and hashes them (the walk only lists the directory)."""

    directory: str
    names: list[str]


def reason_of(exc: OSError) -> str:
    """An OS error in words, with its symbolic name: ``Permission denied (EACCES)``."""
    name = errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc)
    return f"{text} ({name})" if name else text


def kind_of(mode: int) -> str:
    """What a file that is not a regular file is, for the row's reason."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _link(path: str, root: str) -> Task | FileRow:
    try:
        target_text = os.readlink(path)
    except OSError:
        target_text = "?"
    try:
        st = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return FileRow(path, UNREADABLE, f"broken symbolic link to {target_text!r}: the target does not exist")
        return FileRow(path, UNREADABLE, f"symbolic link to {target_text!r} cannot be followed: {reason_of(exc)}")
    target = os.path.realpath(path)
    if not _inside(target, root):
        return FileRow(path, NOT_HASHED, f"symbolic link to {target_text!r}, outside the directory: not followed")
    if stat.S_ISDIR(st.st_mode):
        return FileRow(path, NOT_HASHED, f"symbolic link to directory {target_text!r}: not followed "
                       "(directories inside the tree are walked on their own)")
    if not stat.S_ISREG(st.st_mode):
        return FileRow(path, NOT_HASHED, f"symbolic link to a {kind_of(st.st_mode)}: not read")
    return Task(path, target, st.st_size, st.st_mtime_ns)


def walk(root: str, exclude: frozenset[str] = frozenset(),
         stop: threading.Event | None = None) -> Iterator[Task | FileRow]:
    """Every entry under ``root`` (a real, absolute path), depth first, in name order: :func:`walk_files`
    with each regular file stat'ed here, a task of its own (for the directories a list names)."""
    for entry in walk_files(root, exclude, stop):
        if not isinstance(entry, Files):
            yield entry
            continue
        for name in entry.names:
            path = os.path.join(entry.directory, name)
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError as exc:
                yield FileRow(path, UNREADABLE, reason_of(exc))
                continue
            yield Task(path, path, st.st_size, st.st_mtime_ns)


def walk_files(root: str, exclude: frozenset[str] = frozenset(),
               stop: threading.Event | None = None) -> Iterator[Task | FileRow | Files]:
    """Every entry under ``root`` (a real, absolute path), depth first, in name order, the regular
    files of a directory in groups (:class:`Files`), named only: a seized device is mostly regular
    files, and the walk's own process then does nothing per file (no stat, no object)."""
    # Only a directory holding some excluded path needs each name checked.
    holders = {os.path.dirname(path) for path in exclude}
    stack = [root]
    while stack:
        directory = stack.pop()
        try:
            with os.scandir(directory) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            yield FileRow(directory, UNREADABLE, f"directory cannot be listed: {reason_of(exc)}")
            continue
        if stop is not None and stop.is_set():
            return
        checked = directory in holders
        subdirectories = []
        names: list[str] = []
        for entry in entries:
            try:
                # d_type from the listing: no system call for a regular file.
                if entry.is_file(follow_symlinks=False) and not (checked and entry.path in exclude):
                    names.append(entry.name)
                    if len(names) >= FILES_AT_ONCE:
                        yield Files(directory, names)
                        names = []
                    continue
            except OSError:
                pass  # told below, with the entry's other cases
            if names:
                yield Files(directory, names)
                names = []
            path = entry.path
            if path in exclude:
                yield FileRow(path, NOT_HASHED, "written by this run (report or cache): not hashed")
                continue
            try:
                if entry.is_symlink():
                    yield _link(path, root)
                elif entry.is_dir(follow_symlinks=False):
                    subdirectories.append(path)
                else:
                    kind = kind_of(entry.stat(follow_symlinks=False).st_mode)
                    yield FileRow(path, NOT_HASHED, f"{kind}: not read")
            except OSError as exc:
                yield FileRow(path, UNREADABLE, reason_of(exc))
        if names:
            yield Files(directory, names)
        stack.extend(reversed(subdirectories))



def listed(path: str, exclude: frozenset[str] = frozenset(),
           stop: threading.Event | None = None) -> Iterator[Task | FileRow]:
    """One path handed over in a list (``--from-list``): a file as it is, a directory walked.

    The list says exactly what to look at, so a symbolic link in it is followed
    to a regular file wherever it points; never to a directory.
    """
    if path in exclude:
        yield FileRow(path, NOT_HASHED, "written by this run (report or cache): not hashed")
        return
    try:
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            try:
                st = os.stat(path)
            except OSError as exc:
                yield FileRow(path, UNREADABLE, f"symbolic link cannot be followed: {reason_of(exc)}")
                return
            if stat.S_ISREG(st.st_mode):
                yield Task(path, os.path.realpath(path), st.st_size, st.st_mtime_ns)
            else:
                yield FileRow(path, NOT_HASHED, f"symbolic link to a {kind_of(st.st_mode)}: not followed")
            return
    except OSError as exc:
        yield FileRow(path, UNREADABLE, reason_of(exc))
        return
    if stat.S_ISDIR(st.st_mode):
        yield from walk(os.path.realpath(path), exclude, stop)
    elif stat.S_ISREG(st.st_mode):
        yield Task(path, path, st.st_size, st.st_mtime_ns)
    else:
        yield FileRow(path, NOT_HASHED, f"{kind_of(st.st_mode)}: not read")
