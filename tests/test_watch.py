"""Standing queries end to end: real nodes over real mutual TLS, the real
``icse-gateway watch`` commands as processes, a real webhook receiver.

A case is asked before a country imports the matching digest; after the
import, one alert arrives — exactly once across a ``watch run`` restart and a
webhook that fails three times — while only the node whose store changed is
asked again, about its new rows only. A merge does not alert again; the
digests of a case that never matched stay off every node; ``watch remove``
deletes a case's digests from the file's bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.config import ConfigError
from federation.localfed import LocalFederation, NodeSpec, environment
from federation.pki import DevPki
from federation.query import QueryItem
from federation.webhook import verify
from gateway import watch_config, watch_run as run_module
from gateway.watch_store import CaseStore, Watched
from node.audit import audit_path
from tests.support import import_rows, run_gateway, wait_until
from tests.test_outbox import receiving

SECRET = b"desk-shared-secret-of-the-agency"
WANTED = "5a" * 32  # sha256 NL imports later
NEVER = "c3" * 32  # sha256 of a case nobody holds
ALSO = "e7" * 16  # md5 of the first case, never imported


@pytest.fixture
def local(pki: DevPki, tmp_path: Path) -> Iterator[LocalFederation]:
    fed = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR", "desk@fr"), NodeSpec("NL", "NL", "desk@nl")])
    for node_id, count in (("FR", 50), ("NL", 200)):
        import_rows(fed, node_id, [{"sha1": os.urandom(20).hex(), "reference": f"{node_id}-OLD-{n}",
                                    "category": "1"} for n in range(count)], tmp_path)
    with fed:
        yield fed


def _config(local: LocalFederation, tmp_path: Path, webhook: str) -> Path:
    secret = tmp_path / "webhook.secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    config = local.write_gateway_config()
    with config.open("a") as handle:
        handle.write(f'[watch]\nwebhook = "{webhook}"\nwebhook_secret_file = "{secret}"\n'
                     "webhook_retry_min = 0.2\nwebhook_retry_max = 0.4\ninterval = 1\n")
    return config


def _gateway(*args: str) -> subprocess.CompletedProcess[str]:
    done = run_gateway("watch", *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _audit(local: LocalFederation, node_id: str, case: str) -> list[dict]:
    """The node's audit records of Match calls under ``case`` (read from its audit file)."""
    with sqlite3.connect(f"file:{audit_path(local[node_id].store_path)}?mode=ro", uri=True) as db:
        entries = [json.loads(row[0]) for row in db.execute("SELECT entry FROM audit ORDER BY seq")]
    return [e for e in entries if e["rpc"] == "Match" and e["case"] == case]


def _generation(local: LocalFederation, node_id: str) -> int:
    done = subprocess.run([sys.executable, "-m", "node.cli", "describe", "--config", str(local[node_id].config_path),
                           "--format", "json"], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)["generation"]


def _start_run(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen([sys.executable, "-m", "gateway.cli", "watch", "run", "--config", str(config),
                                 "--interval", "1"], stdout=sink, stderr=sink, env=environment())


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and any(n in p.read_bytes() for n in needles)]


