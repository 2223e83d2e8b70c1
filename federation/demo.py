"""``make demo``: a local federation of country nodes, queried through the gateway.

Every country gets its own synthetic hash set (random digests, with a few
deliberately known to several countries). The investigator's "seized" files
are what their names say, drawn at demo time (gradients, noise and shapes):
pictures, some of which countries know by their exact digests; a resized,
recompressed copy of a picture one country knows by its PDQ hash; and a
re-encoded copy of a short video another country knows by its frame hashes.
Nothing here resembles real material. Every node process is stopped at the
end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image, ImageDraw

from federation import demo_watch
from federation.demo_desk import Desk, describe as describe_alert
from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki

CONTACTS = {
    "FR": "OCRVP victim-ID desk, icse@ocrvp.example.fr",
    "DE": "BKA SO12, icse@bka.example.de",
    "NL": "Politie TBKK, icse@politie.example.nl",
    "ES": "Policia Nacional UIT, icse@policia.example.es",
    "IT": "Polizia Postale CNCPO, icse@cncpo.example.it",
    "SE": "NOA Victim ID, icse@polisen.example.se",
    "BE": "Federal Police CCU, icse@police.example.be",
    "PL": "CBZC, icse@policja.example.pl",
}
RANDOM_PER_COUNTRY = 5_000


def _picture(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A gradient with noise and coloured shapes: enough detail for a reliable PDQ hash."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    pixels = 255 * (0.5 * x + 0.5 * y) * rng.uniform(0.3, 1, 3) + rng.normal(0, 12, (height, width, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = int(rng.integers(0, width - 80)), int(rng.integers(0, height - 60))
        box = (x0, y0, x0 + int(rng.integers(30, width // 2)), y0 + int(rng.integers(30, height // 2)))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return image


def _video(path: Path, seed: int, seconds: int = 6, fps: int = 10, size: tuple[int, int] = (320, 240)) -> Path:
    """A short clip: a drawn scene that changes every second and drifts in between."""
    scenes = [np.asarray(_picture(seed * 100 + s, (size[0] + 64, size[1] + 64))) for s in range(seconds)]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 800_000
        for index in range(seconds * fps):
            shift = index % fps * 3
            frame = np.ascontiguousarray(scenes[index // fps][shift : shift + size[1], shift : shift + size[0]])
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _reencoded(source: Path, path: Path, size: tuple[int, int] = (240, 180)) -> Path:
    """The same clip decoded and encoded again, smaller and at a lower bit rate: other bytes, same frames."""
    with av.open(str(source)) as reader, av.open(str(path), "w") as writer:
        stream = writer.add_stream("mpeg4", rate=10)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.bit_rate = 300_000
        for frame in reader.decode(video=0):
            pixels = np.asarray(frame.to_image().resize(size, Image.Resampling.BILINEAR))
            writer.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        writer.mux(stream.encode())
    return path


def _seized_files(workdir: Path, seed: int) -> tuple[list[Path], Path, Path]:
    """The seized files, and the originals that countries know two of them by:
    ``[IMG_0001.jpg, IMG_0002.jpg, clip_0003.mp4, IMG_0004.jpg, IMG_0005.jpg]``, the
    picture IMG_0005 is a resized, recompressed copy of, and the video clip_0003 re-encodes."""
    seized = workdir / "seized"
    seized.mkdir(parents=True, exist_ok=True)
    pictures = []
    for number in (1, 2, 4):
        path = seized / f"IMG_{number:04d}.jpg"
        _picture(seed + number).save(path, "JPEG", quality=85)
        pictures.append(path)
    original = workdir / "original.png"
    image = _picture(seed)
    image.save(original)
    copy = seized / "IMG_0005.jpg"
    image.resize((320, 240), Image.Resampling.LANCZOS).save(copy, "JPEG", quality=65)
    footage = _video(workdir / "original.mp4", seed)
    clip = _reencoded(footage, seized / "clip_0003.mp4")
    return [pictures[0], pictures[1], clip, pictures[2], copy], original, footage


def _hashes_of(path: Path) -> dict[str, Any]:
    """A file's hashes, as the investigators' CLI computes them."""
    done = subprocess.run([sys.executable, "-m", "gateway.cli", "hash", "--format", "json", str(path)],
                          capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)[0]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _hash_sets(countries: Sequence[str], seized: Sequence[Path], pdq: str, vpdq: str, rng: random.Random,
               out: Path) -> dict[str, Path]:
    """One CSV per country: random digests, plus seized files known to some; the
    second country knows the PDQ hash of a picture a seized file copies, the last
    one the frame hashes of the video a seized clip re-encodes."""
    known_by = {
        seized[0]: countries[:3],  # one file known to three countries
        seized[1]: countries[3:5] or countries[:1],  # another to two
    }  # seized[3] is known to nobody
    series = {seized[0]: "SERIES-ALPHA", seized[1]: "SERIES-BRAVO"}
    shared_random = [rng.randbytes(32).hex() for _ in range(20)]
    paths = {}
    for index, country in enumerate(countries):
        path = out / f"{country}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["algorithm", "digest", "reference", "category", "victim_identified", "series"])
            for file, holders in known_by.items():
                if country in holders:
                    writer.writerow(["sha256", _sha256(file), f"{country}-{rng.randrange(10**8):08d}",
                                     rng.choice(["1", "2"]), rng.choice(["true", "false"]), series[file]])
            if index == 1:
                writer.writerow(["pdq", pdq, f"{country}-{rng.randrange(10**8):08d}", "1", "true", "SERIES-DELTA"])
            if index == len(countries) - 1:
                writer.writerow(["vpdq", vpdq, f"{country}-{rng.randrange(10**8):08d}", "1", "false",
                                 "SERIES-CHARLIE"])
            for digest in shared_random[index % 4 :: 4]:
                writer.writerow(["sha256", digest, "", "1", "", ""])
            for _ in range(RANDOM_PER_COUNTRY):
                algorithm, size = rng.choice([("md5", 16), ("sha1", 20), ("sha256", 32)])
                writer.writerow([algorithm, rng.randbytes(size).hex(), "", rng.choice(["1", "2", "3"]), "", ""])
        paths[country] = path
    return paths


def _run(command: list[str], title: str) -> int:
    print(f"\n$ {title}", flush=True)
    env = {**os.environ, "COLUMNS": os.environ.get("COLUMNS", "160")}
    return subprocess.run(command, env=env, timeout=120, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__)
    parser.add_argument("--pki", type=Path, default=Path("certs/dev"))
    parser.add_argument("--federation", default="dev.icse.test")
    parser.add_argument("--nodes", default="FR,DE,NL,ES,IT,SE")
    parser.add_argument("--workdir", type=Path, default=Path(".demo"))
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args(argv)
    # SIGTERM (e.g. from a supervisor) unwinds like Ctrl-C, so every node is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    countries = [c.strip() for c in args.nodes.split(",") if c.strip()]
    if len(countries) < 2:
        parser.error("the demo needs at least two countries")
    rng = random.Random(args.seed)
    # Absolute: the nodes' configurations name files in it, and a node reads a relative
    # path in its configuration from the configuration's own directory.
    args.workdir = args.workdir.resolve()
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    pki = DevPki(args.pki, args.federation, countries, ["eu-1"])
    if not pki.ca_cert.exists():
        pki.create()

    seized, picture, footage = _seized_files(args.workdir, args.seed)
    pdq, vpdq = _hashes_of(picture)["pdq"], _hashes_of(footage)["vpdq"]
    sets = _hash_sets(countries, seized, pdq, vpdq, rng, args.workdir)
    # The first country's victim-identification desk hears of every hit its node releases (its webhook).
    desk = Desk(args.workdir)
    alerts: dict[str, dict[str, object]] = {
        "alerts": {"webhook": desk.url, "webhook_secret_file": str(desk.secret_file)}}
    federation = LocalFederation(
        args.workdir / "nodes", pki,
        [NodeSpec(c, c, CONTACTS.get(c, f"icse@police.example.{c.lower()}"), tables=alerts if i == 0 else {})
         for i, c in enumerate(countries)],
    )
    print(f"Importing synthetic hash sets into {len(countries)} country stores…", flush=True)
    for country in countries:
        result = federation[country].import_file(sets[country])
        print(f"  {country}: {result.stdout.strip()}", flush=True)
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 2
    print(f"Starting {len(countries)} node processes on loopback (mutual TLS)…", flush=True)
    with federation:
        for country in countries:
            print(f"  {country} listening on {federation[country].address}", flush=True)
        config = federation.write_gateway_config(officer="demo-officer-7", org="Demo National Police", country="FR")
        gateway = federation.gateway_command
        _run(gateway("nodes", "--config", str(config)), "icse-gateway nodes")
        files = [arg for path in seized for arg in ("--file", str(path))]
        miss = "md5:" + rng.randbytes(16).hex()
        status = _run(
            gateway("query", "--config", str(config), "--case", "DEMO-2026-0001", *files, "--hash", miss),
            "icse-gateway query --case DEMO-2026-0001 --file … --hash md5:…",
        )
        print(f"\n(exit status {status}: 0 = at least one hit)")
        holder = federation[countries[0]]
        feed = subprocess.run(holder.node_command("alerts", "--config", str(holder.config_path)),
                              capture_output=True, text=True, timeout=60, check=False).stdout.splitlines()
        print(f"\n$ icse-node alerts --config {countries[0]}/node.toml   ({len(feed)} alert(s) recorded by "
              f"{countries[0]}'s node; also sent to its desk's webhook)", flush=True)
        for alert in desk.wait(len(feed), timeout=30):
            print(f"{countries[0]}'s desk received: {describe_alert(alert)}", flush=True)
        watched = demo_watch.standing_query(federation, config, seized[3], countries[-1], args.workdir)
    desk.close()
    print("All node processes stopped.")
    return 0 if status == 0 and watched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
