"""Private exact matching against a real node over real mutual TLS.

The test plays the gateway's part with its own few lines (blind, sign a token
over the private ``qh``, unblind, test bucket membership, disclose) and then
spies on the node: every file under the node's directory (catalog, segments,
key file, audit log and its WAL, the node's log) is searched for the digests
it was asked about. The spy is checked too: it finds a digest the node holds
in the node's segment files, so "absent" means absent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import random
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np
import pytest

from federation import buckets, oprf, tokens
from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from federation.query import (
    DiscloseItem,
    PrivateGroup,
    PrivateItem,
    PrivateRequest,
    disclose_sha256,
    private_match_sha256,
    private_request,
)
from federation.wire import SERVICE_NAME, disclose_to_pb, pb, private_request_to_pb, rpc
from node.audit import audit_path
from tests.conftest import RunningFederation
from tests.support import Client, claims_for, gateway_client, signing_key, wait_until_async

NODE = "NL"
BITS = 8
QUOTA = 2_000  # items per officer per day on the private node


@dataclasses.dataclass
class PrivateNode:
    local: LocalFederation
    held: list[tuple[str, bytes, str]]  # (algorithm, digest, reference)

    @property
    def node(self):
        return self.local[NODE]

    def client(self) -> Client:
        return gateway_client(self.local.pki, self.node.address, NODE)


def _rows(rng: random.Random, count: int, prefix: str) -> list[tuple[str, bytes, str]]:
    sizes = {"md5": 16, "sha1": 20, "sha256": 32}
    rows = []
    for i in range(count):
        algorithm = rng.choice(sorted(sizes))
        rows.append((algorithm, rng.randbytes(sizes[algorithm]), f"{prefix}-{i}"))
    return rows


def _write_csv(path: Path, rows: Sequence[tuple[str, bytes, str]]) -> Path:
    lines = ["algo,digest,reference,category,victim_identified,series"]
    lines += [f"{a},{d.hex()},{r},2,true,S-PRIV" for a, d, r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def private_node(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateNode]:
    workdir = tmp_path_factory.mktemp("private")
    spec = NodeSpec(NODE, NODE, "desk@police.example.nl", tables={
        "private": {"enabled": True, "prefix_bits": BITS, "encoding": "fixed", "output_bytes": 8},
        "policy": {"items_per_day": QUOTA}})
    local = LocalFederation(workdir, pki, [spec])
    held = _rows(random.Random(14), 300, "NL-PRIV")
    # Imported before the node ever started: no key yet, so the serving node computes the outputs.
    done = local[NODE].import_file(_write_csv(workdir / "first.csv", held[:200]))
    assert done.returncode == 0, done.stdout + done.stderr
    with local:
        # Imported while serving: the key exists, the outputs are computed by the import.
        done = local[NODE].import_file(_write_csv(workdir / "second.csv", held[200:]))
        assert done.returncode == 0, done.stdout + done.stderr
        yield PrivateNode(local, held)


def _token(pki: DevPki, rpc_name: str, qh: str, subject: str = "officer-1") -> str:
    claims = dataclasses.replace(claims_for(pki, NODE, [], rpc_name=rpc_name, subject=subject), query_sha256=qh)
    return signing_key(pki).sign(claims)


async def _describe(client: Client, pki: DevPki) -> pb.DescribeResponse:
    async with client.channel() as channel:
        token = signing_key(pki).sign(claims_for(pki, NODE, [], rpc_name="Describe"))
        return await rpc.NodeStub(channel).Describe(pb.DescribeRequest(), timeout=10,
                                                    metadata=tokens.bearer(token))


async def _covered(client: Client, pki: DevPki) -> pb.DescribeResponse | None:
    described = await _describe(client, pki)
    info = described.private_exact
    return described if info.stored and info.covered == info.stored else None


@dataclasses.dataclass
class Asked:
    inputs: list[bytes]
    blinds: list[bytes]
    items: list[PrivateItem]


def _ask(digests: Sequence[tuple[str, bytes]], bits: int = BITS) -> Asked:
    inputs = [oprf.digest_input(a, d) for a, d in digests]
    blinded = [oprf.blind(data) for data in inputs]
    items = [PrivateItem(a, oprf.bucket_of(data, bits), bits, element)
             for (a, _), data, (_, element) in zip(digests, inputs, blinded, strict=True)]
    return Asked(inputs, [b for b, _ in blinded], items)


async def _private_match(client: Client, pki: DevPki, items: Sequence[PrivateItem] | PrivateRequest, *,
                         token: str | None = None, subject: str = "officer-1") -> pb.PrivateMatchResponse:
    request = items if isinstance(items, PrivateRequest) else private_request(items)
    token = token or _token(pki, "PrivateMatch", private_match_sha256(request), subject)
    async with client.channel() as channel:
        return await rpc.NodeStub(channel).PrivateMatch(private_request_to_pb(request), timeout=30,
                                                        metadata=tokens.bearer(token))


async def _disclose(client: Client, pki: DevPki, key_id: str, items: Sequence[DiscloseItem]) -> pb.DiscloseResponse:
    token = _token(pki, "Disclose", disclose_sha256(key_id, items))
    async with client.channel() as channel:
        return await rpc.NodeStub(channel).Disclose(disclose_to_pb(key_id, items), timeout=30,
                                                    metadata=tokens.bearer(token))


def _found(asked: Asked, response: pb.PrivateMatchResponse) -> list[bytes | None]:
    """The gateway's local membership test: the full output if its fingerprint is in the bucket."""
    evaluated = response.evaluated_elements
    outputs = [oprf.finalize(data, blind, evaluated[32 * i:32 * i + 32])
               for i, (data, blind) in enumerate(zip(asked.inputs, asked.blinds, strict=True))]
    distinct, which = buckets.distinct(np.array([i.bucket for i in asked.items], dtype=np.int64))
    members = buckets.members(response.bucket_answers, which, len(distinct), response.bucket_encoding,
                              response.fingerprint_bits, outputs)
    return [output if member else None for output, member in zip(outputs, members.tolist(), strict=True)]


