"""The node as its operators use it: file modes, odd input files, the command
line as a Unix tool, refusals in words, and a log that stays JSON."""

from __future__ import annotations

import base64
import datetime as dt
import json
import re
import socket
import stat
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from federation import tokens
from federation.localfed import LocalFederation, LocalNode, NodeSpec, environment
from federation.pki import DevPki, Leaf, cert_pem, gateway_leaf, issue, key_pem
from federation.query import QueryItem
from federation.tls import TlsFiles, channel_credentials
from federation.wire import items_to_pb, rpc
from node.audit import AuditEntry, AuditLog, audit_path, connect
from node.store import Store
from node.unix import EXIT_BROKEN_PIPE
from tests.support import Client, claims_for, gateway_client, signing_key, wait_until_async

MD5 = "ab" * 16
NODE = "FR"
KNOWN = bytes.fromhex("5a" * 32)
HONEST = [QueryItem("sha256", KNOWN)]


def _node_cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          timeout=120, env=environment(), check=False, **kwargs)  # type: ignore[call-overload]


def _config(directory: Path, store: str = "store.sqlite") -> Path:
    config = directory / "node.toml"
    config.write_text(f'[node]\nid = "FR"\ncountry = "FR"\nfederation = "t"\nstore = "{store}"\n')
    return config


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- store files are the owner's only ---------------------------------------------------------------

_OPEN_AND_WRITE = textwrap.dedent("""
    import asyncio, json, os, stat, sys
    from pathlib import Path
    from node.audit import AuditEntry, AuditLog, audit_path, connect
    from node.store import Store

    async def main(path):
        os.umask(int(sys.argv[2], 8))
        async with await Store.open(path) as store:
            await store.add_rows([[("md5", bytes(16), "R-1", "", None, "", ""),
                                   ("pdq", bytes(32), "R-2", "", None, "", "")]])
            await store.add_rows([[("sha256", bytes(32), "R-3", "", None, "", "")]])
            db = await connect(audit_path(path))
            audit = await AuditLog.open(db)
            await audit.append(AuditEntry("", "eu-1", "o", "org", "FR", "c", "Match", 1, ("md5",), 0, (),
                                          "OK", "", "t", "p"))
            modes = {str(p.relative_to(path.parent)): stat.S_IMODE(p.stat().st_mode)
                     for p in path.parent.rglob("*")}
            await db.close()
        print(json.dumps(modes))

    asyncio.run(main(Path(sys.argv[1])))
""")


@pytest.mark.parametrize("umask", ["022", "000"])
def test_every_store_file_is_created_owner_only_whatever_the_umask(tmp_path: Path, umask: str) -> None:
    """Catalog, audit log (each with -wal and -shm), every segment's rows and index
    arrays: 0600; the segment directories: 0700."""
    path = tmp_path / "store" / "store.sqlite"
    path.parent.mkdir()
    done = subprocess.run([sys.executable, "-c", _OPEN_AND_WRITE, str(path), umask],
                          capture_output=True, text=True, timeout=60, env=environment(), check=False)
    assert done.returncode == 0, done.stderr
    modes = json.loads(done.stdout)
    for name in ("store.sqlite", "store.sqlite.audit"):
        assert {name, f"{name}-wal", f"{name}-shm"} <= set(modes)
    segments = [name for name in modes if name.startswith("store.sqlite.segments/seg-")]
    assert {name.split("/")[-1] for name in segments} >= {"rows.sqlite", "md5.keys.npy", "pdq.keys.npy",
                                                         "sha256.keys.npy", "lock"}, segments
    directories = {name for name in modes if (path.parent / name).is_dir()}
    assert directories == {"store.sqlite.segments"} | {n for n in segments if n.count("/") == 1}
    assert len(directories) == 3, directories  # the root and two segments
    assert {name: mode for name, mode in modes.items() if name in directories} == dict.fromkeys(directories, 0o700)
    files = {name: mode for name, mode in modes.items() if name not in directories}
    assert files == dict.fromkeys(files, 0o600)


def test_import_cli_under_an_open_umask_leaves_an_owner_only_store(tmp_path: Path) -> None:
    hashes = tmp_path / "hashes.txt"
    hashes.write_text(f"md5:{MD5}\n")
    done = _node_cli("import", "--config", str(_config(tmp_path)), str(hashes), umask=0o000)
    assert done.returncode == 0, done.stderr
    assert _mode(tmp_path / "store.sqlite") == 0o600


