"""Directory triage (``icse-gateway query --dir``) against real nodes: a generated
tree of a few thousand files, some of them known to some countries."""

from __future__ import annotations

import asyncio
import csv
import html
import io
import json
import os
import random
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from gateway import filehash, triage
from gateway.config import NodeEntry
from gateway.results import HitInfo, NodeAnswer, NodeStatus
from gateway.triage import report, sources
from gateway.triage.asking import QUERIES_AT_ONCE
from gateway.triage.walk import walk
from tests import media as draw
from tests.support import address_of, black_hole, import_rows, member_entry, wait_until

SCRIPT_NAME = '"><script>alert(1)<.bin'
RANDOM_FILES = 1_950
IMAGES = 60


@dataclass
class Tree:
    root: Path
    regular: list[Path] = field(default_factory=list)  # every regular file, as walked
    planted: dict[str, Path] = field(default_factory=dict)
    unreadable: dict[str, Path] = field(default_factory=dict)
    not_hashed: dict[str, Path] = field(default_factory=dict)
    outside: Path | None = None


def _write(tree: Tree, relative: str, data: bytes) -> Path:
    path = tree.root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    tree.regular.append(path)
    return path


def _deep_file(base: Path) -> Path:
    """A file whose path is longer than PATH_MAX: unreadable by path even for root."""
    base.mkdir()
    fd = os.open(base, os.O_RDONLY)
    try:
        for _ in range(18):  # 18 x 241 characters > 4096
            os.mkdir("d" * 240, dir_fd=fd)
            inner = os.open("d" * 240, os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("buried.bin", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
        os.write(out, b"x" * 100)
        os.close(out)
    finally:
        os.close(fd)
    return base


def _build(tmp: Path) -> Tree:
    rng = random.Random(2024)
    tree = Tree(tmp / "seized")
    tree.root.mkdir()
    for i in range(RANDOM_FILES):
        _write(tree, f"dir{i % 40:02d}/sub{i % 3}/file{i:04d}.bin", rng.randbytes(rng.randint(16, 1500)))
    # Not what their names say: an image and a video that cannot be decoded.
    _write(tree, "dir00/corrupt.jpg", b"\xff\xd8\xff\xe0" + rng.randbytes(500))
    _write(tree, "dir01/broken.mp4", rng.randbytes(700))
    for i in range(IMAGES):
        size = (64 + 8 * (i % 13), 64 + 8 * (i % 9))
        path = tree.root / f"photos/album{i % 4}/img{i:03d}.{'png' if i % 3 == 0 else 'jpg'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = draw.drawing(5000 + i, size)
        image.save(path) if path.suffix == ".png" else draw.save_jpeg(image, path, 80)
        tree.regular.append(path)
    for i in range(2):
        tree.regular.append(draw.video(_mkdir(tree.root / "videos") / f"other{i}.mp4", 60 + i, seconds=3, fps=5,
                                       size=(128, 96)))

    # Planted: known to some countries.
    tree.planted["script"] = _write(tree, f"docs/{SCRIPT_NAME}", rng.randbytes(777))
    exact_image = tmp / "IMG_0001.jpg"
    draw.save_jpeg(draw.drawing(901, (160, 120)), exact_image, 90)
    tree.planted["exact_image"] = _write(tree, "photos/IMG_0001.jpg", exact_image.read_bytes())
    original = draw.drawing(903, (160, 120))
    draw.save_jpeg(original, tmp / "original.jpg", 92)
    tree.planted["near_image"] = tree.root / "photos/edited/holiday.jpg"
    tree.planted["near_image"].parent.mkdir(parents=True)
    draw.save_jpeg(draw.edited(original, "resized"), tree.planted["near_image"], 60)
    tree.regular.append(tree.planted["near_image"])
    tree.planted["clip"] = draw.video(tree.root / "videos/clip.mp4", 77, seconds=3, fps=5, size=(128, 96))
    tree.regular.append(tree.planted["clip"])
    links = _mkdir(tree.root / "links")
    tree.planted["alias"] = links / "alias.bin"
    tree.planted["alias"].symlink_to(f"../docs/{SCRIPT_NAME}")
    tree.regular.append(tree.planted["alias"])

    # Outside the tree, and known: a link to it must not be followed.
    tree.outside = tmp / "outside.bin"
    tree.outside.write_bytes(rng.randbytes(300))
    tree.not_hashed["outside_link"] = links / "outside"
    tree.not_hashed["outside_link"].symlink_to(tree.outside)
    tree.not_hashed["dir_link"] = links / "photos"
    tree.not_hashed["dir_link"].symlink_to("../photos")
    tree.not_hashed["fifo"] = links / "pipe"
    os.mkfifo(tree.not_hashed["fifo"])  # opening it would block forever
    tree.not_hashed["socket"] = links / "sock"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tree.not_hashed["socket"]))

    # Unreadable even as root.
    tree.unreadable["loop"] = links / "loop"
    tree.unreadable["loop"].symlink_to("loop")
    tree.unreadable["dangling"] = links / "dangling"
    tree.unreadable["dangling"].symlink_to("nowhere")
    deep = _deep_file(tree.root / "deep")
    tree.unreadable["too_long"] = next(p for p in _descend(deep) if len(str(p)) >= 4096)
    # Unreadable for anyone but root.
    locked = _write(tree, "locked/secret.bin", rng.randbytes(100))
    locked.chmod(0)
    if os.geteuid() != 0:
        tree.regular.remove(locked)
        tree.unreadable["locked"] = locked
    return tree


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _descend(base: Path) -> Iterator[Path]:
    path = base
    for _ in range(19):
        path = path / ("d" * 240)
        yield path


@dataclass
class Scene:
    tmp: Path
    tree: Tree
    config: Path
    cache: Path


