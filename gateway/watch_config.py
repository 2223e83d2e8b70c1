"""The ``[watch]`` table of a gateway configuration: where standing queries and their alerts live.

::

    [watch]
    store = "watch-cases.sqlite"         # the agency's open cases (default: beside this file)
    alerts = "watch-alerts.sqlite"       # the durable alert outbox (default: beside this file)
    alerts_jsonl = "watch-alerts.jsonl"  # one JSON line per alert (default: beside this file)
    interval = 20                        # seconds between rounds (default 20, at least 1)
    webhook = "https://desk.example/alerts"   # optional
    webhook_secret_file = "webhook.secret"    # required with webhook: HMAC key, kept 0600
    webhook_retry_min = 1.0              # first retry delay, doubling up to webhook_retry_max
    webhook_retry_max = 300.0

Relative paths are relative to the configuration file.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from federation.config import ConfigError, root
from federation.webhook import WebhookTarget

# A new hit is alerted within one interval plus the case's turn in a round (a round of 1,000 cases
# took 25-35 s on a loaded 2-core machine): 20 s keeps that under a minute.
DEFAULT_INTERVAL = 20.0
KEYS = {"store", "alerts", "alerts_jsonl", "interval", "webhook", "webhook_secret_file", "webhook_retry_min",
        "webhook_retry_max"}


@dataclass(frozen=True)
class WatchConfig:
    store: Path
    alerts: Path
    alerts_jsonl: Path
    interval: float
    webhook: WebhookTarget | None


def load(path: Path) -> WatchConfig:
    table = root(path).table("watch", required=False)
    table.reject_unknown(KEYS)

    def place(key: str, default: str) -> Path:
        raw = Path(table.get(key, str, default))
        return raw if raw.is_absolute() else path.parent / raw

    interval = table.get("interval", float, DEFAULT_INTERVAL)
    if not 1 <= interval <= 86_400:
        raise ConfigError(f"{table.where('interval')}: must be between 1 and 86400 seconds")
    webhook = None
    if "webhook" in table.data:
        url = table.get("webhook", str)
        if not url.startswith(("https://", "http://")):
            raise ConfigError(f"{table.where('webhook')}: expected an http(s) URL")
        secret_path = table.path_of("webhook_secret_file")
        mode = stat.S_IMODE(os.stat(secret_path).st_mode)
        if mode & 0o077:
            raise ConfigError(f"{table.where('webhook_secret_file')}: {secret_path} is readable by others "
                              f"(mode {mode:o}); chmod 600 it")
        secret = secret_path.read_bytes().strip()
        if len(secret) < 16:
            raise ConfigError(f"{table.where('webhook_secret_file')}: the secret must be at least 16 bytes")
        low = table.get("webhook_retry_min", float, 1.0)
        high = table.get("webhook_retry_max", float, 300.0)
        if not 0 < low <= high <= 86_400:
            raise ConfigError(f"{table.where('webhook_retry_min')}: need 0 < webhook_retry_min <= webhook_retry_max")
        webhook = WebhookTarget(url, secret, max_backoff_s=high, min_backoff_s=low)
    return WatchConfig(place("store", "watch-cases.sqlite"), place("alerts", "watch-alerts.sqlite"),
                       place("alerts_jsonl", "watch-alerts.jsonl"), interval, webhook)
