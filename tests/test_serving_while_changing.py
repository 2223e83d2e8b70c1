"""A real node while its data changes and when it fails: every query answered during
a large import, an unexpected failure answered as an audited INTERNAL in words, and
systemd told when the node stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import tempfile
from collections import Counter
from pathlib import Path

import grpc
import pytest

from federation.localfed import LocalFederation, NodeSpec
from federation.outbox import Outbox
from federation.pki import DevPki
from federation.query import QueryItem
from tests.support import claims_for, gateway_client, signing_key, wait_until, wait_until_async

NODE = "FR"


def _hash_file(path: Path, rows: int) -> Path:
    """``rows`` random SHA-256 digests, one ``sha256:hex`` line each."""
    data = os.urandom(32 * rows).hex()
    path.write_text("".join(f"sha256:{data[n:n + 64]}\n" for n in range(0, len(data), 64)))
    return path


def _published(store: Path) -> set[str]:
    with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as db:
        return {f"seg-{n:08d}" for (n,) in db.execute("SELECT id FROM segments WHERE state = 'published'")}


def _unpublished(store: Path) -> bool:
    """Whether a segment is being written: a directory the catalog does not list as published."""
    root = store.with_name(store.name + ".segments")
    return bool({d.name for d in root.glob("seg-*")} - _published(store))


def _audit(store: Path) -> list[dict]:
    with sqlite3.connect(f"file:{store}.audit?mode=ro", uri=True) as db:
        return [json.loads(entry) for (entry,) in db.execute("SELECT entry FROM audit ORDER BY seq")]


@pytest.fixture
def single(pki: DevPki, tmp_path: Path):
    local = LocalFederation(tmp_path / "fed", pki, [NodeSpec(NODE, "FR", "fr@example")])
    yield local
    local.stop()


async def _ask(local: LocalFederation, digest: str, timeout: float = 5.0) -> tuple[str, int, str]:
    """(status, hits, message) of one Match for a SHA-256 digest, straight to the node."""
    items = [QueryItem("sha256", bytes.fromhex(digest))]
    token = signing_key(local.pki).sign(claims_for(local.pki, NODE, items))
    client = gateway_client(local.pki, local[NODE].address, NODE)
    try:
        answer = await client.match(items, token, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code().name, 0, exc.details() or ""
    return "OK", sum(len(result.hits) for result in answer.results), ""


async def test_every_query_is_answered_while_a_large_import_runs_into_the_node(
        single: LocalFederation, tmp_path: Path) -> None:
    node = single[NODE]
    first = _hash_file(tmp_path / "first.txt", 1000)
    known = first.read_text().split()[0].removeprefix("sha256:")
    assert node.import_file(first).returncode == 0
    single.start()
    big = _hash_file(tmp_path / "big.txt", 400_000)
    fresh = big.read_text(encoding="ascii")[7:71]  # the big file's first digest
    # A plain child, polled between queries: an asyncio child is reaped only while the loop
    # runs, and wait_until below polls without it.
    importing = subprocess.Popen(  # noqa: ASYNC220
        node.node_command("import", "--config", str(node.config_path), str(big)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    statuses: Counter[str] = Counter()
    overlapped = 0
    try:
        wait_until(lambda: importing.poll() is not None or _unpublished(node.store_path), 60,
                   "the import starts writing its segment")
        while importing.poll() is None:
            during = _unpublished(node.store_path)
            status, hits, message = await _ask(single, known)
            statuses[f"{status}:{hits}" if status == "OK" else f"{status}: {message}"] += 1
            # Counted as overlapping when the unpublished segment was there before and after the answer.
            overlapped += during and importing.poll() is None and _unpublished(node.store_path)
    finally:
        out, err = importing.communicate(timeout=600)
    assert importing.returncode == 0, err
    assert "added 400000" in out
    assert statuses == Counter({"OK:1": sum(statuses.values())}), statuses
    assert overlapped >= 3, f"only {overlapped} queries ran while the import was writing; make the file bigger"
    # Published in one transaction; the next queries find it (the serving view maps it in the background).
    async def found() -> bool:
        return (await _ask(single, fresh))[:2] == ("OK", 1)
    await wait_until_async(found, 30, "the imported rows are found")


async def test_an_unexpected_failure_is_an_audited_internal_error_in_words(
        single: LocalFederation, tmp_path: Path) -> None:
    node = single[NODE]
    hashes = _hash_file(tmp_path / "set.txt", 100)
    known = hashes.read_text().split()[0].removeprefix("sha256:")
    assert node.import_file(hashes).returncode == 0
    single.start()
    # The rows of the node's one segment are damaged while it serves (its indexes are intact, so the
    # digest is found, and reading its row fails): not the caller's fault, and nothing it could fix.
    (rows,) = node.store_path.with_name(node.store_path.name + ".segments").glob("seg-*/rows.sqlite")
    with rows.open("r+b") as handle:
        handle.write(b"\xff" * 100)
    status, _, message = await _ask(single, known)
    assert status == "INTERNAL"
    assert message.startswith("the node failed to answer because of an internal error (request id ")
    assert "its operator can find the cause in the node's log" in message
    assert "sqlite" not in message.lower() and "Error" not in message and "<class" not in message
    last = _audit(node.store_path)[-1]
    assert (last["rpc"], last["status"]) == ("Match", "INTERNAL") and last["detail"] == message
    assert "DatabaseError" in node.log_path.read_text(), "the cause is in the node's log"
    # The node goes on answering what does not touch the damage.
    assert (await _ask(single, "00" * 32))[:2] == ("OK", 0)


def test_systemd_is_told_ready_and_stopping_over_its_notify_socket(
        single: LocalFederation, monkeypatch: pytest.MonkeyPatch) -> None:
    node = single[NODE]
    directory = tempfile.mkdtemp(prefix="notify-")  # short: a socket path has at most 107 bytes
    address = os.path.join(directory, "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(address)
        listener.settimeout(60)  # bounds a failure only: each datagram is what the test waits for
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        single.start()
        assert listener.recv(64) == b"READY=1"
        assert node.process is not None
        node.process.send_signal(signal.SIGTERM)
        assert listener.recv(64) == b"STOPPING=1"
        assert node.process.wait(60) == 0
    os.unlink(address)
    os.rmdir(directory)


async def test_a_call_the_audit_log_cannot_record_is_not_answered_and_says_so(
        single: LocalFederation, tmp_path: Path) -> None:
    node = single[NODE]
    assert node.import_file(_hash_file(tmp_path / "set.txt", 10)).returncode == 0
    single.start()
    assert (await _ask(single, "00" * 32))[:2] == ("OK", 0), "the node answers"
    # Another writer holds the audit log past the node's busy timeout (as a full or read-only disk would
    # fail every write): the call cannot be recorded, so it is not answered.
    holder = sqlite3.connect(f"{node.store_path}.audit", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        status, _, message = await _ask(single, "00" * 32, timeout=60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert status == "INTERNAL", (status, message)
    assert message.startswith("this node could not record the call in its audit log, so it does not answer it")
    assert "<class" not in message and "Unexpected" not in message
    assert "database is locked" in node.log_path.read_text(), "the cause is in the node's log"
    assert (await _ask(single, "00" * 32))[:2] == ("OK", 0), "once the log can be written, the node answers"


def _alerts(store: Path) -> list[str]:
    """The references of the holder's alerts committed so far (read as ``icse-node alerts`` reads them)."""
    outbox = Outbox(Path(f"{store}.alerts"))
    try:
        return [str(event["reference"]) for _, event in outbox.since(0)]
    finally:
        outbox.close()


async def test_a_hit_the_audit_log_cannot_record_leaves_no_alert(single: LocalFederation, tmp_path: Path) -> None:
    """A hit's alert is committed only once the call's audit record is durable: an answer
    refused for want of its record alerts nobody."""
    node = single[NODE]
    source = _hash_file(tmp_path / "set.txt", 10)
    assert node.import_file(source).returncode == 0
    known = source.read_text().split()[3].removeprefix("sha256:")
    single.start()
    assert (await _ask(single, known))[:2] == ("OK", 1)
    assert len(_alerts(node.store_path)) == 1
    holder = sqlite3.connect(f"{node.store_path}.audit", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        status, _, message = await _ask(single, known, timeout=60)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert status == "INTERNAL", (status, message)
    assert len(_alerts(node.store_path)) == 1, "the refused answer's hit was not alerted"
    assert (await _ask(single, known))[:2] == ("OK", 1)
    assert len(_alerts(node.store_path)) == 2
