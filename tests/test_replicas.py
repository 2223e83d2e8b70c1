"""Replicas: a member running two nodes with one identity, for availability.

Real node processes over real mutual TLS: FR runs twice (``FR`` and ``FR-b``,
each with its own directory and store, the same certificate and the same
imported file), DE once. The gateway is the real ``gateway.fanout.Federation``
or the real command line. What a replica served is read from its own audit,
through ``icse-node audit export``.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from federation.config import ConfigError
from federation.localfed import LocalFederation, LocalNode, NodeSpec
from federation.pki import DevPki
from federation.query import QueryItem
from gateway import config as gateway_config
from gateway.fanout import Federation
from gateway.health import HealthPolicy
from gateway.merge import merge
from gateway.results import NodeAnswer, NodeStatus, Subject
from gateway.signing import signer_for
from tests.support import address_of, black_hole, query_json, run_gateway, wait_until_async

REPLICAS = ("FR", "FR-b")


@dataclass
class Replicated:
    local: LocalFederation
    config: Path
    fr_set: Path  # the file imported on both FR replicas
    known: str  # sha256 hex that FR holds (on both replicas) and DE does not
    reference: str

    def node(self, name: str) -> LocalNode:
        return self.local[name]

    def item(self) -> QueryItem:
        return QueryItem("sha256", bytes.fromhex(self.known))


def _write_set(path: Path, rng: random.Random, first: str | None = None, reference: str = "") -> Path:
    rows = [f"sha256,{first},{reference},1,,S-R"] if first else []
    rows += [f"sha256,{rng.randbytes(32).hex()},,1,," for _ in range(100)]
    path.write_text("algo,digest,reference,category,victim_identified,series\n" + "\n".join(rows) + "\n")
    return path


def _export(node: LocalNode) -> str:
    done = subprocess.run(node.node_command("export", "--config", str(node.config_path), "--format", "csv"),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def replicated(pki: DevPki, tmp_path: Path) -> Iterator[Replicated]:
    rng = random.Random(10)
    known, reference = rng.randbytes(32).hex(), "FR-REPLICATED-1"
    local = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR"), NodeSpec("FR", "FR", name="FR-b"),
                                            NodeSpec("DE", "DE")])
    fr_set = _write_set(tmp_path / "fr.csv", rng, known, reference)
    # As the README tells operators: import on one replica, then that replica's
    # export on the others (it carries the references the node gave to rows
    # imported without one).
    done = local["FR"].import_file(fr_set)
    assert done.returncode == 0, done.stdout + done.stderr
    exported = tmp_path / "fr-export.csv"
    exported.write_text(_export(local["FR"]))
    done = local["FR-b"].import_file(exported)
    assert done.returncode == 0, done.stdout + done.stderr
    done = local["DE"].import_file(_write_set(tmp_path / "de.csv", rng))
    assert done.returncode == 0, done.stdout + done.stderr
    with local:
        yield Replicated(local, local.write_gateway_config(), fr_set, known, reference)


def _served(node: LocalNode, case_prefix: str = "") -> list[dict]:
    """The Match calls this replica answered, from its own audit (each is recorded before its answer leaves)."""
    done = subprocess.run(node.node_command("audit", "export", "--config", str(node.config_path)),
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return [r for r in records if r.get("rpc") == "Match" and r.get("status") == "OK"
            and r.get("case", "").startswith(case_prefix)]


def _kill(node: LocalNode) -> None:
    assert node.process is not None
    node.process.send_signal(signal.SIGKILL)
    node.process.wait()
    node.process = None


def _fr(answers: list[NodeAnswer]) -> NodeAnswer:
    [answer] = [a for a in answers if a.node_id == "FR"]
    return answer


def test_replicas_are_one_member_holding_the_same_set(replicated: Replicated) -> None:
    config = gateway_config.load(replicated.config)
    fr = next(n for n in config.nodes if n.node_id == "FR")
    assert fr.addresses == (replicated.node("FR").address, replicated.node("FR-b").address)
    assert [n.node_id for n in config.nodes] == ["FR", "DE"]
    # The replicas hold the same set; importing a file again changes nothing.
    first, second = (_export(replicated.node(name)) for name in REPLICAS)
    assert first == second and replicated.known in first
    again = replicated.node("FR-b").import_file(replicated.fr_set)
    assert again.returncode == 0 and "added 0," in again.stdout, again.stdout + again.stderr
    assert _export(replicated.node("FR-b")) == first


def test_replica_killed_after_serving_the_queries_go_on_complete(replicated: Replicated) -> None:
    config = gateway_config.load(replicated.config)
    fr, fr_b = replicated.node("FR"), replicated.node("FR-b")

    async def run() -> tuple[list[NodeAnswer], int]:
        async with Federation(config, signer_for(config)) as fed:
            turn = iter(range(1_000_000))

            async def both_served() -> bool:
                answers = await fed.match([replicated.item()], f"WARM-{next(turn)}")
                assert _fr(answers).status is NodeStatus.HIT, answers
                return bool(_served(fr, "WARM-")) and bool(_served(fr_b, "WARM-"))

            # Each replica has answered queries (its own audit has them) before one dies.
            await wait_until_async(both_served, 60, "both replicas serve queries in turn", interval=0.05)
            _kill(fr_b)
            answers = [_fr(await fed.match([replicated.item()], f"AFTER-{n}")) for n in range(6)]
            return answers, fed.health("FR", fr_b.address).failures

    answers, dead_failures = asyncio.run(run())
    assert all(a.status is NodeStatus.HIT for a in answers), answers
    assert all(a.replica == fr.address for a in answers), [a.replica for a in answers]
    assert all(len(a.hits[0]) == 1 and a.hits[0][0].reference == replicated.reference for a in answers), answers
    # The dead replica was asked (and failed over from), not merely never reached.
    assert dead_failures >= 1
    assert len(_served(fr, "AFTER-")) == 6


def test_replica_down_from_the_start_answers_complete_and_names_the_replica(replicated: Replicated) -> None:
    first, second = replicated.node("FR"), replicated.node("FR-b")
    # The first address listed is the one every fresh gateway process asks first.
    _kill(first)
    code, result = query_json(replicated.config, "--case", "ONE-DOWN", "--hash", "sha256:" + replicated.known)
    assert code == 0, result
    assert result["partial"] is False
    nodes = {n["node"]: n for n in result["nodes"]}
    assert set(nodes) == {"FR", "DE"}
    assert nodes["FR"]["status"] == "hit" and nodes["FR"]["replica"] == second.address, nodes["FR"]
    assert nodes["DE"]["status"] == "no_hit" and nodes["DE"]["replica"] == replicated.node("DE").address
    [item] = result["items"]
    assert [h["reference"] for h in item["hits"]] == [replicated.reference]

    # The operator's view lists each replica on its own.
    done = run_gateway("nodes", "--config", str(replicated.config), "--format", "json")
    rows = {(r["node"], r["replica"]): r["status"] for r in json.loads(done.stdout)["nodes"]}
    assert rows[("FR", second.address)] == "ok"
    assert rows[("FR", first.address)] == "unavailable"


def test_hung_replica_costs_its_timeout_then_another_replica_answers(replicated: Replicated,
                                                                      tmp_path: Path) -> None:
    # A replica that accepts connections and never answers (its TLS handshake hangs).
    with black_hole() as hole:
        hung = address_of(hole)
        serving = replicated.node("FR-b").address
        config = tmp_path / "hung.toml"
        config.write_text(replicated.config.read_text().replace(
            f'"{replicated.node("FR").address}"', f'"{hung}"'))
        assert hung in config.read_text()
        code, result = query_json(config, "--case", "HUNG", "--hash", "sha256:" + replicated.known,
                                  "--timeout", "1", "--deadline", "5")
    assert code == 0, result
    fr = next(n for n in result["nodes"] if n["node"] == "FR")
    assert fr["status"] == "hit" and fr["replica"] == serving, fr
    assert result["partial"] is False


def test_both_replicas_down_the_member_is_unavailable_with_both_reasons(replicated: Replicated) -> None:
    for name in REPLICAS:
        _kill(replicated.node(name))
    code, result = query_json(replicated.config, "--case", "BOTH-DOWN", "--hash", "sha256:" + replicated.known)
    assert code == 2, result  # no hit, and not every member answered
    nodes = {n["node"]: n for n in result["nodes"]}
    fr = nodes["FR"]
    assert fr["status"] == "unavailable", fr
    for name in REPLICAS:
        address = replicated.node(name).address
        assert f"replica {address}: failed to connect" in fr["message"], fr["message"]
    assert nodes["DE"]["status"] == "no_hit"


def test_hits_of_a_member_with_two_replicas_appear_once_even_when_both_answered(replicated: Replicated) -> None:
    config = gateway_config.load(replicated.config)
    fr, fr_b = replicated.node("FR"), replicated.node("FR-b")
    # Hedge at once, every time: the hedge goes to the other replica, so that
    # both replicas answer one query.
    policy = HealthPolicy(samples_for_hedging=1, hedge_percentile=0.0, hedge_min_delay=0.0, hedge_budget=1.0,
                          failures_to_open=1000)
    subjects = [Subject(replicated.item(), "given")]

    async def run() -> str:
        async with Federation(config, signer_for(config), policy) as fed:
            turn = iter(range(1_000_000))

            async def answered_by_both() -> str | None:
                case = f"DUP-{next(turn)}"
                answers = await fed.match([replicated.item()], case)
                result = merge(case, subjects, answers)
                [item] = result.items
                assert [h.reference for h in item.hits] == [replicated.reference], item.hits
                assert [n.node_id for n in result.nodes] == ["DE", "FR"] and not result.partial
                both = {r["case"] for r in _served(fr, "DUP-")} & {r["case"] for r in _served(fr_b, "DUP-")}
                return case if case in both else None

            return await wait_until_async(answered_by_both, 120, "one query answered by both replicas",
                                          interval=0.05)

    case = asyncio.run(run())
    # Each replica's call carried its own token: two records, two token ids.
    tokens = [r["token_id"] for name in REPLICAS for r in _served(replicated.node(name)) if r["case"] == case]
    assert len(tokens) == 2 and tokens[0] != tokens[1], tokens


# --------------------------------------------------------------------------- configuration


def _gateway_toml(tmp_path: Path, pki: DevPki, nodes: str) -> Path:
    local = LocalFederation(tmp_path / "cfg", pki, [])
    path = local.write_gateway_config(tmp_path / "federation.toml", nodes=[])
    path.write_text(path.read_text() + nodes)
    return path


@pytest.mark.parametrize(("nodes", "expected"), [
    ('[[nodes]]\nid = "FR"\naddress = "a:1"\naddresses = ["b:2"]\n',
     "[nodes[0]] addresses: give either address (one node) or addresses"),
    ('[[nodes]]\nid = "FR"\n', "[nodes[0]] address: required (or addresses = [...] for replicas)"),
    ('[[nodes]]\nid = "FR"\naddresses = []\n', "[nodes[0]] addresses: empty"),
    ('[[nodes]]\nid = "FR"\naddresses = ["a:1", "a:1"]\n', "[nodes[0]] addresses: 'a:1' listed twice"),
    ('[[nodes]]\nid = "FR"\naddresses = ["a:1", 7]\n', "[nodes[0]] addresses: expected HOST:PORT strings, got 7"),
    ('[[nodes]]\nid = "FR"\naddresses = ["a:1", "b"]\n', "[nodes[0]] addresses: expected HOST:PORT, got 'b'"),
    ('[[nodes]]\nid = "FR"\naddresses = "a:1"\n', "[nodes[0]] addresses: expected list"),
    ('[[nodes]]\nid = "FR"\naddress = "a:1"\n[[nodes]]\nid = "FR"\naddress = "b:2"\n',
     "node id 'FR' listed twice (replicas of one member go in one [[nodes]] table"),
])
def test_replica_addresses_are_validated_with_clear_errors(pki: DevPki, tmp_path: Path, nodes: str,
                                                           expected: str) -> None:
    path = _gateway_toml(tmp_path, pki, nodes)
    with pytest.raises(ConfigError) as error:
        gateway_config.load(path)
    assert str(error.value).startswith(str(path)), error.value
    assert expected in str(error.value), error.value


def test_one_address_or_several_load_alike(pki: DevPki, tmp_path: Path) -> None:
    path = _gateway_toml(tmp_path, pki, '[[nodes]]\nid = "FR"\naddress = "a:1"\n'
                                        '[[nodes]]\nid = "DE"\naddresses = ["b:2", "c:3"]\n')
    fr, de = gateway_config.load(path).nodes
    assert fr.addresses == ("a:1",) and fr.address == "a:1"
    assert de.addresses == ("b:2", "c:3") and de.tls_name == f"de.nodes.{pki.federation}"
