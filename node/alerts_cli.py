"""``icse-node alerts``: the desk's feed of hits this node released, as JSON lines.

Kept apart from ``node.cli`` so it is wired in with two calls:
``add_alerts_parser(subparsers)`` and, for ``args.command == "alerts"``,
``run_alerts(args)``. It reads the node's outbox file (``node.alerts``) while
the node writes it: the file is in WAL mode, so a reader in another process
never waits for the node nor makes it wait. Exit status: 0 done (or ended by
Ctrl-C while following, 130), 2 usage or configuration error, 141 output cut
short by a closed pipe (``| head``).
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import time
from pathlib import Path

from federation.config import ConfigError
from federation.outbox import Outbox
from node import config as node_config
from node.alerts import alerts_path
from node.unix import stdout_closed

_BATCH = 1000


def _cursor(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a cursor (a whole number, 0 or more, as printed in "
                                         f"the 'cursor' field of an alert), got {text!r}")
    return value


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0.05 and 3600, got {text!r}")
    return value


def add_alerts_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``alerts`` to the CLI's ``subparsers``."""
    parser = subparsers.add_parser(
        "alerts",
        help="print the alerts of hits this node released (JSON lines), or follow them",
        description=(
            "Every hit this node releases to a requester is recorded as an alert for its\n"
            "own desk before the answer leaves: reference, series, category, who asked\n"
            "(gateway, country, agency, officer, case), when, distance, algorithm, request\n"
            "id and the one digest that hit - nothing else of the request.\n\n"
            "Printed oldest first, one JSON object per line, each with a 'cursor': give the\n"
            "last one you handled to --since to carry on from there (cursors never change).\n"
            "The node's [alerts] table chooses which hits are recorded and the webhook they\n"
            "are also sent to (README, 'Holder alerts')."),
        epilog="examples:  icse-node alerts --config node.toml --since 0 | jq .reference\n"
        "           icse-node alerts --config node.toml --follow --since \"$(cat last-cursor)\"",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    parser.add_argument("--since", type=_cursor, default=0, metavar="CURSOR",
                        help="only alerts after this cursor (default 0: from the first)")
    parser.add_argument("--follow", action="store_true",
                        help="keep running and print new alerts as the node records them (Ctrl-C ends)")
    parser.add_argument("--interval", type=_interval, default=0.5, metavar="SECONDS",
                        help="with --follow, how often to look for new alerts (default 0.5)")
    return parser


def run_alerts(args: argparse.Namespace) -> int:
    try:
        config = node_config.load(args.config, for_serving=False)
        path = alerts_path(config.store)
        if not path.is_file():
            raise OSError(f"{path}: no alerts file (the node creates it when it starts serving"
                          f"{'' if config.alerts.enabled else '; [alerts] enabled = false in its configuration'})")
        outbox = Outbox(path)
    except (ConfigError, OSError, sqlite3.Error) as exc:
        print(f"icse-node: {exc}", file=sys.stderr)
        return 2
    try:
        _print_feed(outbox, args.since, args.follow, args.interval)
    except BrokenPipeError:
        return stdout_closed()
    except KeyboardInterrupt:
        return 130
    finally:
        outbox.close()
    return 0


def _print_feed(outbox: Outbox, cursor: int, follow: bool, interval: float) -> None:
    while True:
        rows = outbox.since(cursor, _BATCH)
        for row_cursor, event in rows:
            sys.stdout.write(json.dumps({"cursor": row_cursor, **event}, ensure_ascii=False) + "\n")
            cursor = row_cursor
        sys.stdout.flush()
        if len(rows) == _BATCH:
            continue
        if not follow:
            return
        # Another process writes the file: looking again at an interval is how a reader learns of new rows.
        time.sleep(interval)
