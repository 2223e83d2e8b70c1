"""End to end: the gateway CLI fans out to five real node processes over mutual TLS."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.conftest import COUNTRIES, RunningFederation
from tests.support import query_json, run_gateway


def test_shared_digest_hits_in_every_country_that_holds_it(federation: RunningFederation) -> None:
    shared = f"sha256:{federation.data.shared_sha256}"
    code, result = query_json(federation.config, "--case", "CASE-7", "--hash", shared)
    assert code == 0
    assert result["schema"] == "icse.query-result/1"
    assert result["partial"] is False
    hits = result["items"][0]["hits"]
    assert [h["country"] for h in hits] == ["DE", "FR", "NL"]
    assert {h["reference"] for h in hits} == {"DE-SHARED", "FR-SHARED", "NL-SHARED"}
    assert all(h["victim_identified"] is True and h["series"] == "S-ALPHA" for h in hits)
    assert {h["contact"] for h in hits} == {f"desk@police.example.{c}" for c in ("de", "fr", "nl")}
    statuses = {n["node"]: n["status"] for n in result["nodes"]}
    assert statuses == {"DE": "hit", "FR": "hit", "NL": "hit", "ES": "no_hit", "IT": "no_hit"}


def test_mixed_query_reports_hits_and_misses_per_item(federation: RunningFederation) -> None:
    miss = "sha1:" + "ab" * 20
    code, result = query_json(
        federation.config, "--case", "CASE-8",
        "--hash", f"md5:{federation.data.es_md5}", "--hash", miss,
        "--hash", federation.data.per_country["IT"][5],
    )
    assert code == 0
    es_item, miss_item, it_item = result["items"]
    assert [(h["country"], h["reference"], h["category"], h["victim_identified"]) for h in es_item["hits"]] == [
        ("ES", "ES-REF-42", "2", False)
    ]
    assert miss_item["hits"] == []
    assert [h["country"] for h in it_item["hits"]] == ["IT"]
    assert it_item["hits"][0]["reference"].startswith("IT-")
    assert result["summary"]["countries_with_hits"] == ["ES", "IT"]
    assert result["summary"]["nodes_answered"] == len(COUNTRIES)


def test_no_hit_exits_1_and_reveals_nothing(federation: RunningFederation) -> None:
    code, result = query_json(federation.config, "--case", "CASE-9", "--hash", "sha256:" + "00" * 32)
    assert code == 1
    assert result["items"][0]["hits"] == []
    assert all(n["status"] == "no_hit" and n["message"] == "" for n in result["nodes"])


def test_file_is_hashed_locally_and_matched(federation: RunningFederation, tmp_path: Path) -> None:
    seized = tmp_path / "seized.bin"
    seized.write_bytes(b"synthetic bytes " * 1000)
    # Plant the file's SHA-1 in IT's store through the real import command.
    known = tmp_path / "known.txt"
    known.write_text(f"sha1:{hashlib.sha1(seized.read_bytes()).hexdigest()}\n")
    done = federation.local["IT"].import_file(known)
    assert done.returncode == 0, done.stderr
    code, result = query_json(federation.config, "--case", "CASE-10", "--file", str(seized))
    assert code == 0
    by_algorithm = {item["algorithm"]: item for item in result["items"]}
    assert set(by_algorithm) == {"md5", "sha1", "sha256"}
    assert by_algorithm["sha256"]["digest"] == hashlib.sha256(seized.read_bytes()).hexdigest()
    assert all(item["source"] == str(seized) for item in result["items"])
    assert [h["country"] for h in by_algorithm["sha1"]["hits"]] == ["IT"]
    assert by_algorithm["md5"]["hits"] == [] and by_algorithm["sha256"]["hits"] == []
    assert result["summary"]["files_with_hits"] == 1


def test_table_output_is_readable(federation: RunningFederation) -> None:
    done = run_gateway("query", "--config", str(federation.config), "--case", "CASE-11",
                       "--hash", f"sha256:{federation.data.shared_sha256}")
    assert done.returncode == 0, done.stderr
    assert "DE-SHARED" in done.stdout and "S-ALPHA" in done.stdout
    assert "1 of 1 given hash(es) known to the federation — in DE, FR, NL" in done.stdout
    assert "Complete answer" in done.stdout


def test_bad_input_exits_2_with_a_clear_message(federation: RunningFederation) -> None:
    done = run_gateway("query", "--config", str(federation.config), "--case", "C", "--hash", "sha256:abc")
    assert done.returncode == 2
    assert "sha256 digest must be 64 hex characters, got 3" in done.stderr
    done = run_gateway("query", "--config", str(federation.config), "--case", "  ", "--hash", "md5:" + "0" * 32)
    assert done.returncode == 2 and "--case must not be empty" in done.stderr


def test_nodes_command_describes_every_node(federation: RunningFederation) -> None:
    done = run_gateway("nodes", "--config", str(federation.config), "--format", "json")
    assert done.returncode == 0, done.stderr
    nodes = {n["node"]: n for n in json.loads(done.stdout)["nodes"]}
    assert set(nodes) == set(COUNTRIES)
    assert all(n["status"] == "ok" and n["generation"] >= 1 for n in nodes.values())
    assert sum(nodes["FR"]["counts"].values()) >= 201


def test_a_dead_node_makes_the_answer_partial(federation: RunningFederation, tmp_path: Path) -> None:
    config = tmp_path / "federation.toml"
    text = federation.config.read_text()
    # One more member whose node is not running: nothing listens on its port.
    text += '[[nodes]]\nid = "PL"\ncountry = "PL"\naddress = "127.0.0.1:9"\n'
    config.write_text(text)
    code, result = query_json(config, "--case", "CASE-12", "--hash", "sha256:" + "11" * 32)
    assert code == 2, "a no-hit is not trustworthy while a node did not answer"
    assert result["partial"] is True
    statuses = {n["node"]: n["status"] for n in result["nodes"]}
    assert statuses["PL"] == "unavailable"
    assert [s for n, s in statuses.items() if n != "PL"] == ["no_hit"] * len(COUNTRIES)
