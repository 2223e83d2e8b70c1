"""The durable outbox against a real local HTTP receiver: exactly once per key
after failures, signatures that verify, delivery resumed by a new process
object over the same file, a private file, and a feed read by cursor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import stat
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from federation import webhook
from federation.bundles import BundleKey
from federation.outbox import Outbox
from federation.webhook import WebhookTarget, backoff, sign, verify
from tests.webhook import Receiver, receiving

SECRET = b"desk-shared-secret"


def _target(url: str) -> WebhookTarget:
    return WebhookTarget(url, SECRET, timeout_s=5.0, max_backoff_s=0.2, min_backoff_s=0.02)


async def _deliver_until(box: Outbox, receiver: Receiver, count: int) -> None:
    """Runs delivery until the receiver accepted ``count`` events, then stops it cleanly."""
    stop = asyncio.Event()
    task = asyncio.create_task(box.deliver_forever(stop, poll_s=0.05))
    await asyncio.to_thread(receiver.wait_accepted, count)
    stop.set()
    await asyncio.wait_for(task, 10)


def test_add_is_idempotent_and_the_feed_reads_by_cursor(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "alerts.db")
    assert box.add("r1:0:FR-1", {"reference": "FR-1"})
    assert not box.add("r1:0:FR-1", {"reference": "FR-1", "changed": True})
    assert box.add("r1:1:FR-2", {"reference": "FR-2"})
    everything = box.since(0)
    assert [event for _, event in everything] == [{"reference": "FR-1"}, {"reference": "FR-2"}]
    first_cursor = everything[0][0]
    assert box.since(first_cursor) == everything[1:]
    assert box.since(everything[-1][0]) == []
    assert box.since(0, limit=1) == everything[:1]
    box.close()
    # Another object (another process) over the same file sees the same feed.
    again = Outbox(tmp_path / "alerts.db")
    assert again.since(0) == everything
    assert not again.add("r1:0:FR-1", {"reference": "FR-1"})
    again.close()


def test_outbox_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        box = Outbox(tmp_path / "alerts.db", jsonl_path=tmp_path / "alerts.jsonl")
        box.add("k", {"case": "DE-2026-1"})
        box.close()
    finally:
        os.umask(old)
    for path in (tmp_path / "alerts.db", tmp_path / "alerts.jsonl"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_jsonl_mirror_carries_cursor_and_key_and_is_caught_up_on_open(tmp_path: Path) -> None:
    jsonl = tmp_path / "alerts.jsonl"
    box = Outbox(tmp_path / "alerts.db", jsonl_path=jsonl)
    box.add("a", {"reference": "FR-1"})
    box.add("a", {"reference": "FR-1"})
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert lines == [{"cursor": box.since(0)[0][0], "key": "a", "reference": "FR-1"}]
    box.close()
    # An event committed by an outbox without the mirror (as if the process died
    # before writing the line) is written when the mirror is next opened.
    plain = Outbox(tmp_path / "alerts.db")
    plain.add("b", {"reference": "FR-2"})
    plain.close()
    with sqlite_connection(tmp_path / "alerts.db") as db:
        db.execute("UPDATE outbox SET fed = 0 WHERE key = 'b'")
    Outbox(tmp_path / "alerts.db", jsonl_path=jsonl).close()
    assert [json.loads(line)["key"] for line in jsonl.read_text().splitlines()] == ["a", "b"]


@contextlib.contextmanager
def sqlite_connection(path: Path) -> Iterator[object]:
    import sqlite3  # noqa: PLC0415 - only this helper pokes at the file directly

    db = sqlite3.connect(path, isolation_level=None)
    try:
        yield db
    finally:
        db.close()


async def test_delivered_exactly_once_per_key_after_three_failures(tmp_path: Path) -> None:
    with receiving(fail_first=3) as receiver:
        box = Outbox(tmp_path / "alerts.db", webhook=_target(receiver.url))
        assert box.add("req-1:0:FR-1", {"reference": "FR-1", "series": "S-ALPHA"})
        assert not box.add("req-1:0:FR-1", {"reference": "FR-1", "series": "S-ALPHA"})
        await _deliver_until(box, receiver, 1)
        assert len(receiver.requests) == 4
        assert receiver.accepted == ["req-1:0:FR-1"]
        assert box.attempts("req-1:0:FR-1") == (4, True)
        # A later round sends nothing more: a delivered event is never sent again.
        assert await box.deliver_due() == 0
        assert len(receiver.requests) == 4
        box.close()


async def test_signature_verifies_over_the_exact_body(tmp_path: Path) -> None:
    with receiving() as receiver:
        box = Outbox(tmp_path / "alerts.db", webhook=_target(receiver.url))
        event = {"reference": "FR-7", "case": "DE-2026-0042", "note": "é"}
        box.add("k7", event)
        await _deliver_until(box, receiver, 1)
        box.close()
    headers, body = receiver.requests[0]
    assert headers["Content-Type"] == "application/json"
    assert headers["X-ICSE-Event-Id"] == "k7"
    assert headers["X-ICSE-Timestamp"].isdigit()
    assert verify(SECRET, body, headers["X-ICSE-Signature"])
    assert not verify(b"another secret", body, headers["X-ICSE-Signature"])
    assert not verify(SECRET, body + b" ", headers["X-ICSE-Signature"])
    assert json.loads(body) == event
    assert headers["X-ICSE-Signature"] == sign(SECRET, body)


async def test_restart_resumes_with_persisted_attempts(tmp_path: Path) -> None:
    path = tmp_path / "alerts.db"
    with receiving(fail_first=2) as receiver:
        first = Outbox(path, webhook=_target(receiver.url))
        first.add("a", {"n": 1})
        first.add("b", {"n": 2})
        # One round: both fail (the receiver refuses its first two requests).
        assert await first.deliver_due() == 0
        assert first.attempts("a") == (1, False) and first.attempts("b") == (1, False)
        first.close()  # the process ends here
        second = Outbox(path, webhook=_target(receiver.url))
        # The failures counted by the first process are still there.
        assert second.attempts("a") == (1, False)
        await _deliver_until(second, receiver, 2)
        assert sorted(receiver.accepted) == ["a", "b"]
        assert second.attempts("a") == (2, True) and second.attempts("b") == (2, True)
        second.close()
        third = Outbox(path, webhook=_target(receiver.url))
        assert await third.deliver_due() == 0  # nothing delivered twice across restarts
        third.close()
    assert len(receiver.requests) == 4


async def test_a_failing_event_waits_its_backoff_and_is_not_marked_delivered(tmp_path: Path) -> None:
    with receiving(fail_first=1) as receiver:
        target = WebhookTarget(receiver.url, SECRET, max_backoff_s=600.0, min_backoff_s=600.0)
        box = Outbox(tmp_path / "alerts.db", webhook=target)
        box.add("slow", {"n": 1})
        assert await box.deliver_due() == 0
        # Its next attempt is minutes away: the next round does not try it.
        assert await box.deliver_due() == 0
        assert len(receiver.requests) == 1
        assert box.status().failing == 1 and box.status().delivered == 0
        box.close()


async def test_an_unreachable_webhook_counts_as_a_failure(tmp_path: Path) -> None:
    with receiving() as receiver:
        dead = receiver.url  # the port is closed once the receiver stops
    box = Outbox(tmp_path / "alerts.db", webhook=_target(dead))
    box.add("x", {"n": 1})
    assert await box.deliver_due() == 0
    assert box.attempts("x") == (1, False)
    box.close()


def test_backoff_is_capped_exponential_with_jitter() -> None:
    target = WebhookTarget("http://127.0.0.1:9/", SECRET, max_backoff_s=300.0, min_backoff_s=1.0)
    rng = random.Random(1)
    for attempts, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0), (60, 300.0)):
        delays = {backoff(attempts, target, rng) for _ in range(50)}
        assert all(ceiling / 2 <= d <= ceiling for d in delays), (attempts, delays)
        assert len(delays) > 1  # jittered, not lockstep


def test_secret_is_not_in_the_target_repr() -> None:
    assert "desk-shared-secret" not in repr(_target("http://127.0.0.1:9/"))


@pytest.mark.parametrize("status", [301, 500])
async def test_non_2xx_is_not_delivered(tmp_path: Path, status: int) -> None:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(status)
            self.send_header("Location", "http://127.0.0.1:9/elsewhere")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        box = Outbox(tmp_path / "alerts.db", webhook=_target(f"http://127.0.0.1:{server.server_port}/"))
        box.add("r", {"n": 1})
        assert await box.deliver_due() == 0
        assert box.attempts("r") == (1, False)
        box.close()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_module_names_its_headers() -> None:
    assert (webhook.SIGNATURE_HEADER, webhook.EVENT_ID_HEADER, webhook.TIMESTAMP_HEADER) == (
        "X-ICSE-Signature", "X-ICSE-Event-Id", "X-ICSE-Timestamp")


def test_add_many_commits_together_and_counts_new_keys(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "alerts.db", jsonl_path=tmp_path / "alerts.jsonl")
    assert box.add("a", {"n": 1})
    assert box.add_many([("a", {"n": 1}), ("b", {"n": 2}), ("c", {"n": 3}), ("b", {"n": 2})]) == 2
    assert box.add_many([]) == 0
    assert [event["n"] for _, event in box.since(0)] == [1, 2, 3]
    assert [json.loads(line)["key"] for line in (tmp_path / "alerts.jsonl").read_text().splitlines()] == [
        "a", "b", "c"]
    box.close()


def test_an_unwritable_jsonl_file_does_not_lose_the_event(tmp_path: Path) -> None:
    jsonl = tmp_path / "not-yet" / "alerts.jsonl"
    box = Outbox(tmp_path / "alerts.db", jsonl_path=jsonl)
    assert box.add("a", {"n": 1})  # committed, although its line could not be written
    assert box.since(0)[0][1] == {"n": 1}
    box.close()
    jsonl.parent.mkdir()
    Outbox(tmp_path / "alerts.db", jsonl_path=jsonl).close()
    assert [json.loads(line)["key"] for line in jsonl.read_text().splitlines()] == ["a"]


KEY = BundleKey("eu-1/rq/", ("item", "reference"), "event_id")


def _bundle(count: int) -> tuple[dict[str, object], dict[str, list[object]]]:
    """An answer's worth of like events: what they share, and their own fields as columns."""
    shared: dict[str, object] = {"type": "hit.released", "case": 'DE-"1"\u2028', "officer": "ö\\", "n": 3}
    columns: dict[str, list[object]] = {
        "item": list(range(count)), "reference": [f'FR-{n} "é"' for n in range(count)],
        "victim_identified": [None, True, False][:count] + [None] * (count - 3),
        "matched_share": [0.625, None, 1e-07][:count] + [None] * (count - 3),
        "detail": [{"b": 1, "a": [n]} for n in range(count)],
        # Stored once when all alike (by their JSON: 1 and true differ, 0 and 0.0 too).
        "algorithm": ["sha256"] * count, "flag": [1, True] + [1] * (count - 2), "zero": [0] * (count - 1) + [0.0],
        "tier": [{"level": "standard"}] * count}
    return shared, columns


