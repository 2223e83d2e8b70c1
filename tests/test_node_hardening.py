"""The node as its operators use it: file modes, odd input files, the command
line as a Unix tool, refusals in words, and a log that stays JSON."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from federation.localfed import environment

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
