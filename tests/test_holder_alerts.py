"""Holder alerts end to end: real node processes over mutual TLS, queried by the
real gateway CLI, alerting a real local webhook and the ``icse-node alerts`` feed.

What a holder's desk must get: one alert per released hit, with who asked and
the one digest that hit, and nothing else of the request (no-hit digests appear
in no file the node writes); only the hits its filters ask for; a webhook
delivery exactly once although the webhook fails and the node restarts; an
alert that survives kill -9 of the node once the answer has left.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
import os
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from federation.bundles import canonical
from federation.config import ConfigError
from federation.localfed import LocalFederation, NodeSpec, environment
from federation.outbox import Outbox
from federation.pki import DevPki
from federation.tokens import QueryClaims
from federation.webhook import verify
from node import config as node_config
from node.alerts import Alerts, ReleasedHit, open_outbox, passes
from node.records import HashRecord
from tests.support import query_json
from tests.webhook import Receiver, receiving

SECRET = b"fr-desk-webhook-secret-0123456789"


@dataclass
class Holder:
    """FR's node holding a few referenced rows, and a gateway config to ask it."""

    local: LocalFederation
    gateway: Path
    rows: dict[str, tuple[str, str, str, str]]  # name -> (algorithm, hex digest, reference, category/series)
    country: str  # the requesting officer's

    def write_gateway(self) -> None:
        self.gateway = self.local.write_gateway_config(officer="officer-7", org="BKA Test", country=self.country)

    def restart(self) -> None:
        """Starts the stopped node again (on a new port, which the gateway config then names)."""
        self.node.start()
        self.node.wait_ready()
        self.write_gateway()

    @property
    def node(self):  # type: ignore[no-untyped-def]
        return self.local["FR"]

    def digest(self, name: str) -> str:
        algorithm, hexdigest, _, _ = self.rows[name]
        return f"{algorithm}:{hexdigest}"


def _rows(rng: random.Random) -> dict[str, tuple[str, str, str, str, str]]:
    """name -> (algorithm, digest hex, reference, category, series)."""
    return {
        "alpha1": ("sha256", rng.randbytes(32).hex(), "FR-A-1", "1", "S-ALPHA"),
        "alpha3": ("md5", rng.randbytes(16).hex(), "FR-A-3", "3", "S-ALPHA"),
        "other3": ("sha1", rng.randbytes(20).hex(), "FR-O-3", "3", "S-OTHER"),
        "alphax": ("sha256", rng.randbytes(32).hex(), "FR-A-X", "x", "S-ALPHA"),
    }


def _write_secret(directory: Path) -> Path:
    path = directory / "webhook.secret"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as out:
        out.write(SECRET + b"\n")
    return path


def _start(pki: DevPki, workdir: Path, alerts: dict[str, object], *, country: str = "DE") -> Holder:
    rng = random.Random(13)
    rows = _rows(rng)
    workdir.mkdir(parents=True)
    local = LocalFederation(workdir, pki, [NodeSpec("FR", "FR", "desk@police.example.fr",
                                                    tables={"alerts": alerts} if alerts else {})])
    path = workdir / "fr.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["algo", "digest", "reference", "category", "victim_identified", "series"])
        writer.writerows([algorithm, digest, reference, category, "false", series]
                         for algorithm, digest, reference, category, series in rows.values())
    done = local["FR"].import_file(path)
    assert done.returncode == 0, done.stdout + done.stderr
    local.start()
    holder = Holder(local, Path(), {name: (a, d, r, f"{c}/{s}") for name, (a, d, r, c, s) in rows.items()},
                    country)
    holder.write_gateway()
    return holder


@pytest.fixture
def holder_factory(pki: DevPki, tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[Holder] = []

    def make(alerts: dict[str, object], **kwargs: object) -> Holder:
        holder = _start(pki, tmp_path / f"fed{len(started)}", alerts, **kwargs)  # type: ignore[arg-type]
        started.append(holder)
        return holder

    yield make
    for holder in started:
        holder.local.stop()


def _alerts_cli(holder: Holder, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "node.cli", "alerts", "--config", str(holder.node.config_path),
                           *args], capture_output=True, text=True, timeout=60, check=False)


