"""The desk's webhook: where an outbox POSTs its events, signed, and how often it retries.

Each event is one POST of its canonical JSON with ``X-ICSE-Event-Id`` (its key,
for the receiver to drop a repeat), ``X-ICSE-Timestamp`` and
``X-ICSE-Signature: sha256=<hex HMAC-SHA256 of the body>``; only a 2xx counts as
delivered (``federation.outbox``), and a redirect is a failure.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

SIGNATURE_HEADER = "X-ICSE-Signature"
EVENT_ID_HEADER = "X-ICSE-Event-Id"
TIMESTAMP_HEADER = "X-ICSE-Timestamp"


@dataclass(frozen=True)
class WebhookTarget:
    """Where and how events are POSTed. ``secret`` signs each body (never logged)."""

    url: str
    secret: bytes = field(repr=False)
    timeout_s: float = 5.0
    max_backoff_s: float = 300.0
    # The first retry's delay; each later one doubles, up to ``max_backoff_s``.
    min_backoff_s: float = 1.0


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-ICSE-Signature`` value of ``body``: ``sha256=<hex HMAC-SHA256>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: str) -> bool:
    """Whether ``signature`` is the header value ``sign`` gives (constant time)."""
    return hmac.compare_digest(sign(secret, body), signature)


def backoff(attempts: int, target: WebhookTarget, rng: random.Random | None = None) -> float:
    """Seconds to wait after the ``attempts``-th failure: exponential from
    ``min_backoff_s``, capped at ``max_backoff_s``, between half and all of it
    ("equal jitter": never zero, never in lockstep with other senders)."""
    ceiling = min(target.max_backoff_s, target.min_backoff_s * 2 ** min(max(attempts - 1, 0), 32))
    return ceiling / 2 + (rng or random).uniform(0, ceiling / 2)


class Rejected(Exception):
    """The webhook answered, but not with a 2xx."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is a failure: following it would resend the signed body to
    an address nobody configured (and urllib would turn the POST into a GET)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirect())


def post(target: WebhookTarget, key: str, body: bytes) -> None:
    """One signed POST; returns on a 2xx, raises otherwise (runs in a worker thread)."""
    request = urllib.request.Request(target.url, data=body, method="POST", headers={
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(target.secret, body),
        EVENT_ID_HEADER: key,
        TIMESTAMP_HEADER: str(int(time.time())),
        "User-Agent": "icse-outbox/1",
    })
    try:
        with _OPENER.open(request, timeout=target.timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        exc.close()
        raise Rejected(f"HTTP {exc.code}") from None
    if not 200 <= status < 300:
        raise Rejected(f"HTTP {status}")
