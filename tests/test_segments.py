"""The segment store: publish, retract, merge, restart, damage, and a node that
keeps answering while its data changes (real files, real processes)."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import sqlite3
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from federation.query import QueryItem
from node import matcher, readiness
from node.audit import AuditEntry, AuditLog, audit_path, connect
from node.live_index import LiveIndexes
from node.merge import merge
from node.records import HashRecord
from node.segment import SegmentCorrupt
from node.store import Store
from tests.support import wait_until_async

ROOT = Path(__file__).resolve().parent.parent


def rows(prefix: int, count: int, algorithm: str = "sha256", size: int = 32) -> list[HashRecord]:
    """Random digests (PDQ ones far apart from each other), reference R-prefix-n."""
    rng = random.Random(f"{prefix}-{algorithm}")
    return [HashRecord(algorithm, rng.randbytes(size), f"R-{prefix}-{n}") for n in range(count)]


def hits(current, records: list[HashRecord]) -> list[str]:
    """The references a query for these digests returns (through the pure matcher)."""
    items = [QueryItem(r.algorithm, r.digest) for r in records]
    found = matcher.match(matcher.validate(items, matcher.Limits()), current.indexes, matcher.Limits())
    stored = current.records(c.record_id for m in found for c in m.candidates)
    return [stored[m.candidates[0].record_id].record.reference if m.candidates else "" for m in found]


async def test_one_row_import_is_visible_next_query_and_other_segments_are_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    first, one = rows(1, 3000), rows(2, 1)
    async with await Store.open(path) as serving, await Store.open(path) as importing:
        await importing.add([first])
        live = LiveIndexes(serving)
        before = await live.start()
        (old,) = before.segments
        await importing.add([one])
        after = await live.current()
        assert hits(after, one + first[:2]) == ["R-2-0", "R-1-0", "R-1-1"]
        assert len(after.segments) == 2
        kept = next(s for s in after.segments if s.segment_id == old.segment_id)
        assert kept.segment is old.segment and kept.segment.indexes["sha256"] is old.segment.indexes["sha256"]
        again = await importing.add([first + one])
        assert (again.added, again.already_present) == (0, 3001)
        assert (await live.current()).generation == after.generation, "re-import changes nothing"
        await live.stop()


async def test_retract_is_visible_next_query_then_merge_drops_it(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    a, b = rows(1, 500), rows(2, 500, "pdq")
    async with await Store.open(path) as store:
        await store.add([a])
        await store.add([b])
        live = LiveIndexes(store)
        await live.start()
        removed = await store.remove([[(r.algorithm, r.digest) for r in a[:10] + b[:5]]])
        assert (removed.removed, removed.not_present) == (15, 0)
        current = await live.current()
        assert hits(current, a[:11]) == [""] * 10 + ["R-1-10"]
        assert current.counts() == {"pdq": 495, "sha256": 490}
        result = await merge(store)
        assert result is not None and result.dropped == 15 and result.rows == 985
        merged = await live.current()
        assert len(merged.segments) == 1 and merged.counts() == {"pdq": 495, "sha256": 490}
        assert hits(merged, a[:11] + b[4:6]) == [""] * 10 + ["R-1-10", "", "R-2-5"]
        assert sorted(p.name for p in store.root.iterdir()) == [f"seg-{result.segment_id:08d}"]
        back = await store.add([a[:1]])  # imported again after its retraction: visible again
        assert back.added == 1 and hits(await live.current(), a[:1]) == ["R-1-0"]
        await live.stop()


async def test_restart_maps_the_same_answers(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    stored = rows(3, 300) + rows(4, 200, "pdq") + rows(5, 50, "md5", 16)
    async with await Store.open(path) as store:
        await store.add([stored])
        first = hits(await store.snapshot(), stored)
    async with await Store.open(path) as store:
        assert hits(await store.snapshot(), stored) == first and "" not in first


async def test_a_damaged_segment_file_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    async with await Store.open(path) as store:
        await store.add([rows(1, 100)])
        live = LiveIndexes(store)
        await live.start()
        await store.add([rows(2, 100)])  # published; the serving view has not mapped it yet
        newest = max(store.root.iterdir())
        damaged = newest / "sha256.keys.npy"
        data = bytearray(damaged.read_bytes())
        data[-1] ^= 1
        damaged.write_bytes(bytes(data))
        with pytest.raises(SegmentCorrupt, match=f"{damaged}: checksum mismatch"):
            await live.current()
        await live.stop()
        with pytest.raises(SegmentCorrupt, match=r"sha256\.keys\.npy"):
            await LiveIndexes(store).start()


async def test_audit_appends_while_an_import_holds_the_catalog(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    async with await Store.open(path):
        pass
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # what a writer of the catalog holds
    db = await connect(audit_path(path))
    try:
        log = await AuditLog.open(db)
        entry = AuditEntry("", "eu-1", "o", "org", "FR", "c", "Match", 1, ("md5",), 0, (), "OK", "", "t", "p")
        assert await log.append(entry) == 1
    finally:
        await db.close()
        holder.execute("ROLLBACK")
        holder.close()


def test_notify_sends_ready_to_a_real_datagram_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="sd-", dir="/tmp") as directory:
        address = os.path.join(directory, "notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
            listener.bind(address)
            assert readiness.notify("READY=1", {"NOTIFY_SOCKET": address})
            assert listener.recv(64) == b"READY=1"
    assert not readiness.notify("READY=1", {})


COMPACT_KILL = """
import asyncio, sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from node.store import Store
from node.merge import merge
import node.segment as segment