def _feed(holder: Holder, since: int = 0) -> list[dict]:
    done = _alerts_cli(holder, "--since", str(since))
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def _query(holder: Holder, case: str, *digests: str, expect: int = 0) -> dict:
    args = ["--case", case]
    for digest in digests:
        args += ["--hash", digest]
    code, result = query_json(holder.gateway, *args)
    assert code == expect, result
    return result


def _written_bytes(node_dir: Path) -> dict[str, bytes]:
    """Every file the node wrote (store, segments, audit, alerts, log), by name."""
    return {str(p.relative_to(node_dir)): p.read_bytes() for p in node_dir.rglob("*") if p.is_file()}


def _outbox_rows(holder: Holder) -> list[tuple[str, int, bool]]:
    """(key, attempts, delivered?) of every alert, read from the node's outbox file."""
    path = Path(f"{holder.node.store_path}.alerts")
    box = Outbox(path)
    box.expand()  # answers' bundles not yet delivered become their alerts
    box.close()
    with sqlite3.connect(path) as db:
        return [(k, a, bool(d)) for k, a, d in db.execute("SELECT key, attempts, delivered IS NOT NULL"
                                                             " FROM outbox ORDER BY id")]


def test_a_released_hit_becomes_one_alert_with_no_other_digest_of_the_request(holder_factory) -> None:
    holder = holder_factory({})
    rng = random.Random(99)
    misses = [f"sha256:{rng.randbytes(32).hex()}", f"md5:{rng.randbytes(16).hex()}",
              f"sha1:{rng.randbytes(20).hex()}", f"sha256:{rng.randbytes(32).hex()}"]
    result = _query(holder, "DE-2026-0042", misses[0], holder.digest("alpha3"), misses[1], misses[2],
                    misses[3])
    assert [len(item["hits"]) for item in result["items"]] == [0, 1, 0, 0, 0]
    alerts = _feed(holder)
    assert len(alerts) == 1
    alert = alerts[0]
    algorithm, digest = holder.digest("alpha3").split(":")
    assert alert["cursor"] >= 1
    assert {k: alert[k] for k in ("type", "node_id", "node_country", "reference", "series", "category",
                                  "algorithm", "digest", "distance", "item", "requesting_country",
                                  "requesting_agency", "officer", "case", "gateway", "victim_identified")} == {
        "type": "hit.released", "node_id": "FR", "node_country": "FR", "reference": "FR-A-3",
        "series": "S-ALPHA", "category": "3", "algorithm": algorithm, "digest": digest, "distance": 0,
        "item": 1, "requesting_country": "DE", "requesting_agency": "BKA Test", "officer": "officer-7",
        "case": "DE-2026-0042", "gateway": "eu-1", "victim_identified": False}
    assert alert["request_id"] == result["request_id"]
    assert alert["event_id"] == f"eu-1/{result['request_id']}/1/FR-A-3"
    assert alert["time"].endswith("Z")
    outbox = Path(f"{holder.node.store_path}.alerts")
    assert stat.S_IMODE(outbox.stat().st_mode) == 0o600, "alerts name cases and officers"
    holder.local.stop()  # the log and every file complete
    written = _written_bytes(holder.node.dir)
    assert any(name.endswith(".alerts") for name in written)
    assert any(name.endswith(".audit") for name in written)
    for miss in misses:
        hexdigest = miss.split(":")[1]
        for needle in (hexdigest, hexdigest.upper(), bytes.fromhex(hexdigest)):
            for name, content in written.items():
                text = needle.encode() if isinstance(needle, str) else needle
                assert text not in content, f"a no-hit digest is in {name}"
    # The digest that hit is in the alert: the search above would have found the others.
    assert any(digest.encode() in content for name, content in written.items() if ".alerts" in name)


def test_a_no_hit_query_makes_no_alert(holder_factory) -> None:
    holder = holder_factory({})
    _query(holder, "DE-2026-0043", "sha256:" + "00" * 32, expect=1)
    assert _feed(holder) == []


