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
  one row: their shared fields once and the rest as columns, committed with one
  small write; each bundle becomes its events (the same canonical texts ``add``
  would store, in order, a repeated key dropped) when anything reads or delivers
  them (``expand``). A 5,000-hit answer costs one row of ~150 bytes per hit
  instead of 5,000 indexed rows of ~700 bytes: about 5 ms instead of 50 before
  the answer may leave.
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
import hashlib
import hmac
import json
import logging
import os
import random
import sqlite3
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("icse.outbox")

SIGNATURE_HEADER = "X-ICSE-Signature"
EVENT_ID_HEADER = "X-ICSE-Event-Id"
TIMESTAMP_HEADER = "X-ICSE-Timestamp"
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
class WebhookTarget:
    """Where and how events are POSTed. ``secret`` signs each body (never logged)."""

    url: str
    secret: bytes = field(repr=False)
    timeout_s: float = 5.0
    max_backoff_s: float = 300.0
    # The first retry's delay; each later one doubles, up to ``max_backoff_s``.
    min_backoff_s: float = 1.0


@dataclass(frozen=True)
class OutboxStatus:
    """Counts for an operator (and for metrics): nothing of the events themselves."""

    total: int
    pending: int
    delivered: int
    failing: int  # pending events that have failed at least once


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-ICSE-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: str) -> bool:
    """Whether ``signature`` is the header value ``sign`` gives (constant time)."""
    return hmac.compare_digest(sign(secret, body), signature)