def _keys(columns: dict[str, list[object]]) -> list[str]:
    return [f"eu-1/rq/{item}/{reference}" for item, reference in zip(columns["item"], columns["reference"],
                                                                       strict=True)]


def _events(shared: dict[str, object], columns: dict[str, list[object]]) -> list[tuple[str, dict[str, object]]]:
    return [(key, {**shared, **{name: values[n] for name, values in columns.items()}, "event_id": key})
            for n, key in enumerate(_keys(columns))]


def test_a_bundle_reads_back_as_the_same_events_add_would_store(tmp_path: Path) -> None:
    """One row per answer on the write; on the read, the same keys, cursors' order and
    byte-for-byte texts as ``add_many`` of each event (quotes, non-ASCII, None, bools,
    floats, nested values), before and after events added one by one."""
    shared, columns = _bundle(5)
    one_by_one = Outbox(tmp_path / "plain.db")
    one_by_one.add("before", {"x": 1})
    assert one_by_one.add_many(_events(shared, columns)) == 5
    one_by_one.add("after", {"x": 2})
    bundled = Outbox(tmp_path / "bundled.db")
    bundled.add("before", {"x": 1})
    assert bundled.add_bundle(shared, columns, KEY) == 5
    with sqlite_connection(bundled.path) as db:
        assert db.execute("SELECT count(*) FROM outbox").fetchone() == (1,)  # only "before" so far
        (body,) = db.execute("SELECT body FROM bundles").fetchone()
    assert set(json.loads(body)["columns"]) == {"item", "reference", "victim_identified", "matched_share", "detail",
                                                "flag", "zero"}  # algorithm and tier: stored once; no keys
    bundled.add("after", {"x": 2})  # the bundle comes first in the feed: it was recorded first
    assert bundled.since(0) == one_by_one.since(0)
    with sqlite_connection(one_by_one.path) as a, sqlite_connection(bundled.path) as b:
        query = "SELECT id, key, event FROM outbox ORDER BY id"
        assert b.execute(query).fetchall() == a.execute(query).fetchall()
    one_by_one.close()
    bundled.close()


