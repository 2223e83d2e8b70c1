"""The node's store, indexes and importer against a real SQLite file."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from federation import algorithms
from federation.pki import DevPki
from federation.query import QueryItem
from node import matcher
from node.importer import ImportAborted, import_file
from node.index import Candidate, ExactIndex
from node.live_index import LiveIndexes
from node.records import HashRecord
from node.segment_set import record_id
from node.store import Store


async def test_import_is_idempotent_and_reports_rejections(tmp_path: Path) -> None:
    source = tmp_path / "set.txt"
    source.write_text("md5:" + "11" * 16 + "\nsha1:zz\nsha256:" + "22" * 32 + "\nmd5:" + "11" * 16 + "\n")
    async with await Store.open(tmp_path / "s.sqlite") as store:
        first = await import_file(store, source, country="FR")
        assert (first.added, first.already_present) == (2, 1)
        assert [(r.line, r.reason) for r in first.rejected] == [(2, "sha1 digest must be 40 hex characters, got 2")]
        generation = await store.generation()
        again = await import_file(store, source, country="FR")
        assert (again.added, again.already_present) == (0, 3)
        assert await store.generation() == generation, "nothing changed, so no new generation"
        assert await store.counts() == {"md5": 1, "sha256": 1}


async def test_strict_import_writes_nothing_on_a_bad_row(tmp_path: Path) -> None:
    rows = "".join(f"sha256:{os.urandom(32).hex()}\n" for _ in range(25_000)) + "sha256:nothex\n"
    source = tmp_path / "set.txt"
    source.write_text(rows)
    async with await Store.open(tmp_path / "s.sqlite") as store:
        with pytest.raises(ImportAborted, match="line 25001"):
            await import_file(store, source, country="FR", strict=True)
        assert await store.counts() == {}
        assert await store.generation() == 0


async def test_store_is_wal(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    source = tmp_path / "set.txt"
    source.write_text("md5:" + "ab" * 16 + "\n")
    async with await Store.open(path) as store:
        await import_file(store, source, country="DE")
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def _unnamed_sources(directory: Path) -> list[Path]:
    """Files whose rows have no reference, in each import format (one with some that have one)."""
    rng = random.Random(7)
    lines = directory / "set.txt"
    lines.write_text("# no references\n" + "".join(f"sha256:{rng.randbytes(32).hex()}\n" for _ in range(300)))
    wide = directory / "wide.csv"
    wide.write_text("md5,sha1,reference,category\n" + "".join(
        f"{rng.randbytes(16).hex()},{rng.randbytes(20).hex()},{'FR-OWN-' + str(n) if n % 3 == 0 else ''},1\n"
        for n in range(200)))
    long = directory / "long.csv"
    long.write_text("".join(f"pdq,{rng.randbytes(32).hex()},   ,2\n" for _ in range(200)))
    document = directory / "case.json"
    document.write_text(json.dumps({"value": [{"Media": [
        {"MD5": rng.randbytes(16).hex(), "SHA1": rng.randbytes(20).hex(), "Category": 1} for _ in range(100)]}]}))
    return [lines, wide, long, document]


async def _import_all(path: Path, sources: list[Path]) -> list[tuple]:
    async with await Store.open(path) as store:
        for source in sources:
            await import_file(store, source, country="DE")
        return [row async for batch in store.iter_rows() for row in batch]


async def test_rows_without_references_are_named_alike_on_every_replica(tmp_path: Path) -> None:
    """Two stores importing the same files hold the same set, references included;
    a generated reference is the file's and the row's, never the hash's."""
    sources = _unnamed_sources(tmp_path)
    first = await _import_all(tmp_path / "a" / "s.sqlite", sources)
    second = await _import_all(tmp_path / "b" / "s.sqlite", sources)
    assert len(first) == 300 + 400 + 200 + 200
    assert first == second
    files = {hashlib.sha256(source.read_bytes()).hexdigest()[:8]: source for source in sources}
    named = re.compile(r"DE-([0-9a-f]{8})-([0-9]+)")
    by_reference: dict[str, set[str]] = {}
    for algorithm, digest, reference, *_ in first:
        by_reference.setdefault(reference, set()).add(algorithm)
        assert digest.hex()[:8] not in reference and digest.hex()[-8:] not in reference
        if reference.startswith("FR-OWN-"):
            continue  # the file's own reference, kept
        found = named.fullmatch(reference)
        assert found, reference
        source = files[found.group(1)]
        row = int(found.group(2))
        if source.suffix == ".txt":
            assert 2 <= row <= 301  # the line (the first is a comment)
        elif source.suffix == ".json":
            assert 1 <= row <= 100  # the media item
        else:
            assert 1 <= row <= 201
    wide_rows = [r for r in by_reference
                 if named.fullmatch(r) and files[named.fullmatch(r).group(1)].name == "wide.csv"]
    assert len(wide_rows) == 200 - 67 and all(by_reference[r] == {"md5", "sha1"} for r in wide_rows), \
        "the hashes of one wide row share its reference"
    media = [r for r in by_reference if named.fullmatch(r) and files[named.fullmatch(r).group(1)].suffix == ".json"]
    assert len(media) == 100 and all(by_reference[r] == {"md5", "sha1"} for r in media)
    # Another file (one row more) names its rows differently: references are not shared between files.
    more = tmp_path / "more.txt"
    more.write_text(sources[0].read_text() + f"sha256:{'cd' * 32}\n")
    async with await Store.open(tmp_path / "c" / "s.sqlite") as store:
        await import_file(store, more, country="DE")
        references = {row[2] async for batch in store.iter_rows() for row in batch}
    assert len(references) == 301 and not references & set(by_reference)