def backoff(attempts: int, target: WebhookTarget, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failure: exponential from
    ``min_backoff_s``, capped at ``max_backoff_s``, between half and all of it
    ("equal jitter": never zero, never in lockstep with other senders)."""
    ceiling = min(target.max_backoff_s, target.min_backoff_s * 2 ** min(max(attempts - 1, 0), 32))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


def canonical(event: dict[str, object]) -> str:
    """An event's text as the outbox stores and sends it: sorted keys, no spaces, UTF-8."""
    return json.dumps(event, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _compact(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


# How ``json.dumps(..., ensure_ascii=False)`` writes a string (its C version, when built).
_encode_string = json.encoder.encode_basestring


def _json_value(value: object) -> str:
    """``json.dumps`` of one value as ``canonical`` writes it, without its call overhead
    for the kinds events mostly hold (str, int, bool, None); anything else goes through it."""
    if type(value) is str:
        return _encode_string(value)
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is int:
        return int.__repr__(value)
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class _Template:
    """``canonical`` of events that share most of their fields, the shared ones encoded once:
    one string format per event instead of a ``json.dumps`` (with its key sort) each."""

    def __init__(self, shared: dict[str, object], names: Sequence[str]):
        keys = sorted([*shared, *names])
        if len(set(keys)) != len(keys):
            raise ValueError("a field is both shared and per event, or named twice")
        self.order = [key for key in keys if key not in shared]  # the per-event values, in this order
        # A str.format template: a per-event value is a field, the constant text's braces are doubled.
        self._template = "{{" + ",".join(
            _encode_string(key) + ":" + (_json_value(shared[key]).replace("{", "{{").replace("}", "}}")
                                         if key in shared else "{}") for key in keys) + "}}"

    def encode(self, values: Sequence[object]) -> str:
        """The text of one event, ``values`` its own fields in ``order``."""
        return self._template.format(*map(_json_value, values))


@dataclass(frozen=True)
class BundleKey:
    """How each event of a bundle is keyed: ``prefix``, then the values of its ``fields``
    (``str`` of each) joined by "/"; the event holds its key as ``field`` too. An alert:
    "gateway/request id/" + item + "/" + reference, as ``event_id``."""

    prefix: str
    fields: tuple[str, ...]
    field: str


def bundle_events(body: dict[str, Any]) -> list[tuple[str, str]]:
    """(key, canonical text) of each event of a bundle as ``add_bundle`` stored it."""
    shared, columns, key = body["shared"], body["columns"], body["key"]
    count = len(next(iter(columns.values()))) if columns else 1
    prefix, field = key["prefix"], key["field"]
    parts = [columns[name] if name in columns else [shared[name]] * count for name in key["fields"]]
    keys = [prefix + "/".join(map(str, values)) for values in zip(*parts, strict=True)]
    template = _Template(shared, [*columns, field])
    values = zip(*(keys if name == field else columns[name] for name in template.order), strict=True)
    return list(zip(keys, map(template.encode, values), strict=True))


def _all_same(values: Sequence[object]) -> bool:
    """Whether every value is the first, as JSON writes them (1 and true, 0 and 0.0 differ):
    decided without encoding them for the kinds an event mostly holds."""
    first = values[0]
    if type(first) not in _PLAIN_KINDS:
        return _compact(values) == "[" + ",".join([_compact(first)] * len(values)) + "]"
    return values.count(first) == len(values) and set(map(type, values)) == {type(first)}


_PLAIN_KINDS = frozenset({str, int, bool, type(None)})


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


class _Rejected(Exception):
    """The webhook answered, but not with a 2xx."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: following it would resend the signed body to
    an address nobody configured (and urllib would turn the POST into a GET)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


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
        count = len(next(iter(columns.values()), ()))
        if not count:
            return 0
        if any(len(values) != count for values in columns.values()):
            raise ValueError("columns of a bundle differ in length")
        if not set(key.fields) <= set(columns) or key.field in columns:
            raise ValueError("a bundle's key is made of its columns, and its field is none of them")
        _Template(shared, [*columns, key.field])  # a field both shared and per event: refused now, not when read
        # A column whose values are all the same is stored once, with the shared fields: an
        # answer's algorithm, tier and distance, often its series and category.
        constant = dict(shared)
        varying: dict[str, str] = {}
        for name, values in columns.items():
            if _all_same(values):
                constant[name] = values[0]
            else:
                varying[name] = _compact(values)
        key_text = _compact({"prefix": key.prefix, "fields": key.fields, "field": key.field})
        body = ('{"key":' + key_text + ',"shared":' + _compact(constant) + ',"columns":{'
                + ",".join(_compact(name) + ":" + text for name, text in varying.items()) + "}}")
        parts = [varying.get(name) or _compact(constant[name]) for name in key.fields]
        digest = hashlib.sha256("\n".join([key_text, *parts]).encode()).hexdigest()
        with self._lock:  # one statement: its own transaction, synced (synchronous=FULL) before it returns
            added = self._db.execute("INSERT INTO bundles (key, body, created) VALUES (?, ?, ?)"
                                     " ON CONFLICT (key) DO NOTHING", (digest, body, _now())).rowcount
        if not added:
            return 0
        first = columns[key.fields[0]]
        distinct = count if len(set(first)) == count else len(set(zip(*(columns[f] for f in key.fields),
                                                                       strict=True)))
        self._wake_deliverer(distinct)
        return distinct

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
                await asyncio.to_thread(_post, target, key, body.encode())
            except (_Rejected, OSError, ValueError) as exc:  # OSError covers URLError, timeouts, refused
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


def _post(target: WebhookTarget, key: str, body: bytes) -> None:
    """One signed POST; returns on a 2xx, raises otherwise (runs in a worker thread)."""
    request = urllib.request.Request(target.url, data=body, method="POST", headers={
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(target.secret, body),
        EVENT_ID_HEADER: key,
        TIMESTAMP_HEADER: str(int(time.time())),
        "User-Agent": "icse-outbox/1",
    })
    try:
        with _OPENER.open(request, timeout=target.timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        raise _Rejected(f"HTTP {exc.code}") from None
    if not 200 <= status < 300:
        raise _Rejected(f"HTTP {status}")


async def _first_of(stop: asyncio.Event, wake: asyncio.Event, timeout: float) -> None:
    """Returns when ``stop`` or ``wake`` is set, or after ``timeout`` seconds."""
    waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(wake.wait())]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
