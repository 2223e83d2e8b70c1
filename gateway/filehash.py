"""Hashing an investigator's files locally: only digests ever leave the machine.

Every file gets the exact digests; images also their image kinds' hashes (PDQ),
videos their video kinds' frame hashes (vPDQ). Only a file whose name or
first bytes say image or video is handed to a decoder: the others — most of a
seized device — cost one read. What could not be hashed
perceptually, or was too poor to send, is said in ``skipped`` instead of
failing the file.

Which kinds exist, what each decodes and how its fields are named come from
:mod:`federation.algorithms`; this module adds the one thing the registry
cannot carry — the hashing functions, which need Pillow, pdqhash and PyAV —
in :data:`IMAGE_HASHERS` and :data:`VIDEO_HASHERS`, keyed by the algorithm's
name. :func:`hashes_json` is the one rendering of a file's hashes, used by
``icse-gateway hash``, the triage reports and the triage cache alike.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from federation import algorithms
from federation.algorithms import Algorithm, Content, MatchKind
from federation.query import QueryItem
from gateway import media
from gateway.media import PerceptualHash, VideoHash
from gateway.results import Skipped, Subject

if TYPE_CHECKING:
    import numpy as np

# Bytes per read: large reads keep a large file at disk speed (hashlib releases the GIL on them);
# the buffer is allocated once per thread, so a small file costs no allocation of that size.
CHUNK = 8 << 20
_buffers = threading.local()

# Image kinds: decoded RGB pixels and whether rotations/flips are wanted -> the hash.
IMAGE_HASHERS: dict[str, Callable[[np.ndarray, bool], PerceptualHash]] = {
    algorithms.PDQ.name: media.pdq_image,
}
# Video kinds: the file and the lowest frame quality kept -> frame hashes, or None if no video.
VIDEO_HASHERS: dict[str, Callable[[Path, int], VideoHash | None]] = {
    algorithms.VPDQ.name: media.video_hash,
}


def exact_digests(path: Path) -> dict[str, bytes]:
    """Every exact algorithm's digest of the file, in one pass over it."""
    return _read(path)[0]


def exact_and_head(path: Path | str, size: int = -1) -> tuple[dict[str, bytes], bytes, os.stat_result | None]:
    """The exact digests, the file's first bytes (:data:`gateway.media.HEAD_BYTES`), in one pass, and the
    file's status once read when it was read in one call (its size and time then tell whether it changed).

    ``size``, the file's size when the caller knows it, spares a small file
    the read that would only find its end: most files of a device are small.
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = os.read(descriptor, SMALL)
        if len(data) < SMALL and (len(data) == size or not os.read(descriptor, 1)):
            digests = {name: new(data).digest() for name, new in _constructors(algorithms.names())}
            return digests, data[: media.HEAD_BYTES], os.fstat(descriptor)
    finally:
        os.close(descriptor)
    return (*_read(path), None)


# A file up to this size is read in one call and hashed from the bytes read.
SMALL = 64 << 10


@functools.lru_cache(maxsize=4)
def _constructors(names: tuple[str, ...]) -> tuple[tuple[str, Callable[[bytes], Any]], ...]:
    """Each exact algorithm's hashlib constructor (``hashlib.md5``…: no name lookup per file)."""
    del names  # the cache key
    return tuple((a.name, getattr(hashlib, a.hashlib_name, None) or functools.partial(hashlib.new, a.hashlib_name))
                 for a in algorithms.all_algorithms() if a.hashlib_name)


def _read(path: Path | str) -> tuple[dict[str, bytes], bytes]:
    """The exact digests and the file's first bytes, from one pass of large reads into one reused buffer."""
    hashers = [(a.name, hashlib.new(a.hashlib_name)) for a in algorithms.all_algorithms() if a.hashlib_name]
    view: memoryview | None = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(bytearray(CHUNK))
    head = b""
    with open(path, "rb", buffering=0) as handle:
        while count := handle.readinto(view):
            chunk = view[:count]
            if not head:
                head = bytes(chunk[: media.HEAD_BYTES])
            for _, hasher in hashers:
                hasher.update(chunk)
    return {name: hasher.digest() for name, hasher in hashers}, head


@dataclass(frozen=True)
class FileHashes:
    path: Path
    exact: dict[str, bytes]
    # By algorithm name: a PerceptualHash for image kinds, a VideoHash for video kinds.
    perceptual: dict[str, PerceptualHash | VideoHash] = field(default_factory=dict)
    skipped: tuple[Skipped, ...] = ()
    # Image hashes below their kind's quality floor: never sent, but shown (as Meta's tools do).
    unsent: dict[str, PerceptualHash] = field(default_factory=dict)

    # For callers that want one kind by name (tests, the demo); the code above them does not.
    @property
    def pdq(self) -> PerceptualHash | None:
        found = self.perceptual.get(algorithms.PDQ.name)
        return found if isinstance(found, PerceptualHash) else None

    @property
    def dihedral(self) -> tuple[tuple[str, PerceptualHash], ...]:
        """PDQ's eight rotations and flips as hashes, when they were asked for."""
        pdq = self.pdq
        return tuple((name, PerceptualHash(digest, pdq.quality)) for name, digest in pdq.variants) if pdq else ()

    @property
    def video(self) -> VideoHash | None:
        found = self.perceptual.get(algorithms.VPDQ.name)
        return found if isinstance(found, VideoHash) else None