@pytest.fixture(scope="module")
def scene(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scene]:
    tmp = tmp_path_factory.mktemp("triage")
    tree = _build(tmp)
    script = filehash.hash_file(tree.planted["script"])
    exact_image = filehash.hash_file(tree.planted["exact_image"])
    original = filehash.hash_file(tmp / "original.jpg")
    clip = filehash.hash_file(tree.planted["clip"])
    outside = filehash.hash_file(tree.outside)
    assert exact_image.pdq and original.pdq and clip.video
    local = LocalFederation(tmp / "nodes", pki, [NodeSpec(c, c, f"{c}@example") for c in ("FR", "DE", "NL", "ES")])
    import_rows(local, "FR", [{"sha256": script.exact["sha256"].hex(), "reference": "FR-DOC-1"},
                          {"sha256": outside.exact["sha256"].hex(), "reference": "FR-OUT-9"}], tmp)
    import_rows(local, "DE", [{"md5": script.exact["md5"].hex(), "reference": "DE-DOC-2", "series": "S-D"},
                          {"vpdq": clip.video.digest.hex(), "reference": "DE-VID-3"}], tmp)
    import_rows(local, "NL", [{"sha1": exact_image.exact["sha1"].hex(), "pdq": exact_image.pdq.digest.hex(),
                           "reference": "NL-IMG-4"}], tmp)
    import_rows(local, "ES", [{"pdq": original.pdq.digest.hex(), "reference": "ES-IMG-5"}], tmp)
    with local:
        yield Scene(tmp, tree, local.write_gateway_config(), tmp / "cache.sqlite")


def _run(*args: str, timeout: float = 120, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, input=stdin)


def _triage(scene: Scene, tag: str, *extra: str, config: Path | None = None) -> tuple[int, dict, Path]:
    out = scene.tmp / f"out-{tag}"
    out.mkdir(exist_ok=True)
    done = _run("query", "--config", str(config or scene.config), "--case", f"TRIAGE/{tag}", "--format", "json",
                "--dir", str(scene.tree.root), "--jsonl", str(out / "files.jsonl"), "--csv", str(out / "files.csv"),
                "--html", str(out / "report.html"), *extra)
    assert done.stdout.strip(), done.stderr
    return done.returncode, json.loads(done.stdout), out


@dataclass
class Run:
    code: int
    summary: dict
    rows: dict[str, dict]
    csv_rows: list[dict[str, str]]
    html: str
    seconds: float


def _load(code: int, summary: dict, out: Path, seconds: float) -> Run:
    lines = (out / "files.jsonl").read_text(encoding="utf-8").splitlines()
    rows = {}
    for line in lines:
        row = json.loads(line)
        assert row["path"] not in rows, f"{row['path']} listed twice"
        rows[row["path"]] = row
    with (out / "files.csv").open(newline="", encoding="utf-8") as handle:
        csv_rows = list(csv.DictReader(handle))
    return Run(code, summary, rows, csv_rows, (out / "report.html").read_text(encoding="utf-8"), seconds)


@pytest.fixture(scope="module")
def first(scene: Scene) -> Run:
    started = time.monotonic()
    code, summary, out = _triage(scene, "first", "--jobs", "2", "--batch", "500", "--cache", str(scene.cache))
    return _load(code, summary, out, time.monotonic() - started)


@pytest.fixture(scope="module")
def second(scene: Scene, first: Run) -> Run:
    started = time.monotonic()
    code, summary, out = _triage(scene, "second", "--jobs", "2", "--cache", str(scene.cache))
    return _load(code, summary, out, time.monotonic() - started)


def _key(path: Path) -> str:
    return str(path)


def test_tree_is_big_and_mixed(scene: Scene) -> None:
    assert len(scene.tree.regular) >= 2000
    assert sum(p.suffix in (".jpg", ".png") for p in scene.tree.regular) >= IMAGES
    assert sum(p.suffix == ".mp4" for p in scene.tree.regular) >= 3


def test_planted_files_are_found_in_the_right_countries(scene: Scene, first: Run) -> None:
    assert first.code == 0
    rows, planted = first.rows, scene.tree.planted
    expected = {"script": ["DE", "FR"], "alias": ["DE", "FR"], "exact_image": ["NL"], "near_image": ["ES"],
                "clip": ["DE"]}
    for name, countries in expected.items():
        row = rows[_key(planted[name])]
        assert row["status"] == "hashed" and row["known"], name
        assert row["countries"] == countries, name
    script = rows[_key(planted["script"])]
    assert {(r["country"], r["reference"]) for r in script["references"]} == {("FR", "FR-DOC-1"), ("DE", "DE-DOC-2")}
    assert script["best_distance"] == 0 and script["sha256"] and script["md5"]
    assert rows[_key(planted["exact_image"])]["references"][0]["matched_by"] == ["sha1", "pdq"]
    near = rows[_key(planted["near_image"])]
    assert 0 < near["best_distance"] <= 31, "a resized, recompressed copy: found by PDQ only"
    assert near["references"][0]["matched_by"] == ["pdq"] and near["pdq_quality"] >= 50
    clip = rows[_key(planted["clip"])]
    assert clip["references"][0]["reference"] == "DE-VID-3" and clip["vpdq_frames"] >= 2

    summary = first.summary
    assert summary["summary"]["files_known"] == len(expected)
    assert summary["summary"]["countries_with_hits"] == ["DE", "ES", "FR", "NL"]
    assert summary["countries"]["FR"] == {"files": 2, "references": 2}
    assert {k["path"] for k in summary["known_files"]} == {_key(planted[n]) for n in expected}
    assert "items" not in summary, "stdout summarises; the rows are in the reports"
    assert summary["partial"] is False and all(n["complete"] and n["batches"] >= 2 for n in summary["nodes"])


def test_unrelated_files_are_not_known(scene: Scene, first: Run) -> None:
    planted = {_key(p) for p in scene.tree.planted.values()}
    others = [row for path, row in first.rows.items() if path not in planted]
    assert len(others) > 2000
    assert not any(row["known"] or row["references"] for row in others)
    assert _key(scene.tree.outside) not in first.rows
    assert "FR-OUT-9" not in json.dumps(first.summary) and "FR-OUT-9" not in first.html


