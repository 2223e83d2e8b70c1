"""The node's audit log against real SQLite files: chaining, tampering, pruning, concurrency, CLI."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import io
import itertools
import json
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from node.audit import (
    DEFAULT_RETENTION_DAYS,
    GENESIS,
    AuditEntry,
    AuditError,
    AuditLog,
    audit_path,
    canonical_json,
    chain_hash,
    connect,
)
from node.audit_cli import add_audit_parser, run_audit
from node.store import Store
from tests.support import wait_until_async

ROOT = Path(__file__).resolve().parent.parent
NOW = dt.datetime.now(dt.UTC)
FIELDS = {"time", "gateway", "officer", "org", "country", "case", "rpc", "items", "algorithms", "hits",
          "references", "status", "detail", "token_id", "peer", "key_id", "since_generation", "rows_searched"}


def entry(n: int = 0, *, time: str = "", gateway: str = "eu-1", hits: int = 1) -> AuditEntry:
    return AuditEntry(
        time=time, gateway=gateway, officer=f"officer-{n}", org="BKA", country="DE", case=f"CASE-{n:04d}",
        rpc="Match", items=n + 3, algorithms=("md5", "pdq"), hits=hits,
        references=tuple(f"FR-REF-{n}-{i}" for i in range(hits)), status="OK" if hits else "UNAUTHENTICATED",
        detail="" if hits else "token expired", token_id=f"tok-{n}", peer="ipv4:10.0.0.7:5555",
    )


@pytest.fixture
async def log(tmp_path: Path) -> AsyncIterator[AuditLog]:
    db = await connect(tmp_path / "node.sqlite")
    try:
        yield await AuditLog.open(db)
    finally:
        await db.close()


async def fill(log: AuditLog, count: int) -> None:
    for n in range(count):
        await log.append(entry(n, hits=n % 2))


def sql(path: Path, statement: str, *params: object) -> list[tuple]:
    """A second, plain connection: what someone with file access could do."""
    with sqlite3.connect(path) as db:
        rows = db.execute(statement, params).fetchall()
    db.close()
    return rows


def flip(text: str, at: int) -> str:
    """Changes the one character at ``at`` into another of the same kind."""
    old = text[at]
    new = "7" if old == "3" else "3" if old.isdigit() else "x" if old != "x" else "y"
    return text[:at] + new + text[at + 1:]


# -- the chain -------------------------------------------------------------------------------

async def test_appends_chain_from_genesis_and_verify(log: AuditLog, tmp_path: Path) -> None:
    assert await log.head() is None and (await log.verify()).ok
    assert [await log.append(entry(n)) for n in range(5)] == [1, 2, 3, 4, 5]
    rows = sql(tmp_path / "node.sqlite", "SELECT seq, time, entry, prev_hash, hash FROM audit ORDER BY seq")
    prev = GENESIS
    for _seq, time, text, prev_hash, digest in rows:
        assert prev_hash == prev and digest == chain_hash(prev, text)
        assert json.loads(text)["time"] == time and time.endswith("+00:00")
        assert text.isascii() and ", " not in text and text == json.dumps(json.loads(text), sort_keys=True,
                                                                        separators=(",", ":"))
        prev = digest
    assert await log.head() == (5, prev)
    assert await log.verify() == type(await log.verify())(True, 5, None, "")


async def test_concurrent_appends_and_verify_serialise(log: AuditLog) -> None:
    results = await asyncio.gather(*(log.append(entry(n)) for n in range(200)), log.verify())
    seqs = results[:200]
    assert sorted(seqs) == list(range(1, 201))
    result = await log.verify()
    assert result.ok and result.checked == 200


async def test_a_cancelled_caller_still_leaves_its_record(log: AuditLog) -> None:
    task = asyncio.create_task(log.append(entry(1)))
    await asyncio.sleep(0)  # one turn of the loop: the append has started, not a wait for time to pass
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await log.append(entry(2))
    assert (await log.head())[0] == 2 and (await log.verify()).ok


async def test_times_are_normalised_to_utc_and_naive_ones_refused(log: AuditLog) -> None:
    await log.append(entry(time="2024-05-01T14:00:00+02:00"))
    assert [r["time"] async for r in log.export()] == ["2024-05-01T12:00:00.000000+00:00"]
    with pytest.raises(ValueError, match="time zone"):
        await log.append(entry(time="2024-05-01T14:00:00"))


# -- tampering ------------------------------------------------------------------------------

@pytest.mark.parametrize("seq", [1, 4, 7])
@pytest.mark.parametrize("field", ["gateway", "officer", "case", "items", "algorithms", "references",
                                   "status", "peer", "time", "column time", "column prev_hash", "column hash"])
async def test_a_one_byte_edit_anywhere_names_that_record(log: AuditLog, tmp_path: Path, seq: int,
                                                         field: str) -> None:
    await fill(log, 7)
    db = tmp_path / "node.sqlite"
    if field.startswith("column "):
        column = field.split()[1]
        [(value,)] = sql(db, f"SELECT {column} FROM audit WHERE seq = ?", seq)
        sql(db, f"UPDATE audit SET {column} = ? WHERE seq = ?", flip(value, len(value) - 3), seq)
    else:
        [(text,)] = sql(db, "SELECT entry FROM audit WHERE seq = ?", seq)
        at = text.index(f'"{field}":') + len(field) + 3
        while not text[at].isalnum():  # into the value, past quotes and brackets
            at += 1
        edited = flip(text, at)
        assert len(edited) == len(text) and sum(a != b for a, b in zip(text, edited, strict=True)) == 1
        sql(db, "UPDATE audit SET entry = ? WHERE seq = ?", edited, seq)
    result = await log.verify()
    assert not result.ok and result.first_bad_seq == seq and result.checked == seq - 1, result
    assert result.reason


async def test_a_deleted_middle_record_is_caught_even_when_renumbered(log: AuditLog, tmp_path: Path) -> None:
    await fill(log, 6)
    db = tmp_path / "node.sqlite"
    sql(db, "DELETE FROM audit WHERE seq = 3")
    result = await log.verify()
    assert (result.ok, result.first_bad_seq, result.checked) == (False, 4, 2) and "missing" in result.reason
    sql(db, "UPDATE audit SET seq = seq - 1 WHERE seq > 3")  # close the gap
    result = await log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 3) and "prev_hash" in result.reason


async def test_swapped_records_are_caught(log: AuditLog, tmp_path: Path) -> None:
    await fill(log, 6)
    db = tmp_path / "node.sqlite"
    for statement in ("UPDATE audit SET seq = -2 WHERE seq = 2", "UPDATE audit SET seq = 2 WHERE seq = 5",
                      "UPDATE audit SET seq = 5 WHERE seq = -2"):
        sql(db, statement)
    result = await log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 2)


# -- pruning --------------------------------------------------------------------------------

async def test_prune_keeps_the_chain_verifiable_and_edits_still_show(log: AuditLog, tmp_path: Path) -> None:
    old = (NOW - dt.timedelta(days=DEFAULT_RETENTION_DAYS + 30)).isoformat()
    for n in range(4):
        await log.append(entry(n, time=old))
    for n in range(4, 7):
        await log.append(entry(n))
    head = await log.head()
    assert await log.prune(NOW - dt.timedelta(days=DEFAULT_RETENTION_DAYS)) == 4
    assert await log.prune(NOW - dt.timedelta(days=DEFAULT_RETENTION_DAYS)) == 0
    assert await log.head() == head
    assert await log.verify() == type(await log.verify())(True, 3, None, "")
    assert await log.append(entry(7)) == 8 and (await log.verify()).ok

    db = tmp_path / "node.sqlite"
    [(anchor_seq, anchor_hash)] = sql(db, "SELECT seq, hash FROM audit_anchor")
    assert anchor_seq == 4
    [(text,)] = sql(db, "SELECT entry FROM audit WHERE seq = 6")
    sql(db, "UPDATE audit SET entry = ? WHERE seq = 6", text.replace("officer-5", "officer-6"))
    assert (await log.verify()).first_bad_seq == 6
    sql(db, "UPDATE audit SET entry = ? WHERE seq = 6", text)
    sql(db, "UPDATE audit_anchor SET hash = ?", flip(anchor_hash, 0))
    result = await log.verify()
    assert (result.ok, result.first_bad_seq) == (False, 5) and "anchor" in result.reason
    sql(db, "UPDATE audit_anchor SET hash = ?, seq = 3", anchor_hash)
    assert (await log.verify()).first_bad_seq == 5


async def test_pruning_everything_keeps_the_head_and_the_numbering(log: AuditLog) -> None:
    await fill(log, 3)
    head = await log.head()
    assert await log.prune(NOW + dt.timedelta(days=1)) == 3
    assert await log.head() == head and (await log.verify()).ok
    assert await log.append(entry(9)) == 4 and (await log.verify()).ok


async def test_prune_refuses_to_delete_tampered_records(log: AuditLog, tmp_path: Path) -> None:
    await fill(log, 4)
    db = tmp_path / "node.sqlite"
    [(text,)] = sql(db, "SELECT entry FROM audit WHERE seq = 2")
    sql(db, "UPDATE audit SET entry = ? WHERE seq = 2", text.replace("officer-1", "officer-9"))
    with pytest.raises(AuditError, match="record 2"):
        await log.prune(NOW + dt.timedelta(days=1))
    assert sql(db, "SELECT COUNT(*) FROM audit") == [(4,)] and sql(db, "SELECT * FROM audit_anchor") == []


async def test_prune_from_another_connection_while_appending(log: AuditLog, tmp_path: Path) -> None:
    old = (NOW - dt.timedelta(days=900)).isoformat()
    for n in range(50):
        await log.append(entry(n, time=old))
    other = await connect(tmp_path / "node.sqlite")
    try:
        pruner = await AuditLog.open(other)
        *_, pruned = await asyncio.gather(*(log.append(entry(n)) for n in range(100)),
                                          pruner.prune(NOW - dt.timedelta(days=730)))
    finally:
        await other.close()
    assert pruned == 50
    result = await log.verify()
    assert result.ok and result.checked == 100 and (await log.head())[0] == 150


# -- what is kept ---------------------------------------------------------------------------

async def test_export_writes_json_lines_with_every_field(log: AuditLog) -> None:
    await log.append(entry(0, time="2024-01-01T00:00:00Z"))
    await fill(log, 3)
    out = io.StringIO()
    assert await log.write_jsonl(out) == 4
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert all(set(r) == FIELDS | {"seq", "prev_hash", "hash"} for r in records)
    assert records[0]["prev_hash"] == GENESIS and records[1]["prev_hash"] == records[0]["hash"]
    assert records[2]["references"] == ["FR-REF-1-0"] and records[2]["algorithms"] == ["md5", "pdq"]
    assert [r["seq"] async for r in log.export(since="2025-01-01T00:00:00+00:00")] == [2, 3, 4]


async def test_a_record_is_the_canonical_json_of_the_whole_entry(log: AuditLog, tmp_path: Path) -> None:
    """The text recorded and hashed is ``canonical_json(dataclasses.asdict(entry))`` (made without
    its deep copy): every field, references as a list, in the same bytes."""
    wide = dataclasses.replace(entry(3, time="2024-01-01T00:00:00+00:00"), references=("FR-é", 'FR-"2"', "FR-3"),
                               algorithms=("sha256", "pdq"), key_id="k-1", since_generation=7, rows_searched=9)
    await log.append(wide)
    with sqlite3.connect(tmp_path / "node.sqlite") as db:
        (text,) = db.execute("SELECT entry FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    recorded = dataclasses.replace(wide, time="2024-01-01T00:00:00.000000+00:00")
    assert text == canonical_json(dataclasses.asdict(recorded))


async def test_the_entry_has_no_place_for_digests(log: AuditLog, tmp_path: Path) -> None:
    names = {f.name for f in dataclasses.fields(AuditEntry)}
    assert names == FIELDS and not any("digest" in name or "hash" in name for name in names)
    assert "digest" in (AuditEntry.__doc__ or "")
    with pytest.raises(TypeError):
        AuditEntry(**dataclasses.asdict(entry()), digests=("aa" * 16,))  # type: ignore[call-arg]
    await log.append(entry())
    [(text,)] = sql(tmp_path / "node.sqlite", "SELECT entry FROM audit")
    assert set(json.loads(text)) == FIELDS


# -- two processes --------------------------------------------------------------------------

# Part of the scenario, not a wait: both writers append at this pace (seconds
# between appends), so their appends overlap in time.
WRITER_PACE = 0.002

CHILD = """
import asyncio, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from node.audit import AuditEntry, AuditLog, connect

