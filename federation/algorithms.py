"""The hash kinds the federation speaks, each described once.

Everything that needs to know about an algorithm — the CLI parsing
``sha256:HEX``, the node validating a query, the importer checking a row, the
node choosing an index — asks this registry instead of branching on names.
Later kinds (perceptual ones) register here with their own match kind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class MatchKind(Enum):
    """How a node compares digests of an algorithm, and so which index serves it."""

    EXACT = "exact"
    HAMMING = "hamming"


class DigestError(ValueError):
    """A digest or algorithm name that cannot be used; the message says why."""


@dataclass(frozen=True)
class Algorithm:
    name: str
    digest_size: int
    match_kind: MatchKind
    # Name in hashlib when investigators' files are hashed locally with it.
    hashlib_name: str | None = None
    # Largest Hamming distance a node may be asked for (perceptual kinds).
    max_distance: int = 0

    def validate(self, digest: bytes) -> bytes:
        if len(digest) != self.digest_size:
            raise DigestError(
                f"{self.name} digest must be {self.digest_size} bytes "
                f"({self.digest_size * 2} hex characters), got {len(digest)}"
            )
        return digest

    def parse_hex(self, text: str) -> bytes:
        text = text.strip().lower()
        if len(text) != self.digest_size * 2:
            raise DigestError(
                f"{self.name} digest must be {self.digest_size * 2} hex characters, got {len(text)}"
            )
        if not _HEX.fullmatch(text):
            raise DigestError(f"{self.name} digest is not hexadecimal: {text[:80]!r}")
        return bytes.fromhex(text)


_HEX = re.compile(r"[0-9a-f]*")

MD5 = Algorithm("md5", 16, MatchKind.EXACT, hashlib_name="md5")
SHA1 = Algorithm("sha1", 20, MatchKind.EXACT, hashlib_name="sha1")
SHA256 = Algorithm("sha256", 32, MatchKind.EXACT, hashlib_name="sha256")

_REGISTRY: dict[str, Algorithm] = {a.name: a for a in (MD5, SHA1, SHA256)}


def all_algorithms() -> tuple[Algorithm, ...]:
    return tuple(_REGISTRY.values())


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str) -> Algorithm:
    """The algorithm registered under exactly ``name`` (lower case, as on the wire)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DigestError(
            f"unknown algorithm {name[:40]!r} (known: {', '.join(_REGISTRY)})"
        ) from None


def parse_tagged(text: str) -> tuple[Algorithm, bytes]:
    """Parses ``algo:hex`` as written on command lines and in hash lists."""
    algo, sep, hexdigest = text.strip().partition(":")
    if not sep:
        raise DigestError(f"expected ALGORITHM:HEX, got {text.strip()[:80]!r}")
    algorithm = get(algo.strip().lower())
    return algorithm, algorithm.parse_hex(hexdigest)
