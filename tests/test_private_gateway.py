"""Private exact matching from the gateway's side, end to end: real nodes over mutual
TLS that offer it (one per bucket encoding) or not, asked through ``icse-gateway query``
(``auto``, ``--private``, ``--no-private``), the gateway library and the conformance kit.
The pure part (membership test, offers, request sizes) is in test_private_membership.py.
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from federation import oprf, tokens
from federation.localfed import LocalFederation, LocalNode, NodeSpec, environment
from federation.pki import DevPki
from federation.query import DiscloseItem, QueryItem, disclose_sha256, private_match_sha256, private_request
from federation.wire import disclose_to_pb, private_request_to_pb, rpc
from gateway import config as gateway_config, private
from gateway.config import PrivateMode
from gateway.fanout import Federation
from gateway.signing import signer_for
from tests.support import claims_for, gateway_client, import_rows, query_json, run_gateway, signing_key

# --------------------------------------------------------------------------- real nodes over mutual TLS

PRIVATE_NODES = ("FR", "DE")  # offer private exact matching
PLAIN_NODE = "NL"  # does not


@dataclass(frozen=True)
class Mixed:
    local: LocalFederation
    config: Path  # every member
    private_only: Path  # the members that offer private matching
    shared: str  # sha256 hex held by FR (private) and NL (plain)
    de_md5: str  # md5 hex held by DE only (private)
    fr_sha1: str  # sha1 hex held by FR only
    pdq: str  # a PDQ hash held by FR: asked in clear even of a private node


def _init_key(node: LocalNode) -> None:
    """The node's OPRF key, before any import: the import then computes every digest's output
    (no background catch-up for a test to wait for)."""
    node.write_config()
    done = subprocess.run(node.node_command("private-key", "init", "--config", str(node.config_path)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def mixed(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    workdir = tmp_path_factory.mktemp("private-mixed")
    rng = random.Random(14)
    shared, de_md5, fr_sha1, pdq = rng.randbytes(32).hex(), rng.randbytes(16).hex(), rng.randbytes(20).hex(), \
        rng.randbytes(32).hex()
    # FR answers 8-bit buckets in the fixed encoding, DE 9-bit buckets Elias-Fano coded, its fingerprint
    # width chosen from its bucket size.
    settings = {"FR": {"enabled": True, "prefix_bits": 8, "encoding": "fixed"},
                "DE": {"enabled": True, "prefix_bits": 9, "encoding": "elias-fano"}}
    specs = [NodeSpec(n, n, f"desk@police.example.{n.lower()}", tables={"private": settings[n]})
             for n in PRIVATE_NODES]
    local = LocalFederation(workdir, pki, [*specs, NodeSpec(PLAIN_NODE, PLAIN_NODE, "desk@police.example.nl")])
    rows: dict[str, list[dict[str, str]]] = {
        "FR": [{"sha256": shared, "reference": "FR-SHARED"}, {"sha1": fr_sha1, "reference": "FR-SHA1"},
               {"pdq": pdq, "reference": "FR-PDQ"}],
        "DE": [{"md5": de_md5, "reference": "DE-MD5", "category": "2"}],
        "NL": [{"sha256": shared, "reference": "NL-SHARED"}],
    }
    for node_id in PRIVATE_NODES:
        _init_key(local[node_id])
    for node_id, held in rows.items():
        # Enough others that buckets are shared: 8-bit prefixes over a few hundred digests.
        held += [{"sha256": rng.randbytes(32).hex(), "reference": f"{node_id}-{i}"} for i in range(300)]
        import_rows(local, node_id, held, workdir)
    # A generous bound on readiness (a ready file, not a sleep): the machine may be busy.
    local.start(timeout=300)
    try:
        config = local.write_gateway_config()
        only = local.write_gateway_config(workdir / "private-only.toml", nodes=[local[n] for n in PRIVATE_NODES])
        yield Mixed(local, config, only, shared, de_md5, fr_sha1, pdq)
    finally:
        local.stop()


def _hits(result: dict) -> list[list[tuple[str, str]]]:
    return [[(h["node"], h["reference"]) for h in item["hits"]] for item in result["items"]]


def _nodes(result: dict) -> dict[str, dict]:
    return {n["node"]: n for n in result["nodes"]}


def test_mixed_federation_gives_one_merged_answer(mixed: Mixed) -> None:
    unknown = os.urandom(32).hex()
    code, result = query_json(mixed.config, "--case", "PRIV-1", "--hash", f"sha256:{mixed.shared}",
                              "--hash", f"md5:{mixed.de_md5}", "--hash", f"sha256:{unknown}",
                              "--hash", f"sha1:{mixed.fr_sha1}")
    assert code == 0, result
    assert _hits(result) == [[("FR", "FR-SHARED"), ("NL", "NL-SHARED")], [("DE", "DE-MD5")], [], [("FR", "FR-SHA1")]]
    assert not result["partial"] and result["summary"]["nodes_answered"] == 3
    nodes = _nodes(result)
    for node_id in PRIVATE_NODES:  # asked privately: the status line says so
        assert nodes[node_id]["message"].startswith("private exact matching: 4 item(s)"), nodes[node_id]
    assert nodes[PLAIN_NODE]["message"] == ""  # asked in clear: it does not offer private matching
    assert result["items"][1]["hits"][0]["category"] == "2"  # the node's released fields, as with Match


def test_private_and_no_private_give_the_same_result(mixed: Mixed) -> None:
    queries = {
        "hits": ["--hash", f"sha256:{mixed.shared}", "--hash", f"md5:{mixed.de_md5}",
                 "--hash", f"sha256:{os.urandom(32).hex()}"],
        "no hit": ["--hash", f"sha256:{os.urandom(32).hex()}", "--hash", f"md5:{os.urandom(16).hex()}"],
    }
    for name, hashes in queries.items():
        answers = {}
        for flag in ("--private", "--no-private"):
            code, result = query_json(mixed.private_only, "--case", "PRIV-2", flag, *hashes)
            for volatile in ("request_id",):
                result.pop(volatile)
            messages = {n["node"]: n.pop("message") for n in result["nodes"]}
            for node in result["nodes"]:
                node.pop("latency_ms")
            answers[flag] = (code, result, messages)
        assert answers["--private"][:2] == answers["--no-private"][:2], name
        assert answers["--private"][0] == (0 if name == "hits" else 1)
        assert all(m.startswith("private exact matching") for m in answers["--private"][2].values())
        assert set(answers["--no-private"][2].values()) == {""}


def test_private_does_not_ask_a_node_without_it_in_clear(mixed: Mixed) -> None:
    before = _audit(mixed.local, PLAIN_NODE)
    code, result = query_json(mixed.config, "--case", "PRIV-3", "--private", "--hash", f"sha256:{mixed.shared}")
    assert code == 0  # FR's hit, found privately
    assert _hits(result) == [[("FR", "FR-SHARED")]]
    nl = _nodes(result)[PLAIN_NODE]
    assert nl["status"] == "refused" and result["partial"]
    assert "does not offer private exact matching" in nl["message"] and "--private" in nl["message"]
    # NL was asked nothing but its Describe: no Match reached it.
    assert [r["rpc"] for r in _audit(mixed.local, PLAIN_NODE)[len(before):]] == ["Describe"]


def test_perceptual_items_go_in_clear_and_the_status_line_says_so(mixed: Mixed) -> None:
    code, result = query_json(mixed.config, "--case", "PRIV-4", "--hash", f"pdq:{mixed.pdq}",
                              "--hash", f"sha1:{mixed.fr_sha1}")
    assert code == 0
    assert _hits(result) == [[("FR", "FR-PDQ")], [("FR", "FR-SHA1")]]
    assert "1 perceptual item(s) in clear" in _nodes(result)["FR"]["message"]


def test_the_node_learns_no_digest_it_does_not_hold_and_only_disclosed_hits(mixed: Mixed) -> None:
    """The spy, from the gateway's side: after ``query --private``, FR's files (store, key,
    audit, log) hold none of the unknown digests, in any encoding; its audit shows one
    PrivateMatch of every item, one Disclose of the one local hit and no Match."""
    node = mixed.local["FR"]
    unknown = [os.urandom(32) for _ in range(20)]
    before = _audit(mixed.local, "FR")
    hashes = [a for d in unknown for a in ("--hash", f"sha256:{d.hex()}")]
    code, result = query_json(mixed.config, "--case", "PRIV-5", "--private", "--hash", f"sha256:{mixed.shared}",
                              *hashes)
    assert code == 0 and _hits(result)[0][0] == ("FR", "FR-SHARED")
    records = _audit(mixed.local, "FR")[len(before):]
    assert [(r["rpc"], r["items"], r["hits"]) for r in records if r["rpc"] != "Describe"] == [
        ("PrivateMatch", 21, 0), ("Disclose", 1, 1)]
    assert records[-1]["references"] == ["FR-SHARED"]
    # The holder's desk hears of the hit released by Disclose, as of one released by Match.
    alerts = [a for a in _alerts(mixed.local, "FR") if a["case"] == "PRIV-5"]
    assert [(a["reference"], a["digest"]) for a in alerts] == [("FR-SHARED", mixed.shared)], alerts
    blobs = b"".join(p.read_bytes() for p in node.dir.rglob("*") if p.is_file())
    for digest in unknown:
        for form in (digest, digest.hex().encode(), digest.hex().upper().encode(), base64.b64encode(digest)):
            assert form not in blobs
    # The control: the same kind of search finds a digest the node holds (it is in its store).
    assert bytes.fromhex(mixed.shared) in blobs


async def test_a_forged_proof_gets_nothing(mixed: Mixed) -> None:
    """A gateway that skips step 1 and presents random 64-byte proofs is told nothing; the
    proof found by step 1 (the control) releases the hit."""
    pki, node = mixed.local.pki, mixed.local["FR"]
    client = gateway_client(pki, node.address, "FR")
    key = signing_key(pki)
    data = oprf.digest_input("sha256", bytes.fromhex(mixed.shared))
    async with client.channel() as channel:
        stub = rpc.NodeStub(channel)

        async def call(method: str, request: Any, qh: str) -> Any:
            claims = replace(claims_for(pki, "FR", []), rpc=method, query_sha256=qh)
            return await getattr(stub, method)(request, timeout=10, metadata=tokens.bearer(key.sign(claims)))

        (entry,) = private.blind_items([QueryItem("sha256", bytes.fromhex(mixed.shared))], [0], 8)
        request = private_request([entry.item])
        answer = await call("PrivateMatch", private_request_to_pb(request), private_match_sha256(request))
        ((_, proof),) = private.local_hits([entry], answer)
        assert proof == oprf.finalize(data, entry.blind, answer.evaluated_elements)
        for output, expected in ((os.urandom(64), []), (proof[:32] + os.urandom(32), []), (proof, ["FR-SHARED"])):
            items = [DiscloseItem("sha256", output)]
            disclosed = await call("Disclose", disclose_to_pb(answer.key_id, items), disclose_sha256(answer.key_id,
                                                                                                      items))
            assert [h.reference for r in disclosed.results for h in r.hits] == expected


def _alerts(local: LocalFederation, node_id: str) -> list[dict]:
    """The node's holder alerts, read through ``icse-node alerts`` as its desk would."""
    done = subprocess.run(local[node_id].node_command("alerts", "--config", str(local[node_id].config_path)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _audit(local: LocalFederation, node_id: str) -> list[dict]:
    """The node's audit records, read through ``icse-node audit export`` as its operator would."""
    done = subprocess.run(local[node_id].node_command("audit", "export", "--config",
                                                      str(local[node_id].config_path)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def _kit(pki: DevPki, node: LocalNode, known: str) -> subprocess.CompletedProcess[str]:
    """``icse-conformance node`` against ``node``, as gateway eu-1, with a held digest (``ALGO:HEX``)."""
    return subprocess.run(
        [sys.executable, "-m", "federation.conformance.cli", "node", "--address", node.address, "--node-id",
         node.node_id, "--federation", pki.federation, "--ca", str(pki.ca_cert),
         "--cert", str(pki.gateway_cert("eu-1")), "--key", str(pki.gateway_key("eu-1")),
         "--signing-key", str(pki.signing_key("eu-1")),
         "--kid", pki.signing_kid("eu-1"), "--known", known],
        capture_output=True, text=True, timeout=300, env=environment(), check=False)


def _outcomes(output: str) -> dict[str, str]:
    return {words[1]: words[0] for line in output.splitlines()
            if len(words := line.split()) >= 2 and words[0] in ("pass", "FAIL", "skip")}


@pytest.mark.parametrize("node_id", PRIVATE_NODES)  # fixed and Elias-Fano bucket answers
def test_the_conformance_kit_passes_a_node_offering_private_matching(mixed: Mixed, node_id: str) -> None:
    known = f"sha256:{mixed.shared}" if node_id == "FR" else f"md5:{mixed.de_md5}"
    done = _kit(mixed.local.pki, mixed.local[node_id], known)
    private_checks = {name: outcome for name, outcome in _outcomes(done.stdout).items() if name.startswith("private.")}
    # A bucket out of range can be sent only when prefix_bits is not a multiple of 8 (DE's 9).
    skipped = {"private.bucket-range"} if node_id == "FR" else set()
    assert len(private_checks) == 16, done.stdout + done.stderr
    assert {n for n, outcome in private_checks.items() if outcome != "pass"} == skipped, done.stdout + done.stderr
    assert private_checks["private.bucket-range"] == ("skip" if skipped else "pass")
    assert done.returncode == 0, done.stdout


def test_the_configuration_chooses_the_mode_and_the_flags_override_it(mixed: Mixed, tmp_path: Path) -> None:
    text = mixed.private_only.read_text()
    never = tmp_path / "never.toml"
    never.write_text(text.replace("[gateway]\n", '[gateway]\nprivate = "never"\n', 1))
    hashes = ("--case", "PRIV-6", "--hash", f"md5:{mixed.de_md5}")
    code, result = query_json(never, *hashes)
    assert code == 0 and {n["message"] for n in result["nodes"]} == {""}  # in clear, as configured
    code, result = query_json(never, "--private", *hashes)
    assert code == 0 and all(n["message"].startswith("private exact matching") for n in result["nodes"])
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(text.replace("[gateway]\n", '[gateway]\nprivate = "sometimes"\n', 1))
    done = run_gateway("query", "--config", str(wrong), *hashes)
    assert done.returncode == 2 and '"auto", "always" or "never"' in done.stderr


def test_nodes_shows_which_nodes_offer_private_matching(mixed: Mixed) -> None:
    done = run_gateway("nodes", "--config", str(mixed.config), "--format", "json")
    assert done.returncode == 0, done.stderr
    offers = {row["node"]: row["private"] for row in json.loads(done.stdout)["nodes"]}
    assert offers[PLAIN_NODE] is None
    for node_id, bits in (("FR", 8), ("DE", 9)):
        assert offers[node_id]["prefix_bits"] == bits and offers[node_id]["algorithms"] == ["md5", "sha1", "sha256"]
        assert offers[node_id]["covered"] == offers[node_id]["stored"] > 300
    table = run_gateway("nodes", "--config", str(mixed.config))
    assert table.returncode == 0, table.stdout
    assert "8-bit buckets, ~1 each" in table.stdout and "9-bit buckets, ~1 each" in table.stdout, table.stdout


class _DisclosesAnything(LocalNode):
    def node_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.defective_private_node", *args]


def test_the_conformance_kit_fails_a_node_that_discloses_on_a_forged_proof(pki: DevPki, tmp_path: Path) -> None:
    node = _DisclosesAnything(NodeSpec("PL", "PL", tables={"private": {"enabled": True, "prefix_bits": 8}}),
                              tmp_path, pki, ["eu-1"])
    held = os.urandom(32).hex()
    _init_key(node)
    source = tmp_path / "held.txt"
    source.write_text(f"sha256:{held}\n")
    assert node.import_file(source).returncode == 0
    node.start()
    try:
        node.wait_ready(timeout=300)
        done = _kit(pki, node, f"sha256:{held}")
    finally:
        node.stop()
    outcomes = _outcomes(done.stdout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert outcomes["private.forged-proof"] == "FAIL" and "1 result(s) released" in done.stdout, done.stdout
    assert outcomes["private.known-found"] == "pass" and outcomes["private.consistent"] == "pass"


async def test_a_node_restarted_with_other_buckets_is_described_afresh(pki: DevPki, tmp_path: Path) -> None:
    """One gateway run (a long triage, say) outlives a node's restart with another prefix length:
    the request built from the old description is refused, and the gateway describes the node
    again and asks once more, instead of reporting it refused for the rest of the run."""
    with socket.socket() as probe:  # a fixed address, so the restarted node is the same replica
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    held = os.urandom(20)
    first = LocalNode(NodeSpec("PL", "PL", tables={"private": {"enabled": True, "prefix_bits": 8}}),
                      tmp_path, pki, ["eu-1"])
    _init_key(first)
    first.write_config(listen=f"127.0.0.1:{port}")
    source = tmp_path / "held.txt"
    source.write_text(f"sha1:{held.hex()}\n")
    assert first.import_file(source).returncode == 0
    local = LocalFederation(tmp_path, pki, [])
    local.nodes["PL"] = first
    first.start()
    try:
        first.wait_ready(timeout=300)
        config = gateway_config.load(local.write_gateway_config())
        async with private.federation(replace(config, private=PrivateMode.ALWAYS), signer_for(config)) as fed:
            (answer,) = await fed.match([QueryItem("sha1", held)], "PRIV-7")
            assert answer.status.answered and answer.hits[0], answer
            assert "bucket of 8 bits" in answer.message
            first.stop()
            second = LocalNode(NodeSpec("PL", "PL", tables={"private": {"enabled": True, "prefix_bits": 10}}),
                               tmp_path, pki, ["eu-1"])
            second.write_config(listen=f"127.0.0.1:{port}")
            second.start()
            try:
                second.wait_ready(timeout=300)
                (answer,) = await fed.match([QueryItem("sha1", held)], "PRIV-8")
            finally:
                second.stop()
        assert answer.status.answered and answer.hits[0], answer
        assert "bucket of 10 bits" in answer.message
    finally:
        first.stop()


def test_triage_of_a_hash_list_asks_privately_too(mixed: Mixed, tmp_path: Path) -> None:
    """``query --hashes`` (directory triage's batches) takes the same choice: with --private, the
    plain node is not asked and the private nodes' hits are found."""
    listing = tmp_path / "hashes.txt"
    listing.write_text(f"sha256:{mixed.shared}\nmd5:{mixed.de_md5}\nsha256:{os.urandom(32).hex()}\n")
    before = _audit(mixed.local, PLAIN_NODE)
    done = run_gateway("query", "--config", str(mixed.config), "--case", "PRIV-9", "--private", "--hashes",
                       str(listing), "--no-cache", "--jsonl", str(tmp_path / "rows.jsonl"), "--format", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [sorted(r["countries"]) for r in rows] == [["FR"], ["DE"], []]
    assert all(r["not_answered_by"] == [PLAIN_NODE] for r in rows)
    assert {r["rpc"] for r in _audit(mixed.local, PLAIN_NODE)[len(before):]} == {"Describe"}


async def test_a_batch_too_large_for_one_answer_is_asked_in_parts(mixed: Mixed) -> None:
    """Few prefix bits for a large store make large bucket answers: the batch goes out in parts
    that each fit the answer budget, and their candidates land at their items' positions."""
    items = [QueryItem("md5", os.urandom(16)), QueryItem("sha256", bytes.fromhex(mixed.shared)),
             QueryItem("sha1", os.urandom(20)), QueryItem("md5", bytes.fromhex(mixed.de_md5)),
             QueryItem("sha1", bytes.fromhex(mixed.fr_sha1)), QueryItem("sha256", os.urandom(32))]
    before = {n: len(_audit(mixed.local, n)) for n in PRIVATE_NODES}
    config = gateway_config.load(mixed.private_only)
    chooser = private.Chooser(PrivateMode.ALWAYS, answer_budget=100)  # about two items per request here
    async with Federation(config, signer_for(config), strategy=chooser) as fed:
        answers = {a.node_id: a for a in await fed.match(items, "PRIV-10")}
    references = {n: [[h.reference for h in hits] for hits in a.hits] for n, a in answers.items()}
    assert references["FR"] == [[], ["FR-SHARED"], [], [], ["FR-SHA1"], []]
    assert references["DE"] == [[], [], [], ["DE-MD5"], [], []]
    for node_id in PRIVATE_NODES:
        calls = [(r["rpc"], r["items"]) for r in _audit(mixed.local, node_id)[before[node_id]:]]
        asked = [count for rpc_name, count in calls if rpc_name == "PrivateMatch"]
        assert len(asked) >= 3 and sum(asked) == len(items), calls