async def _node_cli(config: Path, command: str, *args: str) -> str:
    """``icse-node COMMAND --config CONFIG ARGS`` (off the event loop); its standard output."""
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "node.cli", command, "--config",
                                                    str(config), *args],
                                   capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _audit(node) -> list[dict]:
    with sqlite3.connect(f"file:{audit_path(node.store_path)}?mode=ro", uri=True) as db:
        return [json.loads(row[0]) for row in db.execute("SELECT entry FROM audit ORDER BY seq")]


def _memory_spy(pid: int, digests: Sequence[bytes]) -> list[str]:
    """Which digests (raw, lower or upper hex) the live process holds anywhere in its readable memory."""
    forms = {form: digest.hex()[:12] for digest in digests
             for form in (digest, digest.hex().encode(), digest.hex().upper().encode())}
    seen = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as memory:
        for line in maps:
            span, permissions = line.split()[:2]
            if not permissions.startswith("r"):
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                memory.seek(start)
                data = memory.read(end - start)
            except (OSError, OverflowError, ValueError):  # [vvar] and the like cannot be read
                continue
            seen.update(name for form, name in forms.items() if data and form in data)
    return sorted(seen)


def _spy(directory: Path, digests: Sequence[bytes]) -> list[str]:
    """Every (file, form) where one of the digests appears: raw bytes, lower or upper hex."""
    seen = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        data = path.read_bytes()
        for digest in digests:
            for form in (digest, digest.hex().encode(), digest.hex().upper().encode()):
                if form in data:
                    seen.append(f"{path.relative_to(directory)}: {form[:12]!r}")
    return seen


async def test_describe_offers_private_matching_and_covers_every_exact_digest(private_node: PrivateNode) -> None:
    pki = private_node.local.pki
    described = await wait_until_async(lambda: _covered(private_node.client(), pki), 60,
                                       "every exact digest has an OPRF output", interval=0.2)
    assert isinstance(described, pb.DescribeResponse)
    assert "private.exact.v2" in described.features
    info = described.private_exact
    assert (info.suite, info.prefix_bits, info.output_bytes) == ("ristretto255-SHA512", BITS, 8)
    assert (info.bucket_encoding, info.fingerprint_bits) == (pb.PRIVATE_BUCKET_ENCODING_FIXED, 64)
    assert len(info.key_id) == 16 and info.stored == len(private_node.held) == info.covered
    assert info.mean_bucket_size == pytest.approx(len(private_node.held) / 2**BITS)
    assert sorted(info.algorithms) == ["md5", "sha1", "sha256"]
    # The operator's view: prefix bits, key id and anonymity set.
    shown = await _node_cli(private_node.node.config_path, "describe")
    assert f"prefix {BITS} bits" in shown and f"key id {info.key_id}" in shown
    assert f"anonymity set: {len(private_node.held) / 2**BITS:,.1f} digests per bucket" in shown


