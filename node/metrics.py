"""Prometheus metrics of a node: what it was asked, what it answered, how fast.

Served over plain HTTP on their own address (``[metrics] listen``): they hold
counts and timings only — never digests, references, officers or cases.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from federation import algorithms

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class NodeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("icse_node_requests", "Calls answered or refused, by method and gRPC status",
                                ["rpc", "status"], registry=self.registry)
        self.items = Counter("icse_node_items", "Query items received, by algorithm", ["algorithm"],
                             registry=self.registry)
        self.hits = Counter("icse_node_hits", "Hits released", registry=self.registry)
        self.refusals = Counter("icse_node_refusals", "Calls refused, by gRPC status", ["reason"],
                                registry=self.registry)
        self.latency = Histogram("icse_node_request_seconds", "Time to answer a call", ["rpc"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.index_size = Gauge("icse_node_index_hashes", "Hashes in the in-memory index, by algorithm",
                                ["algorithm"], registry=self.registry)
        self.generation = Gauge("icse_node_store_generation", "Generation of the hash set being served",
                                registry=self.registry)
        self._known = set(algorithms.names())

    def answered(self, rpc: str, items: Mapping[str, int], hits: int, seconds: float) -> None:
        """``items``: how many query items of each algorithm the call carried."""
        self.requests.labels(rpc, "OK").inc()
        for name, count in items.items():
            self.items.labels(name if name in self._known else "other").inc(count)
        self.hits.inc(hits)
        self.latency.labels(rpc).observe(seconds)

    def refused(self, rpc: str, status: str, seconds: float) -> None:
        self.requests.labels(rpc, status).inc()
        self.refusals.labels(status).inc()
        self.latency.labels(rpc).observe(seconds)

    def serving(self, generation: int, counts: dict[str, int]) -> None:
        self.generation.set(generation)
        for name in algorithms.names():
            self.index_size.labels(name).set(counts.get(name, 0))

    def serve(self, listen: str):
        """Starts the /metrics HTTP endpoint; returns the server (for shutdown)."""
        host, _, port = listen.rpartition(":")
        server, _thread = start_http_server(int(port), addr=host or "127.0.0.1", registry=self.registry)
        return server
