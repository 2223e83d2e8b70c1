"""The bulk parser of plain text files gives exactly what node.formats gives, row by
row: the same rows (per algorithm, in file order), rejections, line numbers and
reasons — on well-formed files and on files full of odd lines, across block edges."""

from __future__ import annotations

import io
import random

import pytest

from node import bulk_parse, formats
from node.records import Rejection

UNNAMED = "FR-0badcafe-"


def _expected(text: bytes, format_name: str) -> tuple[dict[str, list], list]:
    groups: dict[str, list] = {}
    others = []
    decoded = io.TextIOWrapper(io.BytesIO(text), encoding="utf-8-sig", newline="")
    for row in formats.ROW_PARSERS[format_name](decoded, UNNAMED):
        if type(row) is tuple:
            groups.setdefault(row[0], []).append(row)
        else:
            others.append(row)
    return groups, others


def _bulk(text: bytes, format_name: str, block: int) -> tuple[dict[str, list], list]:
    groups: dict[str, list] = {}
    others = []
    source = io.BytesIO(text)
    original = bulk_parse.BLOCK_BYTES
    bulk_parse.BLOCK_BYTES = block
    try:
        for chunk in bulk_parse.chunks(source.read, format_name, UNNAMED):
            for name, (narrow, keys, shape) in chunk.groups.items():
                rows = [shape.expand(row) for row in narrow]
                groups.setdefault(name, []).extend(rows)
                if keys is not None:
                    assert len(keys) == len(rows)
                    assert keys.tobytes() == b"".join(r[1] for r in rows)
            others.extend(chunk.others)
    finally:
        bulk_parse.BLOCK_BYTES = original
    return groups, others


def _hex(rng: random.Random, size: int) -> str:
    return rng.randbytes(size).hex()


ODD_CSV = [
    "sha256,{sha},, cat ,true,,2020-01-01",  # padded category
    "SHA256,{sha},ref-upper,,,,",  # algorithm in capitals: a row only formats reads
    "md5,{md5}zz,ref,,,,",  # too long
    "md5,{bad},ref,,,,",  # not hex
    "pdq,{sha},ref,1,maybe,,",  # bad flag
    "pdq,{sha},ref,1,,,2020-13-45",  # bad date
    "photodna,abc,ref,,,,",  # unsupported kind
    "# a comment",
    "",
    "   ",
    "md5,{md5},ref,,,,,extra",  # too many columns
    "md5,{md5}",  # too few columns (the rest empty)
    "sha1,{sha1},réf-ünïcode,,,,",  # not ASCII
    "nonsense,{md5},x,,,,",
    "vpdq,{sha},video,,,,",
    "sha256,{sha},{long},,,,",  # reference too long
    "sha256,{sha},,,,,",  # no reference: named by line
    "md5,{md5},ref\x01ctl,,,,",  # control character
    "sha1,{SHA1},upper-hex,Cat,FALSE,S-1,2021-02-03T10:00:00",
]


# Lines that are no row at all: the rows around them are still taken in bulk.
NOT_ROWS = [line for line in ODD_CSV if line.startswith(("md5,{md5}zz", "md5,{bad}", "photodna", "#", "nonsense"))
            or not line.strip() or "extra" in line or "{long}" in line or "\x01" in line]


def _csv_file(rng: random.Random, lines: int, odd: float, odd_lines: list[str] = ODD_CSV) -> bytes:
    out = ["algorithm,digest,reference,category,victim_identified,series,date_added"]
    for n in range(lines):
        if rng.random() < odd:
            template = rng.choice(odd_lines)
        else:
            template = rng.choice(["md5,{md5},R-{n},c{c},{flag},{series},{date}",
                                   "sha256,{sha},R-{n},c{c},{flag},{series},{date}",
                                   "pdq,{sha},,c{c},{flag},,{date}"])
        out.append(template.format(
            md5=_hex(rng, 16), sha1=_hex(rng, 20), SHA1=_hex(rng, 20).upper(), sha=_hex(rng, 32),
            bad="g" * 32, n=n, c=n % 3, flag=rng.choice(["", "true", "false", "1", "0", "yes", "unknown"]),
            series=rng.choice(["", "S-2"]), date=rng.choice(["", "2020-05-06", "2019-01-01T00:00:00"]),
            long="x" * 300))
    return ("\n".join(out) + "\n").encode()


@pytest.mark.parametrize("odd", [0.0, 0.02, 0.5])
@pytest.mark.parametrize("block", [64, 700, 1 << 20])
def test_csv_in_bulk_is_what_formats_reads(odd: float, block: int) -> None:
    text = _csv_file(random.Random(int(odd * 100) + block), 600, odd)
    assert _bulk(text, "csv", block) == _expected(text, "csv")


@pytest.mark.parametrize("block", [300, 1 << 20])
def test_rejected_lines_among_rows_taken_in_bulk(block: int) -> None:
    text = _csv_file(random.Random(block), 2000, 0.1, NOT_ROWS)
    found = _bulk(text, "csv", block)
    assert found == _expected(text, "csv")
    assert len(found[1]) > 100 and sum(len(rows) for rows in found[0].values()) > 1500


def test_csv_repeats_keep_file_order_and_edge_cases() -> None:
    rng = random.Random(3)
    digest = _hex(rng, 16)
    rows = [f"md5,{digest},first,,,,", f"md5,{digest},second,,,,", f"MD5,{digest},third,,,,"]
    for text in [
        ("algorithm,digest\n" + "\n".join(f"md5,{_hex(rng, 16)}" for _ in range(50))).encode(),  # no final newline
        b"\xef\xbb\xbfalgorithm,digest,reference\n" + f"md5,{digest},bom\n".encode(),  # BOM
        (f"md5,{digest},no-header,,true\n" + "\n".join(rows) + "\n").encode(),  # no header
        b"algo,hash,ref\n" + f"md5,{digest},aliases\n".encode(),
        b"md5,sha1,reference\n" + f"{digest},,wide\n".encode(),  # wide: line by line
        b"category,reference\nx,y\n",  # a header that stops the file
        b"",
        b"\n\n",
    ]:
        for block in (8, 4096):
            assert _bulk(text, "csv", block) == _expected(text, "csv"), text[:60]


def test_lines_in_bulk_is_what_formats_reads() -> None:
    rng = random.Random(9)
    lines = ["# header comment"]
    for _ in range(800):
        kind = rng.random()
        if kind < 0.8:
            lines.append(f"{rng.choice(['md5', 'sha1', 'sha256', 'pdq'])}:" + _hex(rng, rng.choice([16, 20, 32])))
        else:
            lines.append(rng.choice([" md5:" + _hex(rng, 16), "md5 : " + _hex(rng, 16), "", "#x", "nocolon",
                                     "md5:" + _hex(rng, 16).upper(), "MD5:" + _hex(rng, 16), "md5:zz",
                                     "photodna:00", "md5:" + _hex(rng, 16) + ":x", "\tsha1:" + _hex(rng, 20)]))
    text = ("\n".join(lines) + "\n").encode()
    for block in (100, 1 << 20):
        found = _bulk(text, "lines", block)
        assert found == _expected(text, "lines")
        assert any(isinstance(other, Rejection) for other in found[1])


def test_invalid_utf8_raises_as_the_text_reader_does() -> None:
    text = b"algorithm,digest\nmd5," + b"a" * 32 + b"\nmd5,\xff\xfe\n"
    with pytest.raises(UnicodeDecodeError):
        _bulk(text, "csv", 1 << 20)
