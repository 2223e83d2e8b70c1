"""Network faults between the gateway and one member, with nodes on their own hosts.

Four real node processes, each in its own network namespace reached over a veth
pair on a private 10.231.x.y/30 (``tests.net.netns``; root only, skipped
otherwise with the harness's reason). The gateway is the real ``icse-gateway``
command or ``gateway.fanout.Federation`` in-process, in the root namespace. One
member is faulted per test: partitioned (link down, blackhole), squeezed
(tc tbf), or reached through ``tests.net.faultproxy.FaultProxy`` (latency,
loss, resets). Whatever happens, the answer arrives within the query deadline,
is marked partial and names the member that did not answer; once the fault is
gone the next query is complete again.

Traffic goes only to 127.0.0.1 (the proxy) and to the namespaces' veth
addresses created here.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import os
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from federation.localfed import LocalFederation, NodeSpec
from federation.pki import DevPki
from federation.query import QueryItem
from gateway import config as gateway_config
from gateway.fanout import Federation
from gateway.health import HealthPolicy
from gateway.results import NodeAnswer, NodeStatus
from gateway.signing import signer_for
from tests.net import netns
from tests.net.faultproxy import FaultProxy
from tests.support import query_json, wait_until, wait_until_async

COUNTRIES = ("FR", "DE", "NL", "ES")
# A gateway that ignored its deadline would hang on a faulted member: this guard
# (far beyond any deadline used here) turns such a hang into a failure. The
# deadline itself is proven by what the answer says (the faulted member
# ``timed_out``: the gateway's own timer ended its call), not by a stopwatch.
HANG_GUARD = 30.0
# After a fault is cleared: how long a gateway may take to be complete again
# (gRPC reconnect backoff, TCP retransmission backoff).
RECOVERY = 6.0
RETRY_INTERVAL = 0.3  # between whole queries while waiting for a healed member
NOT_ANSWERED = {"timed_out", "unavailable"}
# The circuit breaker is tested elsewhere (test_resilience); here it must not
# turn the faulted member into "skipped" while faults come and go.
NO_BREAKER = HealthPolicy(failures_to_open=10_000)


@dataclass
class NetFederation:
    local: LocalFederation
    hosts: dict[str, netns.Host]
    config_path: Path
    shared: str  # sha256 hex known to every member

    def config(self, *, node_timeout: float, deadline: float,
               via: dict[str, str] | None = None) -> gateway_config.GatewayConfig:
        """The gateway configuration, with some members' addresses replaced (e.g. by a proxy)."""
        base = gateway_config.load(self.config_path)
        nodes = tuple(dataclasses.replace(n, address=(via or {}).get(n.node_id, n.address)) for n in base.nodes)
        return dataclasses.replace(base, node_timeout=node_timeout, deadline=deadline, nodes=nodes)

    def shared_item(self) -> QueryItem:
        return QueryItem("sha256", bytes.fromhex(self.shared))


def _write_set(path: Path, shared: str, country: str, rng: random.Random) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["algo", "digest", "reference", "category", "victim_identified", "series"])
        writer.writerow(["sha256", shared, f"{country}-SHARED", "1", "true", "S-NET"])
        writer.writerows(["sha256", rng.randbytes(32).hex(), "", "1", "", ""] for _ in range(500))
    return path


@pytest.fixture(scope="module")
def netfed(pki: DevPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetFederation]:
    netns.require_root()
    workdir = tmp_path_factory.mktemp("netfed")
    rng = random.Random(11)
    shared = rng.randbytes(32).hex()
    local = LocalFederation(workdir, pki, [NodeSpec(c, c, f"desk@police.example.{c.lower()}") for c in COUNTRIES])
    with netns.hosts(*(c.lower() for c in COUNTRIES)) as made, contextlib.ExitStack() as stack:
        stack.callback(local.stop)  # nodes first, then their namespaces (hosts' exit)
        hosts = dict(zip(COUNTRIES, made, strict=True))
        for country, h in hosts.items():
            node = local[country]
            node.host = h.address
            node.prefix = ["ip", "netns", "exec", h.ns]
            done = node.import_file(_write_set(workdir / f"{country}.csv", shared, country, rng))
            assert done.returncode == 0, done.stderr + done.stdout
        local.start()
        yield NetFederation(local, hosts, local.write_gateway_config(), shared)


@pytest.fixture(autouse=True)
def healed(netfed: NetFederation) -> Iterator[None]:
    """Every test starts and ends with clean links, also when it fails midway."""
    yield
    for h in netfed.hosts.values():
        h.link_up()
        h.unblackhole()
        h.clear_limits()
    for node in netfed.local.nodes.values():
        assert node.running(), f"node {node.node_id} died:\n{node.log_tail()}"


# --------------------------------------------------------------------------- helpers


def _statuses(result: dict) -> dict[str, str]:
    return {n["country"]: n["status"] for n in result["nodes"]}


