"""Local hashing of images and videos drawn at test time."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pdqhash
import pytest
from PIL import Image

from federation import algorithms
from federation.algorithms import Content
from gateway import filehash, media
from gateway.triage import FileRow, report
from tests import media as draw
from tests.support import run_gateway


def distance(a: bytes, b: bytes) -> int:
    return int(np.unpackbits(np.frombuffer(a, np.uint8) ^ np.frombuffer(b, np.uint8)).sum())


@pytest.fixture(scope="module")
def original() -> Image.Image:
    return draw.drawing(11)


def test_pdq_equals_the_reference_package_on_the_same_pixels(original: Image.Image, tmp_path: Path) -> None:
    for name, save in {"a.png": original.save, "b.jpg": lambda p: draw.save_jpeg(original, p)}.items():
        path = tmp_path / name
        save(path)
        with Image.open(path) as decoded:
            bits, quality = pdqhash.compute(np.asarray(decoded.convert("RGB")))
        ours = filehash.hash_file(path).pdq
        assert ours is not None
        assert ours.digest == np.packbits(bits.astype(np.uint8)).tobytes()
        assert ours.quality == quality


def test_hex_form_follows_threatexchange_bit_order() -> None:
    bits = np.zeros(256, dtype=np.int64)
    bits[0] = bits[255] = 1
    assert media._bits_to_bytes(bits).hex() == "80" + "00" * 30 + "01"


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "CMYK", "I", "F", "YCbCr",
                                  "HSV", "LAB"])
def test_to_rgb_handles_every_mode_in_memory(original: Image.Image, mode: str) -> None:
    converted = media.to_rgb(original.convert(mode))
    assert converted.mode == "RGB" and converted.size == original.size
    assert media.pdq(np.asarray(converted)).quality >= 50


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_every_image_mode_hashes(original: Image.Image, tmp_path: Path, mode: str) -> None:
    if mode == "PA":
        image = original.convert("P").convert("PA")
    elif mode == "I;16":
        image = Image.fromarray(np.asarray(original.convert("L")).astype("<u2") * 256)
    else:
        image = original.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("I;16", "I", "F", "CMYK", "PA", "LA") else "x.png")
    if mode == "YCbCr":
        path = tmp_path / "x.jpg"  # JPEG stores YCbCr natively
    image.save(path)
    hashes = filehash.hash_file(path)
    assert hashes.skipped == ()
    assert hashes.pdq is not None and hashes.pdq.quality >= 50
    reference = filehash.hash_file(_saved(original, tmp_path / "ref.png"))
    assert distance(hashes.pdq.digest, reference.pdq.digest) <= 31, mode


def _saved(image: Image.Image, path: Path) -> Path:
    image.save(path)
    return path


def test_palette_with_transparency_is_composed_on_white(tmp_path: Path) -> None:
    image = draw.drawing(3).convert("P")
    image.info["transparency"] = 0
    path = tmp_path / "t.png"
    image.save(path, transparency=0)
    assert filehash.hash_file(path).pdq is not None


def test_exif_orientation_is_honoured(original: Image.Image, tmp_path: Path) -> None:
    upright = draw.save_jpeg(original, tmp_path / "upright.jpg", 95)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": pixels stored turned the other way
    turned = tmp_path / "turned.jpg"
    original.transpose(Image.Transpose.ROTATE_90).save(turned, "JPEG", quality=95, exif=exif)
    a, b = filehash.hash_file(upright).pdq, filehash.hash_file(turned).pdq
    assert distance(a.digest, b.digest) <= 16


def test_dihedral_variants_find_a_rotated_copy(original: Image.Image, tmp_path: Path) -> None:
    stored = filehash.hash_file(_saved(original, tmp_path / "o.png")).pdq
    rotated = filehash.hash_file(_saved(original.transpose(Image.Transpose.ROTATE_90), tmp_path / "r.png"),
                                 dihedral=True)
    assert len(rotated.dihedral) == 8 and rotated.dihedral[0][0] == "original"
    assert distance(rotated.dihedral[0][1].digest, stored.digest) > 31
    assert min(distance(h.digest, stored.digest) for _, h in rotated.dihedral) <= 31


def test_low_quality_hash_is_reported_not_sent(tmp_path: Path) -> None:
    path = tmp_path / "flat.png"
    Image.new("RGB", (200, 200), (90, 90, 90)).save(path)
    hashes = filehash.hash_file(path)
    assert hashes.pdq is None
    assert [(s.algorithm, "below 50" in s.reason) for s in hashes.skipped] == [("pdq", True)]
    assert [s.item.algorithm for s in filehash.subjects(hashes)] == ["md5", "sha1", "sha256"]


def test_broken_image_is_reported_and_keeps_exact_digests(original: Image.Image, tmp_path: Path) -> None:
    path = tmp_path / "broken.jpg"
    draw.save_jpeg(original, path)
    path.write_bytes(path.read_bytes()[:600])
    hashes = filehash.hash_file(path)
    assert set(hashes.exact) == {"md5", "sha1", "sha256"}
    assert hashes.pdq is None and hashes.skipped and hashes.skipped[0].algorithm == "pdq"


def test_other_files_get_exact_digests_only(tmp_path: Path) -> None:
    path = tmp_path / "notes.bin"
    path.write_bytes(np.random.default_rng(5).bytes(40_000))
    hashes = filehash.hash_file(path)
    assert (hashes.pdq, hashes.video, hashes.skipped) == (None, None, ())


def test_video_frames_match_a_reencoded_copy_and_not_another_video(tmp_path: Path) -> None:
    clip = draw.video(tmp_path / "clip.mp4", seed=1)
    copy = draw.reencoded(clip, tmp_path / "copy.mp4")
    other = draw.video(tmp_path / "other.mp4", seed=2)
    a, b, c = (filehash.hash_file(p).video for p in (clip, copy, other))
    assert a is not None and b is not None and c is not None
    assert a.sampled == 8 and 4 <= len(a.frames) <= 8, "one frame a second, near-duplicates dropped"
    matched = sum(min(distance(f, g) for g in a.frames) <= 31 for f in b.frames) / len(b.frames)
    unrelated = sum(min(distance(f, g) for g in a.frames) <= 31 for f in c.frames) / len(c.frames)
    assert matched >= 0.8 and unrelated < 0.2


def test_still_video_is_deduplicated(tmp_path: Path) -> None:
    path = tmp_path / "still.mp4"
    scene = np.asarray(draw.drawing(4, (320, 240)))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
        for _ in range(40):  # four seconds of the same picture
            for packet in stream.encode(av.VideoFrame.from_ndarray(scene, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    hashes = filehash.hash_file(path).video
    assert hashes is not None and hashes.sampled == 4 and len(hashes.frames) == 1


def test_hash_command_prints_json(original: Image.Image, tmp_path: Path) -> None:
    path = _saved(original, tmp_path / "o.png")
    done = run_gateway("hash", str(path), "--format", "json")
    assert done.returncode == 0, done.stderr
    (entry,) = json.loads(done.stdout)
    assert entry["path"] == str(path) and len(entry["pdq"]) == 64 and entry["pdq_quality"] >= 50
    assert entry["pdq"] == filehash.hash_file(path).pdq.digest.hex()
    assert len(entry["sha256"]) == 64 and entry["not_sent"] == []


def test_every_perceptual_kind_has_its_local_hasher() -> None:
    """The registry says what each kind decodes; the gateway's tables must hash every one of them."""
    tables = {Content.IMAGE: filehash.IMAGE_HASHERS, Content.VIDEO: filehash.VIDEO_HASHERS}
    for algorithm in algorithms.perceptual():
        assert algorithm.name in tables[algorithm.content], algorithm.name
    assert set(filehash.IMAGE_HASHERS) | set(filehash.VIDEO_HASHERS) == {a.name for a in algorithms.perceptual()}


