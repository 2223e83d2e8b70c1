"""Proof that the network harness works: namespace hosts (root only) and the fault proxy.

All traffic stays on loopback or on the private 10.231.0.0/16 veths these tests create.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import socketserver
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from federation import identity
from federation.pki import DevPki
from federation.tls import TlsFiles, channel_credentials, server_credentials
from tests.net import netns
from tests.net.faultproxy import FaultProxy
from tests.net.netns import netns_hosts, wait_tcp  # noqa: F401  (fixture)
from tests.support import wait_until

PORT = 7000  # inside a fresh namespace, nothing else listens

# A small server run inside a namespace.  First byte selects the mode:
#   E: echo until EOF;  D<8-byte n>: send n bytes, close;  U: read until EOF, reply 8-byte count.
NS_SERVER = r"""
import signal, socket, sys, threading
signal.alarm(120)  # hard bound even if nobody stops us
port = int(sys.argv[1])
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", port))
srv.listen(16)

def recv_exact(c, n):
    buf = b""
    while len(buf) < n:
        d = c.recv(n - len(buf))
        if not d:
            raise EOFError
        buf += d
    return buf

def serve(c):
    with c:
        try:
            mode = c.recv(1)
            if mode == b"E":
                while d := c.recv(65536):
                    c.sendall(d)
            elif mode == b"D":
                n = int.from_bytes(recv_exact(c, 8), "big")
                block = b"\xab" * 65536
                while n > 0:
                    c.sendall(block[:n])
                    n -= min(n, len(block))
            elif mode == b"U":
                total = 0
                while d := c.recv(65536):
                    total += len(d)
                c.sendall(total.to_bytes(8, "big"))
        except (OSError, EOFError):
            pass

while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""


def _echo_once(address: str, port: int, payload: bytes, timeout: float = 3.0) -> bytes:
    with socket.create_connection((address, port), timeout=timeout) as c:
        c.sendall(b"E" + payload)
        c.shutdown(socket.SHUT_WR)
        return _read_all(c)


def _read_all(c: socket.socket) -> bytes:
    chunks = []
    while d := c.recv(65536):
        chunks.append(d)
    return b"".join(chunks)


def _download(address: str, n: int) -> float:
    start = time.monotonic()
    with socket.create_connection((address, PORT), timeout=10) as c:
        c.sendall(b"D" + n.to_bytes(8, "big"))
        got = len(_read_all(c))
    assert got == n
    return time.monotonic() - start


def _upload(address: str, n: int) -> float:
    start = time.monotonic()
    with socket.create_connection((address, PORT), timeout=10) as c:
        c.sendall(b"U")
        c.sendall(b"\xcd" * n)
        c.shutdown(socket.SHUT_WR)
        got = int.from_bytes(_read_all(c), "big")
    assert got == n
    return time.monotonic() - start


