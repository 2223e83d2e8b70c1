"""Nodes that crash, hang, refuse or are overloaded, on loopback (no root needed)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from federation import tokens
from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from federation.query import QueryItem
from federation.wire import items_to_pb, rpc
from gateway import config as gateway_config
from gateway.fanout import Federation
from gateway.results import NodeStatus
from gateway.signing import signer_for
from tests.support import claims_for, gateway_client, query_json, signing_key, wait_until, wait_until_async


def _count(store: Path) -> int:
    """Rows in the store's published segments (the catalog's count; nothing is retracted here)."""
    with sqlite3.connect(store) as db:
        return db.execute("SELECT COALESCE(SUM(rows), 0) FROM segments WHERE state = 'published'").fetchone()[0]


def _segment_dirs(store: Path) -> list[Path]:
    return sorted(store.with_name(store.name + ".segments").glob("seg-*"))


def _hash_file(path: Path, rows: int, seed: int) -> Path:
    rng = __import__("random").Random(seed)
    path.write_text("".join(f"sha256:{rng.randbytes(32).hex()}\n" for _ in range(rows)))
    return path


def _audit_verify(node) -> subprocess.CompletedProcess[str]:
    return subprocess.run(node.node_command("audit", "verify", "--config", str(node.config_path)),
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def single(pki: DevPki, tmp_path: Path):
    local = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR", "fr@example")])
    yield local
    local.stop()


def test_import_killed_midway_leaves_the_store_as_before(single: LocalFederation, tmp_path: Path) -> None:
    node = single["FR"]
    assert node.import_file(_hash_file(tmp_path / "first.txt", 1000, 1)).returncode == 0
    big = _hash_file(tmp_path / "big.txt", 400_000, 2)
    process = subprocess.Popen(node.node_command("import", "--config", str(node.config_path), str(big)),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (published,) = _segment_dirs(node.store_path)

    def rows_written() -> int:
        files = [d / "rows.sqlite" for d in _segment_dirs(node.store_path) if d != published]
        return sum(f.stat().st_size for f in files if f.exists())

    # Kill it once its new segment is visibly being written.
    wait_until(lambda: process.poll() is not None or rows_written() >= 4 << 20, 60,
               "the import's new segment grows past 4 MiB")
    assert process.poll() is None, "the import finished before it could be killed; make the file bigger"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _count(node.store_path) == 1000
    assert len(_segment_dirs(node.store_path)) == 2, "the killed import's unpublished segment is left"
    done = node.import_file(big)
    assert done.returncode == 0 and "added 400000" in done.stdout
    assert _count(node.store_path) == 401_000
    assert len(_segment_dirs(node.store_path)) == 2, "the next import removed the dead one's segment"


# Queries without end, each through the gateway's command line (which reads
# the federation configuration afresh), one line per query: FR's status.
LOAD = r"""
import contextlib, io, json, sys
from gateway.cli import main

config, digest, out = sys.argv[1:4]
with open(out, "a") as log:
    for n in range(1_000_000):
        answer = io.StringIO()
        try:
            with contextlib.redirect_stdout(answer):
                main(["query", "--config", config, "--case", f"K-{n}", "--hash", digest, "--format", "json",
                      "--timeout", "2", "--deadline", "3"])
            status = {node["node"]: node["status"] for node in json.loads(answer.getvalue())["nodes"]}["FR"]
        except Exception as exc:  # e.g. the configuration read while the test rewrites it
            status = f"error:{type(exc).__name__}"
        print(status, file=log, flush=True)
