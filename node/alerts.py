"""Alerts to this node's own desk: every hit it released, as it left.

When FR's node releases a hit on one of FR's references to a DE investigator,
FR's victim-identification desk should hear of it then, not when someone reads
the audit log. Each released hit (after policy: what actually left the node)
becomes one event in a durable outbox (``federation.outbox``), a SQLite file of
its own beside the store's catalog and audit log (``alerts_path``), committed
before the answer leaves (an answer's events as one bundle: ``Outbox.add_bundle``);
from there it is delivered to a webhook (signed, retried, at least once, across
restarts) and read by ``icse-node alerts``.

An event holds the reference, series and category of the row that hit, who
asked (gateway, country, agency, officer, case, from the token the audit log
records), when, how close (distance, matched share), the algorithm, the
request id, and the one digest of the request that hit; never any other item
of the request (an officer's no-hit digests must leave no trace here either).

A failed outbox write does not fail the answer: the audit record of the call,
with the same references, case and officer, is already durable (no record, no
answer), so nothing is lost that the desk cannot recover; refusing the
investigator because the desk's notification file is unwritable would turn an
alerting fault into a matching outage. The failure is logged (without
digests) and counted (``icse_node_alerts_failed``) so the operator sees it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Gauge

from federation.bundles import BundleKey
from federation.outbox import Outbox
from federation.tokens import QueryClaims
from federation.webhook import WebhookTarget
from node.config import AlertSettings
from node.private_files import make_private
from node.records import HashRecord

log = logging.getLogger("icse.node")

EVENT_TYPE = "hit.released"


@dataclass(frozen=True)
class ReleasedHit:
    """One hit as it left the node, with the request item it answered."""

    item: int  # the item's position in the request
    algorithm: str
    digest: bytes  # the requester's digest of that item (not the stored one)
    record: HashRecord  # the stored row that hit
    distance: int
    matched_share: float | None
    tier: str  # release tier the requester was given ("hit" or "standard")


def alerts_path(store: Path) -> Path:
    """The outbox of alerts: its own file beside the store's catalog (and ``.audit``)."""
    return store.with_name(store.name + ".alerts")


def open_outbox(store: Path, settings: AlertSettings) -> Outbox | None:
    """The node's outbox, with its webhook if one is configured; None when alerts are off.
    A file that cannot be opened stops the start (OSError, in words): the operator
    is there to fix it, whereas a node serving without its alerts would go unnoticed."""
    if not settings.enabled:
        return None
    webhook = WebhookTarget(settings.webhook, settings.webhook_secret, min_backoff_s=settings.retry_initial_s,
                            max_backoff_s=settings.retry_max_s) if settings.webhook else None
    path = alerts_path(store)
    try:
        make_private(path)
        return Outbox(path, webhook=webhook, jsonl_path=None)
    except sqlite3.Error as exc:
        raise OSError(f"{path}: cannot open the alerts outbox ({exc}); move it aside to start "
                      "with an empty one, or set [alerts] enabled = false") from None


def passes(settings: AlertSettings, claims: QueryClaims, hit: ReleasedHit) -> bool:
    """Whether the desk asked to hear of this hit (its filters; pure)."""
    return _passes(settings, claims, hit.record.series, hit.record.category)


def _passes(settings: AlertSettings, claims: QueryClaims, series: str, category: str) -> bool:
    if settings.requesting_countries is not None and claims.country not in settings.requesting_countries:
        return False
    if settings.series is not None and series not in settings.series:
        return False
    if settings.min_category is not None:
        category = category.strip()
        if not category.isdigit() or int(category) < settings.min_category:
            return False
    return True


def _shared(node_id: str, country: str, claims: QueryClaims, request_id: str, when: dt.datetime) -> dict[str, object]:
    """The fields every alert of one answered request has in common."""
    return {
        "type": EVENT_TYPE,
        "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "node_id": node_id,
        "node_country": country,
        "request_id": request_id,
        "gateway": claims.issuer,
        "requesting_country": claims.country,
        "requesting_agency": claims.org,
        "officer": claims.subject,
        "case": claims.case,
        "token_id": claims.token_id,
    }


class Released(NamedTuple):
    """``ReleasedHit`` as the fields its alert holds, for one hit at a time (``Released.of``)."""

    item: int
    algorithm: str
    digest: bytes
    reference: str
    series: str
    category: str
    victim_identified: bool | None
    distance: int
    matched_share: float | None
    tier: str

    @classmethod
    def of(cls, hit: ReleasedHit) -> Released:
        record = hit.record
        return cls(hit.item, hit.algorithm, hit.digest, record.reference, record.series, record.category,
                   record.victim_identified, hit.distance, hit.matched_share, hit.tier)