def _start_ns_server(h: netns.Host) -> subprocess.Popen:
    proc = h.python(NS_SERVER, str(PORT))
    wait_tcp(h.address, PORT, timeout=5)
    return proc


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (missing, or a zombie nobody reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


# =============================================================================== namespaces


def test_root_available_reports_reason_or_none() -> None:
    reason = netns.root_available()
    assert reason is None or (isinstance(reason, str) and reason)


def test_hosts_are_unique_and_closed_cleanly(netns_hosts) -> None:  # noqa: F811
    a, b = netns_hosts("fr"), netns_hosts("de")
    for h in (a, b):
        assert len(h.root_veth) <= 15 and len(h.ns_veth) <= 15
        assert h.subnet is not None and h.subnet.prefixlen == 30
        assert h.subnet.subnet_of(netns.SUPERNET)
        assert {h.address, h.gateway_address} <= {str(x) for x in h.subnet.hosts()}
        assert h.ns in netns._ns_names()
    assert a.subnet != b.subnet and a.ns != b.ns and a.root_veth != b.root_veth
    # lo is up inside and the veth address is configured there.
    inside = a.run(["ip", "-o", "-4", "addr", "show"]).stdout
    assert "127.0.0.1/8" in inside and f"{a.address}/30" in inside

    ns, veth = a.ns, a.root_veth
    a.close()
    a.close()  # idempotent
    assert a.closed and ns not in netns._ns_names()
    assert subprocess.run(["ip", "link", "show", veth], capture_output=True, check=False).returncode != 0


def test_reachable_then_partitioned_then_restored(netns_hosts) -> None:  # noqa: F811
    h = netns_hosts("fr")
    _start_ns_server(h)
    assert _echo_once(h.address, PORT, b"hello") == b"hello"

    # A connection that survives the partition: its bytes are held, not lost.
    live = socket.create_connection((h.address, PORT), timeout=5)
    live.sendall(b"E")
    h.link_down()
    with pytest.raises(OSError) as refused:
        socket.create_connection((h.address, PORT), timeout=2).close()
    # Refused by the guard route at once (a dropped link), not a connect that timed out.
    assert refused.value.errno == errno.EHOSTUNREACH, refused.value
    live.sendall(b"during-partition")
    live.settimeout(0.5)
    with pytest.raises(TimeoutError):
        live.recv(100)

    h.link_up()
    wait_tcp(h.address, PORT, timeout=5)
    assert _echo_once(h.address, PORT, b"back") == b"back"
    live.settimeout(8)  # TCP retransmission backoff after the outage
    got = b""
    while len(got) < len(b"during-partition"):
        got += live.recv(100)
    assert got == b"during-partition"
    live.close()


def test_blackhole_makes_connects_time_out(netns_hosts) -> None:  # noqa: F811
    h = netns_hosts("nl")
    _start_ns_server(h)
    h.blackhole()
    # A timeout, not a refusal: the packets vanish silently.
    with pytest.raises(TimeoutError):
        socket.create_connection((h.address, PORT), timeout=1.0).close()
    h.unblackhole()
    wait_tcp(h.address, PORT, timeout=5)
    assert _echo_once(h.address, PORT, b"ok") == b"ok"


def test_tbf_limit_slows_transfers_both_ways(netns_hosts) -> None:  # noqa: F811
    h = netns_hosts("es")
    _start_ns_server(h)
    size = 256 * 1024
    free_down = min(_download(h.address, size) for _ in range(3))
    free_up = min(_upload(h.address, size) for _ in range(3))

    h.limit_bandwidth(rate="4mbit", burst="16kb", latency="100ms")  # ~0.5 s for 256 KB
    root_side, ns_side = h.qdiscs()
    assert "tbf" in root_side and "tbf" in ns_side
    slow_down = _download(h.address, size)  # namespace-side egress (node -> gateway)
    slow_up = _upload(h.address, size)  # root-side egress (gateway -> node)
    assert slow_down > 5 * free_down, (slow_down, free_down)
    assert slow_up > 5 * free_up, (slow_up, free_up)

    h.clear_limits()
    root_side, ns_side = h.qdiscs()
    assert "tbf" not in root_side and "tbf" not in ns_side
    assert _download(h.address, size) < slow_down / 3


def test_close_stops_processes_even_on_failure() -> None:
    netns.require_root()
    with pytest.raises(RuntimeError, match="boom"), netns.host("it") as h:
        ns, veth = h.ns, h.root_veth
        leader = h.popen(["sh", "-c", "sleep 30 & sleep 30"])
        wait_until(lambda: len(netns._ns_pids(ns)) >= 2, 5, "two processes in the namespace")
        inside = netns._ns_pids(ns)
        assert len(inside) >= 2
        raise RuntimeError("boom")
    assert leader.poll() is not None
    assert all(_gone(pid) for pid in inside), inside
    assert ns not in netns._ns_names()
    assert subprocess.run(["ip", "link", "show", veth], capture_output=True, check=False).returncode != 0


def test_stale_namespaces_and_veths_are_cleaned() -> None:
    netns.require_root()
    dead = subprocess.Popen(["true"])
    dead.wait()
    assert not netns._pid_alive(dead.pid)
    ns = f"{netns.NS_PREFIX}{dead.pid}-1-stale"
    veth = f"{netns.VETH_PREFIX}99999r"  # beyond the slot range: never a live host's name
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run(["ip", "link", "add", "name", veth, "type", "veth", "peer", "name",
                        f"{netns.VETH_PREFIX}99999n"], check=True)
        subprocess.run(["ip", "link", "set", "dev", veth, "alias",
                        f"{netns.ALIAS_PREFIX} pid={dead.pid} ns={ns}"], check=True)
        removed = netns.cleanup_stale()
        assert ns in removed and veth in removed
        assert ns not in netns._ns_names()
        assert subprocess.run(["ip", "link", "show", veth], capture_output=True, check=False).returncode != 0
    finally:
        subprocess.run(["ip", "link", "del", veth], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def test_in_process_socket_inside_namespace(netns_hosts) -> None:  # noqa: F811
    h = netns_hosts("pl")
    listener = h.socket()
    listener.bind(("0.0.0.0", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    with socket.create_connection((h.address, port), timeout=3) as c:
        peer, (peer_host, _) = listener.accept()
        with peer:
            assert peer_host == h.gateway_address
            peer.sendall(b"from-inside")
            assert c.recv(100) == b"from-inside"
    # The root namespace's loopback does not see the namespace's listener.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_proxy_into_namespace(netns_hosts) -> None:  # noqa: F811
    """The two tools compose: proxy on loopback -> node address inside a namespace."""
    h = netns_hosts("be")
    _start_ns_server(h)
    with FaultProxy(target=(h.address, PORT)) as proxy:
        assert _echo_once("127.0.0.1", proxy.port, b"via-proxy") == b"via-proxy"


# =============================================================================== fault proxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(30)
        try:
            while d := self.request.recv(65536):
                self.request.sendall(d)
        except OSError:
            pass


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.server_address
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo_server) -> Iterator[FaultProxy]:
    with FaultProxy(target=echo_server, seed=1) as p:
        yield p


def _connect(proxy: FaultProxy, timeout: float = 3.0) -> socket.socket:
    c = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def _rtt(c: socket.socket, payload: bytes = b"ping-0123456789") -> float:
    start = time.monotonic()
    c.sendall(payload)
    got = b""
    while len(got) < len(payload):
        d = c.recv(65536)
        assert d, "connection closed"
        got += d
    assert got == payload
    return time.monotonic() - start


def _echo_bulk(c: socket.socket, data: bytes) -> bytes:
    sender = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)), daemon=True)
    sender.start()
    got = _read_all(c)
    sender.join(5)
    return got