def test_a_case_asked_before_an_import_is_alerted_once_after_it(local: LocalFederation, tmp_path: Path) -> None:
    with receiving(fail_first=3) as receiver:
        config = _config(local, tmp_path, receiver.url)
        _gateway("add", "--config", str(config), "--case", "CASE-1", "--hash", f"sha256:{WANTED}",
                 "--hash", f"md5:{ALSO}")
        _gateway("add", "--config", str(config), "--case", "CASE-2", "--hash", f"sha256:{NEVER}")
        _gateway("run", "--config", str(config), "--once")  # asked everywhere: nothing known yet
        assert receiver.requests == []
        for node_id in ("FR", "NL"):
            (first,) = _audit(local, node_id, "CASE-1")
            assert first["since_generation"] == 0 and first["status"] == "OK" and first["hits"] == 0
        asked_at = _generation(local, "NL")

        import_rows(local, "NL", [{"sha256": WANTED, "reference": "NL-NEW-1", "category": "1"},
                                  {"sha1": os.urandom(20).hex(), "reference": "NL-NEW-2", "category": "1"}], tmp_path)
        log = tmp_path / "watch.log"
        run = _start_run(config, log)
        try:
            wait_until(lambda: len(receiver.requests) >= 2, 60, "the alert's first two (failing) deliveries")
        finally:
            _stop(run)  # a restart while the webhook is still failing
        run = _start_run(config, log)
        try:
            receiver.wait_accepted(1, timeout=60)
            rounds = log.read_text().count("round done")
            wait_until(lambda: log.read_text().count("round done") > rounds, 60, "a round after the delivery")
        finally:
            _stop(run)

    # Exactly once: one event, delivered after three refusals, signed; one line; one log line.
    ids = {headers["X-ICSE-Event-Id"] for headers, _ in receiver.requests}
    assert len(receiver.requests) == 4 and len(ids) == 1 and len(receiver.accepted) == 1
    headers, body = receiver.requests[-1]
    assert verify(SECRET, body, headers["X-ICSE-Signature"])
    event = json.loads(body)
    assert (event["case"], event["node_id"], event["reference"]) == ("CASE-1", "NL", "NL-NEW-1")
    assert event["item"] == f"sha256:{WANTED}" and event["contact"] == "desk@nl"
    lines = (tmp_path / "watch-alerts.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["reference"] == "NL-NEW-1"
    assert log.read_text().count("standing query hit") == 1 and WANTED not in log.read_text()

    # Only NL changed: FR was not asked again; NL was asked since the generation it was asked at,
    # and searched only the two rows imported, not the 200 it held before.
    assert len(_audit(local, "FR", "CASE-1")) == 1
    reasks = _audit(local, "NL", "CASE-1")[1:]
    assert [e["since_generation"] for e in reasks] == [asked_at]
    assert reasks[0]["rows_searched"] == 2 and reasks[0]["references"] == ["NL-NEW-1"]
    assert _audit(local, "NL", "CASE-1")[0]["rows_searched"] == 200

    # A merge changes the generation but makes no row new: asked again, nothing searched, no alert.
    before_merge = _generation(local, "NL")
    done = subprocess.run([sys.executable, "-m", "node.cli", "compact", "--config", str(local["NL"].config_path)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    with receiving() as quiet:
        _config(local, tmp_path, quiet.url)
        _gateway("run", "--config", str(config), "--once")
        assert quiet.requests == []
    after = _audit(local, "NL", "CASE-1")[-1]
    assert after["since_generation"] == before_merge and after["rows_searched"] == 0 and after["hits"] == 0
    assert len((tmp_path / "watch-alerts.jsonl").read_text().splitlines()) == 1

    # A case that gains a digest is asked again from scratch: the old hit comes back, the alert does not.
    _gateway("add", "--config", str(config), "--case", "CASE-1", "--hash", f"md5:{'e8' * 16}")
    _gateway("run", "--config", str(config), "--once")
    again = _audit(local, "NL", "CASE-1")[-1]
    assert again["since_generation"] == 0 and again["references"] == ["NL-NEW-1"]
    assert len((tmp_path / "watch-alerts.jsonl").read_text().splitlines()) == 1

    # The case that never matched: asked on both nodes, its digest on neither (store, segments, log, audit).
    assert all(len(_audit(local, n, "CASE-2")) >= 1 for n in ("FR", "NL"))
    for node_id in ("FR", "NL"):
        assert _files_holding(local[node_id].dir, [bytes.fromhex(NEVER), NEVER.encode()]) == []


def test_remove_deletes_a_cases_digests_from_the_files_bytes(local: LocalFederation, tmp_path: Path) -> None:
    config = _config(local, tmp_path, "http://127.0.0.1:9/unused")
    needles = [bytes.fromhex(NEVER), NEVER.encode()]
    _gateway("add", "--config", str(config), "--case", "CASE-KEEP", "--hash", f"md5:{ALSO}")
    _gateway("add", "--config", str(config), "--case", "CASE-GONE", "--hash", f"sha256:{NEVER}")
    _gateway("run", "--config", str(config), "--once")
    store = tmp_path / "watch-cases.sqlite"
    assert oct(store.stat().st_mode & 0o777) == "0o600"
    assert _files_holding(tmp_path, needles) == [str(store)]  # held, and only there: the test can fail
    assert "CASE-GONE" in _gateway("list", "--config", str(config)).stdout
    _gateway("remove", "--config", str(config), "--case", "CASE-GONE")
    assert _files_holding(tmp_path, needles) == []
    listed = json.loads(_gateway("list", "--config", str(config), "--format", "json").stdout)
    assert [c["case"] for c in listed] == ["CASE-KEEP"]
    done = run_gateway("watch", "remove", "--config", str(config), "--case", "CASE-GONE")
    assert done.returncode == 2 and "no open case 'CASE-GONE'" in done.stderr
    # A directory's files, hashed as a query hashes them (exact digests for files that are not media).
    evidence = tmp_path / "evidence"
    (evidence / "sub").mkdir(parents=True)
    (evidence / "a.bin").write_bytes(b"first seized file")
    (evidence / "sub" / "b.bin").write_bytes(b"second seized file")
    _gateway("add", "--config", str(config), "--case", "CASE-DIR", "--dir", str(evidence))
    listed = json.loads(_gateway("list", "--config", str(config), "--format", "json").stdout)
    assert {c["case"]: c["digests"] for c in listed} == {"CASE-DIR": 6, "CASE-KEEP": 1}
    with CaseStore(watch_config.load(config).store) as store:
        watched = {w.item.tagged() for w in store.watched("CASE-DIR")}
    assert f"sha256:{hashlib.sha256(b'second seized file').hexdigest()}" in watched


def test_the_example_watch_table_loads(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[1] / "gateway" / "examples" / "federation.toml"
    settings = watch_config.load(example)
    assert settings.interval == 20 and settings.webhook is None
    assert settings.store == Path("/var/lib/icse-gateway/watch-cases.sqlite")
    bad = tmp_path / "federation.toml"
    bad.write_text('[watch]\ninterval = 0.5\n')
    with pytest.raises(ConfigError, match=r"\[watch\] interval: must be between 1 and 86400 seconds"):
        watch_config.load(bad)
    loose = tmp_path / "loose.secret"
    loose.write_bytes(SECRET)
    loose.chmod(0o644)
    bad.write_text(f'[watch]\nwebhook = "https://desk.example/a"\nwebhook_secret_file = "{loose}"\n')
    with pytest.raises(ConfigError, match="readable by others"):
        watch_config.load(bad)


def test_a_refusing_node_is_left_for_the_round_and_its_cases_stay_unasked(pki: DevPki, tmp_path: Path) -> None:
    """FR's quota admits one item a day: one case is answered, the rest refused. The refusal ends
    FR's part of the round (at most the calls already in flight are refused), and only the case
    FR answered counts as asked there: the others are asked again next round."""
    quota = {"policy": {"items_per_day": 1}}
    fed = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR", tables=quota), NodeSpec("NL", "NL")])
    with fed:
        config = _config(fed, tmp_path, "http://127.0.0.1:9/unused")
        with CaseStore(watch_config.load(config).store) as store:
            store.add_many([(f"CASE-{n:02d}", [Watched(QueryItem("md5", n.to_bytes(16, "big")), "")])
                            for n in range(30)])
        _gateway("run", "--config", str(config), "--once")
        with sqlite3.connect(f"file:{audit_path(fed['FR'].store_path)}?mode=ro", uri=True) as db:
            statuses = [json.loads(row[0])["status"] for row in db.execute("SELECT entry FROM audit")
                        if json.loads(row[0])["rpc"] == "Match"]
        assert statuses.count("OK") == 1 and 1 <= statuses.count("RESOURCE_EXHAUSTED") <= run_module.CONCURRENCY
        listed = json.loads(_gateway("list", "--config", str(config), "--format", "json").stdout)
        assert sorted(c["nodes_asked"] for c in listed) == [1] * 29 + [2]


def test_a_node_restored_to_an_older_generation_is_asked_about_every_row(pki: DevPki, tmp_path: Path) -> None:
    """FR's store is replaced by one at a lower generation (a backup): asking it since the generation
    remembered would be refused (FAILED_PRECONDITION), so the case is asked there since 0 and its hit found."""
    fed = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR")])
    for n in range(2):
        import_rows(fed, "FR", [{"sha1": os.urandom(20).hex(), "reference": f"FR-OLD-{n}", "category": "1"}],
                    tmp_path)
    with fed:
        config = _config(fed, tmp_path, "http://127.0.0.1:9/unused")
        _gateway("add", "--config", str(config), "--case", "CASE-R", "--hash", f"sha256:{WANTED}")
        _gateway("run", "--config", str(config), "--once")
        assert _generation(fed, "FR") == 2
        port = fed["FR"].port
    fed["FR"].write_config(listen=f"127.0.0.1:{port}")  # the same replica, at the same address
    for leftover in fed["FR"].dir.glob("store.sqlite*"):
        shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    import_rows(fed, "FR", [{"sha256": WANTED, "reference": "FR-RESTORED", "category": "1"}], tmp_path)
    assert _generation(fed, "FR") == 1
    with fed:
        _gateway("run", "--config", str(config), "--once")
        last = _audit(fed, "FR", "CASE-R")[-1]
    assert (last["since_generation"], last["status"], last["references"]) == (0, "OK", ["FR-RESTORED"])
    lines = (tmp_path / "watch-alerts.jsonl").read_text().splitlines()
    assert [json.loads(line)["reference"] for line in lines] == ["FR-RESTORED"]