def test_every_file_has_a_row_with_its_hashes(scene: Scene, first: Run) -> None:
    hashed = {p for p, r in first.rows.items() if r["status"] == "hashed"}
    assert hashed == {_key(p) for p in scene.tree.regular}
    for path in hashed:
        row = first.rows[path]
        assert len(row["md5"]) == 32 and len(row["sha1"]) == 40 and len(row["sha256"]) == 64, path
    images = [first.rows[_key(p)] for p in scene.tree.regular if p.suffix in (".jpg", ".png")]
    assert sum(1 for r in images if r["pdq"]) >= IMAGES
    corrupt = first.rows[_key(scene.tree.root / "dir00/corrupt.jpg")]
    assert corrupt["pdq"] is None and corrupt["not_sent"][0]["algorithm"] == "pdq"
    assert first.summary["summary"]["files"] == len(scene.tree.regular)
    assert first.summary["summary"]["items_queried"] >= 3 * len(scene.tree.regular)
    assert first.summary["summary"]["batches"] >= 10, "batches of at most 500 hashes"

    assert len(first.csv_rows) == len(first.rows)
    by_path = {r["path"]: r for r in first.csv_rows}
    script = by_path[_key(scene.tree.planted["script"])]
    assert script["countries"] == "DE FR" and "FR-DOC-1" in script["references"] and script["known"] == "yes"
    assert by_path[_key(scene.tree.planted["near_image"])]["pdq"] == first.rows[
        _key(scene.tree.planted["near_image"])]["pdq"]


def test_unreadable_and_special_entries_are_listed_not_fatal(scene: Scene, first: Run) -> None:
    rows = first.rows
    for name, path in scene.tree.unreadable.items():
        key = _key(path)
        assert key in rows, name
        assert rows[key]["status"] == "unreadable" and rows[key]["reason"], name
    assert "Too many levels of symbolic links" in rows[_key(scene.tree.unreadable["loop"])]["reason"]
    assert "does not exist" in rows[_key(scene.tree.unreadable["dangling"])]["reason"]
    assert "ENAMETOOLONG" in rows[_key(scene.tree.unreadable["too_long"])]["reason"]
    for name, path in scene.tree.not_hashed.items():
        assert rows[_key(path)]["status"] == "not_hashed", name
    assert "outside the directory" in rows[_key(scene.tree.not_hashed["outside_link"])]["reason"]
    listed = {u["path"] for u in first.summary["unreadable"]}
    assert listed == {_key(p) for p in scene.tree.unreadable.values()}
    assert first.summary["summary"]["unreadable"] == len(scene.tree.unreadable)


def test_html_report_is_self_contained_escaped_and_complete(scene: Scene, first: Run) -> None:
    page = first.html
    assert page.count("<script") == 1, "only the report's own sorting script"
    assert "<script>alert(1)" not in page
    assert "&quot;&gt;&lt;script&gt;alert(1)&lt;.bin" in page
    # Every file fits on the page: no link to the complete listing (see the paged test below).
    assert not re.search(r"""(src|href|action)\s*=|@import|url\(|https?://""", page), "no external resources"
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    for text in ("TRIAGE/first", "Known files", "Countries with hits", "Partial answers", "Unreadable files",
                 "every node answered every batch", "FR-DOC-1", "ES-IMG-5", "NL-IMG-4", "DE-VID-3"):
        assert text in page, text
    for name in ("exact_image", "near_image", "clip"):
        assert str(scene.tree.planted[name]) in page, name
    assert "Too many levels of symbolic links" in page
    assert page.count('<tr class="known">') == first.summary["summary"]["files_known"]
    # What matters first: known files grouped by country and reference, then near-duplicates, unreadable files.
    order = [page.index(f'<section id="{name}">') for name in ("countries", "known-by-reference", "near-duplicates",
                                                                  "unreadable", "files-section")]
    assert order == sorted(order)
    grouped = page[order[1]:order[2]]
    fr_doc = grouped[grouped.index("FR-DOC-1"):]
    assert "2 file(s)" in fr_doc[:200] and html.escape(str(scene.tree.planted["script"])) in fr_doc[:2000]
    near = page[order[2]:order[3]]
    near_row = first.rows[str(scene.tree.planted["near_image"])]
    assert str(scene.tree.planted["near_image"]) in near and f'<td class="num">{near_row["best_distance"]}</td>' in near
    assert str(scene.tree.planted["script"]) not in near, "exact copies are not near-duplicates"
    script_row = first.rows[str(scene.tree.planted["script"])]
    assert f'<details><summary>3 value(s)</summary><dl class="digests"><dt>md5</dt><dd>{script_row["md5"]}' in page
    assert 'class="sortable"' in page and "aria-sort" in page


def test_second_run_hashes_nothing_again(scene: Scene, first: Run, second: Run) -> None:
    files = len(scene.tree.regular)
    assert first.summary["summary"]["cache_hits"] == 0 and first.summary["summary"]["hashed_now"] == files
    assert second.summary["summary"]["cache_hits"] == files
    assert second.summary["summary"]["hashed_now"] == 0
    assert all(r["from_cache"] for r in second.rows.values() if r["status"] == "hashed")
    assert second.code == 0
    known = lambda run: {p: (r["countries"], r["best_distance"]) for p, r in run.rows.items() if r["known"]}  # noqa: E731
    assert known(second) == known(first)
    assert {p: r["sha256"] for p, r in second.rows.items()} == {p: r["sha256"] for p, r in first.rows.items()}


def test_a_node_that_does_not_answer_makes_the_answer_partial(scene: Scene, second: Run) -> None:
    config = scene.tmp / "with-dead-node.toml"
    config.write_text(scene.config.read_text() + '[[nodes]]\nid = "IT"\ncountry = "IT"\naddress = "127.0.0.1:9"\n')
    code, summary, out = _triage(scene, "partial", "--cache", str(scene.cache), config=config)
    assert code == 0, "hits are hits, even when some node did not answer"
    assert summary["partial"] is True
    it = next(n for n in summary["nodes"] if n["node"] == "IT")
    assert it["answered"] == 0 and it["batches"] >= 1 and not it["complete"]
    rows = [json.loads(line) for line in (out / "files.jsonl").read_text().splitlines()]
    assert all(r["not_answered_by"] == ["IT"] for r in rows if r["status"] == "hashed")
    page = (out / "report.html").read_text()
    assert "Partial answer." in page and "IT (IT) answered 0 of" in page

    # No hit and a partial answer proves nothing: 2; no hit and complete: 1.
    quiet = scene.tree.root / "dir07"
    base = ["query", "--case", "TRIAGE/quiet", "--dir", str(quiet), "--cache", str(scene.cache)]
    assert _run(*base, "--config", str(config)).returncode == 2
    done = _run(*base, "--config", str(scene.config))
    assert done.returncode == 1, done.stdout + done.stderr
    files = sum(1 for p in scene.tree.regular if quiet in p.parents)
    assert f"0 of {files} file(s) known to the federation" in done.stdout
    assert "Complete answer" in done.stdout