"""


def _served_matches(store: Path) -> int:
    """Match calls the node answered: each has its audit record before its answer leaves."""
    audit = store.with_name(store.name + ".audit")
    with sqlite3.connect(f"file:{audit}?mode=ro", uri=True) as db:
        entries = [json.loads(entry) for (entry,) in db.execute("SELECT entry FROM audit")]
    return sum(1 for e in entries if e.get("rpc") == "Match" and e.get("status") == "OK")


def _statuses(outs: list[Path]) -> list[str]:
    return [line for out in outs if out.exists() for line in out.read_text().splitlines()]


def test_node_killed_during_queries_restarts_with_everything(single: LocalFederation, tmp_path: Path) -> None:
    node = single["FR"]
    assert node.import_file(_hash_file(tmp_path / "set.txt", 5000, 3)).returncode == 0
    known = (tmp_path / "set.txt").read_text().split()[0]
    single.start()
    config = single.write_gateway_config()
    outs = [tmp_path / f"load-{n}.txt" for n in range(4)]
    load = [subprocess.Popen([sys.executable, "-c", LOAD, str(config), known, str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for out in outs]
    try:
        # Killed while it is serving: only once it has answered queries.
        served = wait_until(lambda: _served_matches(node.store_path), 60, "the node answers its first query")
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()
        node.process = None
        before = len(_statuses(outs))
        # The queries go on and find the member gone...
        wait_until(lambda: any(s != "hit" for s in _statuses(outs)[before:]), 60, "queries see the node down")
        single.start()
        single.write_gateway_config(config)
        after = len(_statuses(outs))
        # ... and find it again, with its hash set, once it has restarted.
        wait_until(lambda: "hit" in _statuses(outs)[after:], 60, "queries find the restarted node")
    finally:
        for process in load:
            process.kill()
            process.wait()
    assert served >= 1
    assert _count(node.store_path) == 5000
    assert _served_matches(node.store_path) >= served, "the answered calls' audit records survived the kill"
    verified = _audit_verify(node)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    code, result = query_json(config, "--case", "K-after", "--hash", known)
    assert code == 0 and result["items"][0]["hits"][0]["country"] == "FR"


def test_sigterm_finishes_in_flight_calls_then_exits(single: LocalFederation, pki: DevPki) -> None:
    single.start()
    node = single["FR"]
    items = [QueryItem("sha256", os.urandom(32)) for _ in range(20_000)]

    def signed(batch: list[QueryItem]) -> tuple:
        return tokens.bearer(signing_key(pki).sign(claims_for(pki, "FR", batch)))

    async def call_then_stop() -> list[int]:
        async with gateway_client(pki, node.address, "FR").channel() as channel:
            stub = rpc.NodeStub(channel)
            await stub.Match(items_to_pb(items[:1]), metadata=signed(items[:1]), timeout=10)  # connected
            calls = [asyncio.ensure_future(stub.Match(items_to_pb(items), metadata=signed(items), timeout=30))
                     for _ in range(4)]
            # Sent together on one connection: once the first is answered the
            # node has the others in hand. Stop it now; they must still be answered.
            await asyncio.wait(calls, return_when=asyncio.FIRST_COMPLETED)
            node.process.send_signal(signal.SIGTERM)
            return [len((await call).results) for call in calls]

    assert asyncio.run(call_then_stop()) == [0, 0, 0, 0]
    assert node.process.wait(timeout=15) == 0
    assert "stopped" in node.log_tail()


def test_overload_is_refused_with_resource_exhausted(pki: DevPki, tmp_path: Path) -> None:
    local = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR", "x", limits={"max_concurrent": 1})])
    items = [QueryItem("sha256", os.urandom(32)) for _ in range(20_000)]
    with local:
        client = gateway_client(pki, local["FR"].address, "FR")

        async def burst() -> list[object]:
            calls = [client.match(items, signing_key(pki).sign(claims_for(pki, "FR", items))) for _ in range(12)]
            return await asyncio.gather(*calls, return_exceptions=True)

        outcomes = asyncio.run(burst())
        codes = {o.code() for o in outcomes if isinstance(o, grpc.aio.AioRpcError)}
        assert codes == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert any(not isinstance(o, Exception) for o in outcomes), "some calls were served"
        assert asyncio.run(_one(client, pki, items)), "and the node still answers afterwards"


async def _one(client, pki: DevPki, items: list[QueryItem]) -> bool:
    """A small query once the burst has drained (the slot frees just after the answer)."""

    async def answered() -> str | None:
        try:
            response = await client.match(items[:10], signing_key(pki).sign(claims_for(pki, "FR", items[:10])))
            return response.node_id
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                raise
            return None

    return await wait_until_async(answered, 10, "the node answers once the burst has drained") == "FR"


def test_health_and_reflection_answer_standard_clients(single: LocalFederation, pki: DevPki) -> None:
    single.start()
    node = single["FR"]

    async def ask() -> tuple[int, set[str]]:
        async with gateway_client(pki, node.address, "FR").channel() as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="icse.v1.Node"), timeout=5)
            stream = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = set()
            async for reply in stream:
                names |= {s.name for s in reply.list_services_response.service}
            return status.status, names

    status, names = asyncio.run(ask())
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert {"icse.v1.Node", "grpc.health.v1.Health"} <= names


class _BlackHole:
    """A member whose host accepts connections and then never says anything."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


def _config_with(federation_config: Path, tmp_path: Path, extra: str, deadline: float) -> Path:
    text = federation_config.read_text().replace("node_timeout = 5.0", f"node_timeout = {deadline}")
    path = tmp_path / "federation.toml"
    path.write_text(text + extra)
    return path


def test_hung_node_times_out_at_the_deadline_while_the_others_answer(federation, tmp_path: Path) -> None:
    hole = _BlackHole()
    try:
        config = _config_with(federation.config, tmp_path,
                              f'[[nodes]]\nid = "PL"\ncountry = "PL"\naddress = "127.0.0.1:{hole.port}"\n', 1.5)
        code, result = query_json(config, "--case", "H-1", "--hash", f"sha256:{federation.data.shared_sha256}",
                                  "--deadline", "1.5")
        # The gateway reached PL and PL held the connection without a word: the command
        # came back on its own, so it did not wait for the hung member.
        assert hole.held, "the gateway dialled the hung member"
        assert code == 0 and result["partial"] is True
        statuses = {n["node"]: n["status"] for n in result["nodes"]}
        # Timed out, not refused or unreachable: the deadline is what ended PL's call.
        assert statuses["PL"] == "timed_out", result["nodes"]
        assert {statuses[c] for c in ("FR", "DE", "NL")} == {"hit"}
    finally:
        hole.close()


def test_dead_node_is_skipped_once_its_breaker_opens(federation, tmp_path: Path) -> None:
    config = gateway_config.load(_config_with(
        federation.config, tmp_path, '[[nodes]]\nid = "PL"\ncountry = "PL"\naddress = "127.0.0.1:9"\n', 2.0))

    async def queries() -> list[NodeStatus]:
        seen = []
        async with Federation(config, signer_for(config)) as fed:
            for n in range(5):
                answers = await fed.match([QueryItem("md5", b"\x00" * 16)], f"B-{n}")
                seen.append(next(a for a in answers if a.node_id == "PL").status)
                assert all(a.status.answered for a in answers if a.node_id != "PL")
        return seen

    statuses = asyncio.run(queries())
    assert statuses[:3] == [NodeStatus.UNAVAILABLE] * 3
    assert statuses[3:] == [NodeStatus.SKIPPED] * 2
