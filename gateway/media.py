"""Perceptual hashes of an investigator's images and videos, computed locally.

Images: decoded with Pillow, turned upright by their EXIF orientation, every
mode converted to RGB, then hashed with ``pdqhash`` (Meta's reference PDQ
implementation). Videos: decoded with PyAV, about one frame per second hashed
with PDQ, consecutive near-identical frames dropped — vPDQ's recipe.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from federation.algorithms import Content

if TYPE_CHECKING:
    import numpy as np
    from PIL import Image

# The decoders (Pillow, PyAV, pdqhash, NumPy) are imported by the functions that use them: most files of a
# device are neither image nor video, and a process that only reads them (a hashing worker, the command
# line) starts without them.

# Images above this many pixels are refused rather than decoded (decompression bombs).
MAX_PIXELS = 64_000_000
# Frames per second sampled from videos.
VIDEO_FPS = 1.0
# Consecutive frame hashes this close are one scene: keep the first only.
FRAME_DEDUPE_DISTANCE = 10
MAX_VIDEO_FRAMES = 4096
VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".wmv", ".flv", ".3gp",
                            ".mpg", ".mpeg", ".ts", ".mts", ".vob", ".ogv"})
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".tif", ".tiff",
                            ".webp", ".heic", ".heif", ".avif", ".jp2", ".j2k", ".ico", ".pcx", ".tga", ".ppm",
                            ".pgm", ".pbm"})
# Bytes read from the start of a file to tell what it is.
HEAD_BYTES = 512
# Leading bytes of image formats: (offset, bytes). Enough to tell that a file
# means to be an image even when its name does not say so.
_IMAGE_SIGNATURES = ((0, b"\xff\xd8\xff"), (0, b"\x89PNG\r\n\x1a\n"), (0, b"GIF87a"), (0, b"GIF89a"),
                     (0, b"II*\x00"), (0, b"MM\x00*"), (8, b"WEBP"), (4, b"ftypheic"), (0, b"BM"),
                     (4, b"ftypheix"), (4, b"ftypmif1"), (4, b"ftypavif"), (0, b"\x00\x00\x00\x0cjP  "))
# Leading bytes of the video containers this gateway opens, and the FFmpeg
# demuxer each is opened with. FFmpeg is never left to guess: its probe also
# picks playlist and concatenation formats (HLS, ffconcat, ...) that open the
# other files a crafted file names — any local file, or a FIFO that hangs
# the decoder — and raw stream formats it "finds" in random bytes. Probing
# every file also cost ~47 ms each, most of a triage run's time.
_VIDEO_SIGNATURES = ((4, b"ftyp", "mov"), (0, b"\x1a\x45\xdf\xa3", "matroska"), (8, b"AVI ", "avi"),
                     (0, b"FLV\x01", "flv"), (0, b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "asf"),
                     (0, b"\x00\x00\x01\xba", "mpeg"), (0, b"\x00\x00\x01\xb3", "mpegvideo"),
                     (0, b"OggS", "ogg"))
# MPEG transport streams: a sync byte every 188 bytes (every 192 in M2TS, after a 4-byte time code).
_TS_SYNC = 0x47
_TS_LAYOUTS = ((0, 188), (4, 192))
_TS_SYNCS = bytes([_TS_SYNC] * 3)
VIDEO_FORMATS_SAID = "MP4/MOV, Matroska/WebM, AVI, FLV, ASF/WMV, MPEG-PS, MPEG-TS, Ogg"

DIHEDRAL_NAMES = ("original", "rot90", "rot180", "rot270", "flip-v", "flip-h", "rot90-flip-v", "rot90-flip-h")


class MediaError(ValueError):
    """A file that looks like media but cannot be hashed; the message says why."""


@dataclass(frozen=True)
class PerceptualHash:
    """One image's hash and quality; with ``variants``, also its rotations and flips."""

    digest: bytes
    quality: int
    # (name, digest) of the eight rotations/flips when asked for, "original" first.
    variants: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class VideoHash:
    """A video's frame hashes, and how many frames were looked at to keep them."""

    frames: tuple[bytes, ...]  # kept frame hashes, in time order
    sampled: int  # frames hashed before dropping near-duplicates and low quality
    low_quality: int  # sampled frames dropped for quality below the threshold

    @property
    def digest(self) -> bytes:
        return b"".join(self.frames)


