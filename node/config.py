"""A node's configuration file (TOML), validated at start."""

from __future__ import annotations

import ipaddress
import stat
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from federation import identity
from federation.buckets import choose_bits
from federation.config import ConfigError, Table, root
from federation.tls import TlsFiles
from node.matcher import Limits
from node.policy import Policy, Tier


@dataclass(frozen=True)
class StoreSettings:
    """How a serving node follows and tidies its store (the ``[store]`` table)."""

    # How often the catalog's generation is read to pick up imports and retractions.
    poll_seconds: float = 0.3
    # Merge in the background once more than this many segments are small ...
    merge_above: int = 8
    # ... that is, hold fewer rows than this.
    small_segment_rows: int = 1_000_000


@dataclass(frozen=True)
class AlertSettings:
    """Alerts to this node's own desk when it releases a hit (the ``[alerts]`` table)."""

    # Recorded in the outbox beside the store (``icse-node alerts`` reads it) unless false.
    enabled: bool = True
    # Where each alert is POSTed, signed with ``webhook_secret``; "" for none (the feed only).
    webhook: str = ""
    webhook_secret: bytes = field(default=b"", repr=False)
    # Only hits whose category is a whole number at least this; None: any category.
    min_category: int | None = None
    # Only hits of these series / asked from these countries; None: any.
    series: frozenset[str] | None = None
    requesting_countries: frozenset[str] | None = None
    # Webhook retries: the first after this many seconds, doubling up to ``retry_max_s``.
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0


@dataclass(frozen=True)
class PrivateSettings:
    """Private exact matching (the ``[private]`` table; PROTOCOL.md, "Private exact matching")."""

    enabled: bool = False
    # Bits of the bucket hash naming a bucket: fewer bits, larger anonymity sets and answers.
    prefix_bits: int = 16
    # Bytes of each output a bucket answer carries: more bytes, fewer false positives.
    output_bytes: int = 4
    # How bucket answers are written: "elias-fano" (fingerprints of fingerprint_bits bits, about
    # 2.5 + fingerprint_bits - log2(bucket size) bits each) or "fixed" (output_bytes each).
    encoding: str = "elias-fano"
    # Elias-Fano fingerprint width; 0 (the default): chosen from the mean bucket size so that an item
    # the node does not hold is a false candidate with chance at most 2^-false_candidate_bits
    # (federation.buckets.choose_bits: 19 bits at 10 M stored and 16-bit buckets, ~9.5x an ordinary item).
    fingerprint_bits: int = 0
    false_candidate_bits: int = 11

    def bits(self, mean_bucket_size: float) -> int:
        """Bits of each fingerprint in a bucket answer, for buckets of this mean size."""
        if self.encoding == "fixed":
            return 8 * self.output_bytes
        return self.fingerprint_bits or choose_bits(mean_bucket_size, self.false_candidate_bits,
                                                    *FINGERPRINT_BITS)


PREFIX_BITS = (8, 24)
OUTPUT_BYTES = (3, 8)
FINGERPRINT_BITS = (16, 48)
FALSE_CANDIDATE_BITS = (4, 32)
ENCODINGS = ("fixed", "elias-fano")


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    country: str
    federation: str
    listen: str
    store: Path
    contact: str
    tls: TlsFiles | None
    gateway_keys: Path | None
    trusted_gateways: tuple[str, ...]
    limits: Limits
    policy: Policy
    # Calls served at once; beyond it callers get RESOURCE_EXHAUSTED at once.
    max_concurrent: int = 64
    # HOST:PORT of the Prometheus endpoint; None: no endpoint.
    metrics_listen: str | None = None
    store_settings: StoreSettings = StoreSettings()
    alerts: AlertSettings = AlertSettings()
    private: PrivateSettings = PrivateSettings()


