"""Helpers for tests that talk to real node processes over real mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import inspect
import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from federation import identity, tokens
from federation.localfed import LocalFederation
from federation.pki import DevPki
from federation.query import QueryItem, query_sha256
from federation.tls import TlsFiles, channel_credentials, thumbprint
from federation.wire import items_to_pb, pb, rpc


@dataclass(frozen=True)
class Client:
    """A raw gRPC client for one node, with a chosen identity and signing key."""

    address: str
    node_id: str
    federation: str
    credentials: grpc.ChannelCredentials

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(
            self.address, self.credentials,
            options=[("grpc.ssl_target_name_override", identity.node_tls_name(self.federation, self.node_id))],
        )

    async def match(self, items: Sequence[QueryItem], token: str | None, timeout: float = 10.0) -> pb.MatchResponse:
        async with self.channel() as channel:
            metadata = tokens.bearer(token) if token is not None else None
            return await rpc.NodeStub(channel).Match(items_to_pb(items), timeout=timeout, metadata=metadata)


def gateway_client(pki: DevPki, address: str, node_id: str, gateway_id: str = "eu-1") -> Client:
    files = TlsFiles(pki.ca_cert, pki.gateway_cert(gateway_id), pki.gateway_key(gateway_id))
    return Client(address, node_id, pki.federation, channel_credentials(files))


def signing_key(pki: DevPki, gateway_id: str = "eu-1") -> tokens.SigningKey:
    return tokens.SigningKey.load(pki.signing_key(gateway_id), pki.signing_kid(gateway_id))


def claims_for(pki: DevPki, node_id: str, items: Sequence[QueryItem], *, issuer: str = "eu-1",
               case: str = "CASE-1", rpc_name: str = "Match", now: float | None = None, lifetime: int = 30,
               cert_of: str | None = None, country: str = "FR", subject: str = "officer-1") -> tokens.QueryClaims:
    """Claims as gateway ``issuer`` would sign them (bound to ``cert_of``'s certificate)."""
    return tokens.new_claims(
        issuer=issuer, subject=subject, org="Test Police", country=country, audience=node_id,
        rpc=rpc_name, query_sha256=query_sha256(items), case=case, lifetime=lifetime, now=now,
        cert_thumbprint=thumbprint(pki.gateway_cert(cert_of or issuer).read_bytes()),
    )


def run_gateway(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway.cli", *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def query_json(config: Path, *args: str) -> tuple[int, dict]:
    done = run_gateway("query", "--config", str(config), "--format", "json", *args)
    assert done.stderr == "" or done.returncode != 0, done.stderr
    return done.returncode, (json.loads(done.stdout) if done.stdout.strip() else {})


WIDE_COLUMNS = ("md5", "sha1", "sha256", "pdq", "vpdq", "reference", "category", "victim_identified", "series")


def import_rows(local: LocalFederation, node_id: str, rows: list[dict[str, str]], directory: Path) -> None:
    """Imports rows (wide CSV: one column per algorithm) through the real ``icse-node import``."""
    path = directory / f"{node_id}-{len(list(directory.glob('*.csv')))}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, WIDE_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    done = local[node_id].import_file(path)
    assert done.returncode == 0, done.stdout + done.stderr


POLL_INTERVAL = 0.01


def wait_until(predicate: Callable[[], object], timeout: float, what: str,
               interval: float = POLL_INTERVAL) -> object:
    """Polls ``predicate`` until it returns something true, and returns that.

    How tests wait for something observable (a file, a record, a process gone,
    a retried call that succeeds) instead of sleeping blindly: the deadline only
    bounds a failure, it is never what the test waits for. ``interval`` spaces
    predicates that are costly (a whole query). Raises ``TimeoutError`` naming ``what``.
    """
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"not within {timeout:g} s: {what}")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], object], timeout: float, what: str,
                           interval: float = POLL_INTERVAL) -> object:
    """``wait_until`` for a test running an event loop (the loop keeps running);
    ``predicate`` may be a coroutine function, e.g. a call that is retried."""
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > end:
            raise TimeoutError(f"not within {timeout:g} s: {what}")
        await asyncio.sleep(interval)


@contextlib.contextmanager
def black_hole() -> Iterator[socket.socket]:
    """A listening socket that accepts connections and never answers: a member that
    holds every call (its TLS handshake hangs). Its address is ``address_of(hole)``."""
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        yield hole


def address_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"{host}:{port}"


def member_entry(node_id: str, address: str) -> str:
    """One more ``[[nodes]]`` table for a federation.toml."""
    return f'[[nodes]]\nid = "{node_id}"\ncountry = "{node_id}"\naddress = "{address}"\n'
