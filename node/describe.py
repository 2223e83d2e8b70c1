"""``icse-node describe``: what an on-call operator asks first about a node.

Read from the node's own files (configuration, store, audit log) and a probe
of its listening port, so it works with no federation certificate at hand.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass

import federation
from node.audit import AuditLog, audit_path, connect
from node.config import NodeConfig
from node.store import Store


@dataclass(frozen=True)
class Description:
    node_id: str
    country: str
    software_version: str
    listen: str
    listening: bool | None  # None: the port is chosen at start (":0")
    store: str
    store_bytes: int
    generation: int
    counts: dict[str, int]
    audit_records_head: int | None
    audit_head_hash: str | None


def _listening(listen: str) -> bool | None:
    host, _, port = listen.rpartition(":")
    if not port.isdigit() or int(port) == 0:
        return None
    host = {"0.0.0.0": "127.0.0.1", "[::]": "::1", "": "127.0.0.1"}.get(host, host).strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=1.0):
            return True
    except OSError:
        return False


async def describe(config: NodeConfig) -> Description:
    async with await Store.open(config.store) as store:
        counts = await store.counts()
        generation = await store.generation()
    audit = await connect(audit_path(config.store))
    try:
        head = await (await AuditLog.open(audit)).head()
    finally:
        await audit.close()
    size = sum(p.stat().st_size for p in config.store.parent.glob(config.store.name + "*") if p.is_file())
    size += sum(p.stat().st_size for p in store.root.rglob("*") if p.is_file())
    return Description(
        node_id=config.node_id,
        country=config.country,
        software_version=federation.__version__,
        listen=config.listen,
        listening=_listening(config.listen),
        store=str(config.store),
        store_bytes=size,
        generation=generation,
        counts=counts,
        audit_records_head=head[0] if head else None,
        audit_head_hash=head[1] if head else None,
    )


def render(description: Description, format_name: str) -> str:
    if format_name == "json":
        return json.dumps(asdict(description), indent=2)
    state = {True: "yes", False: "NO — nothing answers on that port", None: "unknown (port chosen at start)"}
    lines = [
        f"node {description.node_id} ({description.country}), software {description.software_version}",
        f"  listening on {description.listen}: {state[description.listening]}",
        f"  store {description.store} ({description.store_bytes:,} bytes), generation {description.generation}",
        "  hashes: " + (", ".join(f"{a} {n:,}" for a, n in description.counts.items()) or "none"),
        f"  audit head: seq {description.audit_records_head} hash {description.audit_head_hash}"
        if description.audit_records_head is not None else "  audit: empty",
    ]
    return "\n".join(lines)