def test_exact_index_finds_only_exact_digests() -> None:
    rng = random.Random(1)
    digests = [rng.randbytes(20) for _ in range(5000)]
    index = ExactIndex(algorithms.SHA1, list(range(100, 5100)), digests)
    one_bit_off = digests[0][:-1] + bytes([digests[0][-1] ^ 1])
    queries = [digests[17], rng.randbytes(20), digests[4999], one_bit_off]
    found = index.search(queries, [0] * 4)
    assert found[0] == [Candidate(117)] and found[2] == [Candidate(5099)]
    assert found[1] == [] and found[3] == []
    assert ExactIndex(algorithms.SHA1, [], []).search([digests[0]], [0]) == [[]]


def test_digests_with_trailing_zero_bytes_stay_distinct() -> None:
    stored = [b"\x01" * 15 + b"\x00", b"\x01" * 15 + b"\x02"]
    index = ExactIndex(algorithms.MD5, [1, 2], stored)
    assert index.search([b"\x01" * 15 + b"\x00", b"\x01" * 15 + b"\x01"], [0, 0]) == [[Candidate(1)], []]


async def test_live_indexes_follow_imports_by_another_connection(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    async with await Store.open(path) as serving, await Store.open(path) as importing:
        live = LiveIndexes(serving)
        assert (await live.current()).counts() == {}
        await importing.add([[HashRecord("md5", b"\x05" * 16, "R-1")]])
        current = await live.current()
        assert current.counts() == {"md5": 1} and current.generation == 1
        valid = matcher.validate([QueryItem("md5", b"\x05" * 16)], matcher.Limits())
        (segment,) = current.segments
        found = matcher.match(valid, current.indexes, matcher.Limits())[0].candidates
        assert found == [Candidate(record_id(segment.segment_id, 1))]


def test_matcher_caps_hits_per_item() -> None:
    class Many:
        def __len__(self) -> int:
            return 3

        def hits(self, digests, max_distance):
            return {position: [Candidate(3, 9), Candidate(1, 2), Candidate(2, 2)] for position in range(len(digests))}

    limits = matcher.Limits(max_hits_per_item=2)
    valid = matcher.validate([QueryItem("md5", b"\x00" * 16)], limits)
    (result,) = matcher.match(valid, {"md5": Many()}, limits)
    assert result.candidates == [Candidate(1, 2), Candidate(2, 2)] and result.truncated


def test_pki_keys_are_private(tmp_path: Path) -> None:
    pki = DevPki(tmp_path, "t.icse.test", ["FR"], ["gw"]).create()
    for key in (pki.ca_key, pki.node_key("FR"), pki.gateway_key("gw"), pki.signing_key("gw")):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert "PRIVATE" not in pki.jwks.read_text() and '"d"' not in pki.jwks.read_text()


def _node_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_node_cli_import_and_stats(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nid = "FR"\ncountry = "FR"\nfederation = "t"\nstore = "fr.sqlite"\n')
    source = tmp_path / "set.csv"
    source.write_text(f"md5,{'aa' * 16},FR-1,1,true\nsha1,bad,FR-2,1,\n")
    done = _node_cli("import", "--config", str(config), str(source))
    assert done.returncode == 1, "a file with rejected rows exits 1"
    assert "added 1, already present 0, rejected 1" in done.stdout and "line 2:" in done.stdout
    stats = _node_cli("stats", "--config", str(config), "--format", "json")
    assert stats.returncode == 0 and '"md5": 1' in stats.stdout
    assert (tmp_path / "fr.sqlite").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[node]\nid = "FR"\ncountry = "France"\nfederation = "t"\nstore = "s"\n',
         "[node] country: expected an ISO 3166"),
        ('[node]\nid = "FR"\ncountry = "FR"\nfederation = "t"\nstore = "s"\ncolour = 1\n',
         "[node] colour: unknown key"),
        ('[node]\ncountry = "FR"\nfederation = "t"\nstore = "s"\n', "[node] id: required"),
        ('[node]\nid = "FR"\ncountry = "FR"\nfederation = "t"\nstore = "s"\n[limits]\nmax_items = 0\n',
         "[limits] max_items: must be at least 1"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_node_config_errors_name_the_bad_key(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "node.toml"
    config.write_text(text)
    done = _node_cli("stats", "--config", str(config))
    assert done.returncode == 2 and message in done.stderr