def _of(content: Content) -> list[Algorithm]:
    return [a for a in algorithms.perceptual() if a.content is content]


def hash_file(path: Path, *, dihedral: bool = False) -> FileHashes:
    """Exact digests, and the perceptual hashes of whatever the file decodes as."""
    exact, head = _read(path)
    if media.claimed_content(path, head) is None:
        return FileHashes(path, exact)  # neither its name nor its signature says image or video: no decoder runs
    source = str(path)
    found: dict[str, PerceptualHash | VideoHash] = {}
    unsent: dict[str, PerceptualHash] = {}
    skipped: list[Skipped] = []
    try:
        image = media.open_image(path)
    except media.MediaError as exc:
        return FileHashes(path, exact, skipped=tuple(Skipped(source, a.name, str(exc)) for a in _of(Content.IMAGE)))
    if image is not None:
        import numpy as np  # noqa: PLC0415 - only for an image (most files are not)

        pixels = np.asarray(image)
        for algorithm in _of(Content.IMAGE):
            hashed = IMAGE_HASHERS[algorithm.name](pixels, dihedral)
            if hashed.quality >= algorithm.min_quality:
                found[algorithm.name] = hashed
            else:
                unsent[algorithm.name] = hashed
                reason = f"quality {hashed.quality} below {algorithm.min_quality}: not sent"
                skipped.append(Skipped(source, algorithm.name, reason))
        return FileHashes(path, exact, found, tuple(skipped), unsent)
    for algorithm in _of(Content.VIDEO):
        try:
            video = VIDEO_HASHERS[algorithm.name](path, algorithm.min_quality)
        except media.MediaError as exc:
            skipped.append(Skipped(source, algorithm.name, str(exc)))
            continue
        if video is not None and not video.frames:
            reason = f"all {video.sampled} sampled frames below quality {algorithm.min_quality}"
            skipped.append(Skipped(source, algorithm.name, reason))
        elif video is not None:
            found[algorithm.name] = video
    if not found and not skipped:
        skipped = _undecodable(path, head, source)
    return FileHashes(path, exact, found, tuple(skipped))


def _undecodable(path: Path, head: bytes, source: str) -> list[Skipped]:
    """Why a file whose name or signature says image or video got no perceptual hash (none if it says neither)."""
    content = media.claimed_content(path, head)
    if content is None:
        return []
    what = "an image" if content is Content.IMAGE else "a video"
    data = "the file is empty" if not head else "its data is not in any format this gateway decodes"
    reason = f"its name or signature says {what}, but it does not decode as one: {data}"
    return [Skipped(source, a.name, reason) for a in _of(content)]


def exact_only(path: Path, reason: str) -> FileHashes:
    """Exact digests alone, every perceptual kind marked not sent for ``reason`` (no decoder runs)."""
    names = "/".join(a.name for a in algorithms.perceptual())
    return FileHashes(path, exact_digests(path), skipped=(Skipped(str(path), names, reason),))


def subjects(hashes: FileHashes, max_distance: int = 0) -> list[Subject]:
    """The query items for one file, labelled with where they came from."""
    source = str(hashes.path)
    found = [Subject(QueryItem(name, digest), source) for name, digest in hashes.exact.items()]
    for name, value in hashes.perceptual.items():
        variants = value.variants if isinstance(value, PerceptualHash) and value.variants else (("", value.digest),)
        found += [Subject(QueryItem(name, digest, max_distance), source, variant) for variant, digest in variants]
    return found


# --------------------------------------------------------------------------- one rendering of a file's hashes