def test_one_rendering_of_a_files_hashes(original: Image.Image, tmp_path: Path) -> None:
    """The hash command, a triage row and the cache write the same fields, and read back what was hashed."""
    picture = _saved(original, tmp_path / "o.png")
    clip = draw.video(tmp_path / "c.mp4", seed=5, seconds=3, fps=5, size=(128, 96))
    flat = _saved(Image.new("RGB", (64, 64), (90, 90, 90)), tmp_path / "flat.png")
    done = run_gateway("hash", str(picture), str(clip), str(flat), "--format", "json", "--dihedral")
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    for path, entry in zip((picture, clip, flat), printed, strict=True):
        hashes = filehash.hash_file(path, dihedral=True)
        fields = filehash.hashes_json(hashes)
        assert entry == {"path": str(path), **fields}
        assert filehash.hashes_from_json(json.loads(json.dumps(fields)), str(path)) == hashes
        row = report.file_json(FileRow(str(path), "hashed", hashes=hashes))
        assert {k: row[k] for k in fields} == fields
    picture_entry, clip_entry, flat_entry = printed
    assert len(picture_entry["pdq_dihedral"]) == 8 and picture_entry["vpdq"] is None
    assert clip_entry["vpdq_frames"] >= 2 and clip_entry["vpdq_frames_sampled"] == 3 and clip_entry["pdq"] is None
    assert len(clip_entry["vpdq"]) == 64 * clip_entry["vpdq_frames"]
    # Below the quality floor: shown, marked not sent, and listed with the reason.
    assert len(flat_entry["pdq"]) == 64 and flat_entry["pdq_sent"] is False and flat_entry["pdq_quality"] < 50
    assert picture_entry["pdq_sent"] is True and flat_entry["not_sent"][0]["algorithm"] == "pdq"