def _bits_to_bytes(bits: np.ndarray) -> bytes:
    # Bit 0 of pdqhash's vector is the most significant bit of the first hex
    # digit, as in ThreatExchange's hex form.
    import numpy as np  # noqa: PLC0415 - see the imports

    return np.packbits(np.asarray(bits, dtype=np.uint8)).tobytes()


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB; transparency is composed onto white."""
    import numpy as np  # noqa: PLC0415 - see the imports
    from PIL import Image  # noqa: PLC0415

    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        span = float(values.max() - values.min()) or 1.0
        image = Image.fromarray(((values - values.min()) * (255.0 / span)).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def open_image(path: Path) -> Image.Image | None:
    """The image upright and in RGB, or None when the file is not an image."""
    from PIL import Image, ImageOps, UnidentifiedImageError  # noqa: PLC0415 - see the imports

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_PIXELS:
                    raise MediaError(f"image of {image.width}x{image.height} pixels is too large to hash")
                image.load()
                return to_rgb(ImageOps.exif_transpose(image))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        return None
    except (OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, MediaError):
            raise
        raise MediaError(f"image cannot be decoded: {exc}") from None


def read_head(path: Path) -> bytes:
    """The first bytes of a file, enough for :func:`claimed_content` and :func:`video_demuxer`."""
    with path.open("rb") as handle:
        return handle.read(HEAD_BYTES)


def _by_offset(signatures: tuple[tuple[int, bytes], ...]) -> tuple[tuple[int, tuple[bytes, ...]], ...]:
    """Signatures grouped by offset: one ``startswith`` per offset (this runs for every file of a device)."""
    offsets = sorted({offset for offset, _ in signatures})
    return tuple((offset, tuple(magic for at, magic in signatures if at == offset)) for offset in offsets)


_IMAGE_SIGNED = _by_offset(_IMAGE_SIGNATURES)


def _signed(head: bytes, grouped: tuple[tuple[int, tuple[bytes, ...]], ...]) -> bool:
    return any(head.startswith(magics, offset) for offset, magics in grouped)


def video_demuxer(head: bytes) -> str | None:
    """The FFmpeg demuxer for a file starting with ``head``, when it is a video container this gateway opens."""
    for offset, magic, demuxer in _VIDEO_SIGNATURES:
        if head.startswith(magic, offset):
            return demuxer
    for start, packet in _TS_LAYOUTS:
        # Three sync bytes, a packet apart (one slice: this runs for every file of a device).
        if len(head) > start + 2 * packet and head[start : start + 2 * packet + 1 : packet] == _TS_SYNCS:
            return "mpegts"
    return None


def claimed_content(path: Path | str, head: bytes | None = None) -> Content | None:
    """What the file's name or first bytes say it is (image or video), whether or not it decodes.

    A decoder that does not recognise a file says only "not mine": this tells
    "not media" from "media that does not decode", which the investigator must
    see. It also spares every other file the decoders: a file that claims
    neither is not opened as media at all. ``head`` is the file's first bytes
    when the caller has read them already.
    """
    suffix = os.path.splitext(path)[1].lower()  # Path.suffix, for a str too
    if suffix in IMAGE_SUFFIXES:
        return Content.IMAGE
    if suffix in VIDEO_SUFFIXES:
        return Content.VIDEO
    if head is None:
        try:
            head = read_head(Path(path))
        except OSError:
            return None
    return content_by_signature(head)


def content_by_signature(head: bytes) -> Content | None:
    """What a file's first bytes alone say it is: :func:`claimed_content` for a caller that has
    looked at the name already (a worker checks every file of a device)."""
    if _signed(head, _IMAGE_SIGNED):
        return Content.IMAGE
    if video_demuxer(head) is not None:
        return Content.VIDEO
    return None


def pdq(pixels: np.ndarray) -> PerceptualHash:
    """Meta's PDQ of RGB pixels: 256 bits and a quality from 0 to 100."""
    import numpy as np  # noqa: PLC0415 - see the imports
    import pdqhash  # noqa: PLC0415

    bits, quality = pdqhash.compute(np.ascontiguousarray(pixels, dtype=np.uint8))
    return PerceptualHash(_bits_to_bytes(bits), int(quality))


