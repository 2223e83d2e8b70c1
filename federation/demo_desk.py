"""The demo's stand-in for a holder's victim-identification desk: a webhook
receiver on loopback that checks each alert's signature, the way a real desk
would (README, "Holder alerts"), and keeps the alerts it accepted."""

from __future__ import annotations

import json
import os
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from federation.webhook import EVENT_ID_HEADER, SIGNATURE_HEADER, verify


class Desk:
    """Listens on 127.0.0.1 until ``close``; ``url`` and ``secret_file`` go into a node's ``[alerts]``."""

    def __init__(self, directory: Path):
        self.secret = secrets.token_hex(32).encode()
        self.secret_file = directory / "desk-webhook.secret"
        descriptor = os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as out:
            out.write(self.secret)
        self.alerts: list[dict[str, object]] = []
        self._seen: set[str] = set()
        self._changed = threading.Condition()
        desk = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                signed = verify(desk.secret, body, self.headers.get(SIGNATURE_HEADER, ""))
                self.send_response(204 if signed else 401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if signed:
                    desk._accept(self.headers.get(EVENT_ID_HEADER, ""), json.loads(body))

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}/icse-alerts"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def _accept(self, event_id: str, alert: dict[str, object]) -> None:
        with self._changed:
            if event_id not in self._seen:  # delivery is at least once: a repeat has the same id
                self._seen.add(event_id)
                self.alerts.append(alert)
            self._changed.notify_all()

    def wait(self, count: int, timeout: float) -> list[dict[str, object]]:
        """The alerts received once ``count`` have arrived, or those received when ``timeout`` passes."""
        with self._changed:
            self._changed.wait_for(lambda: len(self.alerts) >= count, timeout)
            return list(self.alerts)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def describe(alert: dict[str, object]) -> str:
    """One line for the demo's output."""
    return (f"hit on {alert['reference']} (series {alert['series'] or '-'}, category {alert['category'] or '-'}) "
            f"released to {alert['requesting_country']} {alert['requesting_agency']}, officer {alert['officer']}, "
            f"case {alert['case']}, {alert['algorithm']} distance {alert['distance']} (signature verified)")
