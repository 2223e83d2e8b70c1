"""A durable outbox: events recorded once, delivered at least once, in their own SQLite file.

An alert that a hit was released (node) or that an open case matched (gateway)
must reach its desk even if the webhook is down for hours or the process is
killed a moment after the event: it is first committed to this file, then
delivered from it. Delivery resumes after a restart from what the file says
(attempts, next attempt time, delivered or not), so nothing is lost and nothing
already acknowledged is sent again, except the one event whose acknowledgement
was in flight when the process died: delivery is at least once, and each event
carries an id (its key) a receiver uses to drop such a repeat.

- ``add`` is idempotent on a key: the same event recorded twice (a retried
  request) is stored, fed and delivered once.
- ``add_bundle`` records many like events (one answer's thousands of hits) as
  one row (``federation.bundles``): their shared fields once and the rest as
  columns, committed with one small write; each bundle becomes its events (the
  same canonical texts ``add`` would store, in order, a repeated key dropped)
  when anything reads or delivers them (``expand``). A 5,000-hit answer costs
  one row of ~100 bytes per hit instead of 5,000 indexed rows of ~700 bytes:
  about 5 ms instead of 50 before the answer may leave.
- ``since`` is the feed: rows in the order they were added, after a cursor (the
  row id; ids are never reused, so a cursor stays valid for good).
- ``deliver_forever`` POSTs each pending event to a webhook, signed with
  HMAC-SHA256 over the body; an event is marked delivered only on an HTTP 2xx.
  Failures back off exponentially (capped, with jitter, so a desk coming back
  after an outage is not hit by every node at the same instant).
- ``jsonl_path``, when given, also receives every event as a JSON line (with its
  cursor and key), for tools that follow a file; a line lost to a crash between
  commit and write is written when the outbox is next opened with that file.
  Events added while the outbox was opened without one are not written later.

The file is created 0600 (its events name cases and officers), in WAL mode with
``synchronous=FULL``: a committed event survives a power cut, and another
process can read the feed while this one writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from federation.bundles import BundleKey, bundle_events, canonical, encode_bundle
from federation.webhook import Rejected, WebhookTarget, backoff, post

log = logging.getLogger("icse.outbox")

BUSY_TIMEOUT_MS = 10_000
# Events tried per delivery round; the rest wait for the next round.
_BATCH = 100

SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    event TEXT NOT NULL,
    created TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL DEFAULT 0,
    delivered TEXT,
    last_error TEXT NOT NULL DEFAULT '',
    fed INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS outbox_pending ON outbox (next_attempt) WHERE delivered IS NULL;
CREATE INDEX IF NOT EXISTS outbox_unfed ON outbox (id) WHERE fed = 0;
-- Events recorded together, not yet expanded into outbox rows while body is set (``add_bundle``).
CREATE TABLE IF NOT EXISTS bundles (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    body TEXT,
    created TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS bundles_pending ON bundles (id) WHERE body IS NOT NULL;
"""