def pdq_dihedral(pixels: np.ndarray) -> PerceptualHash:
    """Also the eight rotations and flips, for material that was turned or mirrored."""
    import numpy as np  # noqa: PLC0415 - see the imports
    import pdqhash  # noqa: PLC0415

    vectors, quality = pdqhash.compute_dihedral(np.ascontiguousarray(pixels, dtype=np.uint8))
    variants = tuple((name, _bits_to_bytes(v)) for name, v in zip(DIHEDRAL_NAMES, vectors, strict=True))
    return PerceptualHash(variants[0][1], int(quality), variants)


def pdq_image(pixels: np.ndarray, dihedral: bool) -> PerceptualHash:
    """PDQ of a decoded picture, with its rotations and flips when ``dihedral``."""
    return pdq_dihedral(pixels) if dihedral else pdq(pixels)


def _distance(a: bytes, b: bytes) -> int:
    import numpy as np  # noqa: PLC0415 - see the imports

    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


def video_hash(path: Path, min_quality: int) -> VideoHash | None:
    """Frame hashes of a video, or None when the file holds no video stream.

    The file is opened only with the demuxer its signature names
    (:func:`video_demuxer`), never by FFmpeg's guess.
    """
    import av  # noqa: PLC0415 - see the imports

    looks_like_video = path.suffix.lower() in VIDEO_SUFFIXES
    try:
        demuxer = video_demuxer(read_head(path))
    except OSError as exc:
        raise MediaError(f"video cannot be read: {exc}") from None
    if demuxer is None:
        if looks_like_video:
            raise MediaError(f"its data is not in a video container this gateway opens ({VIDEO_FORMATS_SAID})")
        return None
    try:
        container = av.open(str(path), format=demuxer)
    except av.error.FFmpegError as exc:
        if looks_like_video:
            raise MediaError(f"video cannot be opened: {exc}") from None
        return None  # only its signature said video: the caller says it does not decode
    with container:
        if not container.streams.video:
            if looks_like_video:
                raise MediaError("the file holds no video stream")
            return None
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames: list[bytes] = []
        sampled = low = 0
        next_time = 0.0
        try:
            for frame in container.decode(stream):
                time = frame.time if frame.time is not None else sampled / VIDEO_FPS
                if time + 1e-6 < next_time:
                    continue
                next_time = time + 1.0 / VIDEO_FPS
                sampled += 1
                hashed = pdq(frame.to_ndarray(format="rgb24"))
                if hashed.quality < min_quality:
                    low += 1
                elif not frames or _distance(frames[-1], hashed.digest) > FRAME_DEDUPE_DISTANCE:
                    frames.append(hashed.digest)
                if len(frames) >= MAX_VIDEO_FRAMES:
                    break
        except av.error.FFmpegError as exc:
            if not frames and looks_like_video:
                raise MediaError(f"video cannot be decoded: {exc}") from None
            if not frames:
                return None
    if sampled == 0:
        if looks_like_video:
            raise MediaError("video has no decodable frames")
        return None
    return VideoHash(tuple(frames), sampled, low)