def test_proxy_forwards_bytes_unchanged(proxy: FaultProxy) -> None:
    data = os.urandom(1 << 20)
    with _connect(proxy, timeout=10) as c:
        assert _echo_bulk(c, data) == data
    wait_until(lambda: proxy.bytes_up == len(data) and proxy.bytes_down == len(data), 3,
               "the proxy counts every byte both ways")
    stats = proxy.snapshot()
    assert stats.accepted == 1 and stats.resets == 0


def test_proxy_delay_adds_latency_and_clear_removes_it(proxy: FaultProxy) -> None:
    with _connect(proxy) as c:
        base = statistics.median(_rtt(c) for _ in range(5))
        proxy.delay(0.1)  # applied to the existing connection
        delayed = statistics.median(_rtt(c) for _ in range(3))
        assert delayed >= 0.18, (delayed, base)  # a lower bound: a delay never ends early
        # A delay far beyond the read timeout: an echo that comes back at all was not delayed.
        proxy.delay(600)
        proxy.clear()
        c.settimeout(30)
        _rtt(c)


def test_proxy_delay_preserves_order(proxy: FaultProxy) -> None:
    proxy.delay(0.02)
    data = b"".join(i.to_bytes(4, "big") for i in range(64 * 1024))  # 256 KB counter
    with _connect(proxy, timeout=10) as c:
        assert _echo_bulk(c, data) == data


def test_proxy_drop_holds_chunks_and_keeps_order(proxy: FaultProxy) -> None:
    with _connect(proxy) as c:
        proxy.drop(1.0, stall=(0.2, 0.3))  # every chunk, each direction
        assert _rtt(c) >= 0.35
        proxy.drop(0.5, stall=(0.01, 0.05))
        data = os.urandom(128 * 1024)
        with _connect(proxy, timeout=10) as c2:
            assert _echo_bulk(c2, data) == data
        proxy.drop(0.0)
        _rtt(c)  # the connection goes on, in order


def test_proxy_clear_releases_held_chunks(proxy: FaultProxy) -> None:
    with _connect(proxy) as c:
        proxy.drop(1.0, stall=(600.0, 600.0))  # held far beyond the read timeout below
        c.sendall(b"held")
        c.settimeout(0.3)
        with pytest.raises(TimeoutError):
            c.recv(10)
        proxy.clear()
        c.settimeout(30)
        assert c.recv(10) == b"held"  # only clear() can have released it