async def main():
    db = await connect(Path(sys.argv[2]))
    log = await AuditLog.open(db)
    Path(sys.argv[3]).touch()
    for n in range(100):
        await log.append(AuditEntry("", "proc-B", "o", "org", "NL", "c", "Match", 1, ("md5",), 0, (), "OK",
                                    "", f"t{n}", "p"))
        await asyncio.sleep(float(sys.argv[4]))  # the writer's pace, so the two writers overlap
    await db.close()

asyncio.run(main())
"""


async def test_two_processes_appending_interleave_without_breaking_the_chain(log: AuditLog,
                                                                             tmp_path: Path) -> None:
    ready = tmp_path / "child-ready"
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", CHILD, str(ROOT),
                                                 str(tmp_path / "node.sqlite"), str(ready), str(WRITER_PACE))
    await wait_until_async(lambda: ready.exists() or child.returncode is not None, 10,
                           "the second writer has opened the log")
    for n in range(100):
        await log.append(entry(n, gateway="proc-A"))
        await asyncio.sleep(WRITER_PACE)
    assert await asyncio.wait_for(child.wait(), 30) == 0
    result = await log.verify()
    assert result.ok and result.checked == 200
    gateways = [r["gateway"] async for r in log.export()]
    assert sorted(gateways) == ["proc-A"] * 100 + ["proc-B"] * 100
    switches = sum(a != b for a, b in itertools.pairwise(gateways))
    assert switches > 2, "the two processes' appends should interleave"


# -- the CLI --------------------------------------------------------------------------------

def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="icse-node")
    add_audit_parser(parser.add_subparsers(dest="command", required=True))
    return run_audit(parser.parse_args(["audit", *argv]))


@pytest.fixture
def node_config(tmp_path: Path) -> Path:
    config = tmp_path / "node.toml"
    config.write_text('[node]\nid = "FR"\ncountry = "FR"\nfederation = "t"\nstore = "fr.sqlite"\n')

    async def populate() -> None:
        async with await Store.open(tmp_path / "fr.sqlite"):
            db = await connect(audit_path(tmp_path / "fr.sqlite"))
            log = await AuditLog.open(db)
            for n in range(3):
                await log.append(entry(n, time=(NOW - dt.timedelta(days=800)).isoformat()))
            for n in range(3, 5):
                await log.append(entry(n))
            await db.close()

    asyncio.run(populate())
    return config


def test_cli_verify_head_export_prune(node_config: Path, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    config = str(node_config)
    assert cli("verify", "--config", config) == 0
    [(last_hash,)] = sql(audit_path(tmp_path / "fr.sqlite"), "SELECT hash FROM audit WHERE seq = 5")
    assert f"5 records verified, head seq 5 hash {last_hash}" in capsys.readouterr().out
    assert cli("head", "--config", config) == 0
    assert "node=FR" in (line := capsys.readouterr().out) and f"seq=5 hash={last_hash}" in line

    out = tmp_path / "audit.jsonl"
    assert cli("export", "--config", config, "--out", str(out)) == 0
    assert [json.loads(line)["seq"] for line in out.read_text().splitlines()] == [1, 2, 3, 4, 5]
    since = (NOW - dt.timedelta(days=1)).date().isoformat()
    assert cli("export", "--config", config, "--since", since) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [4, 5]

    assert cli("prune", "--config", config, "--retention-days", "900") == 0
    assert "pruned 0 records" in capsys.readouterr().out
    assert cli("prune", "--config", config) == 0  # default: two years
    assert "pruned 3 records" in capsys.readouterr().out
    assert cli("prune", "--config", config, "--before", "2999-01-01") == 0
    assert "pruned 2 records" in capsys.readouterr().out
    assert cli("verify", "--config", config) == 0 and f"hash {last_hash}" in capsys.readouterr().out


def test_cli_verify_names_the_bad_record(node_config: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    db = audit_path(tmp_path / "fr.sqlite")
    [(text,)] = sql(db, "SELECT entry FROM audit WHERE seq = 4")
    sql(db, "UPDATE audit SET entry = ? WHERE seq = 4", text.replace('"hits":1', '"hits":0'))
    assert cli("verify", "--config", str(node_config)) == 1
    assert "BROKEN at seq 4: hash does not match" in capsys.readouterr().err
    assert cli("prune", "--config", str(node_config), "--before", "2999-01-01") == 1
    assert "not pruning: audit record 4" in capsys.readouterr().err


def test_cli_usage_and_config_errors_exit_2(node_config: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("verify", "--config", str(tmp_path / "missing.toml")) == 2
    assert "no such configuration file" in capsys.readouterr().err
    elsewhere = tmp_path / "other.toml"
    elsewhere.write_text('[node]\nid = "FR"\ncountry = "FR"\nfederation = "t"\nstore = "nowhere.sqlite"\n')
    assert cli("head", "--config", str(elsewhere)) == 2
    assert "no store here" in capsys.readouterr().err and not (tmp_path / "nowhere.sqlite").exists()
    for argv in (["export", "--config", str(node_config), "--since", "yesterday"],
                 ["prune", "--config", str(node_config), "--retention-days", "0"],
                 ["prune", "--config", str(node_config), "--retention-days", "5", "--before", "2020-01-01"],
                 ["verify"]):
        with pytest.raises(SystemExit) as exited:
            cli(*argv)
        assert exited.value.code == 2
    assert "ISO 8601" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "expected"), [
    (["--help"], ["ACTION", "verify check the whole hash chain", "head print the latest seq", "ticket daily"]),
    (["prune", "--help"], ["--retention-days N", "default 730", "--before ISO", "--config CONFIG"]),
    (["export", "--help"], ["--since ISO", "--out FILE", "JSON object per record"]),
])
def test_cli_help_is_readable(argv: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli(*argv)
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    assert text.startswith("usage: icse-node audit") and all(part in text for part in expected), text
