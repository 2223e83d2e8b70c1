"""Import formats (lines, CSV, VICS JSON), retraction and export, against real stores and a running node."""

from __future__ import annotations

import csv
import json
import random
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from node import cli, importer, vics
from node.importer import ImportAborted, import_file
from node.records import Rejection
from node.segment import directory_of, segments_root
from node.store import Store
from tests.support import query_json

RNG = random.Random(20260)
SECRET_PATH = "Victims/SECRET-PATH-7f3a/IMG_0001.jpg"


def _hex(size: int) -> str:
    return RNG.randbytes(size).hex()


def _media(media_id: int | str, **fields: object) -> dict:
    return {"MediaID": media_id, **fields}


def _vics_cases(*media_per_case: list[dict]) -> dict:
    return {
        "@odata.context": "http://github.com/VICSDATAMODEL/ProjectVic/DataModels/2.0.xml/CUSTOM/$metadata#Cases",
        "value": [{"CaseID": n, "CaseNumber": f"2026/FR/{n:04d}", "SourceApplicationName": "Griffeye",
                   "Media": media} for n, media in enumerate(media_per_case, start=1)],
    }


def _write_json(path: Path, document: object, indent: int | None = 1) -> Path:
    path.write_text(json.dumps(document, indent=indent))
    return path


def _rows(path: Path) -> list[tuple]:
    """Every row of the store's published segments, read with plain SQLite."""
    with sqlite3.connect(path) as catalog:
        published = [i for (i,) in catalog.execute("SELECT id FROM segments WHERE state = 'published'")]
    catalog.close()
    rows = []
    for segment_id in published:
        with sqlite3.connect(directory_of(segments_root(path), segment_id) / "rows.sqlite") as db:
            rows += db.execute(
                "SELECT algorithm, digest, reference, category, victim_identified, series, date_added FROM rows")
        db.close()
    return sorted(rows)


def _config(directory: Path, country: str = "FR", store: str = "store.sqlite") -> Path:
    config = directory / f"node-{store}.toml"
    config.write_text(f'[node]\nid = "{country}"\ncountry = "{country}"\nfederation = "t"\nstore = "{store}"\n')
    return config


