"""A fault-injecting byte-level TCP proxy for reliability tests.

The proxy runs an asyncio event loop on its own daemon thread, so synchronous tests and asyncio
tests use it the same way; every control method is thread-safe and takes effect immediately on
new *and* existing connections.  It forwards bytes unchanged, so TLS, HTTP/2 and gRPC pass
through transparently (point the client at ``proxy.address`` and keep the TLS name override).

    with FaultProxy(target=("127.0.0.1", node_port)) as proxy:
        channel = grpc.secure_channel(proxy.address, creds, options=[...name override...])
        proxy.delay(0.2)        # +200 ms per chunk, each direction, order preserved
        proxy.drop(0.1)         # 10 % of chunks held 0.2-1 s (what TCP loss looks like to apps)
        proxy.stall()           # forward nothing, keep connections open
        proxy.reset()           # RST every connection, and every new one until clear()
        proxy.clear()           # back to a clean pipe

Faults:

* ``delay(s)``: each chunk is released ``s`` seconds after it was read (latency, not a
  throughput cap).  Chunks are written strictly in order per direction.
* ``drop(p, stall=(lo, hi))``: TCP cannot lose bytes, so loss is modelled as what the
  application sees: with probability ``p`` a chunk is held for a retransmission-like timeout
  drawn from ``[lo, hi]`` seconds; later chunks queue behind it (head-of-line blocking).
* ``stall()``: nothing is forwarded in either direction; sockets stay open; new connections
  are accepted (and connected upstream) but see no data.
* ``reset(persist=True)``: abort all connections with RST (``SO_LINGER`` 0) on both sides; while
  set, new connections are accepted and immediately reset.  ``persist=False`` resets the current
  connections once and lets new ones through.
* ``clear()``: removes all faults; chunks held by an earlier ``drop`` are released at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

_EOF = object()
_LINGER_RST = struct.pack("ii", 1, 0)


@dataclass
class ProxyStats:
    """Snapshot of the proxy counters."""

    bytes_up: int = 0  # client -> target, forwarded
    bytes_down: int = 0  # target -> client, forwarded
    accepted: int = 0  # connections accepted on the listening socket
    active: int = 0  # connections currently open (both sides)
    resets: int = 0  # connections aborted with RST by the proxy (reset mode)
    upstream_failures: int = 0  # connections whose upstream connect failed (client gets RST)
    read_up: int = 0  # client -> proxy, read (also while stalled: "the client has sent it")


@dataclass(eq=False)  # hashed by identity (kept in a set)
class _Conn:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)


def _rst(writer: asyncio.StreamWriter | None) -> None:
    """Abort a connection so the peer sees a TCP RST."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()


