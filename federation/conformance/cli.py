"""``icse-conformance``: run the protocol's conformance catalogue against a node or a gateway."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from federation import identity, tls, tokens
from federation.algorithms import DigestError, parse_tagged
from federation.conformance import gateway_kit, node_kit, report
from federation.conformance.target import NodeTarget
from federation.query import QueryItem


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="icse-conformance", description=__doc__)
    parser.add_argument("--format", choices=["table", "json"], default="table")
    sub = parser.add_subparsers(dest="role", required=True)
    node = sub.add_parser("node", help="play a gateway against a node",
                          description="Runs the functional and hostile catalogue against a node over mutual TLS, "
                                      "as a gateway the node trusts. Exit status 0 when every check passes.")
    node.add_argument("--address", required=True, help="host:port of the node")
    node.add_argument("--node-id", required=True, help="the node's member id (its tokens' aud)")
    node.add_argument("--federation", required=True, help="trust domain, e.g. dev.icse.test")
    node.add_argument("--tls-name", help="DNS name to verify (default <id lowercased>.nodes.<federation>)")
    node.add_argument("--ca", type=Path, required=True, help="federation CA (PEM)")
    node.add_argument("--cert", type=Path, required=True, help="a gateway client certificate the node trusts")
    node.add_argument("--key", type=Path, required=True, help="its private key")
    node.add_argument("--signing-key", type=Path, required=True, help="that gateway's token-signing key (PEM)")
    node.add_argument("--kid", required=True, help="the signing key's kid in the node's key set")
    node.add_argument("--other-signing-key", type=Path, help="a key the node trusts that belongs to another gateway")
    node.add_argument("--other-kid", help="its kid")
    node.add_argument("--known", metavar="ALGO:HEX", help="a digest the node holds (for the hit check)")
    node.add_argument("--timeout", type=float, default=10.0, help="per-call deadline, seconds")
    gateway = sub.add_parser("gateway", help="play a checking node for a gateway",
                             description="Serves as a node with the given certificate, runs the gateway's commands "
                                         "against it and checks every call. {address} and {config} in commands and "
                                         "{address} in the template are filled in.")
    gateway.add_argument("--node-id", required=True, help="the node id the kit answers as")
    gateway.add_argument("--federation", required=True)
    gateway.add_argument("--ca", type=Path, required=True, help="federation CA (PEM)")
    gateway.add_argument("--cert", type=Path, required=True, help="a node server certificate for --node-id")
    gateway.add_argument("--key", type=Path, required=True, help="its private key")
    gateway.add_argument("--jwks", type=Path, required=True, help="the gateways' public key set")
    gateway.add_argument("--listen", default="127.0.0.1:0")
    gateway.add_argument("--template", type=Path, help="gateway configuration with {address}; becomes {config}")
    gateway.add_argument("--run", action="append", default=[], metavar="COMMAND",
                         help="a gateway command to run (repeatable); should make Match and Describe calls")
    gateway.add_argument("--run-incompatible", action="append", default=[], metavar="COMMAND",
                         help="a query command run while the kit speaks protocol major 2: must fail, hit unused")
    gateway.add_argument("--timeout", type=float, default=60.0, help="per command, seconds")
    return parser


def _node_target(args: argparse.Namespace, parser: argparse.ArgumentParser) -> NodeTarget:
    files = tls.TlsFiles(args.ca, args.cert, args.key)
    uris = _cert_uris(args.cert)
    gateway = next((g for u in uris if (g := identity.gateway_id_from_uri(args.federation, u))), None)
    if gateway is None:
        parser.error(f"{args.cert}: certificate names no gateway of {args.federation} (URIs: {uris or 'none'})")
    other = None
    if args.other_signing_key or args.other_kid:
        if not (args.other_signing_key and args.other_kid):
            parser.error("--other-signing-key and --other-kid go together")
        other = tokens.SigningKey.load(args.other_signing_key, args.other_kid)
    known = None
    if args.known:
        try:
            algorithm, digest = parse_tagged(args.known)
        except DigestError as exc:
            parser.error(f"--known: {exc}")
        known = QueryItem(algorithm.name, digest)
    return NodeTarget(
        address=args.address, node_id=args.node_id,
        tls_name=args.tls_name or identity.node_tls_name(args.federation, args.node_id), files=files,
        gateway_id=gateway, key=tokens.SigningKey.load(args.signing_key, args.kid), other_key=other, known=known,
        timeout=args.timeout)


def _cert_uris(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return names.get_values_for_type(x509.UniformResourceIdentifier)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.role == "node":
        target = _node_target(args, parser)
        results = asyncio.run(node_kit.NodeKit(target).run())
        heading = f"icse-conformance node {target.node_id} at {target.address}"
    else:
        setup = gateway_kit.GatewaySetup(
            files=tls.TlsFiles(args.ca, args.cert, args.key), node_id=args.node_id, federation=args.federation,
            jwks=args.jwks, listen=args.listen, template=args.template, runs=args.run,
            incompatible_runs=args.run_incompatible, timeout=args.timeout)
        if not setup.runs:
            parser.error("give at least one --run command")
        with tempfile.TemporaryDirectory(prefix="icse-conformance-") as workdir:
            results = asyncio.run(gateway_kit.run(setup, Path(workdir)))
        heading = f"icse-conformance gateway (checking node {setup.node_id})"
    if args.format == "json":
        report.write_json(results, sys.stdout)
    else:
        report.write_table(results, sys.stdout, heading)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
