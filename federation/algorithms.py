"""The hash kinds the federation speaks, each described once.

Everything that needs to know about an algorithm — the CLI parsing
``sha256:HEX``, the node validating a query, the importer checking a row, the
node choosing an index, the gateway hashing a file and naming the fields of
its reports — asks this registry instead of branching on names.

Like python-threatexchange's ``SignalType``, an entry says what content it
hashes (:class:`Content`) and how it is shown, but this package carries no
decoder: the node never decodes media, and must not load Pillow or FFmpeg to
learn what ``pdq`` is. The gateway keeps the hashing functions in one small
table keyed by :attr:`Algorithm.name` (:mod:`gateway.filehash`), checked
against this registry by the tests; adding a kind is an entry here and, for a
perceptual one, its function there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class MatchKind(Enum):
    """How a node compares digests of an algorithm, and so which index serves it."""

    EXACT = "exact"
    # One perceptual hash; a match is within a Hamming distance.
    HAMMING = "hamming"
    # A sequence of perceptual frame hashes (video); a match is a stored video
    # holding near matches for a large enough share of the query's frames.
    FRAMES = "frames"


class Content(Enum):
    """What a file must be for an algorithm to hash it (threatexchange's ``ContentType``)."""

    # Any bytes: exact digests, computed with hashlib.
    BYTES = "bytes"
    # A decoded picture.
    IMAGE = "image"
    # The decoded frames of a video.
    VIDEO = "video"


class DigestError(ValueError):
    """A digest or algorithm name that cannot be used; the message says why."""


@dataclass(frozen=True)
class Algorithm:
    name: str
    # Bytes of one hash (of one frame, for FRAMES kinds).
    digest_size: int
    match_kind: MatchKind
    # Name in hashlib when investigators' files are hashed locally with it.
    hashlib_name: str | None = None
    # Perceptual kinds: the distance asked for when a query names none.
    default_distance: int = 0
    # Perceptual kinds: hashes below this quality are unreliable and not sent.
    min_quality: int = 0
    # FRAMES kinds: a digest is 1..max_frames hashes concatenated.
    max_frames: int = 1
    # FRAMES kinds: share of query frames that must match a stored video.
    min_share: float = 0.0
    # What the gateway decodes to hash a file with it.
    content: Content = Content.BYTES
    # How people call it (report headings); the name when empty.
    label: str = ""

    @property
    def title(self) -> str:
        return self.label or self.name

    @property
    def perceptual(self) -> bool:
        return self.match_kind is not MatchKind.EXACT

    def validate(self, digest: bytes) -> bytes:
        size, count = self.digest_size, len(digest) // self.digest_size
        if self.max_frames == 1 and len(digest) != size:
            raise DigestError(
                f"{self.name} digest must be {size} bytes ({size * 2} hex characters), got {len(digest)}"
            )
        if self.max_frames > 1 and (len(digest) % size or not 1 <= count <= self.max_frames):
            raise DigestError(
                f"{self.name} digest must be 1 to {self.max_frames} frame hashes of {size} bytes, "
                f"got {len(digest)} bytes"
            )
        return digest

    def parse_hex(self, text: str) -> bytes:
        text = text.strip().lower()
        if self.max_frames == 1 and len(text) != self.digest_size * 2:
            raise DigestError(
                f"{self.name} digest must be {self.digest_size * 2} hex characters, got {len(text)}"
            )
        if not _HEX.fullmatch(text) or len(text) % 2:
            raise DigestError(f"{self.name} digest is not hexadecimal: {text[:80]!r}")
        return self.validate(bytes.fromhex(text))


_HEX = re.compile(r"[0-9a-f]*")

MD5 = Algorithm("md5", 16, MatchKind.EXACT, hashlib_name="md5")
SHA1 = Algorithm("sha1", 20, MatchKind.EXACT, hashlib_name="sha1")
SHA256 = Algorithm("sha256", 32, MatchKind.EXACT, hashlib_name="sha256")
# Meta's PDQ: 256 bits; distance <= 31 is a match, quality < 50 is unreliable.
PDQ = Algorithm("pdq", 32, MatchKind.HAMMING, default_distance=31, min_quality=50, content=Content.IMAGE,
                label="PDQ")
# Video as PDQ hashes of about one frame per second (consecutive near-identical
# frames dropped); vPDQ's rule: >= 80 % of query frames within distance 31.
VPDQ = Algorithm("vpdq", 32, MatchKind.FRAMES, default_distance=31, min_quality=50,
                 max_frames=4096, min_share=0.8, content=Content.VIDEO, label="vPDQ")

_REGISTRY: dict[str, Algorithm] = {a.name: a for a in (MD5, SHA1, SHA256, PDQ, VPDQ)}


def all_algorithms() -> tuple[Algorithm, ...]:
    return tuple(_REGISTRY.values())


def perceptual() -> tuple[Algorithm, ...]:
    """The kinds computed by decoding a file (images, videos), in registry order."""
    return tuple(a for a in _REGISTRY.values() if a.perceptual)


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
