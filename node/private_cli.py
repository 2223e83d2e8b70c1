"""``icse-node private-key``: the node's OPRF key for private exact matching.

``init`` creates the key if there is none (a node with ``[private] enabled``
also does at start); ``rotate`` starts a rotation that the serving node
finishes (node.private_builder); ``show`` names the keys by id. No command
prints a secret key.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from federation import oprf
from node import private_key
from node.config import NodeConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "private-key", help="create, rotate or show the node's OPRF key (private exact matching)",
        description="The node's secret OPRF key (file <store>.oprf-key, owner-only). 'init' creates it if "
        "missing; 'rotate' makes a new key: the serving node computes every segment's outputs under it in "
        "the background, answering under the old key until they all exist, then switches (the key id in "
        "its answers and in describe changes); 'show' prints the key ids. Secret keys are never printed.")
    parser.add_argument("action", choices=["init", "rotate", "show"])
    parser.add_argument("--config", type=Path, required=True, help="node configuration (TOML)")
    parser.add_argument("--format", default="table", choices=["table", "json"])
    parser.add_argument("--replace", action="store_true",
                        help="init: replace a damaged or lost key with a new one (every output is computed again; "
                        "until then private answers cover nothing)")


def run(config: NodeConfig, action: str, format_name: str, replace: bool = False) -> int:
    store = config.store
    if replace and action != "init":
        raise ValueError("--replace goes with init only")
    if action == "init":
        keys, created = private_key.init(store, replace=replace)
        state = "created" if created else "already present"
    elif action == "rotate":
        keys = private_key.rotate(store)
        state = "rotation started"
    else:
        found = private_key.load(store)
        if found is None:
            raise private_key.KeyFileError(f"{private_key.key_path(store)}: no OPRF key (icse-node private-key init)")
        keys, state = found, "present"
    ids = {"active": keys.active_id,
           "next": oprf.key_id(keys.next) if keys.next is not None else None,
           "previous": oprf.key_id(keys.previous) if keys.previous is not None else None}
    if format_name == "json":
        print(json.dumps({"state": state, "file": str(private_key.key_path(store)), **ids}))
    else:
        print(f"OPRF key {state}: active {ids['active']}"
              + (f", next {ids['next']} (outputs computed by the serving node)" if ids["next"] else "")
              + (f", previous {ids['previous']}" if ids["previous"] else ""))
    return 0
