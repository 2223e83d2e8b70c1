"""The conformance kit (``icse-conformance``), run as a member would run it:
green against our node and our gateway, red against a node and a gateway with
a planted defect. Real processes, real certificates, real mutual TLS.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from federation.localfed import LocalNode, NodeSpec, environment
from federation.pki import DevPki
from tests.conftest import RunningFederation

NODE = "FR"
KIT = [sys.executable, "-m", "federation.conformance.cli"]


def _kit(*args: str) -> subprocess.CompletedProcess[str]:
    """The kit's exit status is part of what the tests judge (1: a check failed), so it is returned, not raised."""
    return subprocess.run([*KIT, *args], capture_output=True, text=True, timeout=300, env=environment(), check=False)


def _node_args(pki: DevPki, node: LocalNode, *extra: str) -> list[str]:
    return ["node", "--address", node.address, "--node-id", node.node_id, "--federation", pki.federation,
            "--ca", str(pki.ca_cert), "--cert", str(pki.gateway_cert("eu-1")), "--key", str(pki.gateway_key("eu-1")),
            "--signing-key", str(pki.signing_key("eu-1")), "--kid", pki.signing_kid("eu-1"), *extra]


def _lines(output: str) -> dict[str, str]:
    """check name -> outcome, from the kit's table."""
    table = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("pass", "FAIL", "skip"):
            table[words[1]] = words[0]
    return table


def test_our_node_passes_the_whole_catalogue(federation: RunningFederation) -> None:
    pki, node = federation.local.pki, federation.local[NODE]
    done = _kit(*_node_args(pki, node, "--other-signing-key", str(pki.signing_key("eu-2")),
                            "--other-kid", pki.signing_kid("eu-2"),
                            "--known", f"sha256:{federation.data.shared_sha256}"))
    table = _lines(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    # This federation's nodes do not offer private matching: those checks are skipped (and run in
    # tests/test_private_gateway.py against a node that offers it); every other check passes.
    assert {o for n, o in table.items() if not n.startswith("private.")} == {"pass"}, done.stdout
    assert {o for n, o in table.items() if n.startswith("private.")} == {"skip"}, done.stdout
    for name in ("token.replayed", "auth.key-of-another-gateway", "auth.legacy-qh", "match.hit-in-place",
                 "transport.reflection-v1", "describe.answer", "request.too-many"):
        assert table[name] == "pass"


class _DefectiveNode(LocalNode):
    def node_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "tests.defective_node", *args]


@pytest.fixture
def defective_node(pki: DevPki, tmp_path: Path) -> Iterator[LocalNode]:
    node = _DefectiveNode(NodeSpec(NODE, NODE), tmp_path, pki, ["eu-1"])
    node.start()
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def test_a_node_that_accepts_replayed_tokens_fails(pki: DevPki, defective_node: LocalNode) -> None:
    done = _kit(*_node_args(pki, defective_node))
    table = _lines(done.stdout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert table["token.replayed"] == "FAIL"
    assert "OK then OK" in done.stdout
    assert table["match.no-hit-is-absent"] == "pass" and table["auth.key-of-another-gateway"] == "skip"


def _gateway_template(pki: DevPki, tmp_path: Path, signing_of: str = "eu-1") -> Path:
    template = tmp_path / "federation.toml.in"
    template.write_text(f"""[gateway]
id = "eu-1"
federation = "{pki.federation}"
node_timeout = 10

[tls]
ca = "{pki.ca_cert}"
cert = "{pki.gateway_cert('eu-1')}"
key = "{pki.gateway_key('eu-1')}"

[signing]
key = "{pki.signing_key(signing_of)}"
kid = "{pki.signing_kid(signing_of)}"

[requester]
officer = "officer-1"
org = "Test Police"
country = "FR"

[[nodes]]
id = "PL"
country = "PL"
address = "{{address}}"
""")
    return template


def _gateway_kit(pki: DevPki, template: Path) -> subprocess.CompletedProcess[str]:
    gateway = f"{sys.executable} -m gateway.cli"
    query = (f"{gateway} query --config {{config}} --case CONFORMANCE-1 --format json "
             f"--hash md5:{'ab' * 16} --hash pdq:{'0f' * 32}")
    return _kit("gateway", "--node-id", "PL", "--federation", pki.federation, "--ca", str(pki.ca_cert),
                "--cert", str(pki.node_cert("PL")), "--key", str(pki.node_key("PL")), "--jwks", str(pki.jwks),
                "--template", str(template), "--run", query, "--run", f"{gateway} nodes --config {{config}}",
                "--run-incompatible", query)


def test_our_gateway_passes(pki: DevPki, tmp_path: Path) -> None:
    done = _gateway_kit(pki, _gateway_template(pki, tmp_path))
    table = _lines(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr
    assert set(table.values()) == {"pass"}, done.stdout
    assert {"calls.match", "calls.describe", "call.qh", "call.key-owner", "incompatible.1"} <= set(table)


def test_a_gateway_signing_with_another_gateways_key_fails(pki: DevPki, tmp_path: Path) -> None:
    done = _gateway_kit(pki, _gateway_template(pki, tmp_path, signing_of="eu-2"))
    table = _lines(done.stdout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert table["call.key-owner"] == "FAIL" and table["call.qh"] == "pass"


def test_the_kit_imports_neither_node_nor_gateway() -> None:
    """It judges our node and gateway as it judges a foreign one: through the protocol only."""
    probe = ("import sys, federation.conformance.cli; "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in ('node', 'gateway')))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
