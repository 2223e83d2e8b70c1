"""Prometheus metrics of the gateway: queries, and each node as the gateway sees it.

The gateway CLI is a batch job, so it writes them in the text format for the
node exporter's textfile collector (``--metrics-file``); a long-running
process embedding ``Federation`` can serve ``registry`` instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, write_to_textfile

from gateway.results import NodeAnswer

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.queries = Counter("icse_gateway_queries", "Federated queries sent", registry=self.registry)
        self.items = Counter("icse_gateway_items", "Query items sent (per query, not per node)",
                             registry=self.registry)
        self.hits = Counter("icse_gateway_hits", "Hits received from nodes", registry=self.registry)
        self.partial = Counter("icse_gateway_partial_answers", "Queries some node did not answer",
                               registry=self.registry)
        self.node_status = Counter("icse_gateway_node_answers", "Per-node outcomes", ["node", "status"],
                                   registry=self.registry)
        self.node_latency = Histogram("icse_gateway_node_latency_seconds", "Per-node call latency seen by the gateway",
                                      ["node"], buckets=_LATENCY_BUCKETS, registry=self.registry)

    def record(self, items: int, answers: Sequence[NodeAnswer]) -> None:
        self.queries.inc()
        self.items.inc(items)
        if any(not a.status.answered for a in answers):
            self.partial.inc()
        for answer in answers:
            self.node_status.labels(answer.node_id, answer.status.value).inc()
            self.hits.inc(sum(len(h) for h in answer.hits))
            if answer.status.answered:
                self.node_latency.labels(answer.node_id).observe(answer.latency_ms / 1000)

    def write(self, path: Path) -> None:
        write_to_textfile(str(path), self.registry)