def _cli_query(netfed: NetFederation, case: str, seconds: float) -> dict:
    code, result = query_json(netfed.config_path, "--case", case, "--hash", f"sha256:{netfed.shared}",
                              "--timeout", str(seconds), "--deadline", str(seconds))
    assert code == 0, result  # some member always has the shared digest: a hit
    return result


def _assert_cli_partial(result: dict, faulted: str, allowed: set[str] = NOT_ANSWERED) -> None:
    statuses = _statuses(result)
    assert result["partial"] is True, statuses
    assert statuses[faulted] in allowed, statuses
    assert all(statuses[c] == "hit" for c in COUNTRIES if c != faulted), statuses
    assert result["summary"]["nodes_answered"] == len(COUNTRIES) - 1
    hits = {h["country"] for h in result["items"][0]["hits"]}
    assert hits == set(COUNTRIES) - {faulted}


def _cli_complete_again(netfed: NetFederation, case: str) -> dict:
    results: list[dict] = []

    def complete() -> bool:
        results.append(_cli_query(netfed, f"{case}-{len(results) + 1}", 2.0))
        return not results[-1]["partial"]

    try:
        wait_until(complete, RECOVERY, f"{case}: every member answers again", interval=RETRY_INTERVAL)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}; last answer: {_statuses(results[-1])}") from None
    result = results[-1]
    assert set(_statuses(result).values()) == {"hit"}
    return result


def _by_node(answers: list[NodeAnswer]) -> dict[str, NodeAnswer]:
    return {a.node_id: a for a in answers}


async def _timed(fed: Federation, items: list[QueryItem], case: str, *, timeout: float | None = None,
                 deadline: float | None = None) -> dict[str, NodeAnswer]:
    """One query, guarded against a gateway that would hang (it must not: see HANG_GUARD)."""
    answers = await asyncio.wait_for(fed.match(items, case, timeout, deadline), HANG_GUARD)
    return _by_node(answers)


def _complete(answers: dict[str, NodeAnswer]) -> bool:
    return all(a.status.answered for a in answers.values())


def _assert_partial(answers: dict[str, NodeAnswer], faulted: str, allowed: set[NodeStatus]) -> None:
    assert answers[faulted].status in allowed, answers[faulted]
    for country, answer in answers.items():
        if country != faulted:
            assert answer.status.answered, answer


async def _complete_again(fed: Federation, items: list[QueryItem], case: str, *, timeout: float = 2.0,
                          deadline: float = 2.5) -> dict[str, NodeAnswer]:
    tries: list[dict[str, NodeAnswer]] = []

    async def complete() -> bool:
        answers = await _timed(fed, items, f"{case}-{len(tries) + 1}", timeout=timeout, deadline=deadline)
        tries.append(answers)
        return _complete(answers)

    try:
        await wait_until_async(complete, RECOVERY, f"{case}: every member answers again", interval=RETRY_INTERVAL)
    except TimeoutError as exc:
        last = {c: (a.status.value, a.message) for c, a in tries[-1].items()}
        raise AssertionError(f"{exc}; last answers: {last}") from None
    return tries[-1]


async def _with_federation(config: gateway_config.GatewayConfig,
                           body: Callable[[Federation], Awaitable[None]]) -> None:
    async with Federation(config, signer_for(config), NO_BREAKER) as fed:
        await body(fed)


# --------------------------------------------------------------------------- (a) partition


def test_partitioned_member_link_down(netfed: NetFederation) -> None:
    """Veth down: connects fail at once (unreachable); the answer names DE and is partial."""
    deadline = 2.0
    netfed.hosts["DE"].link_down()
    result = _cli_query(netfed, "NET-A1", deadline)
    _assert_cli_partial(result, "DE")
    netfed.hosts["DE"].link_up()
    _cli_complete_again(netfed, "NET-A1-UP")


def test_partitioned_member_blackholed(netfed: NetFederation) -> None:
    """Silent loss of every packet: the connect hangs, the deadline ends it."""
    deadline = 2.0
    netfed.hosts["NL"].blackhole()
    result = _cli_query(netfed, "NET-A2", deadline)
    _assert_cli_partial(result, "NL")
    netfed.hosts["NL"].unblackhole()
    _cli_complete_again(netfed, "NET-A2-UP")


async def test_partition_of_a_live_connection(netfed: NetFederation) -> None:
    """A long-lived gateway whose open connection to FR goes dark, then comes back."""
    deadline = 2.0
    config = netfed.config(node_timeout=1.5, deadline=deadline)
    items = [netfed.shared_item()]
    h = netfed.hosts["FR"]

    async def body(fed: Federation) -> None:
        for n in range(6):  # connected, and latency samples (hedging) like a gateway in service
            answers = await _timed(fed, items, f"NET-A3-WARM-{n}")
            assert _complete(answers), answers
        h.link_down()
        for n in range(2):
            answers = await _timed(fed, items, f"NET-A3-DOWN-{n}")
            _assert_partial(answers, "FR", {NodeStatus.TIMED_OUT, NodeStatus.UNAVAILABLE})
        h.link_up()
        await _complete_again(fed, items, "NET-A3-UP")

    await _with_federation(config, body)


