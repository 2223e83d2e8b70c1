"""``icse-gateway watch``: standing queries for an agency's open cases.

``watch add --case REF (--file F | --dir D | --hash ALGO:HEX)...`` keeps the
digests of a case in the agency's own store (gateway.watch_store), never on a
node; ``watch list`` shows the open cases; ``watch remove --case REF`` closes
one and deletes its digests; ``watch run`` re-asks, every ``--interval``
seconds, only the nodes whose store changed, only about what they added, and
raises one alert per case x reference (JSON lines, optional signed webhook,
a line in this log).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from federation import algorithms
from federation.outbox import Outbox
from federation.query import QueryItem
from gateway import config as gateway_config, filehash, selfcheck, watch_config
from gateway.signing import signer_for
from gateway.watch_client import WatchClient
from gateway.watch_run import Watcher, serve
from gateway.watch_store import CaseStore, Watched


class WatchUsage(ValueError):
    """A command line that cannot be carried out; the message says why."""


def add_parser(sub: argparse._SubParsersAction, log_options: Callable[[argparse.ArgumentParser], None]) -> None:
    watch = sub.add_parser(
        "watch", help="standing queries: keep open cases' digests here and be alerted of new matches",
        description="Standing queries. An open case's digests stay in this agency's own store, never on any "
        "node; 'watch run' re-asks only the nodes whose store changed, only about what they added.")
    actions = watch.add_subparsers(dest="watch_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="open a case (or add digests to it)")
    add.add_argument("--case", required=True, help="case reference (goes into every node's audit with each re-ask)")
    add.add_argument("--hash", action="append", default=[], metavar="ALGO:HEX", help="a digest; repeatable")
    add.add_argument("--file", action="append", default=[], type=Path, metavar="PATH",
                     help="a file, hashed here as 'query --file' hashes it; repeatable")
    add.add_argument("--dir", action="append", default=[], type=Path, metavar="DIR",
                     help="every file under a directory; repeatable")
    add.add_argument("--max-distance", type=int, default=0, metavar="N", help="for perceptual hashes (default 31)")
    listing = actions.add_parser("list", help="the open cases")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    remove = actions.add_parser("remove", help="close a case and delete its digests")
    remove.add_argument("--case", required=True)
    run = actions.add_parser("run", help="re-ask changed nodes every interval until stopped (SIGTERM)")
    run.add_argument("--interval", type=float, metavar="S", help="seconds between rounds (default: [watch] "
                     f"interval, else {watch_config.DEFAULT_INTERVAL:.0f})")
    run.add_argument("--once", action="store_true", help="one round (and one delivery attempt), then exit")
    run.add_argument("--officer", help="requesting officer (default: [requester] officer)")
    for action in (add, listing, remove, run):
        action.add_argument("--config", type=Path, required=True, help="federation configuration (TOML)")
    log_options(run)
    run.set_defaults(log_level="INFO")


def main(args: argparse.Namespace, case_of: Callable[[str], str]) -> int:
    """Runs one ``watch`` action; ``case_of`` validates a case reference as ``query`` does."""
    config = gateway_config.load(args.config)
    settings = watch_config.load(args.config)
    if args.watch_command == "run":
        return _run(config, settings, args)
    with CaseStore(settings.store) as store:
        if args.watch_command == "add":
            case = case_of(args.case)
            watched = _watched(args.hash, args.file, args.dir, args.max_distance)
            added = store.add(case, watched)
            print(f"case {case}: {added} digest(s) added, {len(store.watched(case))} watched")
            return 0
        if args.watch_command == "remove":
            if not store.remove(args.case):
                raise WatchUsage(f"no open case {args.case!r}")
            print(f"case {args.case}: closed, its digests deleted")
            return 0
        cases = store.cases()
    if args.format == "json":
        print(json.dumps([{"case": c.reference, "opened": c.created, "digests": c.digests,
                           "nodes_asked": c.nodes_asked} for c in cases], indent=2))
    else:
        for c in cases:
            print(f"{c.reference}\topened {c.created}\t{c.digests} digest(s)\tasked on {c.nodes_asked} node(s)")
        if not cases:
            print("no open cases")
    return 0


def _watched(hashes: Sequence[str], files: Sequence[Path], directories: Sequence[Path],
             max_distance: int) -> list[Watched]:
    if not 0 <= max_distance <= 256:
        raise WatchUsage("--max-distance must be between 0 and 256")
    found: list[Watched] = []
    for text in hashes:
        try:
            algorithm, digest = algorithms.parse_tagged(text)
        except algorithms.DigestError as exc:
            raise WatchUsage(f"--hash {text[:80]}: {exc}") from None
        found.append(Watched(QueryItem(algorithm.name, digest, max_distance if algorithm.perceptual else 0),
                             f"{algorithm.name}:{digest.hex()[:16]}"))
    paths = list(files)
    for directory in directories:
        if not directory.is_dir():
            raise WatchUsage(f"--dir {directory}: not a directory")
        paths += sorted(p for p in directory.rglob("*") if p.is_file())
    for path in paths:
        if not path.is_file():
            raise WatchUsage(f"--file {path}: not a readable file")
        found += [Watched(s.item, s.source) for s in filehash.subjects(filehash.hash_file(path), max_distance)]
    if not found:
        raise WatchUsage("nothing to watch: give --hash ALGO:HEX, --file PATH or --dir DIR")
    return found


def _run(config: gateway_config.GatewayConfig, settings: watch_config.WatchConfig, args: argparse.Namespace) -> int:
    if args.interval is not None and not 1 <= args.interval <= 86_400:
        raise WatchUsage("--interval must be between 1 and 86400 seconds")
    requester = config.requester
    if args.officer:
        requester = gateway_config.Requester(args.officer, requester.org, requester.country)
    if not requester.officer:
        raise WatchUsage("no requesting officer: set [requester] officer in the config or pass --officer")
    selfcheck.check_client(config.tls, selfcheck.ClientIdentity(config.federation, config.gateway_id))
    signer = signer_for(config, requester)
    interval = args.interval or settings.interval

    async def go() -> int:
        client = WatchClient(config, signer)
        outbox = Outbox(settings.alerts, webhook=settings.webhook, jsonl_path=settings.alerts_jsonl)
        try:
            with CaseStore(settings.store) as store:
                return await serve(Watcher(client, store, outbox), outbox, interval, once=args.once,
                                   deliver=settings.webhook is not None)
        finally:
            outbox.close()
            await client.close()

    return asyncio.run(go())

