"""The gateway under conditions its users meet: a breaker's trial call that is refused or
cancelled, its own certificate gone bad, a member that dies in the middle of a call.

Real node processes over real mutual TLS; faults come from ``tests.net.faultproxy``
on loopback (no root needed).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from federation.pki import DevPki, Leaf, cert_pem, gateway_leaf, issue, key_pem, new_ca, write_private
from federation.query import QueryItem
from federation.tls import TlsFiles
from gateway import config as gateway_config
from gateway.fanout import Federation
from gateway.health import Admission, HealthPolicy, NodeHealth
from gateway.results import NodeAnswer, NodeStatus
from gateway.selfcheck import CertificateProblem, ClientIdentity, check_client
from gateway.signing import signer_for
from tests.net.faultproxy import FaultProxy
from tests.support import address_of, black_hole, member_entry, run_gateway, wait_until_async

ITEM = QueryItem("md5", b"\x01" * 16)


# --------------------------------------------------------------------------- breaker, pure


def _opened(policy: HealthPolicy) -> NodeHealth:
    health = NodeHealth(policy)
    for moment in range(policy.failures_to_open):
        health.failed(moment)
    return health


@pytest.mark.parametrize("outcome", ["succeeded", "failed", "inconclusive"])
def test_breaker_trial_is_settled_by_every_outcome(outcome: str) -> None:
    health = _opened(HealthPolicy(failures_to_open=3, cooldown=30))
    assert health.admit(10) is Admission.SKIP
    trial = health.admit(40)
    assert trial is Admission.TRIAL and health.probing
    assert health.admit(40.5) is Admission.SKIP, "one trial at a time"
    if outcome == "succeeded":
        health.succeeded(0.01)
        assert health.admit(41) is Admission.CALL, "an answer closes the circuit"
    elif outcome == "failed":
        health.failed(41)
        assert health.admit(60) is Admission.SKIP, "a failure re-opens it for a cool-down"
        assert health.admit(72) is Admission.TRIAL
    else:
        health.inconclusive(trial)
        assert not health.probing
        assert health.admit(41) is Admission.TRIAL, "a refusal or cancellation gives the trial back"


def test_an_ordinary_call_that_ends_inconclusive_leaves_a_trial_alone() -> None:
    health = _opened(HealthPolicy(failures_to_open=3, cooldown=30))
    trial = health.admit(40)
    health.inconclusive(Admission.CALL)
    assert health.probing and health.admit(41) is Admission.SKIP
    health.inconclusive(trial)
    assert health.admit(41) is Admission.TRIAL


# --------------------------------------------------------------------------- breaker, fan-out


@pytest.fixture
def proxied_fr(federation) -> Iterator[tuple[gateway_config.GatewayConfig, FaultProxy]]:
    """The gateway configuration with only FR, reached through a fault proxy."""
    base = gateway_config.load(federation.config)
    fr = next(n for n in base.nodes if n.node_id == "FR")
    host, port = fr.address.rsplit(":", 1)
    with FaultProxy(target=(host, int(port))) as proxy:
        yield dataclasses.replace(base, nodes=(dataclasses.replace(fr, address=proxy.address),)), proxy


async def _open_breaker(fed: Federation, proxy: FaultProxy) -> None:
    """One real failure (a call that times out on a stalled link) opens FR's breaker."""
    assert (await fed.match([ITEM], "WARM", timeout=10, deadline=10))[0].status is NodeStatus.NO_HIT
    proxy.stall()
    answer = (await fed.match([ITEM], "STALLED", timeout=0.5, deadline=0.5))[0]
    assert answer.status is NodeStatus.TIMED_OUT, answer
    proxy.resume()


def _one_shot_policy() -> HealthPolicy:
    # Open after one failure; trial at once (no cool-down to wait out).
    return HealthPolicy(failures_to_open=1, cooldown=0.0)


