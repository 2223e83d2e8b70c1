"""One round of standing queries, and the service that runs rounds until stopped.

A round Describes every replica (cheap: one indexed read on the node), then,
for each replica whose generation differs from the one a case was last
completely asked at, re-asks that case there — one signed Match per case (per
batch of ``max_items_per_request``), under the case's reference, restricted to
rows published after that generation when the node offers
``match.since-generation`` (PROTOCOL.md section 12). Nodes whose store did not
change are not asked at all, and a node that changed searches only its new rows.

A case's generation on a replica advances only once every batch of it was
answered; a failure leaves it where it was, and the next round asks again.
A new hit becomes one alert per case x reference (the outbox's key), recorded
durably before the generation advances, so a crash between the two repeats a
question, never loses or doubles an alert.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from federation.outbox import Outbox
from federation.query import SINCE_GENERATION_FEATURE, QueryItem
from federation.wire import pb
from gateway.watch_client import CallFailed, Replica, WatchClient
from gateway.watch_store import CaseStore, Watched

log = logging.getLogger("icse.gateway.watch")
# Re-asks in flight at once, over all nodes.
CONCURRENCY = 8


@dataclass
class RoundReport:
    cases: int = 0
    described: int = 0
    changed: list[str] = field(default_factory=list)  # replicas whose generation some case had not seen
    queries: int = 0
    items: int = 0
    alerts: int = 0
    failures: list[str] = field(default_factory=list)
    # Replicas that refused a re-ask (rate, quota, policy): not asked again this round.
    refused: set[str] = field(default_factory=set)


def alert_key(case: str, node_id: str, reference: str) -> str:
    """One alert per case x reference (a member's references are its own: the member is part of it)."""
    return f"watch\x1f{case}\x1f{node_id}\x1f{reference}"


def _event(case: str, watched: Watched, hit: pb.Hit, generation: int) -> dict[str, object]:
    return {
        "type": "watch.hit",
        "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "case": case,
        "node_id": hit.node_id,
        "country": hit.country,
        "reference": hit.reference,
        "contact": hit.contact,
        "category": hit.category,
        "series": hit.series,
        "victim_identified": hit.victim_identified if hit.HasField("victim_identified") else None,
        "date_added": hit.date_added,
        "distance": hit.distance,
        "matched_share": hit.matched_share or None,
        "item": watched.item.tagged() if len(watched.item.digest) <= 64 else watched.item.algorithm,
        "source": watched.source,
        "generation": generation,
    }


class Watcher:
    def __init__(self, client: WatchClient, cases: CaseStore, outbox: Outbox, concurrency: int = CONCURRENCY):
        self._client = client
        self._cases = cases
        self._outbox = outbox
        self._slots = asyncio.Semaphore(concurrency)

    async def round(self) -> RoundReport:
        report = RoundReport()
        references = self._cases.references()
        report.cases = len(references)
        if not references:
            return report
        described = await asyncio.gather(*(self._describe(r, report) for r in self._client.replicas))
        work = []
        for replica, description in zip(self._client.replicas, described, strict=True):
            if description is None:
                continue
            last = self._cases.generations(replica.node.node_id, replica.address)
            due = [(case, last.get(case)) for case in references if last.get(case) != description.generation]
            if due:
                report.changed.append(replica.name)
                work += [self._ask(replica, description, case, seen, report) for case, seen in due]
        await asyncio.gather(*work)
        return report

    async def _describe(self, replica: Replica, report: RoundReport) -> pb.DescribeResponse | None:
        try:
            answer = await self._client.describe(replica)
        except CallFailed as exc:
            report.failures.append(f"{replica.name}: Describe: {exc}")
            log.warning("node not described", extra={"node": replica.name, "reason": str(exc)})
            return None
        report.described += 1
        return answer

    async def _ask(self, replica: Replica, description: pb.DescribeResponse, case: str, seen: int | None,
                   report: RoundReport) -> None:
        """Re-asks one case on one replica; advances its generation only after a complete answer."""
        restricted = SINCE_GENERATION_FEATURE in description.features
        since = seen if restricted and seen is not None and 0 < seen <= description.generation else 0
        size = description.max_items_per_request or 20_000
        generations = []
        async with self._slots:  # one case's digests in memory per slot, read when its turn comes
            if replica.name in report.refused:
                return
            watched = self._cases.watched(case)
            for start in range(0, len(watched), size):
                batch = watched[start:start + size]
                items: Sequence[QueryItem] = [w.item for w in batch]
                try:
                    answer = await self._client.match(replica, items, since, case)
                except CallFailed as exc:
                    report.failures.append(f"{replica.name}: case {case}: {exc}")
                    if exc.refused:
                        report.refused.add(replica.name)
                    log.warning("re-ask failed", extra={"node": replica.name, "case": case, "reason": str(exc),
                                                        "skipped_this_round": exc.refused})
                    return
                report.queries += 1
                report.items += len(items)
                generation = answer.generation if restricted else description.generation
                generations.append(generation)
                for result in answer.results:
                    for hit in result.hits:
                        self._alert(case, batch[result.item], hit, generation, report)
        if generations:
            self._cases.asked(case, replica.node.node_id, replica.address, min(generations))

    def _alert(self, case: str, watched: Watched, hit: pb.Hit, generation: int, report: RoundReport) -> None:
        if self._outbox.add(alert_key(case, hit.node_id, hit.reference), _event(case, watched, hit, generation)):
            report.alerts += 1
            # The gateway's own log: the case and what to follow up, never the digest.
            log.warning("standing query hit", extra={
                "case": case, "node": hit.node_id, "country": hit.country, "reference": hit.reference,
                "contact": hit.contact, "source": watched.source})


async def serve(watcher: Watcher, outbox: Outbox, interval: float, *, once: bool = False,
                deliver: bool = False) -> int:
    """Rounds every ``interval`` seconds until SIGTERM or SIGINT (or one round with ``once``),
    delivering alerts to the webhook meanwhile when ``deliver``. 0 when stopped cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    delivery = asyncio.create_task(outbox.deliver_forever(stop)) if deliver and not once else None
    log.warning("watching", extra={"interval_s": interval})
    try:
        while not stop.is_set():
            started = time.monotonic()
            current = asyncio.create_task(watcher.round())
            stopping = asyncio.create_task(stop.wait())
            await asyncio.wait({current, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not current.done():
                current.cancel()  # safe: alerts are durable, generations advance only on complete answers
                with contextlib.suppress(asyncio.CancelledError):
                    await current
                break
            report = current.result()
            log.info("round done", extra={
                "cases": report.cases, "described": report.described, "changed": report.changed,
                "queries": report.queries, "items": report.items, "alerts": report.alerts,
                "failures": len(report.failures), "refused_by": sorted(report.refused),
                "ms": round((time.monotonic() - started) * 1000, 1)})
            if once:
                if deliver:
                    await outbox.deliver_due()
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, interval - (time.monotonic() - started)))
    finally:
        stop.set()
        if delivery is not None:
            await delivery
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0
