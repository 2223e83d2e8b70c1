"""Near-duplicate images and re-encoded videos found across countries (real nodes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from gateway import filehash
from tests import media as draw
from tests.support import import_rows, query_json


@dataclass
class Scene:
    config: Path
    files: dict[str, Path]


@pytest.fixture(scope="module")
def scene(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    tmp = tmp_path_factory.mktemp("perceptual")
    files = {}
    original = draw.drawing(21)
    files["original"] = draw.save_jpeg(original, tmp / "original.jpg", 92)
    files["resized"] = draw.save_jpeg(draw.edited(original, "resized"), tmp / "resized.jpg", 60)
    files["palette"] = tmp / "palette.png"
    draw.edited(original, "palette").save(files["palette"])
    files["rotated"] = draw.save_jpeg(original.transpose(Image.Transpose.ROTATE_270), tmp / "rotated.jpg", 90)
    files["unrelated"] = draw.save_jpeg(draw.drawing(22), tmp / "unrelated.jpg")
    files["clip"] = draw.video(tmp / "clip.mp4", seed=3)
    files["clip-copy"] = draw.reencoded(files["clip"], tmp / "clip-copy.mkv")
    files["other-clip"] = draw.video(tmp / "other.mp4", seed=4)

    stored = filehash.hash_file(files["original"])
    also = filehash.hash_file(files["palette"])
    video = filehash.hash_file(files["clip"]).video
    assert stored.pdq and also.pdq and video
    local = LocalFederation(tmp / "nodes", pki, [NodeSpec(c, c, f"{c}@example") for c in ("FR", "DE", "NL")] +
                            [NodeSpec("IT", "IT", "it@example", limits={"max_distance": 8})])
    # FR knows the original, DE the palette copy (a few bits away), NL the video; IT the original
    # too, but caps the distance it will search at 8.
    import_rows(local, "FR", [{"pdq": stored.pdq.digest.hex(), "md5": stored.exact["md5"].hex(),
                           "reference": "FR-IMG-1", "category": "1", "series": "S-PDQ"}], tmp)
    import_rows(local, "DE", [{"pdq": also.pdq.digest.hex(), "reference": "DE-IMG-7", "victim_identified": "true"}],
                tmp)
    import_rows(local, "NL", [{"vpdq": video.digest.hex(), "reference": "NL-VID-3", "series": "S-VID"}], tmp)
    import_rows(local, "IT", [{"pdq": stored.pdq.digest.hex(), "reference": "IT-IMG-2"}], tmp)
    with local:
        yield Scene(local.write_gateway_config(), files)


def _hits(result: dict, algorithm: str) -> list[dict]:
    return [hit for item in result["items"] if item["algorithm"] == algorithm for hit in item["hits"]]


def test_resized_recompressed_copy_is_found_in_every_country_that_knows_it(scene: Scene) -> None:
    code, result = query_json(scene.config, "--case", "P-1", "--file", str(scene.files["resized"]))
    assert code == 0
    hits = _hits(result, "pdq")
    assert {h["country"] for h in hits} == {"FR", "DE"}
    assert all(0 < h["distance"] <= 31 for h in hits)
    assert [h["distance"] for h in hits] == sorted(h["distance"] for h in hits), "nearest first"
    assert _hits(result, "md5") == [], "the copy's bytes differ: only the perceptual hash matches"
    fr = next(h for h in hits if h["country"] == "FR")
    assert (fr["reference"], fr["series"]) == ("FR-IMG-1", "S-PDQ")


def test_node_caps_the_distance_it_searches(scene: Scene) -> None:
    _, result = query_json(scene.config, "--case", "P-2", "--file", str(scene.files["resized"]))
    distance_to_original = next(h["distance"] for h in _hits(result, "pdq") if h["country"] == "FR")
    assert distance_to_original > 8, "the edit must be further than IT's cap for this test to mean anything"
    assert "IT" not in {h["country"] for h in _hits(result, "pdq")}
    _, exact_copy = query_json(scene.config, "--case", "P-2", "--file", str(scene.files["original"]))
    assert "IT" in {h["country"] for h in _hits(exact_copy, "pdq")}


def test_requested_distance_narrows_the_search(scene: Scene) -> None:
    _, result = query_json(scene.config, "--case", "P-3", "--file", str(scene.files["resized"]), "--max-distance", "2")
    assert _hits(result, "pdq") == []


def test_unrelated_image_and_video_do_not_match(scene: Scene) -> None:
    code, result = query_json(scene.config, "--case", "P-4", "--file", str(scene.files["unrelated"]),
                              "--file", str(scene.files["other-clip"]))
    assert code == 1
    assert all(item["hits"] == [] for item in result["items"])
    assert {item["algorithm"] for item in result["items"]} >= {"pdq", "vpdq"}


def test_rotated_copy_needs_the_dihedral_option(scene: Scene) -> None:
    _, plain = query_json(scene.config, "--case", "P-5", "--file", str(scene.files["rotated"]))
    assert _hits(plain, "pdq") == []
    code, turned = query_json(scene.config, "--case", "P-5", "--file", str(scene.files["rotated"]), "--dihedral")
    assert code == 0
    variants = {item["variant"] for item in turned["items"] if item["hits"]}
    assert variants and "original" not in variants
    assert {h["country"] for h in _hits(turned, "pdq")} >= {"FR", "DE"}


def test_reencoded_video_matches_by_share_of_frames(scene: Scene) -> None:
    code, result = query_json(scene.config, "--case", "P-6", "--file", str(scene.files["clip-copy"]))
    assert code == 0
    (hit,) = _hits(result, "vpdq")
    assert (hit["country"], hit["reference"], hit["series"]) == ("NL", "NL-VID-3", "S-VID")
    assert 0.8 <= hit["matched_share"] <= 1.0 and hit["distance"] <= 31


def test_given_pdq_hash_is_matched(scene: Scene) -> None:
    pdq = filehash.hash_file(scene.files["original"]).pdq
    code, result = query_json(scene.config, "--case", "P-7", "--hash", f"pdq:{pdq.digest.hex()}")
    assert code == 0
    assert {(h["country"], h["distance"]) for h in _hits(result, "pdq")} >= {("FR", 0), ("IT", 0)}