def test_refused_trial_call_does_not_leave_the_member_skipped(proxied_fr) -> None:
    config, proxy = proxied_fr

    async def run() -> list[NodeAnswer]:
        async with Federation(config, signer_for(config), _one_shot_policy()) as fed:
            await _open_breaker(fed, proxy)
            # The trial: the node refuses a query without a case reference.
            refused = (await fed.match([ITEM], "", timeout=10, deadline=10))[0]
            after = [(await fed.match([ITEM], f"AFTER-{n}", timeout=10, deadline=10))[0] for n in range(2)]
            return [refused, *after]

    refused, *after = asyncio.run(run())
    assert refused.status is NodeStatus.REFUSED, refused
    assert [a.status for a in after] == [NodeStatus.NO_HIT] * 2, after


def test_cancelled_trial_call_does_not_leave_the_member_skipped(proxied_fr) -> None:
    config, proxy = proxied_fr

    async def run() -> NodeAnswer:
        async with Federation(config, signer_for(config), _one_shot_policy()) as fed:
            await _open_breaker(fed, proxy)
            proxy.stall()
            trial = asyncio.create_task(fed.match([ITEM], "TRIAL", timeout=10, deadline=10))
            await wait_until_async(lambda: fed.health("FR").probing, 20, "the trial call to start")
            trial.cancel()  # e.g. the investigator's Ctrl-C, or a triage batch given up
            with pytest.raises(asyncio.CancelledError):
                await trial
            proxy.resume()
            return (await fed.match([ITEM], "AFTER", timeout=10, deadline=10))[0]

    answer = asyncio.run(run())
    assert answer.status is NodeStatus.NO_HIT, answer


# --------------------------------------------------------------------------- died during the call


def test_member_dying_during_the_call_is_told_apart_from_one_already_down(proxied_fr) -> None:
    config, proxy = proxied_fr

    async def run() -> NodeAnswer:
        async with Federation(config, signer_for(config)) as fed:
            assert (await fed.match([ITEM], "WARM", timeout=10, deadline=10))[0].status is NodeStatus.NO_HIT
            proxy.stall()
            sent = proxy.snapshot().read_up
            call = asyncio.create_task(fed.match([ITEM], "DIES", timeout=10, deadline=10))
            await wait_until_async(lambda: proxy.snapshot().read_up > sent, 20, "the request to leave the gateway")
            proxy.reset(persist=True)  # the member dies now, and stays down for the retry
            return (await call)[0]

    answer = asyncio.run(run())
    assert answer.status is NodeStatus.UNAVAILABLE, answer
    first, _, retry = answer.message.partition("; retry: ")
    assert first.startswith("connection lost during the call ("), answer.message
    assert retry.startswith("failed to connect"), answer.message


# --------------------------------------------------------------------------- own certificate


@dataclasses.dataclass
class _Made:
    files: TlsFiles
    who: ClientIdentity


@pytest.fixture
def make_cert(pki: DevPki, tmp_path: Path) -> Callable[..., _Made]:
    """A client certificate and key written to disk, issued as asked (by the federation CA by default)."""
    ca_key = load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())

    def make(leaf: Leaf | None = None, *, other_ca: bool = False, key_of_other: bool = False,
             gateway_id: str = "eu-1") -> _Made:
        issuer_key, issuer_cert = new_ca("rogue CA") if other_ca else (ca_key, ca_cert)
        key, cert = issue(issuer_key, issuer_cert, leaf or gateway_leaf(pki.federation, "eu-1"))
        if key_of_other:
            key, _ = issue(issuer_key, issuer_cert, gateway_leaf(pki.federation, "eu-1"))
        name = f"gw-{len(list(tmp_path.glob('*.pem')))}"
        (tmp_path / f"{name}.pem").write_bytes(cert_pem(cert))
        write_private(tmp_path / f"{name}.key", key_pem(key))
        return _Made(TlsFiles(pki.ca_cert, tmp_path / f"{name}.pem", tmp_path / f"{name}.key"),
                     ClientIdentity(pki.federation, gateway_id))

    return make


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _problem(made: _Made) -> str:
    with pytest.raises(CertificateProblem) as caught:
        check_client(made.files, made.who)
    return str(caught.value)


def test_a_good_client_certificate_passes(make_cert) -> None:
    made = make_cert()
    check_client(made.files, made.who)