def hashes_json(hashes: FileHashes | None) -> dict[str, Any]:
    """A file's hashes as flat JSON fields, the same in every output; None for a file not hashed.

    Every kind has its field (``md5``, ``pdq``, ``vpdq``, …: hex, or null);
    image kinds add ``<name>_quality`` (and ``<name>_dihedral`` when the
    rotations were asked for), video kinds ``<name>_frames``,
    ``<name>_frames_sampled`` and ``<name>_frames_low_quality``;
    an image hash below its quality floor is shown with ``<name>_sent`` false;
    ``not_sent`` lists what was not sent and why. Nothing is lost:
    :func:`hashes_from_json` reads it back.
    """
    if hashes is not None and not hashes.perceptual and not hashes.unsent:
        # Most files of a device: exact digests only. Every other field is as for no hashes at all.
        entry = dict(_no_hashes(algorithms.names()))
        for name, exact in hashes.exact.items():
            if name in entry:
                entry[name] = exact.hex()
        entry["not_sent"] = [{"algorithm": s.algorithm, "reason": s.reason} for s in hashes.skipped]
        return entry
    entry = {}
    for algorithm in algorithms.all_algorithms():
        name = algorithm.name
        value = hashes.perceptual.get(name) if hashes else None
        if not algorithm.perceptual:
            digest = hashes.exact.get(name) if hashes else None
            entry[name] = digest.hex() if digest is not None else None
        elif algorithm.match_kind is MatchKind.FRAMES:
            video = value if isinstance(value, VideoHash) else None
            entry[name] = video.digest.hex() if video else None
            entry[f"{name}_frames"] = len(video.frames) if video else None
            entry[f"{name}_frames_sampled"] = video.sampled if video else None
            entry[f"{name}_frames_low_quality"] = video.low_quality if video else None
        else:
            image = value if isinstance(value, PerceptualHash) else None
            shown = image or (hashes.unsent.get(name) if hashes else None)
            entry[name] = shown.digest.hex() if shown else None
            entry[f"{name}_quality"] = shown.quality if shown else None
            entry[f"{name}_sent"] = None if shown is None else image is not None
            if shown and shown.variants:
                entry[f"{name}_dihedral"] = {variant: digest.hex() for variant, digest in shown.variants}
    entry["not_sent"] = [{"algorithm": s.algorithm, "reason": s.reason} for s in (hashes.skipped if hashes else ())]
    return entry


@functools.lru_cache(maxsize=4)
def _no_hashes(names: tuple[str, ...]) -> dict[str, Any]:
    """:func:`hashes_json` of no hashes, for the registry holding ``names`` (copied, never changed)."""
    del names  # the cache key: a registry with other kinds has other fields
    return hashes_json(None)


def hashes_text(hashes: FileHashes) -> str:
    """:func:`hashes_json` as compact JSON text: what the triage stores and caches, encoded once
    (in the hashing process); ASCII, so that a reason holding an undecodable file name survives."""
    return json.dumps(hashes_json(hashes), separators=(",", ":"))


def hashes_from_json(entry: dict[str, Any], path: str) -> FileHashes:
    """The hashes :func:`hashes_json` wrote for the file at ``path``."""
    exact: dict[str, bytes] = {}
    found: dict[str, PerceptualHash | VideoHash] = {}
    unsent: dict[str, PerceptualHash] = {}
    for algorithm in algorithms.all_algorithms():
        name = algorithm.name
        if entry.get(name) is None:
            continue
        digest = bytes.fromhex(entry[name])
        if not algorithm.perceptual:
            exact[name] = digest
        elif algorithm.match_kind is MatchKind.FRAMES:
            size = algorithm.digest_size
            frames = tuple(digest[i : i + size] for i in range(0, len(digest), size))
            found[name] = VideoHash(frames, int(entry[f"{name}_frames_sampled"]),
                                    int(entry[f"{name}_frames_low_quality"]))
        else:
            variants = tuple((v, bytes.fromhex(d)) for v, d in (entry.get(f"{name}_dihedral") or {}).items())
            image = PerceptualHash(digest, int(entry[f"{name}_quality"]), variants)
            if entry.get(f"{name}_sent") is False:
                unsent[name] = image
            else:
                found[name] = image
    skipped = tuple(Skipped(path, s["algorithm"], s["reason"]) for s in entry["not_sent"])
    return FileHashes(Path(path), exact, found, skipped, unsent)


# --------------------------------------------------------------------------- exact digests alone, most files


def exact_kinds() -> tuple[tuple[str, int], ...]:
    """(name, digest size) of every exact kind, in the order :func:`exact_digests` and the rows list them."""
    return _exact_kinds(algorithms.names())


@functools.lru_cache(maxsize=4)
def _exact_kinds(names: tuple[str, ...]) -> tuple[tuple[str, int], ...]:
    del names  # the cache key: a registry with other kinds has other ones
    return tuple((a.name, a.digest_size) for a in algorithms.all_algorithms() if a.hashlib_name)


def exact_text_parts() -> tuple[str, ...]:
    """:func:`hashes_text` of exact digests alone (every exact kind), cut where the quoted hex digests go:
    ``parts[0] "hex0" parts[1] "hex1" … parts[-1]``."""
    return _text_parts(algorithms.names())


@functools.lru_cache(maxsize=4)
def _text_parts(names: tuple[str, ...]) -> tuple[str, ...]:
    entry = hashes_json(None)
    exact = _exact_kinds(names)
    for position, (name, _) in enumerate(exact):
        entry[name] = f"@{position}@"
    text = json.dumps(entry, separators=(",", ":"))
    parts = []
    for position in range(len(exact)):
        before, text = text.split(f'"@{position}@"')
        parts.append(before)
    parts.append(text)
    return tuple(parts)


def exact_text(hexes: Sequence[str]) -> str:
    """:func:`hashes_text` of exact digests alone, from their hex forms (in :func:`exact_kinds` order),
    without building the JSON: most files of a device have nothing else."""
    parts = exact_text_parts()
    return "".join([text for part, hexed in zip(parts, hexes, strict=False) for text in (part, f'"{hexed}"')]) \
        + parts[-1]