class FaultProxy:
    """Byte-level TCP proxy ``listen_host:port -> target`` with runtime fault injection."""

    def __init__(self, listen_host: str = "127.0.0.1", target: tuple[str, int] | Sequence[Any] | None = None,
                 *, listen_port: int = 0, chunk_size: int = 65536, queue_chunks: int = 64,
                 connect_timeout: float = 5.0, seed: int | None = None) -> None:
        if target is None or len(target) != 2 or not target[1]:
            raise ValueError(f"target must be (host, port), not {target!r}")
        host, port = target
        self.listen_host = listen_host
        self.target = (str(host), int(port))
        self._listen_port = listen_port
        self._chunk_size = chunk_size
        self._queue_chunks = queue_chunks
        self._connect_timeout = connect_timeout
        self._rng = random.Random(seed)

        # Fault configuration: written by any thread under _cfg_lock, read in the loop thread.
        self._cfg_lock = threading.Lock()
        self._delay = 0.0
        self._drop_p = 0.0
        self._drop_range = (0.2, 1.0)
        self._stalled = False
        self._reset_mode = False
        self._generation = 0  # bumped by clear(): cancels pending drop holds

        self.stats = ProxyStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[_Conn] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._changed: asyncio.Event | None = None
        self._state_lock = threading.Lock()
        self._started = False
        self._stopped = False

    # ------------------------------------------------------------------ lifecycle

    @property
    def address(self) -> str:
        """``host:port`` clients should dial (IPv6 hosts bracketed)."""
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"{host}:{self.port}"

    def start(self) -> int:
        """Start listening; returns the port.  Blocks at most a few seconds."""
        with self._state_lock:
            if self._started:
                return self.port
            if self._stopped:
                raise RuntimeError("a stopped FaultProxy cannot be restarted")
            self._started = True
            loop = asyncio.new_event_loop()
            self._loop = loop
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            self._thread = threading.Thread(target=run, name=f"faultproxy->{self.target[0]}:{self.target[1]}",
                                            daemon=True)
            self._thread.start()
            if not ready.wait(5.0):
                raise RuntimeError("fault proxy loop did not start")
            try:
                self.port = asyncio.run_coroutine_threadsafe(self._open(), loop).result(5.0)
            except BaseException:
                self._stop_loop()
                raise
            return self.port

    async def _open(self) -> int:
        self._changed = asyncio.Event()
        self._server = await asyncio.start_server(self._handle, self.listen_host, self._listen_port,
                                                  limit=self._chunk_size * 2)
        return self._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        """Close the listener and all connections, stop the loop thread. Idempotent."""
        with self._state_lock:
            if self._stopped:
                return
            self._stopped = True
            if self._loop is None:
                return
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5.0)
            self._stop_loop()

    def _stop_loop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(5.0)
        if not loop.is_running():
            loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._conns):
            for writer in (conn.client, conn.upstream):
                if writer is not None:
                    writer.transport.abort()
        tasks = list(self._handlers) + [t for conn in list(self._conns) for t in conn.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ controls (any thread)

    def delay(self, seconds: float) -> None:
        """Add ``seconds`` of latency to every chunk, each direction (0 removes it)."""
        if seconds < 0:
            raise ValueError("delay must be >= 0")
        with self._cfg_lock:
            self._delay = float(seconds)
        self._notify()

    def drop(self, probability: float, stall: tuple[float, float] = (0.2, 1.0)) -> None:
        """Hold each chunk with ``probability`` for a random ``stall`` (lo, hi) seconds."""
        if not 0.0 <= probability <= 1.0:
            raise ValueError("probability must be within [0, 1]")
        lo, hi = stall
        if not 0.0 <= lo <= hi:
            raise ValueError("stall must be (lo, hi) with 0 <= lo <= hi")
        with self._cfg_lock:
            self._drop_p = float(probability)
            self._drop_range = (float(lo), float(hi))
        self._notify()

    def stall(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        with self._cfg_lock:
            self._stalled = True
        self._notify()

    def resume(self) -> None:
        """Undo :meth:`stall` only."""
        with self._cfg_lock:
            self._stalled = False
        self._notify()

    def reset(self, persist: bool = True) -> None:
        """RST all current connections; with ``persist`` also every new one until :meth:`clear`."""
        with self._cfg_lock:
            self._reset_mode = persist
        self._call(self._abort_all)

    def clear(self) -> None:
        """Remove every fault (delay, drop, stall, reset) and release held chunks."""
        with self._cfg_lock:
            self._delay = 0.0
            self._drop_p = 0.0
            self._stalled = False
            self._reset_mode = False
            self._generation += 1
        self._notify()

    def snapshot(self) -> ProxyStats:
        """A copy of the counters (with ``active`` current)."""
        s = self.stats
        return ProxyStats(s.bytes_up, s.bytes_down, s.accepted, s.active, s.resets, s.upstream_failures,
                          s.read_up)

    @property
    def bytes_up(self) -> int:
        return self.stats.bytes_up

    @property
    def bytes_down(self) -> int:
        return self.stats.bytes_down

    # ------------------------------------------------------------------ loop-thread internals

    def _call(self, fn: Any) -> None:
        loop = self._loop
        if loop is not None and loop.is_running():
            with contextlib.suppress(RuntimeError):  # loop closing
                loop.call_soon_threadsafe(fn)

    def _notify(self) -> None:
        self._call(self._wake)

    def _wake(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def _wait_change(self, timeout: float | None = None) -> None:
        assert self._changed is not None
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def _abort_all(self) -> None:
        for conn in list(self._conns):
            self._reset_conn(conn)
        self._wake()

    def _reset_conn(self, conn: _Conn) -> None:
        if conn in self._conns:
            self.stats.resets += 1
        _rst(conn.client)
        _rst(conn.upstream)

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.stats.accepted += 1
        conn = _Conn(cwriter)
        try:
            if self._reset_mode:
                self.stats.resets += 1
                _rst(cwriter)
                return
            try:
                ureader, uwriter = await asyncio.wait_for(
                    asyncio.open_connection(*self.target, limit=self._chunk_size * 2), self._connect_timeout)
            except (TimeoutError, OSError):
                self.stats.upstream_failures += 1
                _rst(cwriter)
                return
            conn.upstream = uwriter
            self._conns.add(conn)
            self.stats.active += 1
            try:
                if self._reset_mode:  # reset() raced with the upstream connect
                    self._reset_conn(conn)
                    return
                await self._forward(conn, creader, uwriter, ureader, cwriter)
            finally:
                self._conns.discard(conn)
                self.stats.active -= 1
        except asyncio.CancelledError:
            pass
        finally:
            for writer in (conn.client, conn.upstream):
                if writer is not None and not writer.transport.is_closing():
                    writer.transport.abort() if self._stopped else writer.close()
            self._handlers.discard(task)

    async def _forward(self, conn: _Conn, creader: asyncio.StreamReader, uwriter: asyncio.StreamWriter,
                       ureader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        up_q: asyncio.Queue[Any] = asyncio.Queue(self._queue_chunks)
        down_q: asyncio.Queue[Any] = asyncio.Queue(self._queue_chunks)
        tasks = [
            asyncio.create_task(self._reader(creader, up_q, "read_up")),
            asyncio.create_task(self._writer(up_q, uwriter, "bytes_up")),
            asyncio.create_task(self._reader(ureader, down_q)),
            asyncio.create_task(self._writer(down_q, cwriter, "bytes_down")),
        ]
        conn.tasks = tasks
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = any(t.exception() is not None for t in done if not t.cancelled())
            if failed:
                # One side broke (RST, EPIPE): show the other side a RST too, like a middlebox would.
                _rst(cwriter)
                _rst(uwriter)
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=1.0)
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
            for t in tasks:
                if t.done() and not t.cancelled():
                    t.exception()  # retrieved: no "never retrieved" warnings

    async def _reader(self, reader: asyncio.StreamReader, queue: asyncio.Queue[Any], counter: str = "") -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await reader.read(self._chunk_size)
            if not data:
                await queue.put(_EOF)
                return
            if counter:
                setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
            with self._cfg_lock:
                p, (lo, hi), gen = self._drop_p, self._drop_range, self._generation
            hold = self._rng.uniform(lo, hi) if p > 0 and self._rng.random() < p else 0.0
            await queue.put((loop.time(), hold, gen, data))

    async def _writer(self, queue: asyncio.Queue[Any], writer: asyncio.StreamWriter, counter: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if item is _EOF:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            t0, hold, gen, data = item
            while True:
                if writer.transport.is_closing():  # aborted (reset/stop) while we held the chunk
                    return
                with self._cfg_lock:
                    stalled, delay, current_gen = self._stalled, self._delay, self._generation
                if stalled:
                    await self._wait_change()
                    continue
                due = t0 + delay + (hold if gen == current_gen else 0.0)
                wait = due - loop.time()
                if wait <= 0:
                    break
                await self._wait_change(wait)
            writer.write(data)
            await writer.drain()
            setattr(self.stats, counter, getattr(self.stats, counter) + len(data))
