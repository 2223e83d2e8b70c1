"""``icse-node audit``: check, export, prune and anchor the node's audit log.

Kept apart from ``node.cli`` so it can be wired in with two calls:
``add_audit_parser(subparsers)`` and, for ``args.command == "audit"``,
``run_audit(args)``. Exit status: 0 ok, 1 the chain is broken, 2 usage or
configuration error, 141 output cut short by a closed pipe (``| head``).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import sys
from pathlib import Path

from federation.config import ConfigError
from node import config as node_config
from node.audit import DEFAULT_RETENTION_DAYS, AuditError, AuditLog, audit_path, connect, utc_iso
from node.unix import stdout_closed


def _when(text: str) -> dt.datetime:
    """An ISO 8601 date or time; without a zone it is taken as UTC."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an ISO 8601 date or time such as 2024-05-01 "
                                         f"or 2024-05-01T12:00:00Z, got {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        days = 0
    if days < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of days, at least 1, got {text!r}")
    return days


def add_audit_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds ``audit`` with its subcommands to the CLI's ``subparsers``."""
    audit = subparsers.add_parser(
        "audit",
        help="verify, export, prune or anchor the audit log of queries",
        description="The node logs every call it answers (never the digests asked about) in a hash "
        "chain kept beside its store: each record carries the SHA-256 of the record before it, so an "
        "edited, deleted or reordered record is found by 'verify'. Removing the newest records is "
        "only caught against an outside copy of 'head': print it to a ticket daily.",
    )
    commands = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")

    def command(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help_text, description=description)
        parser.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
        return parser

    command("verify", "check the whole hash chain",
            "Walk the audit log in order and check every record's hash and link. Exits 1 and names "
            "the first bad record if any was edited, deleted or reordered; prints the head (seq and "
            "hash) on success, to compare with the copy kept outside the node.")
    export = command("export", "write the records as JSON lines for an auditor",
                     "Write one JSON object per record (seq, time, hash, prev_hash and the entry's "
                     "fields: gateway, officer, org, country, case, rpc, items, algorithms, hits, "
                     "references, status, detail, token_id, peer, key_id).")
    export.add_argument("--since", type=_when, metavar="ISO",
                        help="only records at or after this time (UTC unless a zone is given)")
    export.add_argument("--out", type=Path, metavar="FILE", help="write here instead of standard output")
    prune = command("prune", "delete records past their retention period",
                    "Delete the oldest records, keeping the rest verifiable: the last deleted record's "
                    "seq and hash are kept as the chain's new anchor. Refuses (exit 1) if the records "
                    "to delete do not verify, so pruning cannot hide an edit.")
    cutoff = prune.add_mutually_exclusive_group()
    cutoff.add_argument("--retention-days", type=_days, default=DEFAULT_RETENTION_DAYS, metavar="N",
                        help=f"delete records older than N days (default {DEFAULT_RETENTION_DAYS}, two years)")
    cutoff.add_argument("--before", type=_when, metavar="ISO",
                        help="delete records older than this time instead (UTC unless a zone is given)")
    command("head", "print the latest seq and hash, to anchor outside the node",
            "Print one line with the node id, the time, and the latest record's seq and hash. Keep it "
            "outside the node (ticket, mail): a later 'verify' must show the same record unchanged, "
            "and a head with a lower seq means records were cut from the end.")
    return audit


def run_audit(args: argparse.Namespace) -> int:
    """Runs the ``audit`` subcommand parsed by ``add_audit_parser``; returns the exit status."""
    try:
        config = node_config.load(args.config, for_serving=False)
        if not config.store.is_file():
            raise ConfigError(f"{config.store}: no store here (has the node imported or served yet?)")
        return asyncio.run(_run(args, config))
    except BrokenPipeError:
        return stdout_closed()
    except (ConfigError, OSError, ValueError) as exc:
        print(f"icse-node audit: {exc}", file=sys.stderr)
        return 2


async def _run(args: argparse.Namespace, config: node_config.NodeConfig) -> int:
    db = await connect(audit_path(config.store))
    try:
        log = await AuditLog.open(db)
        name = f"audit log of node {config.node_id}"
        if args.audit_command == "verify":
            result = await log.verify()
            if not result.ok:
                print(f"{name} BROKEN at seq {result.first_bad_seq}: {result.reason} "
                      f"({result.checked} records before it verified)", file=sys.stderr)
                return 1
            head = await log.head()
            print(f"{name} OK: {result.checked} records verified"
                  + (f", head seq {head[0]} hash {head[1]}" if head else ""))
        elif args.audit_command == "export":
            since = args.since.isoformat() if args.since else None
            if args.out is None:
                count = await log.write_jsonl(sys.stdout, since)
            else:
                with args.out.open("w", encoding="utf-8") as out:
                    count = await log.write_jsonl(out, since)
            print(f"{name}: exported {count} records", file=sys.stderr)
        elif args.audit_command == "prune":
            before = args.before or dt.datetime.now(dt.UTC) - dt.timedelta(days=args.retention_days)
            try:
                deleted = await log.prune(before)
            except AuditError as exc:
                print(f"{name}: {exc}", file=sys.stderr)
                return 1
            print(f"{name}: pruned {deleted} records older than {utc_iso(before)}")
        else:
            head = await log.head()
            now = utc_iso(dt.datetime.now(dt.UTC))
            print(f"node={config.node_id} at={now} seq={head[0]} hash={head[1]}" if head else f"{name} is empty")
        return 0
    finally:
        await db.close()