@dataclass(frozen=True)
class ReleasedColumns:
    """The hits one answer released as their alerts' fields in columns, one entry per hit in
    each (the digest in hex; the names are the alert's): a 5,000-hit exact batch goes from
    the search's arrays to the outbox's bundle (``Outbox.add_bundle``) without an object per
    hit (``node.hits``)."""

    item: Sequence[int]
    algorithm: Sequence[str]
    digest: Sequence[str]
    reference: Sequence[str]
    series: Sequence[str]
    category: Sequence[str]
    victim_identified: Sequence[bool | None]
    distance: Sequence[int]
    matched_share: Sequence[float | None]
    released_tier: Sequence[str]

    def __len__(self) -> int:
        return len(self.item)

    @classmethod
    def of(cls, hits: Sequence[Released]) -> ReleasedColumns:
        if not hits:
            return _NONE_RELEASED
        item, algorithm, digest, reference, series, category, victim, distance, share, tier = zip(*hits, strict=True)
        return cls(item, algorithm, [d.hex() for d in digest], reference, series, category, victim, distance, share,
                   tier)

    def columns(self) -> dict[str, Sequence[object]]:
        return {name: getattr(self, name) for name in _RELEASED_FIELDS}

    def only(self, keep: Sequence[bool]) -> ReleasedColumns:
        """The hits whose ``keep`` is true."""
        kept: dict[str, Any] = {name: [value for value, chosen in zip(column, keep, strict=True) if chosen]
                                for name, column in self.columns().items()}
        return ReleasedColumns(**kept)


_RELEASED_FIELDS = tuple(f.name for f in fields(ReleasedColumns))
_NONE_RELEASED = ReleasedColumns(*([()] * len(_RELEASED_FIELDS)))


class Alerts:
    """Records released hits in the outbox; called by the service once per answered Match."""

    def __init__(self, outbox: Outbox | None, settings: AlertSettings, node_id: str, country: str,
                 registry: CollectorRegistry | None = None):
        self._outbox = outbox
        self._settings = settings
        self._node_id = node_id
        self._country = country
        # No filter set: every released hit is alerted, none is looked at one by one.
        self._unfiltered = (settings.requesting_countries is None and settings.series is None
                            and settings.min_category is None)
        self.recorded = Counter("icse_node_alerts_recorded", "Alerts recorded in the outbox", registry=registry)
        self.filtered = Counter("icse_node_alerts_filtered", "Released hits left out by the [alerts] filters",
                                registry=registry)
        self.failed = Counter("icse_node_alerts_failed",
                              "Released hits whose alert could not be recorded (the answer still went)",
                              registry=registry)
        if outbox is not None and registry is not None:
            pending = Gauge("icse_node_alerts_pending", "Alerts not yet delivered to the webhook",
                            registry=registry)
            pending.set_function(lambda: outbox.status().pending if outbox.webhook else 0)

    async def record(self, claims: QueryClaims, request_id: str, released: Sequence[ReleasedHit]) -> None:
        """Commits an alert per released hit the filters let through, before
        returning; never raises (see the module docstring)."""
        await self.record_released(claims, request_id, ReleasedColumns.of([Released.of(hit) for hit in released]))

    async def record_released(self, claims: QueryClaims, request_id: str, released: ReleasedColumns) -> None:
        """``record`` for hits given as their alerts' columns."""
        if self._outbox is None or not len(released):
            return
        when = dt.datetime.now(dt.UTC)
        chosen = released if self._unfiltered else released.only(
            [_passes(self._settings, claims, series, category)
             for series, category in zip(released.series, released.category, strict=True)])
        self.filtered.inc(len(released) - len(chosen))
        if not len(chosen):
            return
        try:
            # In a worker thread: the commit syncs to disk, and the loop serves other calls meanwhile.
            added = await asyncio.to_thread(self._write, claims, request_id, chosen, when)
        except Exception as exc:  # noqa: BLE001 - any failure: the answer still goes (module docstring)
            self.failed.inc(len(chosen))
            log.error("alert not recorded; the answer goes out, the audit log has the call", extra={
                "request_id": request_id, "alerts": len(chosen), "reason": f"{type(exc).__name__}: {exc}"})
            return
        self.recorded.inc(added)

    def _write(self, claims: QueryClaims, request_id: str, chosen: ReleasedColumns, when: dt.datetime) -> int:
        """Commits the alerts of one answer as one bundle (``Outbox.add_bundle``: the shared
        fields once, each hit's own as columns); how many alerts that is."""
        assert self._outbox is not None
        # One alert per gateway's request, item and reference: a request the gateway sends
        # again (same request id) does not alert the desk twice.
        key = BundleKey(f"{claims.issuer}/{request_id}/", ("item", "reference"), "event_id")
        return self._outbox.add_bundle(_shared(self._node_id, self._country, claims, request_id, when),
                                       chosen.columns(), key)

    async def deliver_forever(self, stop: asyncio.Event) -> None:
        """Delivers recorded alerts to the webhook until ``stop`` (nothing to do without one)."""
        if self._outbox is not None:
            await self._outbox.deliver_forever(stop)
