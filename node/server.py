"""Runs a node: mutual-TLS gRPC server over the store, until SIGTERM/SIGINT.

The composition root: opens the store (mapping its segments: no rebuild) and
the audit log (its own file), compiles the search kernels, starts watching
the store and merging small segments in the background, then says it is
ready (ready file, systemd notify).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import socket
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from federation import tls
from federation.files import atomic_write_text
from federation.outbox import Outbox
from federation.wire import SERVICE_NAME
from node import db as sqlite_setup, private_key, private_view, readiness, reflection
from node.alerts import Alerts, open_outbox
from node.audit import AuditLog, audit_path
from node.auth import Authenticator
from node.config import NodeConfig, StoreSettings
from node.live_index import LiveIndexes
from node.merge import MergePolicy, merge
from node.metadata_limits import MetadataLimits
from node.metrics import NodeMetrics
from node.policy import Admission
from node.private_builder import PrivateBuilder
from node.private_service import PrivateMode, PrivateService, handlers as private_handlers
from node.segment_set import SegmentSet
from node.service import NodeService, handlers
from node.store import Store

log = logging.getLogger("icse.node")

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 8 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    # Generous, so that an excess of metadata reaches metadata_limits.MetadataLimits and is refused in words;
    # beyond this gRPC refuses it itself (RESOURCE_EXHAUSTED, its message possibly empty).
    ("grpc.max_metadata_size", 128 * 1024),
    ("grpc.absolute_max_metadata_size", 128 * 1024),
    ("grpc.so_reuseport", 0),
]
GRACE_SECONDS = 5.0
# Allocations between young-generation collections (Python: 700), and the older generations' ratios.
GC_THRESHOLDS = (50_000, 20, 20)


def bind_failure(address: str) -> str:
    """Why ``address`` ("host:port", "[v6]:port") cannot be listened on, in words,
    found by binding a plain socket there the way gRPC does (SO_REUSEADDR);
    called only after gRPC failed to bind, which reports no reason."""
    host, _, port = address.rpartition(":")
    try:
        candidates = socket.getaddrinfo(host.strip("[]") or None, int(port), type=socket.SOCK_STREAM,
                                        flags=socket.AI_PASSIVE)
    except (socket.gaierror, ValueError) as exc:
        return f"not a listening address ({exc})"
    reasons = []
    for family, kind, proto, _, where in candidates:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(where)
            except OSError as exc:
                reasons.append((exc.strerror or str(exc)).lower())
    return reasons[0] if reasons else "gRPC could not bind it (set GRPC_VERBOSITY=debug for its reason)"


def _write_ready(path: Path, config: NodeConfig, port: int, metrics_port: int | None) -> None:
    """Atomically tells a supervisor (tests, demo) the bound ports."""
    atomic_write_text(path, json.dumps({"node_id": config.node_id, "port": port, "metrics_port": metrics_port,
                                        "pid": os.getpid()}))


class Merger:
    """Merges small segments in the background when the policy says so: one merge
    at a time, never inside a query; queries go on against the old segments."""

    def __init__(self, path: Path, policy: MergePolicy):
        self._path = path
        self._policy = policy
        self._task: asyncio.Task[None] | None = None

    def consider(self, live: SegmentSet) -> None:
        chosen = self._policy.pick(live)
        if chosen and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._run(chosen))

    async def _run(self, chosen: list[int]) -> None:
        try:
            # A connection of its own: its transactions never interleave with the watcher's reads.
            async with await Store.open(self._path) as store:
                await merge(store, chosen)
        except Exception:
            log.exception("background merge failed; the segments stay as they were")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


async def serve(config: NodeConfig, ready_file: Path | None = None) -> None:
    assert config.tls is not None and config.gateway_keys is not None
    settings: StoreSettings = config.store_settings
    store = await Store.open(config.store)
    audit_db = await sqlite_setup.connect(audit_path(config.store))
    indexes = LiveIndexes(store, settings.poll_seconds)
    merger = Merger(config.store, MergePolicy(settings.merge_above, settings.small_segment_rows))
    outbox: Outbox | None = None
    stop_alerts = asyncio.Event()
    delivering: asyncio.Task[None] | None = None
    private = PrivateMode(config.private, config.store)
    builder = PrivateBuilder(config.store) if config.private.enabled else None
    try:
        outbox = open_outbox(config.store, config.alerts)
        if builder is not None:  # the OPRF key exists before any import or merge of this run computes outputs
            keys, created = await asyncio.to_thread(private_key.init, config.store)
            log.info("private matching enabled", extra={"key_id": keys.active_id, "key_created": created,
                                                        "prefix_bits": config.private.prefix_bits})
        loaded = await indexes.start()
        await asyncio.to_thread(readiness.warm_up)
        if builder is not None:
            await asyncio.to_thread(private_view.warm_up)
        indexes.on_change.append(merger.consider)
        merger.consider(loaded)
        if builder is not None:
            indexes.on_change.append(builder.consider)
            builder.start(loaded)
        auth = Authenticator(config.node_id, config.federation, config.gateway_keys, config.trusted_gateways)
        audit = await AuditLog.open(audit_db)
        metrics = NodeMetrics()
        metrics.serving(loaded.generation, loaded.counts())
        metrics_server = metrics.serve(config.metrics_listen) if config.metrics_listen else None
        alerts = Alerts(outbox, config.alerts, config.node_id, config.country, metrics.registry)
        # Alerts recorded by an earlier run and not yet delivered go first, before anything new.
        delivering = asyncio.get_running_loop().create_task(alerts.deliver_forever(stop_alerts))
        service = NodeService(config, indexes, auth, Admission(config.policy), audit, metrics, alerts)
        service.private_info = private.info
        server = grpc.aio.server(options=SERVER_OPTIONS, maximum_concurrent_rpcs=config.max_concurrent,
                                 interceptors=(MetadataLimits(service),))
        private_service = PrivateService(service, private, config)
        server.add_generic_rpc_handlers((handlers(service), private_handlers(private_service)))
        checks = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(checks, server)
        reflection.enable(server, (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name))
        try:
            port = server.add_secure_port(config.listen, tls.server_credentials(config.tls))
        except RuntimeError:  # grpc says only "Failed to bind"; the reason is found by trying
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {config.listen}: {bind_failure(config.listen)}")
        await server.start()
        for name in ("", SERVICE_NAME):
            await checks.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("serving", extra={"node": config.node_id, "node_country": config.country, "port": port,
                                   "hashes": sum(loaded.counts().values()), "generation": loaded.generation,
                                   "segments": len(loaded.segments)})
        if ready_file is not None:
            _write_ready(ready_file, config, port, metrics_server.server_port if metrics_server else None)
        # What is loaded now lives as long as the node: out of the collector's sight (freeze), and
        # collections far apart, so that the thousands of objects of a batch's hits do not make
        # each answer pay full collections of everything (a third of a 5,000-hit answer's time).
        gc.freeze()
        gc.set_threshold(*GC_THRESHOLDS)
        readiness.notify("READY=1")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        readiness.notify("STOPPING=1")
        log.info("stopping: finishing in-flight calls", extra={"node": config.node_id, "grace_s": GRACE_SECONDS})
        await checks.enter_graceful_shutdown()
        await server.stop(GRACE_SECONDS)
        if metrics_server is not None:
            metrics_server.shutdown()
    finally:
        stop_alerts.set()
        if delivering is not None:
            # Stops between deliveries: one in flight finishes (within the webhook's timeout);
            # one not acknowledged is sent again at the next start.
            with contextlib.suppress(Exception):
                await delivering
        if outbox is not None:
            outbox.close()
        if builder is not None:
            await builder.stop()
        await merger.stop()
        await indexes.stop()
        await audit_db.close()
        await store.close()
    log.info("stopped", extra={"node": config.node_id})
