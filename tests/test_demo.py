"""``make demo``: what a newcomer sees first must be right, with no error on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from federation import demo
from federation.pki import DevPki
from gateway import filehash


def test_the_seized_files_are_what_their_names_say(tmp_path: Path) -> None:
    seized, picture, footage = demo._seized_files(tmp_path, 2026)
    for path in seized:
        hashes = filehash.hash_file(path)
        assert hashes.skipped == (), (path.name, hashes.skipped)
        kind = hashes.video if path.suffix == ".mp4" else hashes.pdq
        assert kind is not None, path.name
    clip = filehash.hash_file(seized[2]).video
    original = filehash.hash_file(footage).video
    assert clip is not None and original is not None and len(original.frames) >= 4
    assert filehash.hash_file(seized[2]).exact != filehash.hash_file(footage).exact, "a re-encoded copy"
    assert filehash.hash_file(picture).pdq is not None


def test_the_demo_finds_the_clip_by_its_frames_and_shows_no_error(pki: DevPki, tmp_path: Path) -> None:
    # A relative work directory, as ``make demo`` gives (its default, ".demo"): every path the
    # demo writes into a node's configuration must still name the file it means.
    done = subprocess.run([sys.executable, "-m", "federation.demo", "--pki", str(pki.root), "--federation",
                           pki.federation, "--nodes", "FR,DE", "--workdir", "demo"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "not sent" not in out and "cannot" not in out and "Error" not in out, out
    lines = out.splitlines()
    video = next(i for i, line in enumerate(lines) if "vpdq:" in line)  # the clip's row: its second line
    assert "DE" in lines[video - 1] and "frames" in lines[video - 1], out
    assert "SERIES-CHARLIE" in out and "SERIES-DELTA" in out
    assert "4 of 5 file(s)" in out and "Complete answer" in out
    # FR's desk hears, through its signed webhook, of each hit FR's node released: SERIES-ALPHA and -BRAVO.
    desk = sorted(line for line in lines if line.startswith("FR's desk received: hit on FR-"))
    assert len(desk) == 2 and "(2 alert(s) recorded by FR's node" in out, out
    assert "SERIES-ALPHA" in "".join(desk) and "SERIES-BRAVO" in "".join(desk)
    assert all("case DEMO-2026-0001" in line and "signature verified" in line for line in desk), desk
    # The standing query: asked before DE imports the set, alerted once after it.
    assert out.count("alert: case DEMO-2026-0002: DE holds") == 1 and "as DE-NEW-0001" in out, out
    assert out.index("DE imports a new set") < out.index("alert: case DEMO-2026-0002"), out
