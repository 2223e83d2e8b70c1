"""The node as its operators use it: file modes, odd input files, the command
line as a Unix tool, refusals in words, and a log that stays JSON."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from federation.localfed import LocalFederation, NodeSpec, environment
from federation.pki import DevPki
from node.audit import AuditEntry, AuditLog
from node.store import Store
from node.unix import EXIT_BROKEN_PIPE

MD5 = "ab" * 16


def _node_cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          timeout=120, env=environment(), **kwargs)  # type: ignore[call-overload]


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
    from node.audit import AuditEntry, AuditLog
    from node.store import Store

    async def main(path):
        os.umask(int(sys.argv[2], 8))
        async with await Store.open(path) as store:
            await store.add_rows([[("md5", bytes(16), "R-1", "", None, "", "")]])
            audit = await AuditLog.open(store.connection)
            await audit.append(AuditEntry("", "eu-1", "o", "org", "FR", "c", "Match", 1, ("md5",), 0, (),
                                          "OK", "", "t", "p"))
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.parent.glob(path.name + "*")}
        print(json.dumps(modes))

    asyncio.run(main(Path(sys.argv[1])))
""")


@pytest.mark.parametrize("umask", ["022", "000"])
def test_store_wal_and_shm_are_created_owner_only_whatever_the_umask(tmp_path: Path, umask: str) -> None:
    path = tmp_path / "store.sqlite"
    done = subprocess.run([sys.executable, "-c", _OPEN_AND_WRITE, str(path), umask],
                          capture_output=True, text=True, timeout=60, env=environment())
    assert done.returncode == 0, done.stderr
    modes = json.loads(done.stdout)
    assert set(modes) == {"store.sqlite", "store.sqlite-wal", "store.sqlite-shm"}
    assert modes == dict.fromkeys(modes, 0o600)


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
    store = tmp_path / "store.sqlite"
    store.chmod(0o644)
    done = _node_cli("audit", "verify", "--config", str(config))
    assert done.returncode == 0, done.stderr
    assert _mode(store) == 0o600


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
        audit = await AuditLog.open(store.connection)
        for _ in range(records):
            await audit.append(AuditEntry("", "eu-1", "officer-1", "Police", "FR", "CASE-1", "Match", 1,
                                          ("md5",), 0, (), "OK", "", "token", "ipv4:127.0.0.1:1"))
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


def test_serve_on_a_port_in_use_says_so_and_exits_2(pki: DevPki, tmp_path: Path) -> None:
    local = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR")])
    node = local["FR"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        node.write_config(address)
        done = _node_cli("serve", "--config", str(node.config_path))
    assert done.returncode == 2
    assert f"cannot listen on {address}: address already in use" in done.stderr
    assert "Traceback" not in done.stderr
