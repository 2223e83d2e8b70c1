"""``icse-node describe``: what an on-call operator asks first about a node.

Read from the node's own files (configuration, store, audit log) and a probe
of its listening port, so it works with no federation certificate at hand.
"""

from __future__ import annotations

import json
import socket
from dataclasses import asdict, dataclass

import federation
from federation import oprf
from node import private_key, private_view
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
    private: PrivateDescription | None = None


@dataclass(frozen=True)
class PrivateDescription:
    """Private exact matching: the bucket prefix, the key, and the anonymity set."""

    enabled: bool
    prefix_bits: int
    output_bytes: int
    key_id: str | None  # None: no key yet
    next_key_id: str | None  # a rotation under way
    stored: int  # exact digests held
    covered: int  # of which have outputs under the active key
    anonymity_set: float  # covered / 2^prefix_bits: digests sharing one item's bucket
    encoding: str = "elias-fano"
    fingerprint_bits: int = 0  # of each bucket entry, at this anonymity set
    false_candidate_rate: float = 0.0  # anonymity_set / 2^fingerprint_bits


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
        live = await store.snapshot()
        counts = live.counts()
        generation = await store.generation()
    keys = private_key.load(config.store)
    view = private_view.build(live, keys) if keys is not None else None
    bits = config.private.prefix_bits
    mean = private_view.mean_bucket_size(view.covered if view else 0, bits)
    fingerprint = config.private.bits(mean)
    private = PrivateDescription(
        enabled=config.private.enabled, prefix_bits=bits, output_bytes=config.private.output_bytes,
        key_id=keys.active_id if keys else None,
        next_key_id=oprf.key_id(keys.next) if keys and keys.next else None,
        stored=sum(n for a, n in counts.items() if a in private_view.EXACT),
        covered=view.covered if view else 0, anonymity_set=mean, encoding=config.private.encoding,
        fingerprint_bits=fingerprint, false_candidate_rate=mean / 2.0 ** fingerprint)
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
        private=private,
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
    private = description.private
    if private is not None:
        mode = "enabled" if private.enabled else "disabled"
        lines.append(f"  private matching: {mode}, prefix {private.prefix_bits} bits, buckets {private.encoding} "
                     f"with {private.fingerprint_bits}-bit fingerprints, key id {private.key_id or 'none yet'}"
                     + (f" (rotating to {private.next_key_id})" if private.next_key_id else ""))
        lines.append(f"    anonymity set: {private.anonymity_set:,.1f} digests per bucket "
                     f"({private.covered:,} of {private.stored:,} exact digests covered / 2^{private.prefix_bits}); "
                     f"a digest not held is a false candidate (disclosed) with chance "
                     f"{private.false_candidate_rate:.1e} per item")
    return "\n".join(lines)
