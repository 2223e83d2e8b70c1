"""The node's secret OPRF keys for private exact matching: one file, owner-only.

The file sits beside the store's catalog (``<store>.oprf-key``, mode 0600) and
holds up to three keys, hex-encoded:

- ``active``: the key queries are answered under;
- ``next``: set by a rotation; outputs under it are computed in the background
  for every segment, and once every live segment has them it becomes active;
- ``previous``: the key active before the last rotation, kept so a disclosure
  proved under it (a gateway that asked just before the switch) still works.

Every writer of segments (import, merge) and the serving node read the file;
only ``init``/``rotate`` (command line) and the serving node's builder
(``promote``) write it, each atomically (temporary file, fsync, rename). The
secret keys are never logged: logs and ``describe`` name a key by its id.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from federation import oprf
from node.private_files import open_private, open_private_append


class KeyFileError(ValueError):
    """The key file is unreadable or inconsistent; the message says how."""


@dataclass(frozen=True)
class PrivateKeys:
    active: bytes
    next: bytes | None = None
    previous: bytes | None = None

    @property
    def active_id(self) -> str:
        return oprf.key_id(self.active)

    def by_id(self) -> dict[str, bytes]:
        """Every key held, by key id (the names outputs are stored under)."""
        return {oprf.key_id(k): k for k in (self.active, self.next, self.previous) if k is not None}

    def computed(self) -> dict[str, bytes]:
        """The keys a new segment gets outputs for: active and next (previous is only read)."""
        return {oprf.key_id(k): k for k in (self.active, self.next) if k is not None}


def key_path(store: Path) -> Path:
    return store.with_name(store.name + ".oprf-key")


def load(store: Path) -> PrivateKeys | None:
    """The store's keys, or None when it has none (private mode never set up)."""
    path = key_path(store)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the OPRF key file ({exc})") from None
    try:
        doc = json.loads(text)
        found = [bytes.fromhex(doc[name]) if doc.get(name) else None for name in ("active", "next", "previous")]
        if found[0] is None:
            raise ValueError("no active key")
        keys = PrivateKeys(found[0], found[1], found[2])
        for key in (keys.active, keys.next, keys.previous):
            if key is not None:
                oprf.public_key(key)  # a canonical non-zero scalar, else OprfError
    except (ValueError, TypeError, AttributeError, KeyError):
        # The message never quotes the file: it holds secrets.
        raise KeyFileError(f"{path}: not a valid OPRF key file (restore it from a backup, or "
                           "`icse-node private-key init --replace` and let outputs be recomputed)") from None
    return keys


def _write(store: Path, keys: PrivateKeys) -> None:
    path = key_path(store)
    temporary = path.with_name(f".{path.name}.tmp")
    doc = {name: key.hex() if key is not None else None
           for name, key in (("active", keys.active), ("next", keys.next), ("previous", keys.previous))}
    with open_private(temporary, "w") as handle:
        handle.write(json.dumps(doc) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


@contextlib.contextmanager
def _locked(store: Path) -> Iterator[None]:
    """One writer of the key file at a time (command line and serving node)."""
    with open_private_append(key_path(store).with_name(key_path(store).name + ".lock")) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def init(store: Path, *, replace: bool = False) -> tuple[PrivateKeys, bool]:
    """The store's keys, generating an active key if there is none; (keys, created)."""
    with _locked(store):
        keys = None if replace else load(store)
        if keys is not None:
            return keys, False
        keys = PrivateKeys(oprf.generate_key())
        _write(store, keys)
        return keys, True


def rotate(store: Path) -> PrivateKeys:
    """Starts a rotation: a new ``next`` key. ``KeyFileError`` if none is set up or one is under way."""
    with _locked(store):
        keys = load(store)
        if keys is None:
            raise KeyFileError(f"{key_path(store)}: no OPRF key to rotate (run `icse-node private-key init`)")
        if keys.next is not None:
            raise KeyFileError(f"a rotation to key {oprf.key_id(keys.next)} is under way; it finishes once every "
                               "segment has outputs under it (the serving node computes them)")
        keys = PrivateKeys(keys.active, oprf.generate_key(), keys.previous)
        _write(store, keys)
        return keys


def promote(store: Path, next_id: str) -> PrivateKeys | None:
    """Makes the ``next`` key active (the old one becomes ``previous``), if it is still
    the one named ``next_id``; the new keys, or None if the file changed meanwhile."""
    with _locked(store):
        keys = load(store)
        if keys is None or keys.next is None or oprf.key_id(keys.next) != next_id:
            return None
        keys = PrivateKeys(keys.next, None, keys.active)
        _write(store, keys)
        return keys
