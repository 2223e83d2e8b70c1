"""A Match restricted to rows published after a store generation (PROTOCOL.md
section 12), on real stores: what is new, what a merge must not make new, what
a retraction hides, and an upgraded store whose rows' births were not recorded."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

from federation.localfed import LocalNode, NodeSpec
from federation.pki import DevPki
from federation.query import QueryItem
from node import matcher
from node.merge import merge
from node.records import HashRecord
from node.segment_set import SegmentSet
from node.store import Store
from tests.test_conformance import _kit, _lines, _node_args
from tests.test_segments import rows


def since_hits(current: SegmentSet, generation: int, records: list[HashRecord]) -> list[str]:
    """The references found for these digests among rows published after ``generation``."""
    items = [QueryItem(r.algorithm, r.digest) for r in records]
    restricted = current.since(generation)
    found = matcher.match(matcher.validate(items, matcher.Limits()), restricted.indexes, matcher.Limits())
    stored = current.records(c.record_id for m in found for c in m.candidates)
    return [stored[c.record_id].record.reference for m in found for c in m.candidates]


async def test_only_rows_published_after_the_generation_are_searched(tmp_path: Path) -> None:
    old, new = rows(1, 400) + rows(1, 50, "pdq"), rows(2, 30) + rows(2, 5, "pdq")
    async with await Store.open(tmp_path / "s.sqlite") as store:
        await store.add([old])
        asked_at = await store.generation()
        await store.add([new])
        current = await store.snapshot()
        assert sorted(since_hits(current, asked_at, old + new)) == sorted(r.reference for r in new)
        assert len(since_hits(current, 0, old + new)) == len(old + new)
        assert since_hits(current, current.generation, old + new) == []
        # The segment of the old rows is not searched at all: only the import's rows are.
        assert current.since(asked_at).rows_searched == len(new)
        assert current.since(0).rows_searched == len(old + new)
        assert current.since(current.generation).rows_searched == 0


async def test_a_merge_does_not_make_old_rows_new(tmp_path: Path) -> None:
    """Merged segments hold rows of several births: each keeps its own."""
    first, second, third = rows(1, 300), rows(2, 200, "pdq"), rows(3, 100)
    async with await Store.open(tmp_path / "s.sqlite") as store:
        await store.add([first])
        after_first = await store.generation()
        await store.add([second])
        after_second = await store.generation()
        await store.add([third])
        result = await merge(store)
        assert result is not None and len(result.merged) == 3
        current = await store.snapshot()
        assert len(current.segments) == 1 and current.generation > after_second
        everything = first + second + third
        assert sorted(since_hits(current, after_first, everything)) == sorted(r.reference for r in second + third)
        assert sorted(since_hits(current, after_second, everything)) == sorted(r.reference for r in third)
        assert since_hits(current, current.generation, everything) == []
        # Merged twice over (the merged segment with a newer one): births still carried.
        fourth = rows(4, 10)
        await store.add([fourth])
        assert (await merge(store)) is not None
        again = await store.snapshot()
        assert sorted(since_hits(again, after_second, everything + fourth)) == sorted(
            r.reference for r in third + fourth)
        assert since_hits(again, 0, first[:1]) == [first[0].reference]


async def test_retracted_rows_stay_invisible_whenever_they_were_published(tmp_path: Path) -> None:
    old, new = rows(1, 100), rows(2, 100)
    async with await Store.open(tmp_path / "s.sqlite") as store:
        await store.add([old])
        asked_at = await store.generation()
        await store.add([new])
        await store.remove([[(r.algorithm, r.digest) for r in new[:10]]])
        current = await store.snapshot()
        assert sorted(since_hits(current, asked_at, old + new)) == sorted(r.reference for r in new[10:])
        await merge(store)
        merged = await store.snapshot()
        assert sorted(since_hits(merged, asked_at, old + new)) == sorted(r.reference for r in new[10:])


async def test_a_store_without_recorded_births_takes_its_rows_as_born_at_the_upgrade(tmp_path: Path) -> None:
    """A store written before births were recorded: its rows may be seen once more, never missed."""
    path = tmp_path / "s.sqlite"
    records = rows(1, 50)
    async with await Store.open(path) as store:
        await store.add([records])
        await store.add([rows(2, 5)])
    with sqlite3.connect(path) as db:  # the schema-2 catalog: no births
        db.execute("ALTER TABLE segments DROP COLUMN born")
        db.execute("UPDATE meta SET value = 2 WHERE key = 'schema_version'")
    async with await Store.open(path) as store:
        current = await store.snapshot()
        assert {s.born for s in current.segments} == {((1, current.generation),)}
        assert len(since_hits(current, current.generation - 1, records)) == len(records)
        assert since_hits(current, current.generation, records) == []
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (3,)


class _SinceIgnoringNode(LocalNode):
    def node_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.defective_since_node", *args]


def test_the_conformance_kit_fails_a_node_that_ignores_since_generation(pki: DevPki, tmp_path: Path) -> None:
    """Our node passes these checks in test_conformance; this one lists the feature and ignores it."""
    known = "ab" * 32
    data = tmp_path / "set.csv"
    data.write_text(f"algo,digest,reference,category\nsha256,{known},FR-KNOWN,1\n")
    node = _SinceIgnoringNode(NodeSpec("FR", "FR"), tmp_path, pki, ["eu-1"])
    assert node.import_file(data).returncode == 0
    node.start()
    try:
        node.wait_ready()
        done = _kit(*_node_args(pki, node, "--known", f"sha256:{known}"))
    finally:
        node.stop()
    table = _lines(done.stdout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert table["since.current-hides-known"] == "FAIL"
    assert table["since.zero-finds-known"] == "pass" and table["since.generation-stated"] == "pass"
