"""Packed exact items (PROTOCOL.md "Packed exact items"): real node processes over real mutual TLS.

FR runs today's node; DE runs the same software as a node without the feature
(``tests.legacy_node``: no features in Describe, ``MatchRequest.packed`` ignored as
an unknown field). Both hold the same imported rows, so every answer can be
compared with the other form's and with what was imported.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from federation import tokens
from federation.localfed import LocalFederation, LocalNode, NodeSpec, environment
from federation.pki import DevPki
from federation.query import PACKED_EXACT_FEATURE, PackedGroup, QueryItem, canonical_bytes, query_sha256
from federation.wire import items_to_pb, pb, request_to_pb, rpc
from gateway import config as gateway_config
from gateway.answers import hit_info
from gateway.fanout import Federation
from gateway.results import HitInfo
from gateway.signing import signer_for
from node.hits import Asked
from tests.support import Client, claims_for, gateway_client, import_rows, signing_key

MAX_ITEMS = 400
PACKED_CHECKS = ("packed.same-answer", "packed.partial-digest", "packed.not-exact")


class _LegacyNode(LocalNode):
    def node_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.legacy_node", *args]


class _ClaimsPackedNode(_LegacyNode):
    """Lists the feature but ignores packed groups: what the conformance kit must catch."""

    def node_command(self, *args: str) -> list[str]:
        return ["env", "ICSE_TEST_CLAIMS_PACKED=1", *super().node_command(*args)]


@dataclass
class Nodes:
    local: LocalFederation
    pki: DevPki
    sha: list[bytes]  # stored sha256 digests, reference SHA-<n>
    md5: list[bytes]  # stored md5 digests, reference MD5-<n>
    pdq: bytes  # a stored PDQ hash, reference PDQ-0
    rng: random.Random

    def client(self, name: str) -> Client:
        return gateway_client(self.pki, self.local[name].address, name)

    def token(self, name: str, items: list[QueryItem], **claims: object) -> str:
        return signing_key(self.pki).sign(claims_for(self.pki, name, items, **claims))

    def audit(self, name: str) -> list[dict]:
        node = self.local[name]
        done = subprocess.run(node.node_command("audit", "export", "--config", str(node.config_path)),
                              capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stderr
        return [json.loads(line) for line in done.stdout.splitlines()]

    def unknown(self, size: int) -> bytes:
        return self.rng.randbytes(size)


@pytest.fixture(scope="module")
def nodes(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    workdir = tmp_path_factory.mktemp("packed")
    rng = random.Random(10)
    sha, md5, pdq = [rng.randbytes(32) for _ in range(60)], [rng.randbytes(16) for _ in range(20)], rng.randbytes(32)
    limits = {"max_items": MAX_ITEMS}
    local = LocalFederation(workdir, pki, [NodeSpec("FR", "FR", limits=limits), NodeSpec("DE", "DE", limits=limits)])
    local.nodes["DE"] = _LegacyNode(NodeSpec("DE", "DE", limits=limits), local.workdir, pki, ["eu-1"])
    rows = ([{"sha256": d.hex(), "reference": f"SHA-{n}", "category": "1"} for n, d in enumerate(sha)]
            + [{"md5": d.hex(), "reference": f"MD5-{n}", "category": "1"} for n, d in enumerate(md5)]
            + [{"pdq": pdq.hex(), "reference": "PDQ-0", "category": "1"}])
    for name in ("FR", "DE"):
        import_rows(local, name, rows, workdir)
    with local:
        yield Nodes(local, pki, sha, md5, pdq, rng)


async def _send(client: Client, request: pb.MatchRequest, token: str) -> pb.MatchResponse:
    async with client.channel() as channel:
        return await rpc.NodeStub(channel).Match(request, timeout=15, metadata=tokens.bearer(token))


def _answer(response: pb.MatchResponse) -> list[tuple[int, list[str]]]:
    return [(r.item, [h.reference for h in r.hits]) for r in response.results]


def _mixed(nodes: Nodes) -> tuple[list[QueryItem], list[PackedGroup], dict[int, str]]:
    """Unpacked items, packed groups, and the reference expected at each position of the item list."""
    flipped = bytes([nodes.pdq[0] ^ 0x01]) + nodes.pdq[1:]
    items = [QueryItem("pdq", flipped, 8), QueryItem("md5", nodes.md5[3]), QueryItem("sha256", nodes.unknown(32))]
    expected = {0: "PDQ-0", 1: "MD5-3"}
    sha_digests = []
    for n in range(40):  # known and unknown digests interleaved
        known = n % 3 == 0
        sha_digests.append(nodes.sha[n] if known else nodes.unknown(32))
        if known:
            expected[len(items) + n] = f"SHA-{n}"
    md5_digests = [nodes.unknown(16), nodes.md5[7], nodes.md5[0]]
    start = len(items) + len(sha_digests)
    expected |= {start + 1: "MD5-7", start + 2: "MD5-0"}
    groups = [PackedGroup("sha256", b"".join(sha_digests), 32), PackedGroup("md5", b"".join(md5_digests), 16)]
    return items, groups, expected


def _item_list(items: list[QueryItem], groups: list[PackedGroup]) -> list[QueryItem]:
    return items + [QueryItem(g.algorithm, g.digest(n)) for g in groups for n in range(g.count)]


def test_packed_items_have_the_query_digest_of_the_items_they_stand_for() -> None:
    rng = random.Random(3)
    items = [QueryItem("pdq", rng.randbytes(32), 31), QueryItem("md5", rng.randbytes(16))]
    groups = [PackedGroup("sha256", rng.randbytes(32 * 5), 32), PackedGroup("sha1", rng.randbytes(20 * 2), 20)]
    listed = _item_list(items, groups)
    assert canonical_bytes(items, packed=groups) == canonical_bytes(listed)
    assert query_sha256(items, packed=groups) == query_sha256(listed)
    assert query_sha256(items, packed=groups[::-1]) != query_sha256(listed)  # the order of groups is bound
    assert query_sha256([], packed=[PackedGroup("sha256", b"", 32)]) == query_sha256([])
    with pytest.raises(ValueError, match="not a whole number of 32-byte digests"):
        PackedGroup("sha256", b"\x00" * 33, 32)


async def test_describe_lists_the_feature_only_where_offered(nodes: Nodes) -> None:
    for name, offered in (("FR", True), ("DE", False)):
        async with nodes.client(name).channel() as channel:
            token = nodes.token(name, [], rpc_name="Describe")
            described = await rpc.NodeStub(channel).Describe(pb.DescribeRequest(), timeout=10,
                                                             metadata=tokens.bearer(token))
        assert (PACKED_EXACT_FEATURE in described.features) is offered


async def test_a_mixed_request_answers_as_its_item_list_unpacked(nodes: Nodes) -> None:
    items, groups, expected = _mixed(nodes)
    listed = _item_list(items, groups)
    client = nodes.client("FR")
    # One token form: the digest of the item list, whichever form carries it.
    packed = await _send(client, request_to_pb(items, groups), nodes.token("FR", listed))
    plain = await _send(client, items_to_pb(listed), nodes.token("FR", listed))
    assert _answer(packed) == _answer(plain)
    assert {item: refs for item, refs in _answer(packed)} == {p: [ref] for p, ref in expected.items()}
    assert [r.item for r in packed.results] == sorted(expected)
    audit = nodes.audit("FR")[-2]  # the packed request's record
    assert audit["status"] == "OK" and audit["items"] == len(listed) and audit["hits"] == len(expected)
    assert set(audit["algorithms"]) == {"md5", "pdq", "sha256"}


@pytest.mark.parametrize(("group", "words"), [
    (pb.PackedItems(algorithm="sha256", digests=b"\x00" * 65), "65 bytes, not a whole number of 32-byte digests"),
    (pb.PackedItems(algorithm="pdq", digests=b"\x00" * 32), "'pdq' is not an exact algorithm"),
    (pb.PackedItems(algorithm="sha3", digests=b"\x00" * 32), "'sha3' is not an exact algorithm"),
])
async def test_a_packed_group_that_is_not_whole_exact_digests_is_refused_in_words(
        nodes: Nodes, group: pb.PackedItems, words: str) -> None:
    request = pb.MatchRequest(items=[pb.QueryItem(algorithm="md5", digest=nodes.md5[0])], packed=[group])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _send(nodes.client("FR"), request, nodes.token("FR", [QueryItem("md5", nodes.md5[0])]))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "packed group 0" in refused.value.details() and words in refused.value.details()
    record = nodes.audit("FR")[-1]
    assert record["status"] == "INVALID_ARGUMENT" and "packed group 0" in record["detail"]


async def test_packed_items_count_towards_the_item_limit(nodes: Nodes) -> None:
    items = [QueryItem("sha256", nodes.sha[0])]
    groups = [PackedGroup("md5", nodes.unknown(16 * MAX_ITEMS), 16)]
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _send(nodes.client("FR"), request_to_pb(items, groups),
                    nodes.token("FR", _item_list(items, groups)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"request has {MAX_ITEMS + 1} items; this node accepts at most {MAX_ITEMS}" in refused.value.details()


async def test_a_node_without_the_feature_refuses_packed_items_rather_than_answer_no_hit(nodes: Nodes) -> None:
    items, groups, _ = _mixed(nodes)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await _send(nodes.client("DE"), request_to_pb(items, groups), nodes.token("DE", _item_list(items, groups)))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "request items differ from those the token was signed for" in refused.value.details()


class _Recording:
    """A node stub that keeps every Match request the gateway sends through it."""

    def __init__(self, stub: rpc.NodeStub):
        self._stub = stub
        self.sent: list[pb.MatchRequest] = []

    def Match(self, request: pb.MatchRequest, **kwargs: object):  # the stub's method name
        self.sent.append(request)
        return self._stub.Match(request, **kwargs)

    def __getattr__(self, name: str) -> object:
        return getattr(self._stub, name)


async def test_the_gateway_packs_for_nodes_that_offer_it_and_maps_answers_to_its_items(nodes: Nodes) -> None:
    items, groups, expected = _mixed(nodes)
    listed = _item_list(items, groups)
    order = list(range(len(listed)))
    random.Random(5).shuffle(order)  # the caller's order mixes kinds; packing groups them
    asked = [listed[p] for p in order]
    wanted = {n: [expected[p]] for n, p in enumerate(order) if p in expected}
    config = gateway_config.load(nodes.local.write_gateway_config())
    async with Federation(config, signer_for(config)) as fed:
        fed.PACK_AT_LEAST = 10
        recorders = {}
        for node_id in ("FR", "DE"):
            replica = fed._members[node_id].replicas[0]
            recorders[node_id] = replica.stub = _Recording(replica.stub)
        for _ in range(2):  # the second query uses what the first learnt
            answers = {a.node_id: a for a in await fed.match(asked, "CASE-PACKED")}
            for node_id in ("FR", "DE"):
                answer = answers[node_id]
                assert answer.status.answered, answer.message
                assert {n: [h.reference for h in hits] for n, hits in enumerate(answer.hits) if hits} == wanted
    fr, de = recorders["FR"].sent, recorders["DE"].sent
    assert len(fr) == len(de) == 2
    # Unpacked: the PDQ item only (the unknown sha256 and the md5 of the unpacked part are packed too).
    assert all(len(r.items) == 1 and sorted(g.algorithm for g in r.packed) == ["md5", "sha256"] for r in fr)
    assert all(not r.packed and len(r.items) == len(asked) for r in de)


async def test_a_small_batch_is_sent_unpacked_without_asking_describe(nodes: Nodes) -> None:
    config = gateway_config.load(nodes.local.write_gateway_config())
    async with Federation(config, signer_for(config)) as fed:
        replica = fed._members["FR"].replicas[0]
        replica.stub = recorder = _Recording(replica.stub)
        (answer, _) = sorted(await fed.match([QueryItem("sha256", nodes.sha[1])], "CASE-PACKED"),
                             key=lambda a: a.node_id != "FR")
        assert [h.reference for h in answer.hits[0]] == ["SHA-1"]
        assert replica.features is None and not recorder.sent[0].packed


def _kit(pki: DevPki, node: LocalNode, known: str) -> dict[str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "federation.conformance.cli", "node", "--address", node.address,
         "--node-id", node.node_id, "--federation", pki.federation, "--ca", str(pki.ca_cert),
         "--cert", str(pki.gateway_cert("eu-1")), "--key", str(pki.gateway_key("eu-1")),
         "--signing-key", str(pki.signing_key("eu-1")), "--kid", pki.signing_kid("eu-1"), "--known", known],
        capture_output=True, text=True, timeout=300, env=environment(), check=False)
    return {words[1]: words[0] for line in done.stdout.splitlines()
            if len(words := line.split()) >= 2 and words[0] in ("pass", "FAIL", "skip")}


def test_the_conformance_kit_checks_the_feature(nodes: Nodes) -> None:
    known = f"sha256:{nodes.sha[5].hex()}"
    ours = _kit(nodes.pki, nodes.local["FR"], known)
    assert {name: ours[name] for name in PACKED_CHECKS} == dict.fromkeys(PACKED_CHECKS, "pass")
    legacy = _kit(nodes.pki, nodes.local["DE"], known)
    assert {name: legacy[name] for name in PACKED_CHECKS} == dict.fromkeys(PACKED_CHECKS, "skip")
    assert legacy["match.hit-in-place"] == "pass"


def test_the_conformance_kit_fails_a_node_that_lists_the_feature_and_ignores_packed_items(
        nodes: Nodes, tmp_path: Path) -> None:
    node = _ClaimsPackedNode(NodeSpec("NL", "NL"), tmp_path, nodes.pki, ["eu-1"])
    node.start()
    try:
        node.wait_ready(120)
        table = _kit(nodes.pki, node, f"sha256:{nodes.sha[5].hex()}")
    finally:
        node.stop()
    assert table["packed.same-answer"] == "FAIL"
    # Refusals of a bad group: it reads no group at all, so it answers.
    assert table["packed.partial-digest"] == table["packed.not-exact"] == "FAIL"


async def test_a_batch_of_one_exact_algorithm_is_packed_whole(nodes: Nodes) -> None:
    digests = [nodes.sha[n] if n % 4 == 0 else nodes.unknown(32) for n in range(60)]
    asked = [QueryItem("sha256", d) for d in digests]
    wanted = {n: [f"SHA-{n}"] for n in range(0, 60, 4)}
    short = [*asked[:30], QueryItem("sha256", b"\x00" * 31), *asked[30:]]  # one malformed: not one whole group
    config = gateway_config.load(nodes.local.write_gateway_config(nodes=[nodes.local["FR"]]))
    async with Federation(config, signer_for(config)) as fed:
        fed.PACK_AT_LEAST = 10
        replica = fed._members["FR"].replicas[0]
        replica.stub = recorder = _Recording(replica.stub)
        (answer,) = await fed.match(asked, "CASE-PACKED")
        assert {n: [h.reference for h in hits] for n, hits in enumerate(answer.hits) if hits} == wanted
        (refused,) = await fed.match(short, "CASE-PACKED")
    whole, plain = recorder.sent
    assert not whole.items and [(g.algorithm, g.digests) for g in whole.packed] == [("sha256", b"".join(digests))]
    # A batch the node refuses goes unpacked, so the refusal names the caller's position.
    assert not plain.packed and len(plain.items) == len(short)
    assert refused.status.value == "refused" and "item 30: sha256 digest must be 32 bytes" in refused.message


def test_a_batch_of_several_exact_algorithms_is_packed_as_the_item_loop_packs_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A disk's files hashed three ways: grouped a column at a time, the request and the map back to the
    caller's positions are those of the item-by-item loop (which the same batch gets without the shortcut)."""
    from gateway import packing  # noqa: PLC0415

    rng = random.Random(11)
    items = [QueryItem(name, rng.randbytes(size)) for _ in range(100)
             for name, size in (("md5", 16), ("sha1", 20), ("sha256", 32))]
    rng.shuffle(items)
    fast = packing.packed(items)
    monkeypatch.setattr(packing, "_exact_groups", lambda items, sizes: None)
    loop = packing.packed(items)
    assert fast is not None and loop is not None
    assert fast.request == loop.request and fast.query_sha256 == loop.query_sha256
    assert fast.order is not None and loop.order is not None and fast.order.tolist() == loop.order.tolist()
    assert [p.algorithm for p in fast.request.packed] == list(dict.fromkeys(i.algorithm for i in items))
    odd = [*items[:-1], QueryItem("md5", b"\x00" * 15)]  # one digest of the wrong size: never packed
    assert packing.packed(odd) is None


