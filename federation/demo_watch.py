"""The demo's standing query: a case asked before a country imports the matching set,
then the alert arriving after the import.

The investigator opens a case on a seized file nobody knows yet; a round of
``icse-gateway watch run`` asks every node and finds nothing. One country
imports a set holding the file's digest; the next round asks again only the
node whose store changed, only about its new rows, and the alert arrives (a
line in the gateway's log, and one JSON line in the alert feed).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from federation.localfed import LocalFederation


def _run(command: list[str], title: str) -> int:
    print(f"\n$ {title}", flush=True)
    return subprocess.run(command, timeout=120, check=False).returncode


def standing_query(federation: LocalFederation, config: Path, seized: Path, country: str, workdir: Path) -> int:
    """Runs the scene; 0 when the alert arrived after the import (and not before)."""
    gateway = federation.gateway_command
    case = "DEMO-2026-0002"
    _run(gateway("watch", "add", "--config", str(config), "--case", case, "--file", str(seized)),
         f"icse-gateway watch add --case {case} --file {seized.name}")
    _run(gateway("watch", "run", "--config", str(config), "--once", "--log-level", "WARNING"),
         "icse-gateway watch run --once   (every node asked: nobody knows the file yet)")
    feed = config.with_name("watch-alerts.jsonl")
    before = feed.read_text().splitlines() if feed.exists() else []
    digest = hashlib.sha256(seized.read_bytes()).hexdigest()
    new_set = workdir / f"{country}-new.csv"
    new_set.write_text(f"algorithm,digest,reference,category,series\nsha256,{digest},{country}-NEW-0001,1,"
                       "SERIES-ECHO\n")
    print(f"\n{country} imports a new set that holds the seized file's digest…", flush=True)
    imported = federation[country].import_file(new_set)
    print(f"  {country}: {imported.stdout.strip()}", flush=True)
    _run(gateway("watch", "run", "--config", str(config), "--once", "--log-level", "WARNING"),
         f"icse-gateway watch run --once   (only {country} changed: asked about its new rows only)")
    after = feed.read_text().splitlines() if feed.exists() else []
    for line in after[len(before):]:
        alert = json.loads(line)
        print(f"  alert: case {alert['case']}: {alert['country']} holds {alert['source']} as {alert['reference']} "
              f"(series {alert['series'] or '-'}); contact {alert['contact']}", flush=True)
    _run(gateway("watch", "remove", "--config", str(config), "--case", case),
         f"icse-gateway watch remove --case {case}   (case closed: its digests deleted)")
    return 0 if not before and len(after) == 1 else 1