def test_a_bundle_is_recorded_once_and_a_repeated_key_is_one_event(tmp_path: Path) -> None:
    shared, columns = _bundle(4)
    box = Outbox(tmp_path / "alerts.db")
    assert box.add_bundle(shared, columns, KEY) == 4
    assert box.add_bundle(shared, columns, KEY) == 0  # the same events again: a retried request
    repeated = {name: values + values[:1] for name, values in columns.items()}
    assert box.add_bundle(shared, repeated, KEY) == 4  # another bundle; its repeat of a key is dropped
    assert [box.key_of(cursor) for cursor, _ in box.since(0)] == _keys(columns)
    assert box.add_bundle(shared, {name: [] for name in columns}, KEY) == 0
    with pytest.raises(ValueError, match="both shared and per event"):
        box.add_bundle({"item": 1}, columns, KEY)
    with pytest.raises(ValueError, match="differ in length"):
        box.add_bundle(shared, {**columns, "item": columns["item"][1:]}, KEY)
    with pytest.raises(ValueError, match="key is made of its columns"):
        box.add_bundle(shared, columns, BundleKey("p/", ("item", "case"), "event_id"))
    box.close()


def test_a_bundle_committed_but_never_read_survives_and_expands_once(tmp_path: Path) -> None:
    """The bundle is durable when ``add_bundle`` returns (a process killed then loses nothing);
    two outbox objects (two processes) reading the file expand it once between them."""
    path = tmp_path / "alerts.db"
    shared, columns = _bundle(6)
    writer = Outbox(path)
    assert writer.add_bundle(shared, columns, KEY) == 6
    writer.close()  # never read: nothing expanded
    first, second = Outbox(path), Outbox(path)
    assert second.expand() == 6
    assert first.expand() == 0
    assert [event for _, event in first.since(0)] == [event for _, event in _events(shared, columns)]
    assert first.status().total == 6
    first.close()
    second.close()


async def test_bundled_events_are_delivered_one_post_each(tmp_path: Path) -> None:
    shared, columns = _bundle(3)
    with receiving() as receiver:
        box = Outbox(tmp_path / "alerts.db", webhook=_target(receiver.url))
        assert box.add_bundle(shared, columns, KEY) == 3
        await _deliver_until(box, receiver, 3)
        assert box.attempts(_keys(columns)[2]) == (1, True)
        box.close()
    assert receiver.accepted == _keys(columns)
    assert [json.loads(body) for _, body in receiver.requests] == [event for _, event in _events(shared, columns)]


def test_a_bundle_of_one_event_keeps_its_key_though_every_field_is_stored_once(tmp_path: Path) -> None:
    shared, columns = _bundle(3)
    one = {name: values[2:] for name, values in columns.items()}
    box = Outbox(tmp_path / "alerts.db")
    assert box.add_bundle(shared, one, KEY) == 1
    assert [(box.key_of(cursor), event) for cursor, event in box.since(0)] == _events(shared, one)
    box.close()