def test_filters_choose_the_alerts_not_the_answer(holder_factory) -> None:
    holder = holder_factory({"min_category": 2, "series": ["S-ALPHA", "S-BRAVO"],
                             "requesting_countries": ["DE"]})
    everything = [holder.digest(name) for name in ("alpha1", "alpha3", "other3", "alphax")]
    result = _query(holder, "DE-2026-0050", *everything)
    assert all(len(item["hits"]) == 1 for item in result["items"])  # every hit is answered
    # alpha1: category 1 < 2; other3: series not chosen; alphax: category not a number.
    assert [a["reference"] for a in _feed(holder)] == ["FR-A-3"]
    # The same hits asked from FR (not a chosen requesting country): no alert.
    gateway_fr = holder.local.write_gateway_config(holder.local.workdir / "fr-gateway.toml", country="FR")
    code, _ = query_json(gateway_fr, "--case", "FR-2026-1", *[a for d in everything for a in ("--hash", d)])
    assert code == 0
    assert [a["reference"] for a in _feed(holder)] == ["FR-A-3"]


def _webhook_alerts(receiver: Receiver, secret_file: Path, **extra: object) -> dict[str, object]:
    return {"webhook": receiver.url, "webhook_secret_file": str(secret_file), "retry_initial_ms": 20,
            "retry_max_s": 1, **extra}


def test_webhook_delivered_exactly_once_after_three_failures_and_a_restart(holder_factory, tmp_path: Path) -> None:
    with receiving(fail_first=3, accepting=False) as receiver:
        holder = holder_factory(_webhook_alerts(receiver, _write_secret(tmp_path)))
        result = _query(holder, "DE-2026-0060", holder.digest("alpha1"))
        first = f"eu-1/{result['request_id']}/0/FR-A-1"
        receiver.wait_for(lambda r: len(r.requests) >= 3, what="three refused deliveries")
        assert holder.node.stop() == 0  # SIGTERM: the delivery task stops with the node
        attempts = dict((k, (a, d)) for k, a, d in _outbox_rows(holder))
        assert attempts[first][0] >= 3 and attempts[first][1] is False  # the failures are on disk
        receiver.accept()
        holder.restart()
        receiver.wait_accepted(1)
        assert receiver.accepted == [first]
        # A second alert after another restart: had the first been sent again, it would
        # have gone first (delivery is in recording order, and resumes at start).
        assert holder.node.stop() == 0
        holder.restart()
        second = _query(holder, "DE-2026-0061", holder.digest("alpha3"))
        receiver.wait_accepted(2)
        assert receiver.accepted == [first, f"eu-1/{second['request_id']}/0/FR-A-3"]
        for headers, body in receiver.requests:
            assert verify(SECRET, body, headers["X-ICSE-Signature"])
            assert json.loads(body)["event_id"] == headers["X-ICSE-Event-Id"]
        assert SECRET.decode() not in holder.node.log_path.read_text()


def test_an_alert_survives_kill_9_of_the_node_and_is_delivered_after_restart(holder_factory,
                                                                              tmp_path: Path) -> None:
    with receiving(accepting=False) as receiver:
        holder = holder_factory(_webhook_alerts(receiver, _write_secret(tmp_path)))
        result = _query(holder, "DE-2026-0070", holder.digest("other3"))
        assert result["items"][0]["hits"][0]["reference"] == "FR-O-3"
        # The answer has left: the node dies at once, without a chance to flush anything.
        holder.node.process.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
        holder.node.process.wait()  # type: ignore[union-attr]
        holder.node.stop()
        key = f"eu-1/{result['request_id']}/0/FR-O-3"
        assert [a["event_id"] for a in _feed(holder)] == [key]
        receiver.accept()
        holder.restart()
        receiver.wait_accepted(1)
        assert receiver.accepted == [key]
        assert json.loads(receiver.requests[-1][1])["case"] == "DE-2026-0070"