def test_expired_and_not_yet_valid_certificates_say_which_date(make_cert, pki: DevPki) -> None:
    base = gateway_leaf(pki.federation, "eu-1")
    ended = _now() - dt.timedelta(days=2)
    expired = make_cert(dataclasses.replace(base, not_before=_now() - dt.timedelta(days=30), not_after=ended))
    assert f"expired on {ended:%Y-%m-%d}" in _problem(expired)
    starts = _now() + dt.timedelta(days=3)
    early = make_cert(dataclasses.replace(base, not_before=starts, not_after=_now() + dt.timedelta(days=30)))
    assert f"not valid yet: valid from {starts:%Y-%m-%d}" in _problem(early)


def test_certificate_of_another_ca_is_named_as_such(make_cert) -> None:
    assert "does not chain to the federation CA" in _problem(make_cert(other_ca=True))


def test_certificate_without_client_auth_usage(make_cert, pki: DevPki) -> None:
    server_only = dataclasses.replace(gateway_leaf(pki.federation, "eu-1"), client=False, server=True)
    assert "extendedKeyUsage allows serverAuth, not clientAuth" in _problem(make_cert(server_only))


def test_key_that_does_not_belong_to_the_certificate(make_cert) -> None:
    assert "does not belong to client certificate" in _problem(make_cert(key_of_other=True))


@pytest.mark.parametrize("uris, expected", [
    (["spiffe://test.icse.test/node/eu-1"], "names spiffe://test.icse.test/node/eu-1"),
    (["spiffe://other.test/gateway/eu-1"], "names spiffe://other.test/gateway/eu-1"),
    ([], "names no URI name"),
])
def test_certificate_that_does_not_name_this_gateway(make_cert, pki: DevPki, uris: list[str], expected: str) -> None:
    leaf = dataclasses.replace(gateway_leaf(pki.federation, "eu-1"), uris=uris)
    message = _problem(make_cert(leaf))
    assert expected in message and f"expect the URI spiffe://{pki.federation}/gateway/eu-1" in message


def test_gateway_with_a_bad_certificate_contacts_no_node(make_cert, federation, pki: DevPki,
                                                           tmp_path: Path) -> None:
    """Exit 2 and the reason, before any node is dialled: no node logs a handshake or a call."""
    base = gateway_leaf(pki.federation, "eu-1")
    expired = make_cert(dataclasses.replace(base, not_before=_now() - dt.timedelta(days=30),
                                            not_after=_now() - dt.timedelta(days=1)))
    with FaultProxy(target=("127.0.0.1", 9)) as proxy:
        text = federation.config.read_text()
        for old, new in ((str(pki.gateway_cert("eu-1")), str(expired.files.cert)),
                         (str(pki.gateway_key("eu-1")), str(expired.files.key))):
            assert old in text
            text = text.replace(old, new)
        text += f'[[nodes]]\nid = "PL"\ncountry = "PL"\naddress = "{proxy.address}"\n'
        config = tmp_path / "expired.toml"
        config.write_text(text)
        done = run_gateway("query", "--config", str(config), "--case", "C-1", "--hash", "md5:" + "00" * 16)
        assert done.returncode == 2, done.stdout + done.stderr
        assert "expired on" in done.stderr and "Traceback" not in done.stderr, done.stderr
        assert proxy.snapshot().accepted == 0, "a node was contacted"


def test_ctrl_c_during_a_query_ends_as_interrupted(federation, tmp_path: Path) -> None:
    """Ctrl-C while a member holds the call: exit 130 and no answer, never a result that looks whole."""
    with black_hole() as hole:
        hole.settimeout(60)
        config = tmp_path / "held.toml"
        config.write_text(federation.config.read_text() + member_entry("PL", address_of(hole)))
        query = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "query", "--config", str(config), "--case", "CTRL-C",
             "--hash", "sha256:" + "ab" * 32, "--timeout", "120", "--deadline", "120", "--format", "json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            held, _ = hole.accept()  # the query is out, and PL's call is in flight
            with held:
                assert query.poll() is None
                query.send_signal(signal.SIGINT)
                out, err = query.communicate(timeout=30)
        finally:
            if query.poll() is None:
                query.kill()
                query.wait()
    assert query.returncode == 130, out + err
    assert out == "", out