def test_interrupted_run_keeps_its_work(scene: Scene, first: Run) -> None:
    cache = scene.tmp / "interrupted.sqlite"
    args = ["query", "--case", "TRIAGE/int", "--dir", str(scene.tree.root), "--jobs", "1", "--cache", str(cache),
            "--format", "json"]

    def kept() -> int:
        if not cache.exists():
            return 0
        try:
            with sqlite3.connect(f"file:{cache}?mode=ro", uri=True, timeout=1) as db:
                return db.execute("SELECT count(*) FROM hashes").fetchone()[0]
        except sqlite3.Error:
            return 0

    # A member that accepts the connection and never answers: the run cannot end
    # before its (long) deadline, so it is still running when it is interrupted.
    with black_hole() as hole:
        config = scene.tmp / "interrupted.toml"
        config.write_text(scene.config.read_text() + member_entry("IT", address_of(hole)))
        command = [sys.executable, "-m", "gateway.cli", *args, "--config", str(config),
                   "--timeout", "240", "--deadline", "240"]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: kept() >= 20 or process.poll() is not None, 60, "20 files in the triage cache")
            assert process.poll() is None, "the run ended before it could be interrupted"
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "resumes" in stderr
    with sqlite3.connect(cache) as db:
        saved = db.execute("SELECT count(*) FROM hashes").fetchone()[0]
    # Hashing may have got through the whole tree while the member held the run.
    assert 20 <= saved <= len(scene.tree.regular)

    done = _run(*args, "--config", str(scene.config))
    summary = json.loads(done.stdout)["summary"]
    assert summary["cache_hits"] == saved
    assert summary["hashed_now"] == len(scene.tree.regular) - saved
    assert summary["files_known"] == first.summary["summary"]["files_known"]