async def test_membership_is_decided_by_the_gateway_and_the_node_keeps_no_trace(private_node: PrivateNode) -> None:
    pki, node = private_node.local.pki, private_node.node
    await wait_until_async(lambda: _covered(private_node.client(), pki), 60, "outputs computed", interval=0.2)
    rng = random.Random(99)
    held = private_node.held[::37]
    absent = [(a, rng.randbytes(len(d))) for a, d, _ in private_node.held[:40]]
    asked = _ask([(a, d) for a, d, _ in held] + absent)
    audit_before = len(_audit(node))
    response = await _private_match(private_node.client(), pki, asked.items)
    assert len(response.evaluated_elements) == 32 * len(asked.items) and response.prefix_bits == BITS
    assert (response.bucket_encoding, response.output_bytes, response.fingerprint_bits) == (
        pb.PRIVATE_BUCKET_ENCODING_FIXED, 8, 64)
    found = _found(asked, response)
    assert all(found[:len(held)]), "every held digest is found by the gateway"
    assert not any(found[len(held):]), "no absent digest is found"

    # The node's record of the call: counts only, no hit known, no reference.
    records = _audit(node)[audit_before:]
    assert [(r["rpc"], r["items"], r["hits"], r["references"], r["status"]) for r in records] == [
        ("PrivateMatch", len(asked.items), 0, [], "OK")]
    # The spy: no asked digest (held or not) anywhere in the node's files, log or audit...
    asked_digests = [d for _, d, _ in held] + [d for _, d in absent]
    assert _spy(node.dir, [d for _, d in absent]) == []
    assert [s for s in _spy(node.dir, asked_digests) if not s.startswith("store.sqlite.segments/")] == []
    # ... and it would see one: the held digests are in the segments (and the imported files).
    assert any(s.startswith("store.sqlite.segments/") for s in _spy(node.dir, [held[0][1]]))
    assert "PrivateMatch" in node.log_path.read_text()  # the log file is the one the node writes
    # The node process's memory holds none of the absent digests either (the first eight: a scan of
    # its whole memory per digest form is slow), and would show a held one (its arrays are mapped).
    pid = json.loads(node.ready_path.read_text())["pid"]
    assert _memory_spy(pid, [held[0][1]] + [d for _, d in absent[:8]]) == [held[0][1].hex()[:12]]

    # Step 2: the proofs of the hits release them, and only now are they audited as hits.
    proofs = [DiscloseItem(a, out) for (a, _, _), out in zip(held, found, strict=False) if out is not None]
    disclosed = await _disclose(private_node.client(), pki, response.key_id, proofs)
    assert [r.item for r in disclosed.results] == list(range(len(held)))
    assert [r.hits[0].reference for r in disclosed.results] == [ref for _, _, ref in held]
    first = disclosed.results[0].hits[0]
    assert (first.country, first.contact, first.series, first.victim_identified) == (
        NODE, "desk@police.example.nl", "S-PRIV", True)
    record = _audit(node)[-1]
    assert (record["rpc"], record["hits"], record["references"]) == ("Disclose", len(held), [r for _, _, r in held])


async def test_a_forged_proof_gets_nothing(private_node: PrivateNode) -> None:
    pki = private_node.local.pki
    algorithm, digest, _ = private_node.held[3]
    asked = _ask([(algorithm, digest)])
    response = await _private_match(private_node.client(), pki, asked.items)
    (real,) = _found(asked, response)
    assert real is not None
    rng = random.Random(5)
    forged = [DiscloseItem(algorithm, rng.randbytes(64)),  # random bytes
              DiscloseItem(algorithm, real[:63] + bytes([(real[63] + 1) % 256])),  # beside a real proof ...
              DiscloseItem(algorithm, real[:63] + bytes([(real[63] - 1) % 256])),  # ... on either side
              DiscloseItem("sha256" if algorithm != "sha256" else "md5", real),  # a real proof, another algorithm
              DiscloseItem(algorithm, oprf.evaluate(oprf.generate_key(), oprf.digest_input(algorithm, digest)))]
    before = len(_audit(private_node.node))
    disclosed = await _disclose(private_node.client(), pki, response.key_id, forged)
    assert list(disclosed.results) == []
    (record,) = _audit(private_node.node)[before:]
    assert (record["rpc"], record["items"], record["hits"], record["references"]) == ("Disclose", 5, 0, [])
    # The real proof, for contrast, releases the hit.
    assert len((await _disclose(private_node.client(), pki, response.key_id,
                                [DiscloseItem(algorithm, real)])).results) == 1