def _node_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=60,
                          check=False)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``icse-node`` in-process (faster than a subprocess; same code path)."""
    code = cli.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- CSV and lines ---------------------------------------------------------------------------------

async def test_csv_and_lines_reject_bad_rows_by_line_and_go_on(tmp_path: Path) -> None:
    good_md5, good_sha1, good_pdq = _hex(16), _hex(20), _hex(32)
    source = tmp_path / "set.csv"
    source.write_text(
        "algo,digest,reference,category,victim_identified,series,date_added\n"
        f"md5,{good_md5},FR-1,2,true,S-1,2024-02-03\n"
        f"sha1,{_hex(19)},FR-2,,,,\n"                    # line 3: short digest
        f"md5,{_hex(16)},FR-3,1,perhaps,,\n"             # line 4: bad flag
        "\n"
        f"sha1,{good_sha1},,1,,,2024-02-30\n"            # line 6: no such date
        f"sha1,{good_sha1},,1,false,\"S, quoted\",\n"    # line 7: fine (generated reference)
        f"crc32,abcd,FR-5,,,,\n"                         # line 8: unknown algorithm
        f"photodna,{'AQID' * 10},FR-6,,,,\n"             # line 9: not supported, skipped
        f"pdq,{good_pdq},FR-7,3,no,S-2,2024-01-01T10:00:00Z\n"
        f"md5,{_hex(16)},FR-8,1,,,,extra\n"              # line 11: too many columns
    )
    lines = tmp_path / "set.txt"
    lines.write_text(f"# known\nmd5:{good_md5}\nsha256:{_hex(31)}\nnonsense\n\nsha256:{_hex(32)}\n")
    async with await Store.open(tmp_path / "s.sqlite") as store:
        report = await import_file(store, source, country="FR")
        assert [r.line for r in report.rejected] == [3, 4, 6, 8, 11]
        reasons = [r.reason for r in report.rejected]
        assert reasons[0] == "sha1 digest must be 40 hex characters, got 38"
        assert "victim_identified must be true/false/empty" in reasons[1]
        assert "date_added must be an ISO date" in reasons[2]
        assert "unknown algorithm 'crc32'" in reasons[3]
        assert reasons[4] == "8 columns, expected at most 7"
        assert (report.added, report.already_present, dict(report.unsupported)) == (3, 0, {"photodna": 1})
        assert report.unit == "line"
        (pdq,) = [r for r in await _all(store) if r[0] == "pdq"]
        assert pdq[2:] == ("FR-7", "3", False, "S-2", "2024-01-01")

        text = await import_file(store, lines, country="FR")
        assert [(r.line, r.reason[:20]) for r in text.rejected] == [
            (3, "sha256 digest must b"), (4, "expected ALGORITHM:H")]
        assert (text.added, text.already_present) == (1, 1)


def _stored_bytes(directory: Path) -> bytes:
    """Every byte of the store ``s.sqlite`` in ``directory``: catalog, segments, their row files."""
    return b"".join(p.read_bytes() for p in directory.rglob("s.sqlite*") if p.is_file())


async def _all(store: Store) -> list[tuple]:
    return [row async for batch in store.iter_rows() for row in batch]


async def test_wide_csv_counts_photodna_columns_as_unsupported(tmp_path: Path) -> None:
    source = tmp_path / "wide.csv"
    with source.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["md5", "sha1", "photodna", "reference", "category"])
        writer.writerow([_hex(16), _hex(20), "AQIDBA==", "FR-W1", "1"])
        writer.writerow(["", "", "AQIDBA==", "FR-W2", "1"])
        writer.writerow(["", "", "", "FR-W3", "1"])
    async with await Store.open(tmp_path / "s.sqlite") as store:
        report = await import_file(store, source, country="FR")
    assert (report.added, dict(report.unsupported)) == (2, {"photodna": 2})
    assert [r.line for r in report.rejected] == [4]


async def test_progress_is_reported_by_bytes_read(tmp_path: Path) -> None:
    text = tmp_path / "set.csv"
    text.write_text("".join(f"sha256,{_hex(32)},R-{n},1,,\n" for n in range(3000)))
    document = _write_json(tmp_path / "set.json", _vics_cases([_media(n, MD5=_hex(16)) for n in range(3000)]))
    async with await Store.open(tmp_path / "s.sqlite") as store:
        for path in (text, document):
            seen: list[int] = []
            await import_file(store, path, country="FR", advance=seen.append)
            assert sum(seen) == path.stat().st_size and len(seen) >= 1


# -- VICS ------------------------------------------------------------------------------------------

async def test_vics_cases_layout_with_unknown_and_missing_fields(tmp_path: Path) -> None:
    md5, sha1, lone_sha1 = _hex(16).upper(), _hex(20).upper(), _hex(20)
    document = _vics_cases(
        [
            _media(101, Category=2, MD5=md5, SHA1=sha1, PhotoDNA="AQIDBAUG" * 20, MediaSize=2835,
                   DateUpdated="2023-06-07T02:31:49.8300Z", IsPrecategorized="true", Series="SERIES-ALPHA",
                   VictimIdentified=True, OffenderIdentified=False, IsDistributed=True, IsSuspected=False,
                   SelfGenerated=None, Tags="t1;t2", Comments="seen before", MimeType="image/jpeg",
                   RelativeFilePath=SECRET_PATH, Exifs=[{"PropertyName": "Model", "PropertyValue": "X"}],
                   MediaFiles=[{"FileName": "IMG_0001.jpg", "FilePath": SECRET_PATH}],
                   SomeFutureField={"nested": [1, 2]}),
            {"mediaid": 102, "sha1": lone_sha1, "category": "7", "victimidentified": "false"},  # lower-case keys
            _media(103, PhotoDNA="AQID" * 30),                 # PhotoDNA only: skipped, not rejected
            _media(104, MD5="not-hex", SHA1=_hex(20)),         # one bad hash: the other still lands
            _media(105, Category=[1], MD5=_hex(16)),          # bad metadata: the item is rejected
            _media(106, Comments="no hash at all"),
        ],
        [],  # a case without media
        [_media(201, MD5=_hex(16), DateUpdated="/Date(1686105109830)/")],
    )
    source = _write_json(tmp_path / "export.json", document)
    path = tmp_path / "s.sqlite"
    async with await Store.open(path) as store:
        report = await import_file(store, source, country="FR")
        assert report.unit == "media item"
        assert (report.added, report.already_present, dict(report.unsupported)) == (5, 0, {"photodna": 2})
        assert [(r.line, r.reason) for r in report.rejected] == [
            (4, "MediaID 104: MD5: md5 digest must be 32 hex characters, got 7"),
            (5, "MediaID 105: Category must be text or a number, got list"),
            (6, "MediaID 106: no hash (MD5, SHA1) in the media item"),
        ]
        generation = await store.generation()
        again = await import_file(store, source, country="FR")
        assert (again.added, again.already_present) == (0, 5)
        assert await store.generation() == generation, "re-importing changes nothing"
    rows = {(r[0], r[1].hex()): r[2:] for r in _rows(path)}
    assert rows[("md5", md5.lower())] == ("FR-VICS-101", "2", 1, "SERIES-ALPHA", "2023-06-07")
    assert rows[("sha1", sha1.lower())] == ("FR-VICS-101", "2", 1, "SERIES-ALPHA", "2023-06-07")
    assert rows[("sha1", lone_sha1)][:3] == ("FR-VICS-102", "7", 0)
    assert next(v for v in rows.values() if v[0] == "FR-VICS-201")[4] == "2023-06-07"
    # Nothing of where the file lived reaches the store, in any of its files.
    stored = _stored_bytes(tmp_path)
    assert b"SECRET-PATH" not in stored and b"IMG_0001" not in stored and b"seen before" not in stored


@pytest.mark.parametrize("layout", ["media_in_value", "bare_media", "top_level_array"])
async def test_vics_other_layouts(tmp_path: Path, layout: str) -> None:
    media = [_media(1, MD5=_hex(16), Category=1), _media(2, SHA1=_hex(20), RelativeFilePath=SECRET_PATH),
             _media(3, MD5="12")]
    document: object = {
        "media_in_value": {"@odata.context": "http://github.com/VICSDATAMODEL/ProjectVic/DataModels/2.0.xml/"
                           "Default/$metadata#Media", "value": media},
        "bare_media": {"Media": media},
        "top_level_array": [{"CaseID": 9, "Media": media}],
    }[layout]
    source = _write_json(tmp_path / "x.json", document, indent=None)
    async with await Store.open(tmp_path / "s.sqlite") as store:
        report = await import_file(store, source, country="DE")
        assert report.added == 2 and [r.line for r in report.rejected] == [3]
        assert {r[2] for r in await _all(store)} == {"DE-VICS-1", "DE-VICS-2"}
    assert b"SECRET-PATH" not in _stored_bytes(tmp_path)


async def test_malformed_json_mid_file_rolls_the_file_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "BATCH_ROWS", 10)  # so batches were inserted before the error
    good = _write_json(tmp_path / "good.json", _vics_cases([_media(1, MD5=_hex(16))]))
    items = ",\n".join(json.dumps(_media(n, MD5=_hex(16))) for n in range(1, 51))
    broken = tmp_path / "broken.json"
    broken.write_text('{"value": [{"CaseID": 1, "Media": [\n' + items + ',\n{"MediaID": 51, "MD5": "ab",}\n]}]}')
    async with await Store.open(tmp_path / "s.sqlite") as store:
        await import_file(store, good, country="FR")
        generation = await store.generation()
        with pytest.raises(ImportAborted) as caught:
            await import_file(store, broken, country="FR")
        message = str(caught.value)
        assert "malformed JSON at byte offset" in message and "line 52, column 29" in message
        assert "after media item 50" in message and "nothing from this file was imported" in message
        assert await store.counts() == {"md5": 1} and await store.generation() == generation
        truncated = tmp_path / "truncated.json"
        truncated.write_bytes(broken.read_bytes()[:2000])
        with pytest.raises(ImportAborted, match="premature EOF"):
            await import_file(store, truncated, country="FR")
        assert await store.counts() == {"md5": 1}


async def test_vics_strict_and_not_vics(tmp_path: Path) -> None:
    bad = _write_json(tmp_path / "bad.json", {"value": [_media(1, MD5=_hex(16)), _media(2, MD5="zz")]})
    not_vics = _write_json(tmp_path / "other.json", {"hello": [1, 2]})
    async with await Store.open(tmp_path / "s.sqlite") as store:
        with pytest.raises(ImportAborted, match="media item 2: MediaID 2: MD5"):
            await import_file(store, bad, country="FR", strict=True)
        with pytest.raises(ImportAborted, match="no 'value' or 'Media' array at the top level"):
            await import_file(store, not_vics, country="FR")
        assert await store.counts() == {}


# -- export and round trips ------------------------------------------------------------------------

def _diverse_csv(path: Path) -> Path:
    rows = [
        ["md5", _hex(16), "FR-A", "2", "true", "SERIES, with comma", "2021-03-04"],
        ["sha1", _hex(20), "FR-A", "2", "true", "SERIES, with comma", "2021-03-04"],
        ["sha256", _hex(32), "FR-B", "02", "false", 'quote " inside', "2022-12-31"],
        ["pdq", _hex(32), "FR-C", "abc", "", "", "2020-01-01"],
        ["vpdq", _hex(32 * 5), "FR-D", "", "", "Série ünïcode", "2019-07-08"],
        ["md5", _hex(16), "FR-E", "1", "", "", ""],
        ["md5", _hex(16), "FR-A", "2", "true", "SERIES, with comma", "2021-03-04"],  # same item, 2nd md5
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["algorithm", "digest", "reference", "category", "victim_identified", "series",
                         "date_added"])
        writer.writerows(rows)
    return path


def test_export_then_import_round_trips_identically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = _diverse_csv(tmp_path / "set.csv")
    vics_source = _write_json(tmp_path / "v.json", _vics_cases([_media(7, MD5=_hex(16), SHA1=_hex(20), Category=3,
                                                                       Series="S", VictimIdentified=None)]))
    config = _config(tmp_path)
    assert _cli(capsys, "import", "--config", str(config), str(source), str(vics_source))[0] == 0
    original = _rows(tmp_path / "store.sqlite")
    assert len(original) == 9

    for format_name, suffix in (("csv", "csv"), ("vics", "json"), ("lines", "txt")):
        out = tmp_path / f"export-{format_name}.{suffix}"
        code, stdout, stderr = _cli(capsys, "export", "--config", str(config), "--format", format_name,
                                    "--out", str(out))
        assert code == 0 and stdout == "" and f"exported 9 rows ({format_name})" in stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        copy = _config(tmp_path, store=f"copy-{format_name}.sqlite")
        code, stdout, _ = _cli(capsys, "import", "--config", str(copy), str(out))
        assert code == 0 and "added 9, already present 0, rejected 0, unsupported 0" in stdout
        imported = _rows(tmp_path / f"copy-{format_name}.sqlite")
        if format_name == "lines":  # digests only
            assert [r[:2] for r in imported] == [r[:2] for r in original]
        else:
            assert imported == original, format_name
    exported = json.loads((tmp_path / "export-vics.json").read_text())
    (case,) = exported["value"]
    # FR-A's md5 + sha1 share a media item; its second md5 needs another one.
    assert len(case["Media"]) == 7
    assert all(isinstance(m["MediaID"], int) for m in case["Media"])

    code, stdout, _ = _cli(capsys, "export", "--config", str(config))  # default: CSV on standard output
    assert code == 0 and stdout.startswith("algorithm,digest,reference,category,victim_identified,series,date_added")
    assert len(stdout.splitlines()) == 10


# -- retraction, against a running node -----------------------------------------------------------

def test_retract_by_file_and_by_reference_takes_effect_on_a_running_node(pki: DevPki, tmp_path: Path) -> None:
    keep, by_file, by_ref_1, by_ref_2 = _hex(16), _hex(20), _hex(32), _hex(16)
    source = tmp_path / "set.csv"
    source.write_text(f"md5,{keep},FR-KEEP,1,\nsha1,{by_file},FR-F,1,\nsha256,{by_ref_1},FR-R,1,\n"
                      f"md5,{by_ref_2},FR-R,2,\n")
    local = LocalFederation(tmp_path / "fed", pki, [NodeSpec("FR", "FR", "desk@fr")])
    node = local["FR"]
    assert node.import_file(source).returncode == 0
    retract_file = _write_json(tmp_path / "retract.json", {"value": [_media(1, SHA1=by_file, MD5=_hex(16))]})

    def hits(*tagged: str) -> list[int]:
        code, result = query_json(config, "--case", "RETRACT-1", *[a for t in tagged for a in ("--hash", t)])
        assert code in (0, 1), result
        return [len(item["hits"]) for item in result["items"]]

    everything = (f"md5:{keep}", f"sha1:{by_file}", f"sha256:{by_ref_1}", f"md5:{by_ref_2}")
    with local:
        config = local.write_gateway_config()
        assert hits(*everything) == [1, 1, 1, 1]
        done = _node_cli("retract", "--config", str(node.config_path), str(retract_file))
        assert done.returncode == 0, done.stderr
        assert "removed 1, not present 1, rejected 0, unsupported 0" in done.stdout
        assert hits(*everything) == [1, 0, 1, 1]
        done = _node_cli("retract", "--config", str(node.config_path), "--reference", "FR-R",
                         "--reference", "FR-NOPE")
        assert done.returncode == 0, done.stderr
        assert "removed 2 rows, not present 1 of 2 references" in done.stdout and "FR-NOPE" in done.stdout
        assert hits(*everything) == [1, 0, 0, 0]
    with sqlite3.connect(node.store_path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0] == 3


async def test_retract_is_one_transaction_and_counts(tmp_path: Path) -> None:
    digests = [_hex(32) for _ in range(5)]
    source = tmp_path / "set.txt"
    source.write_text("".join(f"sha256:{d}\n" for d in digests))
    first = tmp_path / "first.txt"
    first.write_text(f"sha256:{digests[0]}\nsha256:{digests[1]}\nsha256:{_hex(32)}\n")
    broken = tmp_path / "broken.json"
    broken.write_text('{"value": [{"MediaID": 1, "SHA1": "' + _hex(20) + '"}, {')
    async with await Store.open(tmp_path / "s.sqlite") as store:
        await import_file(store, source, country="FR")
        generation = await store.generation()
        with pytest.raises(ImportAborted, match="malformed JSON"):
            await importer.retract_files(store, [first, broken], country="FR")
        assert await store.counts() == {"sha256": 5} and await store.generation() == generation
        report = await importer.retract_files(store, [first], country="FR")
        assert (report.removed, report.not_present, report.rejected) == (2, 1, [])
        assert await store.counts() == {"sha256": 3} and await store.generation() == generation + 1
        nothing = await importer.retract_files(store, [first], country="FR")
        assert (nothing.removed, nothing.not_present) == (0, 3)
        assert await store.generation() == generation + 1, "nothing removed, no new generation"


# -- the command line ------------------------------------------------------------------------------

def test_cli_exit_codes_and_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    good = _write_json(tmp_path / "good.json", _vics_cases([_media(1, MD5=_hex(16), PhotoDNA="AQID")]))
    rejected = _write_json(tmp_path / "rejected.json", {"Media": [_media(1, SHA1=_hex(20)), _media(2, SHA1="x")]})
    broken = tmp_path / "broken.json"
    broken.write_text('{"value": [{"MediaID": 1, "MD5": "' + _hex(16) + '"}\n{"MediaID": 2}]}')

    code, out, err = _cli(capsys, "import", "--config", str(config), str(good))
    assert code == 0
    assert "added 1, already present 0, rejected 0, unsupported 1 (not supported, skipped: 1 photodna)" in out
    code, out, _ = _cli(capsys, "import", "--config", str(config), str(rejected))
    assert code == 1 and "rejected 1" in out and "media item 2: MediaID 2: SHA1: sha1 digest must be 40" in out
    # A malformed file is refused whole (exit 2); the other files of the command are still imported.
    other = tmp_path / "other.txt"
    other.write_text(f"md5:{_hex(16)}\n")
    code, out, err = _cli(capsys, "import", "--config", str(config), str(broken), str(other))
    assert code == 2 and "malformed JSON at byte offset 69 (line 2, column 1), after media item 1" in err
    assert f"{other}: added 1" in out and str(broken) + ":" not in out
    code, _, err = _cli(capsys, "import", "--config", str(config), str(tmp_path / "missing.csv"))
    assert code == 2 and "no such file" in err
    code, _, err = _cli(capsys, "retract", "--config", str(config))
    assert code == 2 and "give hash FILEs or --reference REF" in err
    code, out, _ = _cli(capsys, "retract", "--config", str(config), str(rejected))
    assert code == 1 and "removed 1, not present 0, rejected 1" in out and "media item 2:" in out
    code, out, _ = _cli(capsys, "stats", "--config", str(config), "--format", "json")
    assert json.loads(out)["counts"] == {"md5": 2}


def test_help_texts_name_the_formats() -> None:
    for command, needle in (("import", "vics"), ("retract", "--reference"), ("export", "--out")):
        done = _node_cli(command, "--help")
        assert done.returncode == 0 and needle in done.stdout


def test_vics_reader_streams_items(tmp_path: Path) -> None:
    # Items come one at a time: a generator over a file larger than any single read.
    source = _write_json(tmp_path / "big.json", _vics_cases([_media(n, MD5=_hex(16)) for n in range(20_000)]),
                         indent=None)
    assert source.stat().st_size > 4 * (1 << 16)
    with vics.VicsReader(source, country="FR") as reader:
        rows = reader.rows()
        first = next(rows)
        assert type(first) is tuple and first[2] == "FR-VICS-0" and reader.items == 1
        assert sum(1 for _ in rows) == 19_999 and reader.items == 20_000


def test_read_media_from_a_string() -> None:
    rows = vics.read_media('{"Media": [{"MediaID": 1}, {"MediaID": 2, "md5": "' + "0" * 32 + '"}]}', "FR")
    assert rows == [Rejection(1, "MediaID 1: no hash (MD5, SHA1) in the media item"),
                    ("md5", bytes(16), "FR-VICS-2", "", None, "", "")]


async def test_rejections_are_all_counted_but_only_the_first_kept(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "KEPT_REJECTIONS", 3)
    source = tmp_path / "set.txt"
    source.write_text("".join(f"md5:{_hex(15)}\n" for _ in range(10)) + f"md5:{_hex(16)}\n")
    async with await Store.open(tmp_path / "s.sqlite") as store:
        report = await import_file(store, source, country="FR")
    assert (report.added, report.rejected_total, [r.line for r in report.rejected]) == (1, 10, [1, 2, 3])
