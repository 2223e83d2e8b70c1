"""Metrics, structured logs and request ids, checked with real clients."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from tests.support import query_json, run_gateway

KNOWN = "7e" * 32


@pytest.fixture(scope="module")
def observed(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalFederation]:
    workdir = tmp_path_factory.mktemp("observed")
    local = LocalFederation(workdir, pki, [
        NodeSpec("NL", "NL", "nl@example", tables={"metrics": {"listen": "127.0.0.1:0"}}),
        NodeSpec("ES", "ES", "es@example"),
    ])
    source = workdir / "known.txt"
    source.write_text(f"sha256:{KNOWN}\nmd5:{'0f' * 16}\n")
    assert local["NL"].import_file(source).returncode == 0
    with local:
        yield local


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_node_metrics_count_queries_hits_refusals_and_index(observed: LocalFederation, tmp_path: Path) -> None:
    node = observed["NL"]
    assert node.metrics_port, "the node reports its metrics port when ready"
    config = observed.write_gateway_config()
    # Plain Match (these metrics are Match's): a node offering private matching would otherwise be asked privately.
    code, _ = query_json(config, "--no-private", "--case", "M-1", "--hash", f"sha256:{KNOWN}", "--hash",
                         "md5:" + "11" * 16)
    assert code == 0
    bad = tmp_path / "bad.toml"  # a gateway the node does not trust: refused
    bad.write_text(config.read_text().replace('id = "eu-1"', 'id = "eu-2"', 1)
                   .replace("eu-1.pem", "eu-2.pem").replace("eu-1.key", "eu-2.key")
                   .replace("eu-1-signing.key", "eu-2-signing.key").replace('kid = "eu-1-1"', 'kid = "eu-2-1"'))
    query_json(bad, "--no-private", "--case", "M-2", "--hash", f"sha256:{KNOWN}")
    metrics = _scrape(node.metrics_port)
    assert metrics[("icse_node_requests_total", (("rpc", "Match"), ("status", "OK")))] >= 1
    assert metrics[("icse_node_items_total", (("algorithm", "sha256"),))] >= 1
    assert metrics[("icse_node_items_total", (("algorithm", "md5"),))] >= 1
    assert metrics[("icse_node_hits_total", ())] >= 1
    assert metrics[("icse_node_refusals_total", (("reason", "PERMISSION_DENIED"),))] >= 1
    assert metrics[("icse_node_index_hashes", (("algorithm", "sha256"),))] == 1
    assert metrics[("icse_node_store_generation", ())] >= 1
    assert metrics[("icse_node_request_seconds_count", (("rpc", "Match"),))] >= 2
    text = urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=5).read().decode()
    assert KNOWN not in text and "M-1" not in text, "metrics carry counts only"


def test_request_id_links_gateway_and_node_log_lines(observed: LocalFederation, tmp_path: Path) -> None:
    config = observed.write_gateway_config()
    code, result = query_json(config, "--case", "L-1", "--hash", f"sha256:{KNOWN}")
    assert code == 0 and len(result["request_id"]) >= 16
    for node_id in ("NL", "ES"):
        lines = [json.loads(line) for line in observed[node_id].log_path.read_text().splitlines()
                 if line.startswith("{")]
        mine = [line for line in lines if line.get("request_id") == result["request_id"]]
        assert len(mine) == 1, node_id
        assert (mine[0]["message"], mine[0]["case"], mine[0]["items"]) == ("answered", "L-1", 1)
        assert KNOWN not in json.dumps(lines)
    done = run_gateway("query", "--config", str(config), "--case", "L-2", "--hash", f"sha256:{KNOWN}",
                       "--format", "json", "--log-level", "INFO", "--log-format", "json")
    gateway_lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    request_id = json.loads(done.stdout)["request_id"]
    assert {line["node"] for line in gateway_lines if line.get("request_id") == request_id} == {"NL", "ES"}


def test_gateway_writes_textfile_metrics(observed: LocalFederation, tmp_path: Path) -> None:
    config = observed.write_gateway_config()
    metrics_file = tmp_path / "gateway.prom"
    code, _ = query_json(config, "--case", "T-1", "--hash", f"sha256:{KNOWN}", "--metrics-file", str(metrics_file))
    assert code == 0
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics_file.read_text()) for s in family.samples}
    assert samples[("icse_gateway_queries_total", ())] == 1
    assert samples[("icse_gateway_node_answers_total", (("node", "NL"), ("status", "hit")))] == 1
    assert samples[("icse_gateway_node_answers_total", (("node", "ES"), ("status", "no_hit")))] == 1
    assert samples[("icse_gateway_node_latency_seconds_count", (("node", "NL"),))] == 1


def test_example_configurations_validate(tmp_path: Path, pki: DevPki) -> None:
    root = Path(__file__).resolve().parents[1]
    swaps = {"/etc/icse/ca.pem": pki.ca_cert, "/etc/icse/node.pem": pki.node_cert("FR"),
             "/etc/icse/node.key": pki.node_key("FR"), "/etc/icse/gateway-keys.jwks.json": pki.jwks,
             "/etc/icse/gateway.pem": pki.gateway_cert("eu-1"), "/etc/icse/gateway.key": pki.gateway_key("eu-1"),
             "/etc/icse/gateway-signing.key": pki.signing_key("eu-1"),
             "/var/lib/icse/node.sqlite": tmp_path / "node.sqlite"}
    for example, loader in (("node/examples/node.toml", "node.config"), ("gateway/examples/federation.toml",
                                                                          "gateway.config")):
        text = (root / example).read_text()
        for old, new in swaps.items():
            text = text.replace(old, str(new))
        path = tmp_path / Path(example).name
        path.write_text(text)
        loaded = __import__(loader, fromlist=["load"]).load(path)
        assert loaded.federation == "icse.example.org"


def test_node_describe_reads_its_own_files(observed: LocalFederation) -> None:
    node = observed["NL"]
    done = subprocess.run(node.node_command("describe", "--config", str(node.config_path), "--format", "json"),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    description = json.loads(done.stdout)
    assert (description["node_id"], description["country"]) == ("NL", "NL")
    assert description["counts"] == {"md5": 1, "sha256": 1} and description["generation"] >= 1
    assert description["audit_records_head"] >= 1 and len(description["audit_head_hash"]) == 64
    assert description["listening"] is None, "the test node's port is chosen at start"
