"""A local federation of real node processes on loopback, for the demo, the
tests and the benchmarks.

It writes each node's configuration, starts ``icse-node serve`` as a separate
process, waits for it to report its port, writes the gateway's federation
configuration, and stops every process it started — on normal exit, on an
exception and on Ctrl-C alike. It drives the node and gateway only through
their command lines and files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from federation.pki import DevPki


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    country: str
    contact: str = ""
    limits: dict[str, int] = field(default_factory=dict)
    # Further configuration tables, e.g. {"policy": {...}, "metrics": {...}}.
    tables: dict[str, dict[str, object]] = field(default_factory=dict)
    # A replica of a member (same node_id, certificate and data) needs its own
    # directory and name here, e.g. "FR-b"; empty means the node id.
    name: str = ""

    @property
    def key(self) -> str:
        """How the federation names this node: its directory and its key in ``LocalFederation``."""
        return self.name or self.node_id


def _toml_value(value: object) -> str:
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def toml_text(tables: dict[str, dict[str, object]]) -> str:
    """Small TOML writer for flat tables (enough for node and gateway configs)."""
    lines = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


class LocalNode:
    def __init__(self, spec: NodeSpec, workdir: Path, pki: DevPki, gateways: Sequence[str]):
        self.spec = spec
        self.dir = workdir / spec.key
        self.config_path = self.dir / "node.toml"
        self.store_path = self.dir / "store.sqlite"
        self.log_path = self.dir / "node.log"
        self.ready_path = self.dir / "ready.json"
        self.pki = pki
        self.gateways = list(gateways)
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None
        # Where the node listens and is reached; a network-namespace test sets
        # its own address and a command prefix (``ip netns exec NAME``).
        self.host = "127.0.0.1"
        self.prefix: list[str] = []

    @property
    def node_id(self) -> str:
        return self.spec.node_id

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def write_config(self, listen: str | None = None) -> Path:
        listen = listen or f"{self.host}:0"
        self.dir.mkdir(parents=True, exist_ok=True)
        tables: dict[str, dict[str, object]] = {
            "node": {
                "id": self.spec.node_id,
                "country": self.spec.country,
                "federation": self.pki.federation,
                "listen": listen,
                "store": str(self.store_path),
                "contact": self.spec.contact,
            },
            "tls": {
                "ca": str(self.pki.ca_cert),
                "cert": str(self.pki.node_cert(self.spec.node_id)),
                "key": str(self.pki.node_key(self.spec.node_id)),
            },
            "trust": {"gateway_keys": str(self.pki.jwks), "gateways": self.gateways},
        }
        if self.spec.limits:
            tables["limits"] = dict(self.spec.limits)
        tables.update(self.spec.tables)
        self.config_path.write_text(toml_text(tables))
        return self.config_path

    def node_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "node.cli", *args]

    def import_file(self, path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        """Runs ``icse-node import`` against this node's store."""
        if not self.config_path.exists():
            self.write_config()
        return subprocess.run(
            self.node_command("import", "--config", str(self.config_path), str(path), *extra),
            capture_output=True, text=True, timeout=600, check=False,
        )

    def serve_command(self) -> list[str]:
        """``icse-node serve`` tied to this process: not even a SIGKILLed
        supervisor leaves nodes behind. The node arms the tie itself, after
        exec: no Python may run between fork and exec in a process with gRPC
        threads (no pre-exec hook). Standard input is a pipe whose end only we
        hold; the kernel closes it when we die, whatever the prefix. The
        parent-death signal needs the node's parent to be us: without a prefix
        (a prefix such as ``ip netns exec`` may fork)."""
        command = self.node_command("serve", "--config", str(self.config_path),
                                    "--ready-file", str(self.ready_path), "--stop-on-stdin-eof")
        if not self.prefix:
            command += ["--parent-pid", str(os.getpid())]
        return self.prefix + command

    def start(self) -> None:
        if not self.config_path.exists():
            self.write_config()
        self.ready_path.unlink(missing_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.serve_command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.PIPE,
                env=environment(),
            )

    def wait_ready(self, timeout: float = 30.0) -> None:
        assert self.process is not None
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ready_path.exists():
                ready = json.loads(self.ready_path.read_text())
                self.port, self.metrics_port = int(ready["port"]), ready.get("metrics_port")
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"node {self.node_id} exited with {self.process.returncode}:\n{self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"node {self.node_id} not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout``."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process = None
        return code


class LocalFederation:
    """Nodes started together, and the gateway configuration that reaches them."""

    def __init__(self, workdir: Path, pki: DevPki, specs: Iterable[NodeSpec], gateway_id: str = "eu-1"):
        self.workdir = workdir.resolve()
        self.pki = pki
        self.gateway_id = gateway_id
        self.nodes: dict[str, LocalNode] = {}
        for spec in specs:
            if spec.key in self.nodes:
                raise ValueError(f"two nodes named {spec.key!r}: give a replica its own NodeSpec.name")
            self.nodes[spec.key] = LocalNode(spec, self.workdir, pki, [gateway_id])

    def __getitem__(self, key: str) -> LocalNode:
        """A node by its name (the node id, or a replica's own name)."""
        return self.nodes[key]

    def start(self, timeout: float = 60.0) -> LocalFederation:
        try:
            for node in self.nodes.values():
                node.start()
            for node in self.nodes.values():
                node.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.running():
                node.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        for node in self.nodes.values():
            node.stop()

    def __enter__(self) -> LocalFederation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_gateway_config(
        self, path: Path | None = None, *, officer: str = "officer-1", org: str = "Demo Police",
        country: str = "FR", node_timeout: float = 5.0, gateway_id: str | None = None,
        nodes: Iterable[LocalNode] | None = None,
    ) -> Path:
        gateway_id = gateway_id or self.gateway_id
        path = path or self.workdir / "federation.toml"
        text = toml_text({
            "gateway": {"id": gateway_id, "federation": self.pki.federation, "node_timeout": node_timeout},
            "tls": {
                "ca": str(self.pki.ca_cert),
                "cert": str(self.pki.gateway_cert(gateway_id)),
                "key": str(self.pki.gateway_key(gateway_id)),
            },
            "signing": {"key": str(self.pki.signing_key(gateway_id)), "kid": self.pki.signing_kid(gateway_id)},
            "requester": {"officer": officer, "org": org, "country": country},
        })
        # Replicas of one member (same node id) are one [[nodes]] table with addresses = [...].
        members: dict[str, list[LocalNode]] = {}
        for node in nodes if nodes is not None else self.nodes.values():
            members.setdefault(node.node_id, []).append(node)
        for node_id, replicas in members.items():
            entry: dict[str, object] = {"id": node_id, "country": replicas[0].spec.country}
            if len(replicas) == 1:
                entry["address"] = replicas[0].address
            else:
                entry["addresses"] = [replica.address for replica in replicas]
            text += "[[nodes]]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in entry.items()) + "\n\n"
        path.write_text(text)
        return path

    def gateway_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "gateway.cli", *args]


def environment() -> dict[str, str]:
    """The environment child processes run with (unbuffered output)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1"}
