"""What members say and what files are called is shown as data, never acted on.

A real node imports hostile references and series (rich markup, bidi overrides)
through its own CSV import; a node that is not ours (a gRPC server here, with a
member's real certificate, over real mutual TLS) answers with ANSI escapes and
control characters its importer would have refused. The real ``icse-gateway``
command prints them; its table must show every one literally and keep the hit.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from PIL import Image

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki, cert_pem, issue, key_pem, new_ca, node_leaf
from federation.wire import pb, rpc
from gateway.textsafe import terminal_safe
from tests.support import import_rows

# Wide enough that no table cell wraps, so a value is found on one line.
WIDE = {**os.environ, "COLUMNS": "1000"}


def _gateway(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env=env or WIDE, check=False)


def _query(config: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    return _gateway("query", "--config", str(config), "--case", "T-1", *args, cwd=cwd, env=env)


# --------------------------------------------------------------------------- the function


@pytest.mark.parametrize("raw, shown", [
    ("NL-[bold]0001", "NL-[bold]0001"),
    ("Opération Nightjar \u2013 東京", "Opération Nightjar \u2013 東京"),  # printable: shown as is
    ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
    ("done\rOVERWRITTEN", "done\\x0dOVERWRITTEN"),
    ("a\x9bb\x7fc", "a\\x9bb\\x7fc"),
    ("invoice\u202egpj.exe", "invoice\\u202egpj.exe"),
    ("\u2066x\u2069\u200e\u200f\u061c", "\\u2066x\\u2069\\u200e\\u200f\\u061c"),
    ("zero\u200bwidth\ufeff", "zero\\u200bwidth\\ufeff"),
    ("undecodable-\udcff.jpg", "undecodable-\\udcff.jpg"),
    ("tag\U000e0041", "tag\\U000e0041"),
])
def test_terminal_safe_escapes_what_acts_on_a_terminal(raw: str, shown: str) -> None:
    assert terminal_safe(raw) == shown


# --------------------------------------------------------------------------- a real node, hostile data

MARKUP = {
    "a": ("NL-[bold]0001", "[final]"),
    "b": ("[red]x[/red]", "Operation [/] Nightjar"),
    "c": ("NL-\u202e0002", "[link=https://example.invalid]click[/link] :smile:"),
}


@pytest.fixture(scope="module")
def hostile_store(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str], Path]]:
    """A running NL whose store holds markup-like references and series; a seized file it knows."""
    workdir = tmp_path_factory.mktemp("hostile")
    rng = random.Random(8)
    digests = {key: rng.randbytes(16).hex() for key in MARKUP}
    seized = workdir / "seized"
    seized.mkdir()
    picture = seized / "holiday [final] copy.jpg"
    picture.write_bytes(rng.randbytes(2048))
    rows = [{"md5": digests[key], "reference": ref, "category": "1", "series": series}
            for key, (ref, series) in MARKUP.items()]
    rows.append({"md5": hashlib.md5(picture.read_bytes()).hexdigest(), "reference": "NL-FILE", "category": "1",
                 "series": "[final]"})
    local = LocalFederation(workdir, pki, [NodeSpec("NL", "NL", "desk@[police].example.nl")])
    import_rows(local, "NL", rows, workdir)
    with local:
        yield local.write_gateway_config(), digests, seized


def test_markup_from_a_member_is_shown_literally_and_the_hit_kept(hostile_store) -> None:
    config, digests, _ = hostile_store
    done = _query(config, *(f"--hash=md5:{d}" for d in digests.values()))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    for reference, series in MARKUP.values():
        assert terminal_safe(reference) in done.stdout
        assert series in done.stdout
    assert "desk@[police].example.nl" in done.stdout
    assert "\u202e" not in done.stdout and "\\u202e" in done.stdout


def test_file_name_with_brackets_is_printed_as_it_is(hostile_store) -> None:
    config, _, seized = hostile_store
    done = _query(config, "--file", "holiday [final] copy.jpg", cwd=seized)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "holiday [final] copy.jpg" in done.stdout and "NL-FILE" in done.stdout


# --------------------------------------------------------------------------- a node that is not ours

HOSTILE_HIT = pb.Hit(reference="\x1b[2J\x1b[31mPL-1\x1b[0m", country="PL", node_id="PL",
                     contact="call\rOVERWRITE", category="[/]", series="S\u202eevil\x9b31m",
                     date_added="2026-01-01\x07")


HOSTILE_VERSION = "\x1b]0;pwned\x07 1.0 [/]"


class _Hostile(rpc.NodeServicer):
    def Match(self, request: pb.MatchRequest, context: grpc.ServicerContext) -> pb.MatchResponse:
        return pb.MatchResponse(node_id="PL", country="PL", protocol_version="1.0",
                                results=[pb.ItemResult(item=0, hits=[HOSTILE_HIT])])

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.DescribeResponse:
        return pb.DescribeResponse(node_id="PL", country="P\u202eL", software_version=HOSTILE_VERSION,
                                   protocol_version="1.0", counts=[pb.AlgorithmCount(algorithm="[bold]md5", count=1)])


def _serve(cert: bytes, key: bytes, ca: bytes) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpc.add_NodeServicer_to_server(_Hostile(), server)
    port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True))
    server.start()
    return server, port


def _with_node(config: Path, out: Path, node_id: str, port: int) -> Path:
    out.write_text(config.read_text() + f'[[nodes]]\nid = "{node_id}"\ncountry = "{node_id}"\n'
                                        f'address = "127.0.0.1:{port}"\n')
    return out


def test_escapes_and_control_characters_from_a_node_are_shown_escaped(federation, pki: DevPki,
                                                                      tmp_path: Path) -> None:
    server, port = _serve(pki.node_cert("PL").read_bytes(), pki.node_key("PL").read_bytes(),
                          pki.ca_cert.read_bytes())
    try:
        done = _query(_with_node(federation.config, tmp_path / "fed.toml", "PL", port),
                      "--hash", "md5:" + "77" * 16)
    finally:
        server.stop(None)
    assert done.returncode == 0, done.stdout + done.stderr
    for raw in ("\x1b", "\r", "\x07", "\x9b", "\u202e"):
        assert raw not in done.stdout, repr(raw)
    for field in ("reference", "contact", "category", "series", "date_added"):
        assert terminal_safe(getattr(HOSTILE_HIT, field)) in done.stdout, field


def test_what_a_node_says_about_itself_is_shown_escaped(federation, pki: DevPki, tmp_path: Path) -> None:
    server, port = _serve(pki.node_cert("PL").read_bytes(), pki.node_key("PL").read_bytes(),
                          pki.ca_cert.read_bytes())
    try:
        done = _gateway("nodes", "--config", str(_with_node(federation.config, tmp_path / "fed.toml", "PL", port)))
    finally:
        server.stop(None)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "\x1b" not in done.stdout and "\u202e" not in done.stdout
    assert terminal_safe(HOSTILE_VERSION) in done.stdout and "P\\u202eL" in done.stdout
    assert "[bold]md5 1" in done.stdout


# --------------------------------------------------------------------------- gateway messages


def test_node_that_is_not_the_federations_is_named_in_words(federation, pki: DevPki, tmp_path: Path) -> None:
    """A server whose certificate is from another CA: words, not OpenSSL's text nor gRPC's log lines."""
    rogue_key, rogue_ca = new_ca("rogue CA")
    key, cert = issue(rogue_key, rogue_ca, node_leaf(pki.federation, "PL"))
    server, port = _serve(cert_pem(cert), key_pem(key), pki.ca_cert.read_bytes())
    config = _with_node(federation.config, tmp_path / "fed.toml", "PL", port)
    try:
        done = _query(config, "--hash", "md5:" + "77" * 16)
        asked = _query(config, "--hash", "md5:" + "77" * 16, env={**WIDE, "GRPC_VERBOSITY": "INFO"})
    finally:
        server.stop(None)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "does not verify against the federation CA" in done.stdout, done.stdout
    assert "CERTIFICATE_VERIFY_FAILED" not in done.stdout
    assert done.stderr == "", done.stderr
    assert "CERTIFICATE_VERIFY_FAILED" in asked.stderr, "gRPC's own log, when the user asks for it"


def test_unresolvable_node_keeps_its_detail(federation, tmp_path: Path) -> None:
    config = tmp_path / "fed.toml"
    config.write_text(federation.config.read_text()
                      + '[[nodes]]\nid = "PL"\ncountry = "PL"\naddress = "icse-node.bka.example.invalid:7443"\n')
    code_json = _query(config, "--hash", "md5:" + "77" * 16, "--format", "json")
    message = next(n["message"] for n in json.loads(code_json.stdout)["nodes"] if n["node"] == "PL")
    assert "icse-node.bka.example.invalid" in message
    table = _query(config, "--hash", "md5:" + "77" * 16)
    assert terminal_safe(message) in table.stdout, (message, table.stdout)


def test_when_no_node_answers_the_summary_says_so_and_what_to_check(pki: DevPki, tmp_path: Path) -> None:
    local = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR", "x"), NodeSpec("DE", "DE", "x")])
    config = local.write_gateway_config()  # written, never started: nobody listens there
    done = _query(config, "--hash", "md5:" + "77" * 16, "--deadline", "2", "--timeout", "1")
    assert done.returncode == 2, done.stdout + done.stderr
    assert "NO node answered (2 asked)" in done.stdout
    assert "addresses" in done.stdout and "certificate" in done.stdout and "network" in done.stdout
    assert "PARTIAL" not in done.stdout


# --------------------------------------------------------------------------- hash


def test_hash_prints_a_low_quality_pdq_marked_not_sent(tmp_path: Path) -> None:
    flat = tmp_path / "flat.png"
    Image.new("RGB", (64, 64), (120, 120, 120)).save(flat)
    done = _gateway("hash", str(flat))
    assert done.returncode == 0, done.stderr
    line = next(line for line in done.stdout.splitlines() if line.strip().startswith("pdq:"))
    assert "(not sent: quality" in line and len(line.split()[1]) == 64, done.stdout
    assert "pdq_quality:" in done.stdout
    as_json = _gateway("hash", "--format", "json", str(flat))
    entry = json.loads(as_json.stdout)[0]
    assert entry["pdq_sent"] is False and entry["pdq_quality"] < 50 and len(entry["pdq"]) == 64