def test_proxy_stall_times_out_reads_then_clear_resumes(proxy: FaultProxy) -> None:
    with _connect(proxy) as c:
        _rtt(c)
        proxy.stall()
        c.sendall(b"stalled")
        c.settimeout(0.5)
        with pytest.raises(TimeoutError):
            c.recv(100)
        with _connect(proxy) as fresh:  # new connections are accepted but see nothing either
            fresh.sendall(b"new")
            fresh.settimeout(0.3)
            with pytest.raises(TimeoutError):
                fresh.recv(100)
            proxy.clear()
            fresh.settimeout(3)
            assert fresh.recv(100) == b"new"
        c.settimeout(3)
        assert c.recv(100) == b"stalled"
        assert proxy.snapshot().active >= 1


def _expect_reset_or_eof(c: socket.socket) -> None:
    c.settimeout(3)
    try:
        c.sendall(b"x")
        assert c.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        pass


def test_proxy_reset_aborts_connections_until_clear(proxy: FaultProxy) -> None:
    with _connect(proxy) as c:
        _rtt(c)
        proxy.reset()
        c.settimeout(3)
        with pytest.raises(ConnectionResetError):  # RST, not an orderly FIN
            c.recv(100)
    for _ in range(2):  # while set, new connections are reset too
        try:
            fresh = _connect(proxy)
        except ConnectionError:
            continue
        with fresh:
            _expect_reset_or_eof(fresh)
    assert proxy.snapshot().resets >= 2
    proxy.clear()
    with _connect(proxy) as c:
        _rtt(c)


def test_proxy_reset_while_stalled_frees_connections(proxy: FaultProxy) -> None:
    with _connect(proxy) as c:
        _rtt(c)
        proxy.stall()
        c.sendall(b"held")  # held or still in flight: the reset frees the connection either way
        proxy.reset()
        c.settimeout(3)
        with pytest.raises(ConnectionResetError):
            c.recv(100)
    wait_until(lambda: proxy.snapshot().active == 0, 3, "the proxy holds no connection")


def test_proxy_one_shot_reset(proxy: FaultProxy) -> None:
    with _connect(proxy) as old:
        _rtt(old)
        proxy.reset(persist=False)
        _expect_reset_or_eof(old)
    with _connect(proxy) as new:
        _rtt(new)


async def test_proxy_from_asyncio(echo_server) -> None:
    with FaultProxy(target=echo_server) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"a")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(1), 3) == b"a"
            proxy.delay(0.1)
            start = time.monotonic()
            writer.write(b"b")
            await writer.drain()
            assert await asyncio.wait_for(reader.readexactly(1), 3) == b"b"
            assert time.monotonic() - start >= 0.18
            proxy.stall()
            writer.write(b"c")
            await writer.drain()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(reader.readexactly(1), 0.3)
        finally:
            writer.close()


def test_proxy_carries_mutual_tls_grpc(tmp_path: Path) -> None:
    pki = DevPki(tmp_path / "pki", "net.icse.test", ["FR"], ["eu-1"]).create()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_secure_port(
        "127.0.0.1:0", server_credentials(TlsFiles(pki.ca_cert, pki.node_cert("FR"), pki.node_key("FR"))))
    server.start()
    creds = channel_credentials(TlsFiles(pki.ca_cert, pki.gateway_cert("eu-1"), pki.gateway_key("eu-1")))
    options = [("grpc.ssl_target_name_override", identity.node_tls_name(pki.federation, "FR"))]
    request = health_pb2.HealthCheckRequest(service="")
    try:
        with FaultProxy(target=("127.0.0.1", port)) as proxy:
            with grpc.secure_channel(proxy.address, creds, options=options) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
                assert proxy.bytes_up > 0 and proxy.bytes_down > 0  # TLS handshake + HTTP/2 went through

                proxy.delay(0.1)
                start = time.monotonic()
                stub.Check(request, timeout=5)
                assert time.monotonic() - start >= 0.18

                proxy.stall()
                with pytest.raises(grpc.RpcError) as stalled:
                    stub.Check(request, timeout=0.5)
                assert stalled.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                proxy.clear()
                assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING

                proxy.reset()
                with pytest.raises(grpc.RpcError) as reset:
                    stub.Check(request, timeout=2)
                assert reset.value.code() == grpc.StatusCode.UNAVAILABLE
            proxy.clear()
            with grpc.secure_channel(proxy.address, creds, options=options) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                assert stub.Check(request, timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    finally:
        server.stop(0)