def test_the_feed_resumes_from_a_cursor_and_follows(holder_factory) -> None:
    holder = holder_factory({})
    _query(holder, "DE-2026-0080", holder.digest("alpha1"))
    _query(holder, "DE-2026-0081", holder.digest("alpha3"))
    both = _feed(holder)
    assert [a["case"] for a in both] == ["DE-2026-0080", "DE-2026-0081"]
    first, second = both[0]["cursor"], both[1]["cursor"]
    assert first < second
    assert _feed(holder, first) == both[1:]
    assert _feed(holder, second) == []
    follower = subprocess.Popen(
        [sys.executable, "-m", "node.cli", "alerts", "--config", str(holder.node.config_path), "--follow",
         "--since", str(second), "--interval", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environment())
    try:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(follower.stdout.readline().decode()))  # type: ignore[union-attr]
        reader.start()
        _query(holder, "DE-2026-0082", holder.digest("other3"))
        reader.join(60)
        followed = json.loads(lines[0])
        assert (followed["case"], followed["reference"]) == ("DE-2026-0082", "FR-O-3")
        assert followed["cursor"] > second
        # The reader goes away (| head): the next alert ends the follower quietly, 141.
        follower.stdout.close()  # type: ignore[union-attr]
        _query(holder, "DE-2026-0083", holder.digest("alpha1"))
        assert follower.wait(60) == 141
        assert b"Traceback" not in follower.stderr.read()  # type: ignore[union-attr]
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
        follower.stderr.close()  # type: ignore[union-attr]