async def test_exact_hits_are_the_same_messages_with_or_without_a_perceptual_item(nodes: Nodes) -> None:
    """A batch of exact items only is answered straight from the search's arrays; one with a
    perceptual item goes through the per-item matches. Each exact hit is the same Hit either way,
    every field of it (the standard tier's metadata, the node's country, id and contact)."""
    exact = [nodes.sha[n] if n % 2 else nodes.unknown(32) for n in range(30)]
    group = [PackedGroup("sha256", b"".join(exact), 32)]
    flipped = bytes([nodes.pdq[0] ^ 0x01]) + nodes.pdq[1:]
    with_pdq = [QueryItem("pdq", flipped, 8)]
    client = nodes.client("FR")
    alone = await _send(client, request_to_pb([], group), nodes.token("FR", _item_list([], group)))
    mixed = await _send(client, request_to_pb(with_pdq, group), nodes.token("FR", _item_list(with_pdq, group)))
    assert [r.item for r in mixed.results] == [0, *(1 + r.item for r in alone.results)]
    assert [list(r.hits) for r in alone.results] == [list(r.hits) for r in mixed.results[1:]]
    assert len(alone.results) == 15 and all(len(r.hits) == 1 for r in alone.results)
    hit = alone.results[0].hits[0]
    assert (hit.reference, hit.country, hit.node_id, hit.category) == ("SHA-1", "FR", nodes.local["FR"].node_id, "1")
    assert hit.date_added and not hit.HasField("victim_identified")


