"""The version of the federation protocol this code speaks (PROTOCOL.md, "Versioning").

``MAJOR.MINOR``: a minor version only adds what a peer of the same major
version may ignore (new fields, new optional claims); a new major version
changes something a peer cannot ignore (the query digest, a claim's meaning),
and peers of different major versions refuse each other. The major version is
also bound into the query digest's domain tag (``federation.query``), so a
token made under one major version never verifies a request under another.
"""

from __future__ import annotations

import re

MAJOR = 1
MINOR = 1
VERSION = f"{MAJOR}.{MINOR}"

# Optional features a node lists in Describe (PROTOCOL.md, "Features").
# v2: items and answers packed, each distinct bucket answered once (v1, one message per item, is gone).
PRIVATE_EXACT_FEATURE = "private.exact.v2"

_VERSION = re.compile(r"(0|[1-9][0-9]{0,3})\.(0|[1-9][0-9]{0,3})")


class IncompatibleProtocol(ValueError):
    """A peer speaks a protocol version this code cannot serve or use."""


def parse(text: str) -> tuple[int, int]:
    """``"1.0"`` -> ``(1, 0)``; ``ValueError`` naming the text otherwise."""
    found = _VERSION.fullmatch(text)
    if found is None:
        raise ValueError(f"protocol version {text[:32]!r} is not MAJOR.MINOR (e.g. {VERSION!r})")
    return int(found.group(1)), int(found.group(2))


def check_compatible(text: str, peer: str = "peer") -> tuple[int, int]:
    """The peer's version if this code may talk to it, else ``IncompatibleProtocol``
    saying, in words, which versions the two sides speak."""
    if not text:
        raise IncompatibleProtocol(
            f"{peer} states no protocol version; this software speaks ICSE protocol {VERSION} "
            f"(a node of protocol 1.0 or later states it in Describe and in every Match answer)")
    try:
        major, minor = parse(text)
    except ValueError as exc:
        raise IncompatibleProtocol(f"{peer}: {exc}") from None
    if major != MAJOR:
        raise IncompatibleProtocol(
            f"{peer} speaks ICSE protocol {text}, this software speaks {VERSION}: "
            f"major versions {major} and {MAJOR} are incompatible, its answers are not used")
    return major, minor
