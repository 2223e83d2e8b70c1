"""Hashing an investigator's files locally: only digests ever leave the machine."""

from __future__ import annotations

import hashlib
from pathlib import Path

from federation import algorithms
from federation.query import QueryItem

CHUNK = 1 << 20


def exact_digests(path: Path) -> dict[str, bytes]:
    """Every exact algorithm's digest of the file, in one pass over it."""
    hashers = {a.name: hashlib.new(a.hashlib_name) for a in algorithms.all_algorithms() if a.hashlib_name}
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.digest() for name, hasher in hashers.items()}


def file_items(path: Path) -> list[QueryItem]:
    return [QueryItem(name, digest) for name, digest in exact_digests(path).items()]