finish = segment.SegmentWriter.finish
def stalled(self):
    Path(sys.argv[3]).touch()  # the merged segment's rows are written; wait here to be killed
    import time
    time.sleep(600)
segment.SegmentWriter.finish = stalled

async def main():
    async with await Store.open(Path(sys.argv[2])) as store:
        await merge(store)

asyncio.run(main())
"""


async def test_merge_killed_leaves_the_store_answering_the_same(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    sets = [rows(n, 200) for n in range(1, 4)]
    async with await Store.open(path) as store:
        for part in sets:
            await store.add([part])
        await store.remove([[(sets[0][0].algorithm, sets[0][0].digest)]])
        before = hits(await store.snapshot(), [r for part in sets for r in part])
    ready = tmp_path / "merging"
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", COMPACT_KILL, str(ROOT), str(path), str(ready))
    await wait_until_async(lambda: ready.exists() or child.returncode is not None, 120,
                           "the merge has written its segment's rows")
    assert child.returncode is None, "the merge ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    await child.wait()
    assert len(list((tmp_path / "s.sqlite.segments").iterdir())) == 4, "the dead merge's segment is left"
    async with await Store.open(path) as store:
        assert len(list(store.root.iterdir())) == 3, "opening removes it"
        assert hits(await store.snapshot(), [r for part in sets for r in part]) == before
        assert (await merge(store)).rows == 599
        assert hits(await store.snapshot(), [r for part in sets for r in part]) == before


async def test_a_large_import_is_several_bounded_segments_published_together(tmp_path: Path) -> None:
    part = rows(9, 3500)
    # Rows 500-1199 come twice: within the first segment, and against it (finished, unpublished) in the second.
    repeated = part[:1200] + part[500:2600] + part[2600:]
    batches = [repeated[n:n + 700] for n in range(0, len(repeated), 700)]
    async with await Store.open(tmp_path / "s.sqlite") as store:
        counts = await store.add_rows(
            [[(r.algorithm, r.digest, r.reference, r.category, r.victim_identified, r.series, r.date_added)
              for r in batch] for batch in batches], segment_rows=1000)
        assert (counts.added, counts.already_present) == (3500, 700)
        live = await store.snapshot()
        assert live.generation == 1, "every segment of the import published in one transaction"
        assert [s.segment.counts["sha256"] for s in live.segments] == [1200, 1600, 700]
        assert live.counts() == {"sha256": 3500}
        assert hits(live, part) == [r.reference for r in part]
        assert sorted(p.name for p in store.root.iterdir()) == [f"seg-{n:08d}" for n in range(1, 4)]


async def test_hit_rows_are_read_in_id_order_and_a_missing_row_is_corruption(tmp_path: Path) -> None:
    """``SegmentSet.hit_rows`` aligns each row with its record id across segments (the ids asked
    in any order, repeated); a row the index names but the rows file lacks is never dropped
    silently: SegmentCorrupt."""
    path = tmp_path / "s.sqlite"
    async with await Store.open(path) as store:
        await store.add([rows(1, 300)])
        await store.add([rows(2, 200, "pdq")])
        live = LiveIndexes(store)
        current = await live.start()
        whole = current.rows(c.record_id for m in matcher.match(
            matcher.validate([QueryItem(r.algorithm, r.digest) for r in rows(1, 300) + rows(2, 200, "pdq")],
                             matcher.Limits()), current.indexes, matcher.Limits()) for c in m.candidates)
        asked = np.array(sorted(whole)[::7] * 2, dtype=np.int64)[::-1].copy()
        found = current.hit_rows(asked)
        assert found.ids.tolist() == sorted(set(asked.tolist()))
        assert {rid: row[1:] for rid, row in found.by_id().items()} == {
            rid: (r[2], r[3], r[4], r[5], r[6]) for rid, r in whole.items() if rid in set(asked.tolist())}
        assert [row[1] for row in found.of(asked)] == [whole[rid][2] for rid in asked.tolist()]
        beyond = np.array([max(whole) + 1], dtype=np.int64)
        with pytest.raises(SegmentCorrupt, match="lacks rows"):
            current.hit_rows(beyond)
        await live.stop()
