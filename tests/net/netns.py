"""Network-namespace "hosts" for reliability tests (Linux, root only).

Each :class:`Host` is a fresh network namespace joined to the root namespace by a veth pair on
its own /30 out of ``10.231.0.0/16``::

    root namespace                          namespace  icsetn-<pid>-<seq>-<prefix>
    ictn<slot>r  10.231.a.b+1/30  <---->  ictn<slot>n  10.231.a.b+2/30   (+ lo up)
    (.gateway_address)                      (.address)

Only the connected /30 routes exist on either side: the namespace has no default route, and the
root namespace gets a lowest-priority ``unreachable 10.231.0.0/16`` guard route so that a test
address whose veth is down (``link_down``) or already deleted can never leak to the default route.

The /30 is claimed atomically by creating the veth whose name encodes the slot, so concurrent test
processes and repeated runs never share a subnet.  Namespaces (and root veths) left behind by a
crashed run are recognised by the owning pid in their name (alias) and removed by
:func:`cleanup_stale` (run automatically before the first host of a process is made).

Usage::

    from tests.net import netns

    def test_something():
        netns.require_root()                       # pytest.skip(reason) when unusable
        with netns.host("fr") as h:                # or the ``netns_hosts`` fixture
            server = h.popen([sys.executable, "-m", "http.server", "8000"])
            netns.wait_tcp(h.address, 8000)
            h.link_down(); ...; h.link_up()
            h.limit_bandwidth("1mbit"); ...; h.clear_limits()
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import itertools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any, TypeVar

import pytest

T = TypeVar("T")

NS_PREFIX = "icsetn-"  # namespace names: icsetn-<pid>-<seq>-<name_prefix>
VETH_PREFIX = "ictn"  # veth names: ictn<slot>r (root side), ictn<slot>n (namespace side)
ALIAS_PREFIX = "icsetn"  # root veth alias: "icsetn pid=<pid> ns=<ns>"
SUPERNET = ipaddress.IPv4Network("10.231.0.0/16")
SLOTS = SUPERNET.num_addresses // 4  # one /30 per host
GUARD_METRIC = 4294967295
CMD_TIMEOUT = 10.0
_CLONE_NEWNET = 0x40000000
_BLACKHOLE_MAC = "02:00:00:00:00:01"  # locally administered; nobody owns it

_NS_RE = re.compile(rf"^{re.escape(NS_PREFIX)}(\d+)-")
_VETH_RE = re.compile(rf"^{re.escape(VETH_PREFIX)}(\d+)r$")
_ALIAS_RE = re.compile(rf"^{re.escape(ALIAS_PREFIX)} pid=(\d+)")


class NetnsUnavailable(RuntimeError):
    """Namespaces cannot be used here (not root, no ``ip``, kernel refuses)."""


class NetnsError(RuntimeError):
    """An ``ip``/``tc`` command failed."""


# --------------------------------------------------------------------------- commands


def _run(argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT,
         input: str | None = None) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise NetnsError(f"timed out after {timeout}s: {' '.join(argv)}") from exc
    if check and done.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} -> {done.returncode}: {(done.stderr or done.stdout).strip()}")
    return done


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


@lru_cache(maxsize=1)
def root_available() -> str | None:
    """``None`` when tests can create namespaces and veths, else a reason to skip."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespace tests need root (euid is not 0)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network namespace tests need `{tool}` (iproute2) on PATH"
    probe = f"{NS_PREFIX}{os.getpid()}-probe"
    try:
        _run(["ip", "netns", "add", probe])
    except (NetnsError, OSError) as exc:
        return f"`ip netns add` does not work here: {exc}"
    try:
        _run(["ip", "link", "add", "name", f"{VETH_PREFIX}probe", "type", "veth",
              "peer", "name", "probe0", "netns", probe])
    except NetnsError as exc:
        return f"cannot create veth pairs here: {exc}"
    finally:
        _run(["ip", "link", "del", f"{VETH_PREFIX}probe"], check=False)
        _run(["ip", "netns", "del", probe], check=False)
    return None


def require_root() -> None:
    """``pytest.skip`` with the reason from :func:`root_available` when namespaces are unusable."""
    reason = root_available()
    if reason is not None:
        pytest.skip(reason)


# --------------------------------------------------------------------------- cleanup


def _ns_names() -> list[str]:
    out = _run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
    if not out:
        return []
    try:
        return [entry["name"] for entry in json.loads(out)]
    except (ValueError, KeyError, TypeError):
        return [line.split()[0] for line in out.splitlines() if line.strip()]