# --------------------------------------------------------------------------- (b) bandwidth


async def test_bandwidth_squeeze(netfed: NetFederation) -> None:
    """1 Mbit/s to and from ES: a 20,000-digest query (~1 MB) cannot cross in 2 s, one digest can."""
    deadline = 2.0
    config = netfed.config(node_timeout=deadline, deadline=deadline)
    small = [netfed.shared_item()]
    big = [QueryItem("sha256", os.urandom(32)) for _ in range(19_999)] + small
    h = netfed.hosts["ES"]

    async def body(fed: Federation) -> None:
        answers = await _timed(fed, big, "NET-B-FREE")
        assert _complete(answers), answers  # unsqueezed, the big query fits easily
        h.limit_bandwidth(rate="1mbit", burst="32kb", latency="200ms")
        # The small query goes first: after the big one is cancelled, what it had already
        # written into the kernel's socket buffer still drains at 1 Mbit/s, and calls on the
        # same connection queue behind it for a few seconds (head-of-line blocking).
        answers = await _timed(fed, small, "NET-B-SMALL")
        assert _complete(answers), answers
        answers = await _timed(fed, big, "NET-B-BIG")
        _assert_partial(answers, "ES", {NodeStatus.TIMED_OUT})
        assert all(len(a.hits[-1]) == 1 for c, a in answers.items() if c != "ES")
        h.clear_limits()
        await _complete_again(fed, big, "NET-B-CLEAR", timeout=deadline, deadline=deadline)

    await _with_federation(config, body)


# --------------------------------------------------------------------------- (c) proxy


@contextlib.contextmanager
def _proxied(netfed: NetFederation, country: str) -> Iterator[FaultProxy]:
    node = netfed.local[country]
    with FaultProxy(target=(node.host, node.port), seed=5) as proxy:
        yield proxy


async def test_latency_through_proxy(netfed: NetFederation) -> None:
    timeout, deadline = 1.0, 1.5
    items = [netfed.shared_item()]
    with _proxied(netfed, "DE") as proxy:
        config = netfed.config(node_timeout=timeout, deadline=deadline, via={"DE": proxy.address})

        async def body(fed: Federation) -> None:
            for n in range(6):
                answers = await _timed(fed, items, f"NET-C1-WARM-{n}")
                assert _complete(answers), answers
            # Moderate: well under the per-node deadline, even one round trip each way.
            proxy.delay(0.15)
            answers = await _timed(fed, items, "NET-C1-MODERATE")
            assert _complete(answers), answers
            assert answers["DE"].latency_ms >= 250, answers["DE"]
            # Beyond the per-node deadline: DE times out, the rest is answered in time.
            proxy.delay(1.5 * timeout)
            answers = await _timed(fed, items, "NET-C1-SLOW")
            _assert_partial(answers, "DE", {NodeStatus.TIMED_OUT})
            proxy.clear()
            await _complete_again(fed, items, "NET-C1-CLEAR")

        await _with_federation(config, body)


async def test_loss_through_proxy(netfed: NetFederation) -> None:
    timeout, deadline = 1.0, 1.5
    items = [netfed.shared_item()]
    with _proxied(netfed, "NL") as proxy:
        config = netfed.config(node_timeout=timeout, deadline=deadline, via={"NL": proxy.address})

        async def body(fed: Federation) -> None:
            answers = await _timed(fed, items, "NET-C2-WARM")
            assert _complete(answers), answers
            proxy.drop(0.3, stall=(0.2, 1.5))  # 30 % of chunks held like lost segments
            hurt = 0
            for n in range(6):
                answers = await _timed(fed, items, f"NET-C2-LOSS-{n}")
                if not _complete(answers):
                    _assert_partial(answers, "NL", {NodeStatus.TIMED_OUT, NodeStatus.UNAVAILABLE})
                hurt += not answers["NL"].status.answered or answers["NL"].latency_ms >= 150
            assert hurt, "the loss never held a chunk: the test proved nothing"
            proxy.clear()
            await _complete_again(fed, items, "NET-C2-CLEAR")

        await _with_federation(config, body)


async def test_resets_through_proxy(netfed: NetFederation) -> None:
    timeout, deadline = 1.0, 1.5
    items = [netfed.shared_item()]
    with _proxied(netfed, "ES") as proxy:
        config = netfed.config(node_timeout=timeout, deadline=deadline, via={"ES": proxy.address})

        async def body(fed: Federation) -> None:
            answers = await _timed(fed, items, "NET-C3-WARM")
            assert _complete(answers), answers
            proxy.reset()
            for n in range(2):
                answers = await _timed(fed, items, f"NET-C3-RESET-{n}")
                _assert_partial(answers, "ES", {NodeStatus.UNAVAILABLE})
            assert proxy.snapshot().resets >= 1
            proxy.clear()
            await _complete_again(fed, items, "NET-C3-CLEAR")

        await _with_federation(config, body)
