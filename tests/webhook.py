"""A real local HTTP webhook receiver for alert tests: it refuses (HTTP 503)
its first ``fail_first`` requests, and all of them while ``accepting`` is
false, then answers 204; it records every request and the event ids it accepted."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Receiver:
    fail_first: int = 0
    accepting: bool = True
    requests: list[tuple[Message, bytes]] = field(default_factory=list)  # headers: case-insensitive
    accepted: list[str] = field(default_factory=list)  # X-ICSE-Event-Id of each 2xx answer, in order
    changed: threading.Condition = field(default_factory=threading.Condition)
    url: str = ""

    def handle(self, headers: Message, body: bytes) -> int:
        with self.changed:
            self.requests.append((headers, body))
            refused = len(self.requests) <= self.fail_first or not self.accepting
            if not refused:
                self.accepted.append(headers["X-ICSE-Event-Id"])
            self.changed.notify_all()
            return 503 if refused else 204

    def accept(self) -> None:
        with self.changed:
            self.accepting = True

    def wait_for(self, predicate: Callable[[Receiver], bool], timeout: float = 60.0, what: str = "") -> None:
        """Waits until ``predicate(self)`` holds (under the lock); the timeout only bounds a failure."""
        with self.changed:
            if not self.changed.wait_for(lambda: predicate(self), timeout):
                raise TimeoutError(f"not within {timeout:g} s: {what} (requests {len(self.requests)}, "
                                   f"accepted {self.accepted})")

    def wait_accepted(self, count: int, timeout: float = 60.0) -> None:
        self.wait_for(lambda r: len(r.accepted) >= count, timeout, f"{count} events accepted")


@contextlib.contextmanager
def receiving(fail_first: int = 0, accepting: bool = True) -> Iterator[Receiver]:
    """A ``Receiver`` listening on 127.0.0.1 (its ``url``) until the block ends."""
    receiver = Receiver(fail_first, accepting)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(receiver.handle(self.headers, body))
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver.url = f"http://127.0.0.1:{server.server_port}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