def test_alerts_command_says_what_is_wrong(holder_factory, tmp_path: Path) -> None:
    holder = holder_factory({})
    done = _alerts_cli(holder, "--since", "-3")
    assert done.returncode == 2 and "expected a cursor" in done.stderr
    lonely = tmp_path / "lonely.toml"
    lonely.write_text(f'[node]\nid = "FR"\ncountry = "FR"\nfederation = "x"\nstore = "{tmp_path / "none.sqlite"}"\n')
    done = subprocess.run([sys.executable, "-m", "node.cli", "alerts", "--config", str(lonely)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "no alerts file" in done.stderr
    assert done.stdout == ""



def _config(tmp_path: Path, pki: DevPki, alerts: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nid = "FR"\ncountry = "FR"\nfederation = "{pki.federation}"\nstore = "store.sqlite"\n\n'
                    f'[tls]\nca = "{pki.ca_cert}"\ncert = "{pki.node_cert("FR")}"\nkey = "{pki.node_key("FR")}"\n\n'
                    f'[trust]\ngateway_keys = "{pki.jwks}"\ngateways = ["eu-1"]\n\n[alerts]\n{alerts}\n')
    return path


@pytest.mark.parametrize(("alerts", "message"), [
    ('webhook = "http://desk.example.fr/alerts"\nwebhook_secret_file = "s"',
     "plain http:// is accepted only to this machine"),
    ('webhook = "ftp://127.0.0.1/x"\nwebhook_secret_file = "s"', "expected an https:// URL"),
    ('webhook = "https://desk.example.fr/alerts"', "webhook_secret_file: required with a webhook"),
    ('webhook_secret_file = "s"', "given without a webhook"),
    ('webhook = "https://desk.example.fr/a"\nwebhook_secret_file = "missing"', "file not found"),
    ('webhook = "https://desk.example.fr/a"\nwebhook_secret_file = "open"', "readable by others"),
    ('webhook = "https://desk.example.fr/a"\nwebhook_secret_file = "short"', "needs at least 16"),
    ("min_category = -1", "must be 0 or more"),
    ('min_category = "A"', "expected int"),
    ('requesting_countries = ["de"]', "ISO 3166 alpha-2"),
    ('series = "S-ALPHA"', "expected list"),
    ("retry_initial_ms = 0", "must be at least 1"),
    ('webhooks = "https://x"', "unknown key"),
])
def test_alerts_configuration_is_checked_at_start(tmp_path: Path, pki: DevPki, alerts: str, message: str) -> None:
    _write_secret(tmp_path).rename(tmp_path / "s")
    (tmp_path / "open").write_bytes(SECRET)
    (tmp_path / "open").chmod(0o644)
    _write_secret(tmp_path).rename(tmp_path / "short")
    (tmp_path / "short").write_bytes(b"tiny")
    with pytest.raises(ConfigError, match=message) as caught:
        node_config.load(_config(tmp_path, pki, alerts))
    assert "[alerts]" in str(caught.value)
    assert SECRET.decode() not in str(caught.value)


def test_a_valid_alerts_table_loads_and_keeps_its_secret_out_of_sight(tmp_path: Path, pki: DevPki) -> None:
    _write_secret(tmp_path).rename(tmp_path / "s")
    path = _config(tmp_path, pki, 'webhook = "https://desk.example.fr/a"\nwebhook_secret_file = "s"\n'
                   'min_category = 2\nseries = ["S-1"]\nrequesting_countries = ["DE"]')
    loaded = node_config.load(path)
    assert loaded.alerts.webhook_secret == SECRET
    assert (loaded.alerts.min_category, loaded.alerts.series, loaded.alerts.requesting_countries) == (
        2, frozenset({"S-1"}), frozenset({"DE"}))
    assert SECRET.decode() not in repr(loaded)
    # Commands other than serve never read the secret (an operator's import needs no access to it).
    assert node_config.load(path, for_serving=False).alerts.webhook_secret == b""
    assert node_config.load(_config(tmp_path, pki, "")).alerts == node_config.AlertSettings()


def _claims(country: str = "DE") -> QueryClaims:
    return QueryClaims(issuer="eu-1", subject="officer-7", org="BKA Test", country=country, audience="FR",
                       rpc="Match", query_sha256="0" * 64, case="DE-1", cert_thumbprint="", issued_at=0,
                       expires_at=0, token_id="t-1")


def _released(item: int, reference: str, category: str = "3", series: str = "S-ALPHA") -> ReleasedHit:
    return ReleasedHit(item, "sha256", bytes(32), HashRecord("sha256", bytes(32), reference, category, None,
                                                             series), 0, None, "standard")


async def test_an_outbox_that_cannot_be_written_never_fails_the_answer(tmp_path: Path) -> None:
    settings = node_config.AlertSettings()
    outbox = open_outbox(tmp_path / "store.sqlite", settings)
    assert outbox is not None
    registry = CollectorRegistry()
    alerts = Alerts(outbox, settings, "FR", "FR", registry)
    await alerts.record(_claims(), "r1", [_released(0, "FR-1"), _released(0, "FR-1"), _released(1, "FR-2")])
    assert registry.get_sample_value("icse_node_alerts_recorded_total") == 2  # the repeat is one alert
    outbox.close()  # every write now fails
    await alerts.record(_claims(), "r2", [_released(0, "FR-3")])  # returns: the answer goes
    assert registry.get_sample_value("icse_node_alerts_failed_total") == 1
    assert registry.get_sample_value("icse_node_alerts_recorded_total") == 2


def test_filters_are_pure_rules_on_the_row_and_the_requester() -> None:
    chosen = node_config.AlertSettings(min_category=2, series=frozenset({"S-ALPHA"}),
                                       requesting_countries=frozenset({"DE"}))
    assert passes(chosen, _claims("DE"), _released(0, "r", "3"))
    assert passes(chosen, _claims("DE"), _released(0, "r", "2"))
    assert not passes(chosen, _claims("DE"), _released(0, "r", "1"))
    assert not passes(chosen, _claims("DE"), _released(0, "r", ""))
    assert not passes(chosen, _claims("NL"), _released(0, "r", "3"))
    assert not passes(chosen, _claims("DE"), _released(0, "r", "3", "S-OTHER"))
    assert passes(node_config.AlertSettings(), _claims("NL"), _released(0, "r", "", ""))


async def test_pending_alerts_are_a_metric_until_the_webhook_takes_them(tmp_path: Path) -> None:
    with receiving(accepting=False) as receiver:
        settings = node_config.AlertSettings(webhook=receiver.url, webhook_secret=SECRET, retry_initial_s=0.02,
                                             retry_max_s=0.05)
        outbox = open_outbox(tmp_path / "store.sqlite", settings)
        assert outbox is not None
        registry = CollectorRegistry()
        alerts = Alerts(outbox, settings, "FR", "FR", registry)
        await alerts.record(_claims(), "r1", [_released(0, "FR-1"), _released(1, "FR-2")])
        assert registry.get_sample_value("icse_node_alerts_pending") == 2
        assert await outbox.deliver_due() == 0
        receiver.accept()
        stop = asyncio.Event()
        delivering = asyncio.create_task(alerts.deliver_forever(stop))
        await asyncio.to_thread(receiver.wait_accepted, 2)
        stop.set()
        await delivering
        assert registry.get_sample_value("icse_node_alerts_pending") == 0
        outbox.close()


def test_a_damaged_outbox_stops_the_start_in_words(pki: DevPki, tmp_path: Path) -> None:
    local = LocalFederation(tmp_path, pki, [NodeSpec("FR", "FR")])
    node = local["FR"]
    node.write_config()
    Path(f"{node.store_path}.alerts").write_bytes(b"this is not a database, " * 200)
    node.start()
    try:
        with pytest.raises(RuntimeError, match="cannot open the alerts outbox"):
            node.wait_ready()
        assert node.process is not None and node.process.wait(30) == 2
        assert "Traceback" not in node.log_path.read_text()
        feed = subprocess.run(node.node_command("alerts", "--config", str(node.config_path)),
                              capture_output=True, text=True, timeout=60, check=False)
        assert feed.returncode == 2 and "not a database" in feed.stderr and "Traceback" not in feed.stderr
    finally:
        node.stop()


def event_key(claims: QueryClaims, request_id: str, hit: ReleasedHit) -> str:
    """An alert's id, as the README gives it: gateway / request id / item / reference."""
    return f"{claims.issuer}/{request_id}/{hit.item}/{hit.record.reference}"


def event(node_id: str, country: str, claims: QueryClaims, request_id: str, hit: ReleasedHit,
          when: dt.datetime) -> dict[str, object]:
    """The alert the desk should receive for ``hit``, every field spelled out."""
    record = hit.record
    return {
        "type": "hit.released", "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "node_id": node_id, "node_country": country, "request_id": request_id, "gateway": claims.issuer,
        "requesting_country": claims.country, "requesting_agency": claims.org, "officer": claims.subject,
        "case": claims.case, "token_id": claims.token_id,
        "reference": record.reference, "series": record.series, "category": record.category,
        "victim_identified": record.victim_identified, "algorithm": hit.algorithm, "digest": hit.digest.hex(),
        "distance": hit.distance, "matched_share": hit.matched_share, "item": hit.item, "released_tier": hit.tier,
    }


async def test_a_batch_of_alerts_is_stored_as_the_canonical_json_of_each_event(tmp_path: Path) -> None:
    """The alerts of one answer are recorded together (one bundle, shared fields once): once
    expanded, each stored text is still exactly ``canonical(event)``, whatever the values (quotes,
    non-ASCII, None, booleans, floats), and a filter still drops what it should."""
    settings = node_config.AlertSettings()
    outbox = open_outbox(tmp_path / "store.sqlite", settings)
    assert outbox is not None
    alerts = Alerts(outbox, settings, 'FR "main"', "FR")
    claims = QueryClaims("gw-é", 'officer "x"\\', "org\n", "DE", "FR", "Match", "0" * 64, "CASE-ü\u2028",
                         "t", 0, 0, "tok-1")
    hits = [ReleasedHit(0, "sha256", bytes(range(32)), HashRecord("sha256", bytes(32), 'R-"1"', "3", None,
                                                                  "S-é"), 0, None, "standard"),
            ReleasedHit(7, "pdq", bytes(32), HashRecord("pdq", bytes(32), "R-2\u00a0", "", True, ""), 12, None,
                        "hit"),
            ReleasedHit(9, "video", b"\x01" * 40, HashRecord("video", b"", "R-3", "10", False, "\\"), 3, 0.625,
                        "standard")]
    await alerts.record(claims, "rid-1", hits)
    assert sqlite3.connect(outbox.path).execute("SELECT count(*) FROM outbox").fetchone() == (0,)  # one bundle
    assert outbox.expand() == len(hits)
    stored = sqlite3.connect(outbox.path).execute("SELECT key, event FROM outbox ORDER BY id").fetchall()
    outbox.close()
    assert [key for key, _ in stored] == [event_key(claims, "rid-1", hit) for hit in hits]
    for (key, text), hit in zip(stored, hits, strict=True):
        when = dt.datetime.fromisoformat(json.loads(text)["time"].replace("Z", "+00:00"))
        assert text == canonical({"event_id": key, **event('FR "main"', "FR", claims, "rid-1", hit, when)})