def test_options_that_need_dir(scene: Scene) -> None:
    done = _run("query", "--config", str(scene.config), "--case", "X", "--hash", "md5:" + "0" * 32, "--jobs", "2")
    assert done.returncode == 2 and "only go with --dir" in done.stderr
    done = _run("query", "--config", str(scene.config), "--case", "X", "--dir", str(scene.tree.root),
                "--file", str(scene.tree.outside))
    assert done.returncode == 2 and "cannot be combined" in done.stderr
    done = _run("query", "--config", str(scene.config), "--case", "X", "--dir", str(scene.tree.outside))
    assert done.returncode == 2 and "not a directory" in done.stderr
    done = _run("query", "--config", str(scene.config), "--case", "X", "--dir", str(scene.tree.root),
                "--html", str(scene.tmp / "missing" / "r.html"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    done = _run("query", "--config", str(scene.config), "--case", "X", "--hash", "md5:" + "0" * 32,
                "--file-timeout", "5")
    assert done.returncode == 2 and "--file-timeout only go with --dir" in done.stderr
    done = _run("query", "--config", str(scene.config), "--case", "X", "--dir", str(scene.tree.root),
                "--file-timeout", "0")
    assert done.returncode == 2 and "--file-timeout must be more than 0" in done.stderr


def _listing(scene: Scene, tag: str, *args: str, stdin: str | None = None) -> tuple[int, dict, dict[str, dict]]:
    out = scene.tmp / f"out-{tag}"
    out.mkdir(exist_ok=True)
    done = _run("query", "--config", str(scene.config), "--case", f"TRIAGE/{tag}", "--format", "json",
                "--jsonl", str(out / "rows.jsonl"), "--no-cache", *args, stdin=stdin)
    assert done.stdout.strip(), done.stderr
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    return done.returncode, json.loads(done.stdout), {r["path"]: r for r in rows}


def test_several_trees_and_a_list_of_paths(scene: Scene) -> None:
    tree = scene.tree
    docs, photos = tree.root / "docs", tree.root / "photos"
    code, summary, rows = _listing(scene, "dirs", "--dir", str(docs), "--dir", str(photos))
    assert code == 0
    assert rows[str(tree.planted["script"])]["countries"] == ["DE", "FR"]
    assert rows[str(tree.planted["exact_image"])]["countries"] == ["NL"]
    assert set(rows) == {str(p) for p in tree.regular if docs in p.parents or photos in p.parents}
    assert str(docs) in summary["root"] and str(photos) in summary["root"]
    done = _run("query", "--config", str(scene.config), "--case", "X", "--dir", str(tree.root), "--dir", str(photos))
    assert done.returncode == 2 and "inside" in done.stderr

    listing = "\n".join([str(tree.planted["near_image"]), str(tree.not_hashed["fifo"]), str(tree.root / "gone.bin"),
                         str(tree.root / "dir03"), ""])
    code, summary, rows = _listing(scene, "list", "--from-list", "-", stdin=listing)
    assert code == 0
    assert rows[str(tree.planted["near_image"])]["countries"] == ["ES"]
    assert rows[str(tree.not_hashed["fifo"])]["status"] == "not_hashed"
    assert rows[str(tree.root / "gone.bin")]["status"] == "unreadable"
    in_dir03 = {str(p) for p in tree.regular if tree.root / "dir03" in p.parents}
    assert in_dir03 and in_dir03 <= set(rows) and len(rows) == len(in_dir03) + 3
    assert "paths listed in stdin" in summary["root"]


def test_digest_lists_are_read_in_every_format_and_queried(scene: Scene) -> None:
    script = filehash.hash_file(scene.tree.planted["script"]).exact
    outside = filehash.hash_file(scene.tree.outside).exact
    hashdeep = ("%%%% HASHDEEP-1.0\n%%%% size,md5,sha1,sha256,filename\n## Invoked from: /case\n##\n"
                f"777,{script['md5'].hex()},{script['sha1'].hex()},{script['sha256'].hex()},/case/a,b.bin\n"
                f"300,{'0' * 32},{'0' * 40},{outside['sha256'].hex()},/case/other.bin\n"
                f"5,{'1' * 32},{'1' * 40},{'1' * 64},/case/unknown.bin\n")
    code, summary, rows = _listing(scene, "hashdeep", "--hashes", "-", stdin=hashdeep)
    assert code == 0
    assert rows["/case/a,b.bin"]["countries"] == ["DE", "FR"] and rows["/case/a,b.bin"]["size"] == 777
    assert rows["/case/other.bin"]["countries"] == ["FR"]
    assert not rows["/case/unknown.bin"]["known"]
    assert "not read here" in rows["/case/a,b.bin"]["notes"][0]
    assert summary["summary"]["files_known"] == 2 and summary["summary"]["items_queried"] == 9
    assert summary["partial"] is False

    export = scene.tmp / "export.csv"
    export.write_text(f"Name;MD5 Hash;SHA-1\nx.bin;{script['md5'].hex()};\ny.bin;;{'2' * 40}\n")
    code, _, rows = _listing(scene, "csv", "--hashes", str(export))
    assert code == 0 and rows["x.bin"]["countries"] == ["DE"] and not rows["y.bin"]["known"]
    tagged = f"sha256:{outside['sha256'].hex()}\nmd5:{'3' * 32} some name\n"
    code, _, rows = _listing(scene, "tagged", "--hashes", "-", stdin=tagged)
    assert code == 0 and len(rows) == 2 and "some name" in rows
    sums = f"{script['sha256'].hex()}  /case/s.bin\n"
    code, _, rows = _listing(scene, "sums", "--hashes", "-", stdin=sums)
    assert code == 0 and rows["/case/s.bin"]["countries"] == ["FR"]

    bad = hashdeep.replace(f"5,{'1' * 32}", f"5,{'1' * 31}")
    done = _run("query", "--config", str(scene.config), "--case", "X", "--hashes", "-", stdin=bad)
    assert done.returncode == 2 and "stdin line 7" in done.stderr and "32 hex characters" in done.stderr
    assert not done.stdout.strip(), "nothing asked when the list does not read"
    done = _run("query", "--config", str(scene.config), "--case", "X", "--hashes", "-", stdin="hello\n")
    assert done.returncode == 2 and "stdin line 1: not a digest list" in done.stderr


# --------------------------------------------------------------------------- in process, no nodes


class _NoHits:
    def __init__(self) -> None:
        self.batches: list[int] = []

    async def match(self, items, case, timeout=None, deadline=None):
        self.batches.append(len(items))
        return [NodeAnswer("FR", "FR", NodeStatus.NO_HIT, hits=((),) * len(items), truncated=(False,) * len(items))]


def crashing_hasher(path: Path, *, dihedral: bool = False) -> filehash.FileHashes:
    """Stands for a decoder that takes the whole process down on a hostile file."""
    if path.name == "crash.bin":
        os._exit(3)
    return filehash.hash_file(path, dihedral=dihedral)


async def test_a_file_that_crashes_a_worker_costs_only_its_perceptual_hash(tmp_path: Path) -> None:
    rng = random.Random(5)
    for i in range(60):
        (tmp_path / f"f{i:02d}.bin").write_bytes(rng.randbytes(200))
    (tmp_path / "crash.bin").write_bytes(b"hostile")
    draw.save_jpeg(draw.drawing(1, (96, 80)), tmp_path / "pic.jpg")
    run = triage.Triage(str(tmp_path), "CRASH", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=2, batch=50,
                        hasher=crashing_hasher)
    federation = _NoHits()
    result = await run.run(federation)
    rows = {Path(r.path).name: r for r in result.store.rows()}
    assert len(rows) == 62 and all(r.status == "hashed" for r in rows.values())
    crashed = rows["crash.bin"]
    assert crashed.hashes.exact["sha256"] == filehash.exact_digests(tmp_path / "crash.bin")["sha256"]
    assert "crashed" in crashed.hashes.skipped[0].reason
    assert rows["pic.jpg"].hashes.pdq is not None, "the other files are hashed as usual"
    assert sum(federation.batches) == result.items_queried >= 62 * 3
    assert max(federation.batches) <= 50
    assert result.exit_status() == 1


def test_cache_survives_a_round_trip(tmp_path: Path) -> None:
    picture = draw.save_jpeg(draw.drawing(3, (96, 80)), tmp_path / "p.jpg")
    clip = draw.video(tmp_path / "c.mp4", 9, seconds=2, fps=5, size=(96, 72))
    cache = triage.HashCache(tmp_path / "c.sqlite")
    for path, dihedral in ((picture, False), (picture, True), (clip, False)):
        st = path.stat()
        task = triage.Task(str(path), str(path), st.st_size, st.st_mtime_ns)
        hashes = filehash.hash_file(path, dihedral=dihedral)
        cache.put(task, dihedral, triage.Hashed(hashes, st.st_size, st.st_mtime_ns))
        assert cache.get(task, dihedral) == hashes
        assert cache.get(triage.Task(str(path), str(path), st.st_size, st.st_mtime_ns + 1), dihedral) is None
    cache.close()
    assert (tmp_path / "c.sqlite").stat().st_mode & 0o777 == 0o600


# Part of the scenarios below, not waits: a hasher and a federation slower than usual.
HASH_DELAY = 0.01
ANSWER_DELAY = 0.01


def slow_hasher(path: Path, *, dihedral: bool = False) -> filehash.FileHashes:
    time.sleep(HASH_DELAY)
    return filehash.hash_file(path, dihedral=dihedral)


async def test_queries_start_while_files_are_still_being_hashed(tmp_path: Path) -> None:
    rng = random.Random(6)
    for i in range(200):
        (tmp_path / f"f{i:03d}.bin").write_bytes(rng.randbytes(100))
    run = triage.Triage(str(tmp_path), "PIPE", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=2, batch=60,
                        hasher=slow_hasher)
    seen: list[int] = []

    class Watching(_NoHits):
        async def match(self, items, case, timeout=None, deadline=None):
            seen.append(run.done)
            return await super().match(items, case, timeout, deadline)

    federation = Watching()
    result = await run.run(federation)
    assert seen[0] < 200, "the first batch went out before the last file was hashed"
    assert sum(federation.batches) == 600 and max(federation.batches) == 60
    assert result.exit_status() == 1 and result.hashed_now == 200


async def test_hashing_waits_when_the_nodes_fall_behind(tmp_path: Path) -> None:
    rng = random.Random(7)
    for i in range(600):
        (tmp_path / f"f{i:03d}.bin").write_bytes(rng.randbytes(50))
    run = triage.Triage(str(tmp_path), "SLOW", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=2, batch=20)
    waiting: list[int] = []

    class Slow(_NoHits):
        async def match(self, items, case, timeout=None, deadline=None):
            waiting.append(len(run._pending))
            await asyncio.sleep(ANSWER_DELAY)
            return await super().match(items, case, timeout, deadline)

    result = await run.run(Slow())
    assert result.items_queried == 1800
    in_flight = 2 * run.jobs * triage.CHUNK_FILES * 3  # chunks already with the workers
    assert max(waiting) <= 20 * triage.PENDING_BATCHES + in_flight < 1000


async def test_a_file_that_says_image_or_video_but_does_not_decode_says_so(tmp_path: Path) -> None:
    rng = random.Random(8)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(rng.randbytes(4000))
    (tmp_path / "noise.PNG").write_bytes(rng.randbytes(300))
    (tmp_path / "boxed.bin").write_bytes(b"\x00\x00\x00\x18ftypisom" + rng.randbytes(600))  # an MP4's signature
    (tmp_path / "noise.bin").write_bytes(rng.randbytes(4000))
    draw.save_jpeg(draw.drawing(2, (96, 80)), tmp_path / "pic.jpg")
    run = triage.Triage(str(tmp_path), "BROKEN", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=1)
    result = await run.run(_NoHits())
    rows = {Path(r.path).name: report.file_json(r) for r in result.store.rows()}
    for name, algorithm in (("empty.jpg", "pdq"), ("noise.jpg", "pdq"), ("noise.PNG", "pdq"),
                            ("boxed.bin", "vpdq")):
        row = rows[name]
        assert row["status"] == "hashed" and row["sha256"], name
        assert [s["algorithm"] for s in row["not_sent"]] == [algorithm], name
        assert "does not decode" in row["not_sent"][0]["reason"], name
    assert "empty" in rows["empty.jpg"]["not_sent"][0]["reason"]
    assert rows["noise.bin"]["not_sent"] == [], "bytes that claim nothing are just bytes"
    assert rows["pic.jpg"]["pdq"] and rows["pic.jpg"]["not_sent"] == []


async def test_rows_go_to_the_store_not_to_memory(tmp_path: Path) -> None:
    """A tree's rows are final on disk as they come; the run holds only those still in flight."""
    rng = random.Random(9)
    files = 3000
    for i in range(files):
        (tmp_path / f"d{i % 10}" / f"f{i:04d}.bin").parent.mkdir(exist_ok=True)
        (tmp_path / f"d{i % 10}" / f"f{i:04d}.bin").write_bytes(rng.randbytes(40))
    (tmp_path / "dangling").symlink_to("nowhere")
    nodes = [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")]
    walked = [0]

    def counted(exclude, stop):
        for entry in walk(str(tmp_path), exclude, stop):
            walked[0] += 1
            yield entry

    run = triage.Triage(str(tmp_path), "STORE", nodes, jobs=2, batch=30, entries=counted)
    stored: list[int] = []
    ahead: list[int] = []

    class Counting(_NoHits):
        async def match(self, items, case, timeout=None, deadline=None):
            stored.append(run.store.count())
            ahead.append(walked[0] - run.done)
            return await super().match(items, case, timeout, deadline)

    result = await run.run(Counting())
    try:
        assert not hasattr(result, "rows"), "the result carries no list of rows"
        in_flight = 2 * run.jobs * triage.CHUNK_FILES + 30 * (triage.PENDING_BATCHES + 1)
        assert run.peak_live <= in_flight < files / 2
        assert stored[len(stored) // 2] > files / 4, "rows are stored while the run goes on"
        walk_ahead = sources.WALK_GROUP * (sources.WALK_QUEUE + 2)  # queued, being taken, being walked
        assert max(ahead) <= walk_ahead + in_flight < files / 2, "the walk does not run ahead of the hashing"
        assert result.files == files and result.count("unreadable") == 1 and result.files_known == 0
        assert sum(1 for _ in result.store.rows()) == files + 1
        summary = report.summary_json(result)["summary"]
        assert summary["files"] == files and summary["unreadable"] == 1 and summary["items_queried"] == 3 * files
        assert result.exit_status() == 2
        assert run.store.path.stat().st_mode & 0o777 == 0o600
    finally:
        result.store.close()
    assert not run.store.path.exists(), "the rows of a run do not outlive it"


def hanging_hasher(path: Path, *, dihedral: bool = False) -> filehash.FileHashes:
    """Stands for a decoder stuck on a crafted file: ``hang.bin`` blocks for ever reading a FIFO no one writes to."""
    if path.name == "hang.bin":
        (path.parent.parent / "nobody-writes.fifo").read_bytes()
    return filehash.hash_file(path, dihedral=dihedral)


async def test_a_file_that_hangs_the_decoder_costs_at_most_the_file_timeout(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "nobody-writes.fifo")
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(10)
    for i in range(40):
        (tree / f"f{i:02d}.bin").write_bytes(rng.randbytes(300))
    (tree / "hang.bin").write_bytes(b"crafted")
    draw.save_jpeg(draw.drawing(4, (96, 80)), tree / "pic.jpg")
    run = triage.Triage(str(tree), "HANG", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=2, batch=50,
                        file_timeout=1.0, hasher=hanging_hasher)
    # A guard against the hang this is about, not a measurement.
    result = await asyncio.wait_for(run.run(_NoHits()), 120)
    try:
        rows = {Path(r.path).name: r for r in result.store.rows()}
        stuck = rows["hang.bin"]
        assert stuck.status == "hashed", stuck.reason
        assert stuck.hashes.exact["sha256"] == filehash.exact_digests(tree / "hang.bin")["sha256"]
        assert "took longer than 1 s" in stuck.hashes.skipped[0].reason
        assert rows["pic.jpg"].hashes.pdq is not None, "the other files are hashed as usual"
        assert sum(1 for r in rows.values() if r.status == "hashed" and not r.hashes.skipped) == 41
    finally:
        result.store.close()


async def test_a_playlist_never_makes_the_decoder_open_other_files(tmp_path: Path) -> None:
    """FFmpeg's HLS demuxer opens whatever a playlist lists: another local video, or a FIFO that hangs it.

    Named like a video and like a playlist, neither is opened with a demuxer that follows references.
    """
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    video = draw.video(elsewhere / "other.mp4", 12, seconds=2, fps=5, size=(96, 72))
    os.mkfifo(elsewhere / "segment.ts")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name, target in (("clip.mp4", video), ("stuck.m3u8", elsewhere / "segment.ts")):
        (tree / name).write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\n{target}\n#EXT-X-ENDLIST\n")
    assert filehash.hash_file(video).video is not None, "the listed video itself is hashed"
    run = triage.Triage(str(tree), "LIST", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=1)
    # A guard against the hang this is about, not a measurement: no --file-timeout is set.
    result = await asyncio.wait_for(run.run(_NoHits()), 120)
    try:
        rows = {Path(r.path).name: r for r in result.store.rows()}
        disguised = rows["clip.mp4"]
        assert disguised.status == "hashed" and disguised.hashes.video is None, "no frames read from the other file"
        assert "not in a video container this gateway opens" in disguised.hashes.skipped[0].reason
        listing = rows["stuck.m3u8"]
        assert listing.status == "hashed" and listing.hashes.exact["sha256"] and not listing.hashes.skipped
    finally:
        result.store.close()


async def test_a_decoder_that_asks_for_too_much_memory_fails_alone(tmp_path: Path) -> None:
    # 49 million pixels: under the size any image is refused at, over what 600 MB of address space can decode.
    Image.new("RGB", (7000, 7000), (120, 30, 200)).save(tmp_path / "huge.png")
    draw.save_jpeg(draw.drawing(5, (96, 80)), tmp_path / "pic.jpg")
    run = triage.Triage(str(tmp_path), "MEM", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=1,
                        worker_memory=600 << 20)
    result = await run.run(_NoHits())
    try:
        rows = {Path(r.path).name: r for r in result.store.rows()}
        huge = rows["huge.png"]
        assert huge.status == "hashed" and huge.hashes.exact["sha256"]
        assert "MemoryError" in huge.hashes.skipped[0].reason
        assert rows["pic.jpg"].hashes.pdq is not None, "the worker goes on with the next file"
    finally:
        result.store.close()


async def test_the_first_batch_is_small_and_progress_counts_hashes_as_they_go_out(tmp_path: Path) -> None:
    rng = random.Random(11)
    for i in range(400):
        (tmp_path / f"f{i:03d}.bin").write_bytes(rng.randbytes(60))
    run = triage.Triage(str(tmp_path), "FIRST", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=2, batch=500)
    sent_when_asked: list[int] = []

    class Watching(_NoHits):
        async def match(self, items, case, timeout=None, deadline=None):
            sent_when_asked.append(run.items_sent)
            return await super().match(items, case, timeout, deadline)

    federation = Watching()
    result = await run.run(federation)
    result.store.close()
    assert federation.batches[0] == triage.FIRST_BATCH, "the first answer comes after 100 hashes, not 500"
    assert max(federation.batches) <= 500 and sum(federation.batches) == 1200
    running = [sum(federation.batches[: i + 1]) for i in range(len(federation.batches))]
    # Counted when it goes out, before its answer; the next ones may be out already (a few at a time).
    ahead = QUERIES_AT_ONCE - 1
    assert all(running[i] <= seen <= running[min(i + ahead, len(running) - 1)]
               for i, seen in enumerate(sent_when_asked)), (sent_when_asked, running)


async def test_the_terminal_shows_near_duplicates_and_explains_its_counts(tmp_path: Path) -> None:
    rng = random.Random(12)
    exact = set()
    for i in range(30):
        path = tmp_path / f"copy{i:02d}.bin"
        path.write_bytes(rng.randbytes(80))
        exact.add(filehash.exact_digests(path)["md5"])
    for i in range(2):
        draw.save_jpeg(draw.drawing(20 + i, (96, 80)), tmp_path / f"zz_edited{i}.jpg")

    class Knowing(_NoHits):
        async def match(self, items, case, timeout=None, deadline=None):
            def hits(item):
                if item.algorithm == "md5" and item.digest in exact:
                    return (HitInfo("FR", "FR", "FR-" + item.digest.hex()[:6]),)
                if item.algorithm == "pdq":
                    return (HitInfo("ES", "ES", "ES-IMG", distance=7),)
                return ()
            return [NodeAnswer("FR", "FR", NodeStatus.HIT, hits=tuple(hits(i) for i in items),
                               truncated=(False,) * len(items))]

    run = triage.Triage(str(tmp_path), "NEAR", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=1)
    result = await run.run(Knowing())
    screen = io.StringIO()
    try:
        report.print_summary(result, Console(file=screen, width=300))
    finally:
        result.store.close()
    text = screen.getvalue()
    for i in range(2):
        line = next(line for line in text.splitlines() if f"zz_edited{i}.jpg" in line)
        assert "ES-IMG (distance 7)" in line and " 7 " in line
    assert "Near-duplicates" in text and "Exact copies (distance 0, first 20 of 30)" in text
    assert "32 of 32 file(s) known" in text
    assert "30 exact copies (distance 0) and 2 near-duplicate(s)" in text
    assert "32 reference(s): a file counts once per node and reference" in text
    assert "32 hit(s): one per hash that matched" in text


async def test_the_html_page_lists_a_page_of_files_and_links_the_complete_listing(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.triage import report_html  # noqa: PLC0415

    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(13)
    for i in range(120):
        (tree / f"f{i:03d}.bin").write_bytes(rng.randbytes(30))
    run = triage.Triage(str(tree), "PAGE", [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")], jobs=1)
    result = await run.run(_NoHits())
    monkeypatch.setattr(report_html, "PAGE_FILES", 50)
    out = tmp_path / "out"
    out.mkdir()
    try:
        report_html.write_html(result, out / "r.html", {"csv": out / "all.csv", "html": out / "r.html"})
        report.write_csv(result, out / "all.csv")
    finally:
        result.store.close()
    page = (out / "r.html").read_text()
    body = page[page.index('<table id="files"'):]
    body = body[body.index("<tbody>"):body.index("</tbody>")]
    assert body.count("<tr>") == 50
    assert "The first 50 of 120 files" in page and '<a href="all.csv">all.csv</a>' in page
    assert len((out / "all.csv").read_text().splitlines()) == 121


async def test_a_cached_run_gives_the_same_rows_and_hashes_a_damaged_record_again(tmp_path: Path) -> None:
    """The cached re-run reads records back without the hashing processes: every row must come out as the
    first run wrote it (digests, what was not sent and why), and a record that does not parse is hashed again."""
    tree = tmp_path / "tree"
    tree.mkdir()
    rng = random.Random(12)
    for i in range(150):
        (tree / f"f{i:03d}.bin").write_bytes(rng.randbytes(10 + i))
    (tree / "empty.bin").write_bytes(b"")
    (tree / "noise.jpg").write_bytes(rng.randbytes(300))  # says image, does not decode: a reason in not_sent
    draw.save_jpeg(draw.drawing(4, (96, 80)), tree / "pic.jpg")
    nodes = [NodeEntry("FR", "FR", "127.0.0.1:1", "fr")]

    async def once() -> tuple[triage.TriageResult, dict[str, dict]]:
        cache = triage.HashCache(tmp_path / "c.sqlite")
        result = await triage.Triage(str(tree), "CACHED", nodes, jobs=2, cache=cache).run(_NoHits())
        cache.close()
        try:
            return result, {Path(r.path).name: report.file_json(r) for r in result.store.rows()}
        finally:
            result.store.close()

    first_result, first = await once()
    with sqlite3.connect(tmp_path / "c.sqlite") as db:
        db.execute("UPDATE hashes SET record = ? WHERE path = ?", ('{"md5": "not hex"', os.fsencode(tree / "f007.bin")))
    second_result, second = await once()
    assert first_result.hashed_now == len(first) == 153 and first_result.cache_hits == 0
    assert second_result.hashed_now == 1 and second_result.cache_hits == 152
    assert second_result.items_queried == first_result.items_queried == 153 * 3 + 1  # pic.jpg adds its PDQ
    assert not second["f007.bin"]["from_cache"] and second["f008.bin"]["from_cache"]
    assert second["pic.jpg"]["pdq"] and "does not decode" in second["noise.jpg"]["not_sent"][0]["reason"]
    without = lambda rows: {name: {k: v for k, v in row.items() if k != "from_cache"} for name, row in rows.items()}  # noqa: E731
    assert without(second) == without(first)


async def test_files_hashed_by_directory_give_the_rows_of_files_hashed_one_by_one(tmp_path: Path) -> None:
    """The workers read a walked directory's files in groups and most come back as columns, stored as such;
    every row, summary count and report line must be what the per-file path (lists of paths) gives."""
    tree = tmp_path / "tree"
    rng = random.Random(21)
    known = set()
    for d in range(3):
        for i in range(140):
            path = tree / f"d{d}" / f"f{i:03d}.bin"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(rng.randbytes(i * 7))
            if i % 50 == 3:
                known.add(filehash.exact_digests(path)["sha1"])
    (tree / "d1" / "empty.bin").write_bytes(b"")
    (tree / "d1" / "noise.jpg").write_bytes(rng.randbytes(300))
    draw.save_jpeg(draw.drawing(9, (96, 80)), tree / "d2" / "pic.jpg")
    (tree / "d0" / "link.bin").symlink_to(tree / "d0" / "f001.bin")
    (tree / "d0" / "dangling").symlink_to("nowhere")
    os.mkfifo(tree / "d1" / "fifo")
    (tree / os.fsdecode(b"bad\xffname.bin")).write_bytes(b"not utf-8")
    class Knowing(_NoHits):
        def __init__(self, down: bool) -> None:
            super().__init__()
            self.down = down  # a second node that answers nothing: every row says so

        async def match(self, items, case, timeout=None, deadline=None):
            self.batches.append(len(items))
            hits = tuple((HitInfo("FR", "FR", "FR-" + i.digest.hex()[:6]),) if i.digest in known else ()
                         for i in items)
            answers = [NodeAnswer("FR", "FR", NodeStatus.HIT, hits=hits, truncated=(False,) * len(items))]
            return [*answers, NodeAnswer("DE", "DE", NodeStatus.UNAVAILABLE, "down")] if self.down else answers

    async def triaged(entries, down: bool) -> tuple[list[dict], dict]:
        nodes = [NodeEntry("FR", "FR", "127.0.0.1:1", "fr"), *([NodeEntry("DE", "DE", "127.0.0.1:2", "de")] * down)]
        run = triage.Triage(str(tree), "SAME", nodes, jobs=2, batch=300, entries=entries)
        result = await run.run(Knowing(down))
        try:
            return [report.file_json(r) for r in result.store.rows()], report.summary_json(result)["summary"]
        finally:
            result.store.close()

    for down in (False, True):
        grouped, grouped_summary = await triaged(None, down)  # the default: directories to the workers
        one_by_one, one_by_one_summary = await triaged(lambda exclude, stop: walk(str(tree), exclude, stop), down)
        assert len(grouped) == 3 * 140 + 7
        assert grouped == one_by_one and grouped_summary == one_by_one_summary
        assert grouped_summary["files_known"] == len(known) == 9 and grouped_summary["not_hashed"] == 1
        assert all(row["not_answered_by"] == ["DE"] for row in grouped if row["status"] == "hashed") == down
