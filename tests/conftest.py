"""Shared fixtures: a generated federation PKI and a running five-country federation."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki

COUNTRIES = ("FR", "DE", "NL", "ES", "IT")

# One compiled-kernel cache for every node the tests start (they inherit the
# environment): each node compiles its search kernels before it says it is
# ready, and with a cache per node directory every start would compile again.
os.environ.setdefault("NUMBA_CACHE_DIR", tempfile.mkdtemp(prefix="icse-test-numba-"))


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels() -> None:
    """Fills that cache once, in one process, before any node starts: five nodes of a federation
    starting together on a cold cache would each compile the kernels at the same time (over a
    minute of CPU on a loaded 2-core machine, past the federation's readiness limit)."""
    subprocess.run([sys.executable, "-c", "from node import readiness; readiness.warm_up()"],
                   check=True, timeout=600)


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> DevPki:
    # eu-2 is a real member of the PKI that the nodes do not trust as a gateway.
    return DevPki(tmp_path_factory.mktemp("pki"), "test.icse.test", [*COUNTRIES, "PL"],
                  ["eu-1", "eu-2"]).create()


@dataclass
class Dataset:
    """What the running federation holds, so tests know the right answers."""

    shared_sha256: str = ""  # known to FR, DE and NL
    es_md5: str = ""  # known to ES only, with metadata
    per_country: dict[str, list[str]] = field(default_factory=dict)  # tagged digests


def _write_sets(directory: Path, rng: random.Random) -> tuple[Dataset, dict[str, Path]]:
    data = Dataset(shared_sha256=rng.randbytes(32).hex(), es_md5=rng.randbytes(16).hex())
    paths = {}
    for country in COUNTRIES:
        shared = country in ("FR", "DE", "NL")
        rows = [["sha256", data.shared_sha256, f"{country}-SHARED", "1", "true", "S-ALPHA"]] if shared else []
        if country == "ES":
            rows.append(["md5", data.es_md5, "ES-REF-42", "2", "false", "S-BRAVO"])
        own = []
        for _ in range(200):
            algorithm, size = rng.choice([("md5", 16), ("sha1", 20), ("sha256", 32)])
            digest = rng.randbytes(size).hex()
            own.append(f"{algorithm}:{digest}")
            rows.append([algorithm, digest, "", "1", "", ""])
        data.per_country[country] = own
        path = directory / f"{country}.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["algo", "digest", "reference", "category", "victim_identified", "series"])
            writer.writerows(rows)
        paths[country] = path
    return data, paths


@dataclass
class RunningFederation:
    local: LocalFederation
    config: Path
    data: Dataset


@pytest.fixture(scope="session")
def federation(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningFederation]:
    workdir = tmp_path_factory.mktemp("federation")
    data, sets = _write_sets(workdir, random.Random(7))
    local = LocalFederation(workdir, pki, [NodeSpec(c, c, f"desk@police.example.{c.lower()}") for c in COUNTRIES])
    for country in COUNTRIES:
        done = local[country].import_file(sets[country])
        assert done.returncode == 0, done.stderr + done.stdout
    with local:
        yield RunningFederation(local, local.write_gateway_config(), data)