def test_a_world_readable_store_is_narrowed_when_opened(tmp_path: Path) -> None:
    hashes = tmp_path / "hashes.txt"
    hashes.write_text(f"md5:{MD5}\n")
    config = _config(tmp_path)
    assert _node_cli("import", "--config", str(config), str(hashes)).returncode == 0
    assert _node_cli("audit", "verify", "--config", str(config)).returncode == 0
    store, audit = tmp_path / "store.sqlite", tmp_path / "store.sqlite.audit"
    store.chmod(0o644)
    audit.chmod(0o644)
    done = _node_cli("stats", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert _mode(store) == 0o600
    done = _node_cli("audit", "verify", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert _mode(audit) == 0o600


# -- VICS files with fields the importer ignores -----------------------------------------------------

def test_vics_integer_beyond_64_bits_in_an_ignored_field_is_tolerated(tmp_path: Path) -> None:
    document = tmp_path / "griffeye.json"
    document.write_text('{"value": [{"CaseNumber": "2026/1", "Media": [{"MediaID": 7, '
                        f'"SourceFileID": 18446744073709563961, "MediaSize": 1e400, "Category": 2.0, "MD5": "{MD5}"'
                        '}]}]}')
    config = _config(tmp_path)
    done = _node_cli("import", "--config", str(config), str(document))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "added 1, already present 0, rejected 0" in done.stdout
    export = _node_cli("export", "--config", str(config), "--format", "csv")
    assert f"md5,{MD5},FR-VICS-7,2," in export.stdout


def test_vics_number_too_long_to_convert_is_refused_in_words(tmp_path: Path) -> None:
    """Python will not convert an integer of more than 4,300 digits, and ijson's
    C parser crashes the process when that happens: the file is refused first."""
    document = tmp_path / "long.json"
    padding = " " * 65_500  # the number straddles two reads
    document.write_text('{"Media": [' + padding + '{"SourceFileID": 1' + "0" * 5000 + f', "MD5": "{MD5}"' + '}]}')
    done = _node_cli("import", "--config", str(_config(tmp_path)), str(document))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "a number of more than 4,300 digits at byte offset 65,528" in done.stderr
    assert "Traceback" not in done.stderr


def test_import_of_a_directory_says_it_is_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "hashes"
    folder.mkdir()
    done = _node_cli("import", "--config", str(_config(tmp_path)), str(folder))
    assert done.returncode == 2
    assert f"{folder}: is a directory" in done.stderr and "no such file" not in done.stderr


# -- the command line as a Unix tool -----------------------------------------------------------------

async def _store_with_records(tmp_path: Path, hashes: int, records: int) -> Path:
    config = _config(tmp_path)
    async with await Store.open(tmp_path / "store.sqlite") as store:
        await store.add_rows([[("md5", n.to_bytes(16, "big"), f"R-{n}", "", None, "", "")
                               for n in range(hashes)]])
    db = await connect(audit_path(tmp_path / "store.sqlite"))
    try:
        audit = await AuditLog.open(db)
        for _ in range(records):
            await audit.append(AuditEntry("", "eu-1", "officer-1", "Police", "FR", "CASE-1", "Match", 1,
                                          ("md5",), 0, (), "OK", "", "token", "ipv4:127.0.0.1:1"))
    finally:
        await db.close()
    return config


def _read_one_line_then_close(*args: str) -> tuple[str, int, str]:
    """Runs ``icse-node ARGS | head -n 1``: reads one line, closes the pipe, waits."""
    process = subprocess.Popen([sys.executable, "-m", "node.cli", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=environment())
    assert process.stdout is not None and process.stderr is not None
    first = process.stdout.readline().decode()
    process.stdout.close()
    errors = process.stderr.read().decode()
    return first, process.wait(timeout=60), errors


@pytest.mark.parametrize("command", [("audit", "export"), ("export",)])
async def test_output_cut_by_a_closed_pipe_ends_quietly(tmp_path: Path, command: tuple[str, ...]) -> None:
    # Several times a pipe's buffer (64 KiB): 3,000 rows of ~60 bytes, 500 records of ~450 bytes,
    # so the command is still writing when the pipe closes.
    config = await _store_with_records(tmp_path, 3000, 500)
    first, code, errors = _read_one_line_then_close(*command, "--config", str(config))
    assert first.strip(), (code, errors)
    assert errors == ""
    assert code == EXIT_BROKEN_PIPE
    # The store was closed properly: the chain still verifies.
    assert _node_cli("audit", "verify", "--config", str(config)).returncode == 0


def _serve_on_a_taken_port(pki: DevPki, tmp_path: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
    """``icse-node serve`` told to listen where another socket already does."""
    node = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR")])["FR"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        node.write_config(address)
        return address, _node_cli("serve", "--config", str(node.config_path))


def test_serve_on_a_port_in_use_says_so_and_exits_2(pki: DevPki, tmp_path: Path) -> None:
    address, done = _serve_on_a_taken_port(pki, tmp_path)
    assert done.returncode == 2
    assert f"cannot listen on {address}: address already in use" in done.stderr
    assert "Traceback" not in done.stderr


# -- refusals in words, from a real node over mutual TLS ---------------------------------------------

@pytest.fixture(scope="module")
def node(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    local = LocalFederation(tmp_path_factory.mktemp("hardening"), pki, [NodeSpec(NODE, NODE)])
    known = local.workdir / "known.txt"
    known.write_text(f"sha256:{KNOWN.hex()}\n")
    assert local[NODE].import_file(known).returncode == 0
    with local:
        yield local[NODE]


def _audit(node: LocalNode) -> list[dict]:
    done = _node_cli("audit", "export", "--config", str(node.config_path))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


async def _refusal(node: LocalNode, token: str | None = None,
                   metadata: tuple[tuple[str, str], ...] = ()) -> grpc.aio.AioRpcError:
    client = gateway_client(node.pki, node.address, NODE)
    async with client.channel() as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await rpc.NodeStub(channel).Match(items_to_pb(HONEST), timeout=10,
                                              metadata=(tokens.bearer(token) if token else ()) + metadata)
    return caught.value


def _token(node: LocalNode, headers: dict[str, str] | None, **changes: object) -> str:
    key = signing_key(node.pki)
    claims = claims_for(node.pki, NODE, HONEST).to_jwt_claims() | changes
    return jwt.encode(claims, key.private_key, algorithm=key.algorithm,
                      headers={"kid": key.kid} if headers is None else headers)


async def test_honest_call_is_answered(node: LocalNode) -> None:
    """Control for the refusals below: the same client and signer get an answer."""
    response = await gateway_client(node.pki, node.address, NODE).match(HONEST, _token(node, None))
    assert len(response.results) == 1


@pytest.mark.parametrize(("cnf", "message"), [
    ("not-an-object", "token claim 'cnf' must be an object holding the client certificate's 'x5t#S256' thumbprint"),
    ({"x5t#S256": 12}, "token claim 'cnf' must be an object holding the client certificate's 'x5t#S256' thumbprint"),
    ({}, "token claim 'cnf' must be an object holding the client certificate's 'x5t#S256' thumbprint"),
])
async def test_malformed_cnf_claim_is_refused_in_words(node: LocalNode, cnf: object, message: str) -> None:
    error = await _refusal(node, _token(node, None, cnf=cnf))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == message


async def test_claim_of_the_wrong_type_is_named(node: LocalNode) -> None:
    error = await _refusal(node, _token(node, None, org=["Police"]))
    assert error.details() == "token claim 'org' must be a string, got a JSON array"


def _with_header(token: str, header: dict[str, object]) -> str:
    """The token with its header replaced (its signature no longer matters: the header is read first)."""
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=").decode()
    return ".".join([encoded, *token.split(".")[1:]])


@pytest.mark.parametrize(("header", "message"), [
    ({"alg": "EdDSA", "typ": "JWT"}, "token header names no signing key ('kid' is missing)"),
    ({"alg": "EdDSA", "kid": 7}, "malformed token: Key ID header parameter must be a string"),
])
async def test_missing_or_odd_key_id_is_refused_in_words(node: LocalNode, header: dict, message: str) -> None:
    error = await _refusal(node, _with_header(_token(node, None), header))
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert error.details() == message
    assert any(r["status"] == "UNAUTHENTICATED" and r["detail"] == message for r in _audit(node))


async def test_a_thousand_junk_headers_are_refused_in_words(node: LocalNode) -> None:
    junk = tuple((f"x-junk-{n}", "junk-value") for n in range(1000))
    error = await _refusal(node, _token(node, None), junk)
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(r"request carries 1,00\d metadata entries \(headers\); this node accepts at most 64",
                        error.details()), error.details()
    record = _audit(node)[-1]
    assert (record["status"], record["gateway"]) == ("RESOURCE_EXHAUSTED", "eu-1")
    assert "metadata entries" in record["detail"]


async def test_junk_headers_on_streaming_methods_are_refused_in_words(node: LocalNode) -> None:
    """Health's Watch (a response stream) and reflection (streams both ways) go through the same check."""
    junk = tuple((f"x-junk-{n}", "junk-value") for n in range(100))

    async def no_requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        # None sent: a request written while the node refuses may end the client's call as INTERNAL.
        return
        yield

    async with gateway_client(node.pki, node.address, NODE).channel() as channel:
        calls = (health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), metadata=junk, timeout=10),
                 reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                     no_requests(), metadata=junk, timeout=10))
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in call:
                    pass
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.details() == ("request carries 101 metadata entries (headers); "
                                              "this node accepts at most 64")


async def test_oversized_header_is_refused_in_words(node: LocalNode) -> None:
    error = await _refusal(node, _token(node, None), (("x-padding", "a" * 50_000),))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert re.fullmatch(r"request metadata \(headers\) is 5\d,\d{3} bytes; this node accepts at most 16,384",
                        error.details()), error.details()


# -- the node's log stays JSON, with gRPC's TLS refusals in it -----------------------------------------

def _client_files(pki: DevPki, tmp_path: Path, case: str) -> TlsFiles | None:
    if case == "no client certificate":
        return None
    if case == "a node's certificate (no client-auth usage)":
        return TlsFiles(pki.ca_cert, pki.node_cert("DE"), pki.node_key("DE"))
    now = dt.datetime.now(dt.UTC)
    base = gateway_leaf(pki.federation, "eu-1")
    leaf = Leaf(base.common_name, base.uris, client=True, not_before=now - dt.timedelta(days=30),
                not_after=now - dt.timedelta(days=1))
    key, cert = issue(load_pem_private_key(pki.ca_key.read_bytes(), password=None),
                      x509.load_pem_x509_certificate(pki.ca_cert.read_bytes()), leaf)
    (tmp_path / "expired.pem").write_bytes(cert_pem(cert))
    (tmp_path / "expired.key").write_bytes(key_pem(key))
    return TlsFiles(pki.ca_cert, tmp_path / "expired.pem", tmp_path / "expired.key")


def _log_records(node: LocalNode) -> list[dict]:
    """Every line of the node's log, each of which must be a JSON object."""
    return [json.loads(line) for line in node.log_path.read_text().splitlines()]


@pytest.mark.parametrize(("case", "reason"), [
    ("no client certificate", "the client presented no certificate"),
    ("a node's certificate (no client-auth usage)",
     ("the client's certificate does not verify: unsupported certificate purpose "
      "(no TLS client-auth usage: not a gateway certificate)")),
    ("an expired certificate", "the client's certificate does not verify: certificate has expired"),
])
async def test_tls_refusal_is_logged_as_a_json_line_with_its_reason(node: LocalNode, tmp_path: Path,
                                                                    case: str, reason: str) -> None:
    files = _client_files(node.pki, tmp_path, case)
    credentials = (channel_credentials(files) if files else
                   grpc.ssl_channel_credentials(node.pki.ca_cert.read_bytes()))
    before = sum(1 for r in _log_records(node) if r.get("reason") == reason)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await Client(node.address, NODE, node.pki.federation, credentials).match(HONEST, _token(node, None))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    def refused() -> list[dict]:
        return [r for r in _log_records(node) if r.get("reason") == reason]

    # The relay writes the line a moment after the client saw the refusal.
    await wait_until_async(lambda: len(refused()) > before, 30, "the refusal in the node's log")
    records = refused()
    assert len(records) == before + 1, node.log_tail()
    assert (records[-1]["message"], records[-1]["level"], records[-1]["logger"]) == (
        "TLS handshake refused", "WARNING", "icse.node.tls")


def test_serve_failing_to_bind_writes_no_plain_grpc_lines(pki: DevPki, tmp_path: Path) -> None:
    _, done = _serve_on_a_taken_port(pki, tmp_path)
    lines = [line for line in done.stderr.splitlines() if not line.startswith("icse-node: cannot listen on")]
    records = [json.loads(line) for line in lines]
    assert any(r["logger"] == "icse.node.grpc" and "Address already in use" in r["message"] for r in records)