def load(path: Path, *, for_serving: bool = True) -> NodeConfig:
    """Reads ``path``. Commands that only touch the store need no TLS or keys."""
    doc = root(path)
    doc.reject_unknown({"node", "tls", "trust", "limits", "policy", "metrics", "store", "alerts", "private"})
    node = doc.table("node")
    node.reject_unknown({"id", "country", "federation", "listen", "store", "contact"})
    try:
        node_id = identity.check_member_id(node.get("id", str), "node id")
    except ValueError as exc:
        raise ConfigError(f"{node.where('id')}: {exc}") from None
    country = node.get("country", str)
    if len(country) != 2 or not country.isalpha() or not country.isupper():
        raise ConfigError(f"{node.where('country')}: expected an ISO 3166 alpha-2 code like 'FR', got {country!r}")
    tls = trust_files = None
    gateways: tuple[str, ...] = ()
    if for_serving:
        tls_table = doc.table("tls")
        tls_table.reject_unknown({"ca", "cert", "key"})
        tls = TlsFiles(tls_table.path_of("ca"), tls_table.path_of("cert"), tls_table.path_of("key"))
        trust = doc.table("trust")
        trust.reject_unknown({"gateway_keys", "gateways"})
        trust_files = trust.path_of("gateway_keys")
        gateways = tuple(trust.get("gateways", list))
        if not gateways or not all(isinstance(g, str) for g in gateways):
            raise ConfigError(f"{trust.where('gateways')}: expected a non-empty list of gateway ids")
    limits = doc.table("limits", required=False)
    limits.reject_unknown({"max_items", "max_hits_per_item", "max_distance", "max_concurrent"})
    defaults = Limits()
    parsed_limits = Limits(
        max_items=_positive(limits, "max_items", defaults.max_items),
        max_hits_per_item=_positive(limits, "max_hits_per_item", defaults.max_hits_per_item),
        max_distance=_positive(limits, "max_distance", defaults.max_distance),
    )
    policy = _policy(doc.table("policy", required=False))
    metrics = doc.table("metrics", required=False)
    metrics.reject_unknown({"listen"})
    metrics_listen = metrics.get("listen", str, "") or None
    if metrics_listen is not None and not metrics_listen.rpartition(":")[2].isdigit():
        raise ConfigError(f"{metrics.where('listen')}: expected HOST:PORT, got {metrics_listen!r}")
    store_table = doc.table("store", required=False)
    store_table.reject_unknown({"poll_ms", "merge_above", "small_segment_rows"})
    defaults_store = StoreSettings()
    store_settings = StoreSettings(
        poll_seconds=_positive(store_table, "poll_ms", int(defaults_store.poll_seconds * 1000)) / 1000,
        merge_above=_positive(store_table, "merge_above", defaults_store.merge_above),
        small_segment_rows=_positive(store_table, "small_segment_rows", defaults_store.small_segment_rows),
    )
    private = _private(doc.table("private", required=False))
    return NodeConfig(
        node_id=node_id,
        country=country,
        federation=node.get("federation", str),
        listen=node.get("listen", str, "127.0.0.1:0"),
        store=node.path_of("store", must_exist=False),
        contact=node.get("contact", str, ""),
        tls=tls,
        gateway_keys=trust_files,
        trusted_gateways=gateways,
        limits=parsed_limits,
        policy=policy,
        max_concurrent=_positive(limits, "max_concurrent", 64),
        metrics_listen=metrics_listen,
        store_settings=store_settings,
        alerts=_alerts(doc.table("alerts", required=False), for_serving),
        private=private,
    )


_LOOPBACK_NAMES = {"localhost"}


def _webhook_url(table: Table, url: str) -> str:
    """HTTPS, or plain HTTP to this machine only: an alert names a case and an
    officer, and must not cross a network unencrypted."""
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise ConfigError(f"{table.where('webhook')}: expected an https:// URL, got {url!r}")
    if parsed.scheme == "http":
        host = parsed.hostname
        try:
            loopback = host in _LOOPBACK_NAMES or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(f"{table.where('webhook')}: plain http:// is accepted only to this machine "
                              f"(127.0.0.1, ::1, localhost); use https:// for {host!r}")
    return url


def _secret(table: Table) -> bytes:
    """The webhook's shared secret, from a file only its owner may read. The
    messages name the file, never its content."""
    path = table.path_of("webhook_secret_file")
    try:
        status = path.stat()
        if not stat.S_ISREG(status.st_mode):
            raise ConfigError(f"{table.where('webhook_secret_file')}: {path} is not a regular file")
        if stat.S_IMODE(status.st_mode) & 0o077:
            raise ConfigError(f"{table.where('webhook_secret_file')}: {path} is readable by others "
                              f"(mode {stat.S_IMODE(status.st_mode):04o}); run: chmod 600 {path}")
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"{table.where('webhook_secret_file')}: cannot read {path}: "
                          f"{exc.strerror or exc}") from None
    if len(secret) < 16:
        raise ConfigError(f"{table.where('webhook_secret_file')}: {path} holds {len(secret)} bytes; "
                          "a webhook secret needs at least 16 (e.g. `head -c 32 /dev/urandom | base64`)")
    return secret


def _names(table: Table, key: str, check: str = "") -> frozenset[str] | None:
    values = table.get(key, list, [])
    if not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{table.where(key)}: expected a list of non-empty strings")
    if check == "country":
        for value in values:
            if len(value) != 2 or not value.isalpha() or not value.isupper():
                raise ConfigError(f"{table.where(key)}: expected ISO 3166 alpha-2 codes like 'DE', got {value!r}")
    return frozenset(values) if values else None