@pytest.mark.parametrize("fields", [
    {},
    {"reference": "FR-1", "country": "FR", "node_id": "fr-1", "contact": "vid@fr.example", "category": "2",
     "series": "S-é", "date_added": "2026-11-30", "distance": 12, "matched_share": 0.625, "victim_identified": False},
    {"reference": "R", "victim_identified": True},
])
def test_a_hit_is_read_as_the_constructor_would_make_it(fields: dict) -> None:
    """``hit_info`` sets the fields without ``HitInfo.__init__``: equal, same hash, same text, every field."""
    made = HitInfo(**({"node_id": "", "country": "", "reference": ""} | fields))
    read = hit_info(pb.Hit(**fields))
    assert read == made and hash(read) == hash(made) and repr(read) == repr(made)
    assert dataclasses.asdict(read) == dataclasses.asdict(made)
    assert {f.name for f in dataclasses.fields(HitInfo)} == {f.name for f in pb.Hit.DESCRIPTOR.fields}


def test_the_digests_of_hit_positions_are_read_in_hex_as_one_by_one() -> None:
    """``Asked.in_hex`` (each packed group written in hex once, then sliced) against ``Asked``'s
    one-position reading: items first, then groups of different widths, any positions."""
    rng = random.Random(5)
    items = [QueryItem("pdq", rng.randbytes(32), 31), QueryItem("md5", rng.randbytes(16))]
    packed = [PackedGroup("sha256", rng.randbytes(32 * 40), 32), PackedGroup("md5", rng.randbytes(16 * 9), 16)]
    asked = Asked(items, packed)
    for positions in ([], [0], [1, 2, 41, 42, 50], sorted(rng.sample(range(51), 20)), list(range(51))):
        expected = [asked(p) for p in positions]
        assert asked.in_hex(positions) == ([a for a, _ in expected], [d.hex() for _, d in expected])
    with pytest.raises(IndexError):
        asked.in_hex([51])
