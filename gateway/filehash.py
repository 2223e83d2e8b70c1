"""Hashing an investigator's files locally: only digests ever leave the machine.

Every file gets the exact digests; images also a PDQ hash, videos their frame
hashes. What could not be hashed perceptually, or was too poor to send, is
said in ``notes`` instead of failing the file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from federation import algorithms
from federation.query import QueryItem
from gateway import media
from gateway.results import Skipped, Subject

CHUNK = 1 << 20


def exact_digests(path: Path) -> dict[str, bytes]:
    """Every exact algorithm's digest of the file, in one pass over it."""
    hashers = {a.name: hashlib.new(a.hashlib_name) for a in algorithms.all_algorithms() if a.hashlib_name}
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            for hasher in hashers.values():
                hasher.update(chunk)
    return {name: hasher.digest() for name, hasher in hashers.items()}


@dataclass(frozen=True)
class FileHashes:
    path: Path
    exact: dict[str, bytes]
    pdq: media.PerceptualHash | None = None
    # The eight rotations/flips, when asked for (the first is the original).
    dihedral: tuple[tuple[str, media.PerceptualHash], ...] = ()
    video: media.VideoHash | None = None
    skipped: tuple[Skipped, ...] = field(default=())
    # A PDQ hash below the quality floor: never sent, but shown by ``icse-gateway hash``.
    pdq_unsent: media.PerceptualHash | None = None


def hash_file(path: Path, *, dihedral: bool = False) -> FileHashes:
    exact = exact_digests(path)
    source = str(path)
    try:
        image = media.open_image(path)
    except media.MediaError as exc:
        return FileHashes(path, exact, skipped=(Skipped(source, "pdq", str(exc)),))
    if image is not None:
        pixels = np.asarray(image)
        if dihedral:
            variants = tuple(media.pdq_dihedral(pixels))
            return _checked(FileHashes(path, exact, variants[0][1], variants), algorithms.PDQ)
        return _checked(FileHashes(path, exact, media.pdq(pixels)), algorithms.PDQ)
    try:
        video = media.video_hash(path, algorithms.VPDQ.min_quality)
    except media.MediaError as exc:
        return FileHashes(path, exact, skipped=(Skipped(source, "vpdq", str(exc)),))
    if video is not None and not video.frames:
        reason = f"all {video.sampled} sampled frames below quality {algorithms.VPDQ.min_quality}"
        return FileHashes(path, exact, skipped=(Skipped(source, "vpdq", reason),))
    return FileHashes(path, exact, video=video)


def _checked(hashes: FileHashes, algorithm: algorithms.Algorithm) -> FileHashes:
    """Drops a PDQ hash whose quality is too low to match reliably."""
    assert hashes.pdq is not None
    if hashes.pdq.quality >= algorithm.min_quality:
        return hashes
    reason = f"quality {hashes.pdq.quality} below {algorithm.min_quality}: not sent"
    return FileHashes(hashes.path, hashes.exact, skipped=(Skipped(str(hashes.path), algorithm.name, reason),),
                      pdq_unsent=hashes.pdq)


def subjects(hashes: FileHashes, max_distance: int = 0) -> list[Subject]:
    """The query items for one file, labelled with where they came from."""
    source = str(hashes.path)
    found = [Subject(QueryItem(name, digest), source) for name, digest in hashes.exact.items()]
    if hashes.dihedral:
        found += [Subject(QueryItem("pdq", h.digest, max_distance), source, variant)
                  for variant, h in hashes.dihedral]
    elif hashes.pdq is not None:
        found.append(Subject(QueryItem("pdq", hashes.pdq.digest, max_distance), source))
    if hashes.video is not None:
        found.append(Subject(QueryItem("vpdq", hashes.video.digest, max_distance), source))
    return found