def _ns_pids(ns: str) -> list[int]:
    out = _run(["ip", "netns", "pids", ns], check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _kill_ns_processes(ns: str, deadline: float = 3.0) -> None:
    """SIGKILL everything still running inside ``ns`` and wait (bounded) until it is gone."""
    end = time.monotonic() + deadline
    while True:
        pids = [p for p in _ns_pids(ns) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > end:
            return
        # Not a blind wait: each round re-reads the namespace's processes (the
        # observable) and kills any that a dying parent forked meanwhile.
        time.sleep(0.05)


def _destroy_ns(ns: str) -> None:
    _kill_ns_processes(ns)
    _run(["ip", "netns", "del", ns], check=False)


def cleanup_stale() -> list[str]:
    """Remove namespaces/veths of this harness whose owning process is gone. Returns what was removed."""
    removed: list[str] = []
    for ns in _ns_names():
        match = _NS_RE.match(ns)
        if match and not _pid_alive(int(match.group(1))):
            _destroy_ns(ns)
            removed.append(ns)
    out = _run(["ip", "-j", "link", "show"], check=False).stdout.strip()
    try:
        links = json.loads(out) if out else []
    except ValueError:
        links = []
    for link in links:
        name = link.get("ifname", "")
        match = _ALIAS_RE.match(link.get("ifalias", "") or "")
        if _VETH_RE.match(name) and match and not _pid_alive(int(match.group(1))):
            _run(["ip", "link", "del", name], check=False)
            removed.append(name)
    return removed


_setup_lock = threading.Lock()
_setup_done = threading.Event()


def _process_setup() -> None:
    """Once per process: clean stale leftovers and install the 10.231/16 no-leak guard route."""
    with _setup_lock:
        if _setup_done.is_set():
            return
        reason = root_available()
        if reason is not None:
            raise NetnsUnavailable(reason)
        cleanup_stale()
        ensure_guard_route()
        _setup_done.set()


def ensure_guard_route() -> None:
    """``unreachable 10.231.0.0/16`` at the lowest priority in the root namespace.

    Connected /30 routes of live veths are more specific and win; anything else in the test
    supernet (a veth that is down or deleted) fails with EHOSTUNREACH instead of following the
    default route off the machine.  Left in place on purpose (it only covers the test subnet).
    """
    _run(["ip", "route", "replace", "unreachable", str(SUPERNET), "metric", str(GUARD_METRIC)])


# --------------------------------------------------------------------------- hosts

_libc = ctypes.CDLL(None, use_errno=True)
_registry: set[Host] = set()
_registry_lock = threading.Lock()
_seq = itertools.count(1)


def _next_seq() -> int:
    with _registry_lock:
        return next(_seq)


def _slot_addresses(slot: int) -> tuple[ipaddress.IPv4Network, ipaddress.IPv4Address, ipaddress.IPv4Address]:
    base = int(SUPERNET.network_address) + 4 * slot
    net = ipaddress.IPv4Network((base, 30))
    return net, ipaddress.IPv4Address(base + 1), ipaddress.IPv4Address(base + 2)


def _used_subnets() -> set[ipaddress.IPv4Network]:
    out = _run(["ip", "-j", "-4", "addr", "show"], check=False).stdout.strip()
    used = set()
    try:
        for link in json.loads(out) if out else []:
            for info in link.get("addr_info", []):
                iface = ipaddress.IPv4Interface(f"{info['local']}/{info['prefixlen']}")
                if iface.network.overlaps(SUPERNET):
                    used.add(iface.network)
    except (ValueError, KeyError):
        pass
    return used


class Host:
    """A network namespace linked to the root namespace by a veth pair on a private /30."""

    def __init__(self, name_prefix: str = "h") -> None:
        _process_setup()
        clean = re.sub(r"[^A-Za-z0-9_]", "", name_prefix)[:20] or "h"
        self.name_prefix = clean
        self.ns = ""
        self.root_veth = ""
        self.ns_veth = ""
        self.subnet: ipaddress.IPv4Network | None = None
        self.address = ""
        self.gateway_address = ""
        self._procs: list[subprocess.Popen[Any]] = []
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        with _registry_lock:
            _registry.add(self)
        try:
            self._create()
        except BaseException:
            self.close()
            raise

    # -- creation -----------------------------------------------------------------

    def _create(self) -> None:
        for _ in range(20):
            ns = f"{NS_PREFIX}{os.getpid()}-{_next_seq()}-{self.name_prefix}"
            done = _run(["ip", "netns", "add", ns], check=False)
            if done.returncode == 0:
                self.ns = ns
                break
            if "exists" not in done.stderr:
                raise NetnsError(f"ip netns add {ns}: {done.stderr.strip()}")
        else:
            raise NetnsError("could not find a free namespace name")

        used = _used_subnets()
        start = random.SystemRandom().randrange(SLOTS)
        for i in range(512):
            slot = (start + i) % SLOTS
            net, gw, addr = _slot_addresses(slot)
            if any(net.overlaps(u) for u in used):
                continue
            root_veth, ns_veth = f"{VETH_PREFIX}{slot}r", f"{VETH_PREFIX}{slot}n"
            # Creating the uniquely named root veth is the atomic claim on this /30.
            done = _run(["ip", "link", "add", "name", root_veth, "type", "veth",
                         "peer", "name", ns_veth, "netns", self.ns], check=False)
            if done.returncode == 0:
                break
            if "exists" not in done.stderr:
                raise NetnsError(f"ip link add {root_veth}: {done.stderr.strip()}")
        else:
            raise NetnsError("no free /30 slot in 10.231.0.0/16")
        self.root_veth, self.ns_veth, self.subnet = root_veth, ns_veth, net
        self.gateway_address, self.address = str(gw), str(addr)

        _run(["ip", "link", "set", "dev", root_veth, "alias", f"{ALIAS_PREFIX} pid={os.getpid()} ns={self.ns}"])
        _run(["ip", "addr", "add", f"{gw}/30", "dev", root_veth])
        _run(["ip", "link", "set", "dev", root_veth, "up"])
        _run(["ip", "-n", self.ns, "link", "set", "dev", "lo", "up"])
        _run(["ip", "-n", self.ns, "addr", "add", f"{addr}/30", "dev", ns_veth])
        _run(["ip", "-n", self.ns, "link", "set", "dev", ns_veth, "up"])

    # -- running things inside ----------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise NetnsError(f"host {self.ns or self.name_prefix} is closed")

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside the namespace (``ip netns exec``); stopped by :meth:`close`.

        Runs in its own session (process group) unless ``start_new_session`` is given, so
        ``close`` can signal the whole group.
        """
        if isinstance(argv, (str, bytes)):
            raise TypeError("argv must be a sequence of arguments, not a string")
        with self._lock:
            self._check_open()
            kwargs.setdefault("start_new_session", True)
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kwargs)
            self._procs.append(proc)
            return proc

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """``popen`` of ``sys.executable -c code args...`` inside the namespace."""
        return self.popen([sys.executable, "-c", code, *args], **kwargs)

    def run(self, argv: Sequence[str], *, timeout: float = CMD_TIMEOUT,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the namespace and wait for it (bounded by ``timeout``)."""
        self._check_open()
        return _run(["ip", "netns", "exec", self.ns, *argv], timeout=timeout, check=check)

    def in_namespace(self, fn: Callable[[], T]) -> T:
        """Call ``fn`` on a helper thread that has joined this namespace (setns).

        Sockets created there belong to the namespace and can be used from any thread.
        """
        self._check_open()
        result: dict[str, Any] = {}

        def target() -> None:
            try:
                fd = os.open(f"/run/netns/{self.ns}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    if _libc.setns(fd, _CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.ns}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                result["value"] = fn()
            except BaseException as exc:  # noqa: BLE001  (re-raised in the caller)
                result["error"] = exc

        thread = threading.Thread(target=target, name=f"setns-{self.ns}", daemon=True)
        thread.start()
        thread.join(CMD_TIMEOUT)
        if thread.is_alive():
            raise NetnsError(f"in_namespace({self.ns}) call did not finish in {CMD_TIMEOUT}s")
        if "error" in result:
            raise result["error"]
        return result["value"]

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM, proto: int = 0) -> socket.socket:
        """A socket living inside the namespace (e.g. for an in-process listener); closed by close()."""
        sock = self.in_namespace(lambda: socket.socket(family, type, proto))
        with self._lock:
            self._sockets.append(sock)
        return sock

    # -- faults ---------------------------------------------------------------------

    def link_down(self) -> None:
        """Partition: take the root-side veth down.

        New connections from the root namespace fail at once (EHOSTUNREACH via the guard
        route); packets on existing connections are dropped in both directions.
        """
        self._check_open()
        _run(["ip", "link", "set", "dev", self.root_veth, "down"])

    def link_up(self) -> None:
        self._check_open()
        _run(["ip", "link", "set", "dev", self.root_veth, "up"])

    def blackhole(self) -> None:
        """Silent partition: links stay up but every packet is dropped in both directions.

        Done with permanent neighbour entries pointing at a MAC nobody owns, so the peer discards
        the frames.  Connection attempts *time out* (instead of failing fast like ``link_down``).
        """
        self._check_open()
        _run(["ip", "neigh", "replace", self.address, "lladdr", _BLACKHOLE_MAC,
              "dev", self.root_veth, "nud", "permanent"])
        _run(["ip", "-n", self.ns, "neigh", "replace", self.gateway_address, "lladdr", _BLACKHOLE_MAC,
              "dev", self.ns_veth, "nud", "permanent"])

    def unblackhole(self) -> None:
        self._check_open()
        _run(["ip", "neigh", "del", self.address, "dev", self.root_veth], check=False)
        _run(["ip", "-n", self.ns, "neigh", "del", self.gateway_address, "dev", self.ns_veth], check=False)

    def limit_bandwidth(self, rate: str = "64kbit", burst: str = "4kb", latency: str = "50ms",
                        direction: str = "both") -> None:
        """tbf rate limit. ``direction``: "both", "to_host" (root-side egress, toward the
        namespace) or "from_host" (namespace-side egress, toward the root namespace)."""
        self._check_open()
        if direction not in ("both", "to_host", "from_host"):
            raise ValueError(f"direction must be both, to_host or from_host, not {direction!r}")
        tbf = ["root", "tbf", "rate", rate, "burst", burst, "latency", latency]
        if direction in ("both", "to_host"):
            _run(["tc", "qdisc", "replace", "dev", self.root_veth, *tbf])
        if direction in ("both", "from_host"):
            _run(["tc", "-n", self.ns, "qdisc", "replace", "dev", self.ns_veth, *tbf])

    def clear_limits(self) -> None:
        """Remove qdiscs installed by :meth:`limit_bandwidth` (both sides; missing ones are fine)."""
        self._check_open()
        _run(["tc", "qdisc", "del", "dev", self.root_veth, "root"], check=False)
        _run(["tc", "-n", self.ns, "qdisc", "del", "dev", self.ns_veth, "root"], check=False)

    def qdiscs(self) -> tuple[str, str]:
        """``tc qdisc show`` of (root side, namespace side), for assertions and debugging."""
        return (_run(["tc", "qdisc", "show", "dev", self.root_veth]).stdout,
                _run(["tc", "-n", self.ns, "qdisc", "show", "dev", self.ns_veth]).stdout)

    # -- teardown -------------------------------------------------------------------

    def _stop_processes(self, grace: float = 2.0) -> None:
        procs, self._procs = self._procs, []
        live = [p for p in procs if p.poll() is None]
        for proc in live:
            _signal_proc(proc, signal.SIGTERM)
        end = time.monotonic() + grace
        for proc in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, end - time.monotonic()))
        for proc in procs:
            _signal_proc(proc, signal.SIGKILL)  # the group may still hold children
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(2.0)
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def close(self) -> None:
        """Stop processes, delete veth and namespace. Idempotent; never raises for missing parts."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._stop_processes()
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()
            self._sockets.clear()
            if self.ns:
                _kill_ns_processes(self.ns)
            if self.root_veth:
                _run(["ip", "link", "del", self.root_veth], check=False)
            if self.ns:
                _run(["ip", "netns", "del", self.ns], check=False)
        finally:
            with _registry_lock:
                _registry.discard(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Host:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Host(ns={self.ns!r}, address={self.address!r}, gateway={self.gateway_address!r})"


def _signal_proc(proc: subprocess.Popen[Any], sig: int) -> None:
    # Only signal by pid while the child is unreaped (its pid cannot have been reused);
    # leftovers of an exited leader are killed by the namespace pid sweep in close().
    if proc.poll() is not None:
        return
    try:
        if os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def host(name_prefix: str = "h") -> Host:
    """``with netns.host("fr") as h:`` - a :class:`Host` that is closed on leaving the block."""
    return Host(name_prefix)


@contextlib.contextmanager
def hosts(*name_prefixes: str) -> Iterator[list[Host]]:
    """Several hosts at once, all closed on exit (also on failure)."""
    made: list[Host] = []
    try:
        for prefix in name_prefixes:
            made.append(Host(prefix))
        yield made
    finally:
        for h in reversed(made):
            h.close()


@pytest.fixture
def netns_hosts() -> Iterator[Callable[[str], Host]]:
    """Fixture factory: ``def test_x(netns_hosts): h = netns_hosts("fr")``.

    Skips the test when namespaces are unusable; closes every host at teardown. Import it into
    a test module (``from tests.net.netns import netns_hosts``) to use it.
    """
    require_root()
    made: list[Host] = []

    def make(name_prefix: str = "h") -> Host:
        made.append(Host(name_prefix))
        return made[-1]

    try:
        yield make
    finally:
        for h in reversed(made):
            h.close()


def wait_tcp(address: str, port: int, timeout: float = 5.0, interval: float = 0.05) -> None:
    """Wait (bounded) until a TCP connect to ``address:port`` succeeds."""
    end = time.monotonic() + timeout
    last: OSError | None = None
    while time.monotonic() < end:
        try:
            with socket.create_connection((address, port), timeout=min(1.0, timeout)):
                return
        except OSError as exc:
            last = exc
            time.sleep(interval)
    raise TimeoutError(f"{address}:{port} not accepting connections after {timeout}s: {last!r}")


@atexit.register
def _close_all() -> None:
    with _registry_lock:
        leftovers = list(_registry)
    for h in leftovers:
        with contextlib.suppress(Exception):
            h.close()