async def _refusal(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_private_requests_are_validated_and_authenticated(private_node: PrivateNode) -> None:
    pki, client = private_node.local.pki, private_node.client()
    good = _ask([("sha256", bytes(32))]).items[0]
    cases = [
        ([good._replace(prefix_bits=16)], grpc.StatusCode.INVALID_ARGUMENT, "this node's buckets have 8 bits"),
        (PrivateRequest(BITS, (PrivateGroup("sha256", b"\x01\x02", good.blinded),)),
         grpc.StatusCode.INVALID_ARGUMENT, "2 buckets but 32 bytes of blinded elements"),
        (PrivateRequest(BITS, (PrivateGroup("sha256", b"", b""),)), grpc.StatusCode.INVALID_ARGUMENT, "no items"),
        ([good, good._replace(blinded=bytes(32))], grpc.StatusCode.INVALID_ARGUMENT,
         "item 1: blinded element is not a valid ristretto255 element"),
        ([good._replace(blinded=b"\x01" * 31)], grpc.StatusCode.INVALID_ARGUMENT, "31 bytes"),
        ([good, good._replace(algorithm="pdq")], grpc.StatusCode.INVALID_ARGUMENT, "group 1: algorithm 'pdq'"),
        (PrivateRequest(BITS, ()), grpc.StatusCode.INVALID_ARGUMENT, "no items"),
    ]
    for items, code, message in cases:
        error = await _refusal(_private_match(client, pki, items))
        assert (error.code(), message in (error.details() or "")) == (code, True), error.details()
    # A token for other items, or for another RPC, does not open PrivateMatch.
    other = _ask([("sha256", bytes(range(32)))]).items
    error = await _refusal(_private_match(client, pki, [good], token=_token(pki, "PrivateMatch",
                                                                           private_match_sha256(
                                                                               private_request(other)))))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "differ" in (error.details() or "")
    error = await _refusal(_private_match(client, pki, [good], token=_token(pki, "Match",
                                                                           private_match_sha256(
                                                                               private_request([good])))))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "not 'PrivateMatch'" in (error.details() or "")
    # Disclose: a key id the node does not hold, and a proof of the wrong size.
    error = await _refusal(_disclose(client, pki, "0" * 16, [DiscloseItem("sha256", bytes(64))]))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "ask PrivateMatch again" in (error.details() or "")
    described = await _describe(client, pki)
    error = await _refusal(_disclose(client, pki, described.private_exact.key_id, [DiscloseItem("sha256", bytes(32))]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "64-byte" in (error.details() or "")


async def test_quota_counts_private_items(private_node: PrivateNode) -> None:
    pki = private_node.local.pki
    items = _ask([("md5", bytes(16))]).items * (QUOTA + 1)
    error = await _refusal(_private_match(private_node.client(), pki, items, subject="quota-officer"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "daily quota" in (error.details() or "")
    response = await _private_match(private_node.client(), pki, items[:QUOTA], subject="quota-officer")
    assert len(response.evaluated_elements) == 32 * QUOTA
    error = await _refusal(_private_match(private_node.client(), pki, items[:1], subject="quota-officer"))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_node_without_private_mode_says_so(federation: RunningFederation) -> None:
    pki, node = federation.local.pki, federation.local["FR"]
    client = gateway_client(pki, node.address, "FR")
    request = private_request(_ask([("sha256", bytes(32))], bits=16).items)
    claims = dataclasses.replace(claims_for(pki, "FR", [], rpc_name="PrivateMatch"),
                                 query_sha256=private_match_sha256(request))
    async with client.channel() as channel:
        stub = rpc.NodeStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.PrivateMatch(private_request_to_pb(request), timeout=10,
                                    metadata=tokens.bearer(signing_key(pki).sign(claims)))
        token = signing_key(pki).sign(claims_for(pki, "FR", [], rpc_name="Describe"))
        described = await stub.Describe(pb.DescribeRequest(), timeout=10, metadata=tokens.bearer(token))
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "private.exact.v2" in (caught.value.details() or "")
    assert "private.exact.v2" not in described.features and not described.HasField("private_exact")


async def test_key_rotation_recomputes_outputs_while_queries_go_on(pki: DevPki,
                                                                   tmp_path: Path) -> None:
    spec = NodeSpec(NODE, NODE, tables={"private": {"enabled": True, "prefix_bits": BITS, "encoding": "elias-fano",
                                                    "fingerprint_bits": 20}})
    local = LocalFederation(tmp_path, pki, [spec])
    held = _rows(random.Random(3), 120, "ROT")
    assert local[NODE].import_file(_write_csv(tmp_path / "rows.csv", held)).returncode == 0
    with local:
        client = gateway_client(pki, local[NODE].address, NODE)
        first = await wait_until_async(lambda: _covered(client, pki), 60, "outputs computed", interval=0.2)
        assert isinstance(first, pb.DescribeResponse)
        old_key = first.private_exact.key_id
        assert (first.private_exact.bucket_encoding, first.private_exact.fingerprint_bits,
                first.private_exact.output_bytes) == (pb.PRIVATE_BUCKET_ENCODING_ELIAS_FANO, 20, 0)
        asked = _ask([(a, d) for a, d, _ in held[:3]])
        before = await _private_match(client, pki, asked.items)
        old_proofs = _found(asked, before)
        assert before.key_id == old_key and all(old_proofs)
        rotated = json.loads(await _node_cli(local[NODE].config_path, "private-key", "rotate", "--format", "json"))
        assert rotated["active"] == old_key and rotated["next"] not in (None, old_key)

        async def switched() -> pb.DescribeResponse | None:
            described = await _describe(client, pki)
            return described if described.private_exact.key_id == rotated["next"] else None

        after_switch = await wait_until_async(switched, 60, "the node answers under the new key", interval=0.2)
        assert isinstance(after_switch, pb.DescribeResponse)
        assert after_switch.private_exact.covered == after_switch.private_exact.stored == len(held)
        asked = _ask([(a, d) for a, d, _ in held[:3]])
        after = await _private_match(client, pki, asked.items)
        new_proofs = _found(asked, after)
        assert after.key_id == rotated["next"] and all(new_proofs) and new_proofs != old_proofs
        # A gateway that proved its hits under the previous key still gets them.
        items = [DiscloseItem(a, p) for (a, _, _), p in zip(held[:3], old_proofs, strict=True) if p is not None]
        disclosed = await _disclose(client, pki, old_key, items)
        assert [r.hits[0].reference for r in disclosed.results] == [ref for _, _, ref in held[:3]]
        key_file = json.loads((local[NODE].store_path.with_name("store.sqlite.oprf-key")).read_text())
        assert set(key_file) == {"active", "next", "previous"} and key_file["next"] is None
        mode = (local[NODE].store_path.with_name("store.sqlite.oprf-key")).stat().st_mode & 0o777
        assert mode == 0o600
        assert key_file["active"] not in local[NODE].log_path.read_text()

        # A damaged key file: Describe goes on (without private matching), PrivateMatch says why.
        local[NODE].store_path.with_name("store.sqlite.oprf-key").write_text("{not json")
        described = await _describe(client, pki)
        assert not described.HasField("private_exact") and "private.exact.v2" not in described.features
        error = await _refusal(_private_match(client, pki, asked.items))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "key file is damaged" in (error.details() or "")
        assert "{not json" not in local[NODE].log_path.read_text()


def _v1_request(item: PrivateItem) -> tuple[bytes, str]:
    """A request in the withdrawn per-item form of ``private.exact.v1`` (field 1, one PrivateItem
    message per item), written by hand, and the ``qh`` a v1 gateway signed for it."""
    def varint(value: int) -> bytes:
        out = b""
        while value >= 0x80:
            out += bytes([value & 0x7F | 0x80])
            value >>= 7
        return out + bytes([value])

    def field(number: int, value: bytes) -> bytes:
        return varint(number << 3 | 2) + varint(len(value)) + value
    message = (field(1, item.algorithm.encode()) + b"\x10" + varint(item.bucket) + b"\x18" + varint(item.prefix_bits)
               + field(4, item.blinded))
    u32 = struct.Struct(">I").pack
    signed = (b"icse.v1.private-match\x00" + u32(1) + u32(len(item.algorithm)) + item.algorithm.encode()
              + u32(item.bucket) + u32(item.prefix_bits) + u32(32) + item.blinded)
    return field(1, message), hashlib.sha256(signed).hexdigest()


async def test_a_request_of_the_withdrawn_per_item_form_is_refused_not_answered(private_node: PrivateNode) -> None:
    """A v1 gateway's request reaching this node (which offers v2 only) is never answered "no hit":
    its items are in a reserved field, so the node computes another qh than the one signed."""
    pki, client = private_node.local.pki, private_node.client()
    item = _ask([("sha256", bytes(32))]).items[0]
    body, qh = _v1_request(item)
    parsed = pb.PrivateMatchRequest.FromString(body)  # well-formed: field 1 is kept as an unknown field
    assert (list(parsed.groups), parsed.prefix_bits, parsed.SerializeToString()) == ([], 0, body)
    async with client.channel() as channel:
        call = channel.unary_unary(f"/{SERVICE_NAME}/PrivateMatch", request_serializer=lambda raw: raw,
                                   response_deserializer=pb.PrivateMatchResponse.FromString)
        error = await _refusal(call(body, timeout=30, metadata=tokens.bearer(_token(pki, "PrivateMatch", qh))))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED and "differ" in (error.details() or ""), error.details()