@dataclass(frozen=True)
class OutboxStatus:
    """Counts for an operator (and for metrics): nothing of the events themselves."""

    total: int
    pending: int
    delivered: int
    failing: int  # pending events that have failed at least once


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _create_private(path: Path) -> None:
    """``path`` created empty 0600 if missing (SQLite takes an empty file as a new
    database, and gives its -wal/-shm files the mode of the database file);
    an existing file of this user's with a wider mode is narrowed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for companion in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        with contextlib.suppress(FileNotFoundError):
            status = companion.stat()
            if stat.S_IMODE(status.st_mode) & 0o077 and status.st_uid == os.geteuid():
                os.chmod(companion, stat.S_IMODE(status.st_mode) & 0o700)


class Outbox:
    """Events recorded durably and delivered at least once; see the module docstring.

    Methods other than ``deliver_forever`` are synchronous and thread-safe: an
    async caller that must not stall its loop on the commit's fsync runs
    ``add`` in a worker thread (``asyncio.to_thread``).
    """

    def __init__(self, path: Path, *, webhook: WebhookTarget | None = None, jsonl_path: Path | None = None) -> None:
        self.path = path
        self._webhook = webhook
        self._jsonl_path = jsonl_path
        self._lock = threading.Lock()
        self._wake: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None
        _create_private(path)
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            self._db.executescript(SCHEMA)
            if jsonl_path is not None:
                self._feed_unfed()
        except BaseException:
            self._db.close()
            raise

    def add(self, key: str, event: dict[str, object]) -> bool:
        """Records ``event`` under ``key``, committed before this returns; False
        (and nothing changed) if ``key`` is already recorded."""
        return self.add_many([(key, event)]) == 1

    def add_many(self, events: Sequence[tuple[str, dict[str, object]]]) -> int:
        """``add`` for several events in one transaction (one sync to disk, not
        one each); returns how many keys were new."""
        return self.add_encoded([(key, canonical(event)) for key, event in events])

    def add_encoded(self, events: Sequence[tuple[str, str]]) -> int:
        """``add_many`` for events already in their canonical JSON text (``canonical``)."""
        if not events:
            return 0
        with self._lock:
            self._expand_locked()  # bundles recorded before these come first in the feed
            with self._transaction():
                added = self._insert(events, _now())
            if added:
                self._feed()
        self._wake_deliverer(added)
        return added

    def add_bundle(self, shared: dict[str, object], columns: dict[str, Sequence[object]], key: BundleKey) -> int:
        """Records events that have ``shared`` in common and differ in ``columns`` (one value
        per event in each), each keyed as ``key`` says, as one row committed before this
        returns; how many distinct events that is (0 when these very events were recorded
        before: a retried request). Read back as ``add`` would have stored them (``expand``)."""
        bundle = encode_bundle(shared, columns, key)
        if bundle is None:
            return 0
        with self._lock:  # one statement: its own transaction, synced (synchronous=FULL) before it returns
            added = self._db.execute("INSERT INTO bundles (key, body, created) VALUES (?, ?, ?)"
                                     " ON CONFLICT (key) DO NOTHING", (bundle.key, bundle.body, _now())).rowcount
        if not added:
            return 0
        self._wake_deliverer(bundle.events)
        return bundle.events

    def expand(self) -> int:
        """Turns recorded bundles into their events (readers and the deliverer call it first); how
        many events were new."""
        with self._lock:
            return self._expand_locked()

    def _expand_locked(self) -> int:
        added = 0
        for (bundle_id,) in self._db.execute("SELECT id FROM bundles WHERE body IS NOT NULL ORDER BY id").fetchall():
            with self._transaction():
                # Read again inside the write transaction: another process may have expanded it meanwhile.
                row = self._db.execute("SELECT body, created FROM bundles WHERE id = ? AND body IS NOT NULL",
                                       (bundle_id,)).fetchone()
                if row is None:
                    continue
                added += self._insert(bundle_events(json.loads(row[0])), row[1])
                self._db.execute("UPDATE bundles SET body = NULL WHERE id = ?", (bundle_id,))
        if added:
            self._feed()
        return added

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _insert(self, events: Sequence[tuple[str, str]], created: str) -> int:
        """Inserts events inside a transaction; how many keys were new."""
        fed = 0 if self._jsonl_path is not None else 1
        before = self._db.total_changes
        self._db.executemany("INSERT INTO outbox (key, event, created, fed) VALUES (?, ?, ?, ?)"
                             " ON CONFLICT (key) DO NOTHING", [(key, text, created, fed) for key, text in events])
        return self._db.total_changes - before

    def _feed(self) -> None:
        """Writes new events to the JSON-lines file, if there is one (lock held)."""
        if self._jsonl_path is None:
            return
        try:
            self._feed_unfed()
        except OSError as exc:  # the events are committed; the next open writes their lines
            log.warning("events recorded, JSON-lines file not written; written when next opened",
                        extra={"path": str(self._jsonl_path), "reason": str(exc)})

    def _wake_deliverer(self, added: int) -> None:
        if added and self._wake is not None:
            loop, wake = self._wake
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to wake
                loop.call_soon_threadsafe(wake.set)

    @property
    def webhook(self) -> WebhookTarget | None:
        """Where ``deliver_forever`` sends events (None: recorded and fed only)."""
        return self._webhook

    def since(self, cursor: int, limit: int = 1000) -> list[tuple[int, dict[str, object]]]:
        """Up to ``limit`` events added after ``cursor`` (0: from the first), oldest first."""
        with self._lock:
            self._expand_locked()
            rows = self._db.execute("SELECT id, event FROM outbox WHERE id > ? ORDER BY id LIMIT ?",
                                    (cursor, limit)).fetchall()
        return [(row_id, json.loads(text)) for row_id, text in rows]

    def key_of(self, cursor: int) -> str | None:
        """The key recorded at ``cursor``, if any."""
        with self._lock:
            self._expand_locked()
            row = self._db.execute("SELECT key FROM outbox WHERE id = ?", (cursor,)).fetchone()
        return row[0] if row else None

    def status(self) -> OutboxStatus:
        with self._lock:
            self._expand_locked()
            total, pending, failing = self._db.execute(
                "SELECT count(*), count(*) FILTER (WHERE delivered IS NULL),"
                " count(*) FILTER (WHERE delivered IS NULL AND attempts > 0) FROM outbox").fetchone()
        return OutboxStatus(total=total, pending=pending, delivered=total - pending, failing=failing)

    def attempts(self, key: str) -> tuple[int, bool]:
        """(failed or made attempts so far, delivered?) of the event under ``key``."""
        with self._lock:
            self._expand_locked()
            row = self._db.execute("SELECT attempts, delivered IS NOT NULL FROM outbox WHERE key = ?",
                                   (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return int(row[0]), bool(row[1])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- JSON-lines mirror ---------------------------------------------------

    def _feed_unfed(self) -> None:
        """Appends events not yet in the JSON-lines file, then marks them (lock held)."""
        assert self._jsonl_path is not None
        rows = self._db.execute("SELECT id, key, event FROM outbox WHERE fed = 0 ORDER BY id").fetchall()
        if not rows:
            return
        descriptor = os.open(self._jsonl_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(descriptor, "a", encoding="utf-8") as out:
            for row_id, key, text in rows:
                out.write(canonical({"cursor": row_id, "key": key, **json.loads(text)}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        self._db.executemany("UPDATE outbox SET fed = 1 WHERE id = ?", [(row[0],) for row in rows])

    # -- webhook delivery -----------------------------------------------------

    async def deliver_forever(self, stop: asyncio.Event, *, poll_s: float = 1.0) -> None:
        """POSTs pending events to the webhook until ``stop`` is set; returns at
        once without a webhook. A new ``add`` wakes it; otherwise it looks again
        at the earliest retry time, and at least every ``poll_s``."""
        if self._webhook is None:
            return
        wake = asyncio.Event()
        self._wake = (asyncio.get_running_loop(), wake)
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    await self.deliver_due(stop)
                    delay = await asyncio.to_thread(self._until_next, poll_s)
                except sqlite3.Error as exc:  # the file is unusable for now: say so, try again later
                    log.error("outbox unreadable; delivery tries again", extra={"path": str(self.path),
                                                                                 "reason": str(exc)})
                    delay = poll_s
                if delay > 0:
                    await _first_of(stop, wake, delay)
        finally:
            self._wake = None

    async def deliver_due(self, stop: asyncio.Event | None = None) -> int:
        """One round: tries every event due now (up to a batch), ending early
        when ``stop`` is set; returns how many were delivered."""
        target = self._webhook
        if target is None:
            return 0
        due = await asyncio.to_thread(self._due)
        delivered = 0
        for row_id, key, body in due:
            if stop is not None and stop.is_set():
                break
            try:
                await asyncio.to_thread(post, target, key, body.encode())
            except (Rejected, OSError, ValueError) as exc:  # OSError covers URLError, timeouts, refused
                await asyncio.to_thread(self._failed, row_id, target, str(exc))
                log.warning("webhook delivery failed; will retry", extra={"event_id": key, "reason": str(exc)})
            else:
                await asyncio.to_thread(self._delivered, row_id)
                delivered += 1
        return delivered

    def _due(self) -> list[tuple[int, str, str]]:
        with self._lock:
            self._expand_locked()
            return self._db.execute(
                "SELECT id, key, event FROM outbox WHERE delivered IS NULL AND next_attempt <= ?"
                " ORDER BY id LIMIT ?", (time.time(), _BATCH)).fetchall()

    def _until_next(self, poll_s: float) -> float:
        with self._lock:
            row = self._db.execute("SELECT min(next_attempt) FROM outbox WHERE delivered IS NULL").fetchone()
        if row[0] is None:
            return poll_s
        return max(0.0, min(poll_s, row[0] - time.time()))

    def _failed(self, row_id: int, target: WebhookTarget, reason: str) -> None:
        with self._lock:
            (attempts,) = self._db.execute("SELECT attempts FROM outbox WHERE id = ?", (row_id,)).fetchone()
            attempts += 1
            self._db.execute("UPDATE outbox SET attempts = ?, next_attempt = ?, last_error = ? WHERE id = ?",
                             (attempts, time.time() + backoff(attempts, target), reason[:500], row_id))

    def _delivered(self, row_id: int) -> None:
        now = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        with self._lock:
            self._db.execute("UPDATE outbox SET delivered = ?, attempts = attempts + 1, last_error = ''"
                             " WHERE id = ?", (now, row_id))


async def _first_of(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> None:
    """Returns when ``stop`` or ``wake`` is set, or after ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