def _alerts(table: Table, for_serving: bool) -> AlertSettings:
    table.reject_unknown({"enabled", "webhook", "webhook_secret_file", "min_category", "series",
                          "requesting_countries", "retry_initial_ms", "retry_max_s"})
    webhook = table.get("webhook", str, "")
    if webhook:
        webhook = _webhook_url(table, webhook)
        if "webhook_secret_file" not in table.data:
            raise ConfigError(f"{table.where('webhook_secret_file')}: required with a webhook "
                              "(every alert is signed with it)")
    elif "webhook_secret_file" in table.data:
        raise ConfigError(f"{table.where('webhook_secret_file')}: given without a webhook")
    min_category = table.data.get("min_category")
    if min_category is not None:
        min_category = table.get("min_category", int)
        if min_category < 0:
            raise ConfigError(f"{table.where('min_category')}: must be 0 or more, got {min_category}")
    return AlertSettings(
        enabled=table.get("enabled", bool, True),
        webhook=webhook,
        # Only a serving node sends alerts: other commands need not read the secret.
        webhook_secret=_secret(table) if webhook and for_serving else b"",
        min_category=min_category,
        series=_names(table, "series"),
        requesting_countries=_names(table, "requesting_countries", "country"),
        retry_initial_s=_positive(table, "retry_initial_ms", 1000) / 1000,
        retry_max_s=float(_positive(table, "retry_max_s", 300)),
    )


def _private(table: Table) -> PrivateSettings:
    table.reject_unknown({"enabled", "prefix_bits", "output_bytes", "encoding", "fingerprint_bits",
                          "false_candidate_bits"})
    defaults = PrivateSettings()
    enabled = table.get("enabled", bool, defaults.enabled)
    bits = table.get("prefix_bits", int, defaults.prefix_bits)
    if not PREFIX_BITS[0] <= bits <= PREFIX_BITS[1]:
        raise ConfigError(f"{table.where('prefix_bits')}: must be {PREFIX_BITS[0]} to {PREFIX_BITS[1]}, got {bits}")
    width = table.get("output_bytes", int, defaults.output_bytes)
    if not OUTPUT_BYTES[0] <= width <= OUTPUT_BYTES[1]:
        raise ConfigError(f"{table.where('output_bytes')}: must be {OUTPUT_BYTES[0]} to {OUTPUT_BYTES[1]}, "
                          f"got {width}")
    encoding = table.get("encoding", str, defaults.encoding)
    if encoding not in ENCODINGS:
        raise ConfigError(f"{table.where('encoding')}: expected one of {', '.join(ENCODINGS)}, got {encoding!r}")
    fingerprint = table.get("fingerprint_bits", int, defaults.fingerprint_bits)
    if fingerprint and not FINGERPRINT_BITS[0] <= fingerprint <= FINGERPRINT_BITS[1]:
        raise ConfigError(f"{table.where('fingerprint_bits')}: must be {FINGERPRINT_BITS[0]} to "
                          f"{FINGERPRINT_BITS[1]} (or 0: chosen from the bucket size), got {fingerprint}")
    target = table.get("false_candidate_bits", int, defaults.false_candidate_bits)
    if not FALSE_CANDIDATE_BITS[0] <= target <= FALSE_CANDIDATE_BITS[1]:
        raise ConfigError(f"{table.where('false_candidate_bits')}: must be {FALSE_CANDIDATE_BITS[0]} to "
                          f"{FALSE_CANDIDATE_BITS[1]}, got {target}")
    return PrivateSettings(enabled, bits, width, encoding, fingerprint, target)


def _tier(table: Table, key: str, value: object) -> Tier:
    try:
        return Tier(value)
    except ValueError:
        raise ConfigError(f"{table.where(key)}: expected \"hit\" or \"standard\", got {value!r}") from None


def _policy(table: Table) -> Policy:
    table.reject_unknown({"countries", "tier", "tiers", "requests_per_minute", "items_per_day"})
    defaults = Policy()
    countries = table.get("countries", list, ["*"])
    if not countries or not all(isinstance(c, str) for c in countries):
        raise ConfigError(f"{table.where('countries')}: expected a list of country codes, or [\"*\"]")
    tiers = table.table("tiers", required=False)
    return Policy(
        countries=None if "*" in countries else frozenset(countries),
        tier=_tier(table, "tier", table.get("tier", str, defaults.tier.value)),
        tiers={country: _tier(tiers, country, value) for country, value in tiers.data.items()},
        requests_per_minute=_positive(table, "requests_per_minute", defaults.requests_per_minute),
        items_per_day=_positive(table, "items_per_day", defaults.items_per_day),
    )


def _positive(table: Table, key: str, default: int) -> int:
    value = table.get(key, int, default)
    if value < 1:
        raise ConfigError(f"{table.where(key)}: must be at least 1, got {value}")
    return value
