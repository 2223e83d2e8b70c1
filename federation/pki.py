"""A development PKI for a federation: CA, node and gateway certificates,
and the gateways' token-signing keys with the key set nodes trust.

Real deployments bring their own PKI (see certs/README.md); this exists so that
`make demo` and the tests run real mutual TLS without any manual step. Private
keys are written 0600.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from federation import identity, tokens

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def write_private(path: Path, data: bytes) -> None:
    """Creates ``path`` with mode 0600 from the start (no window of wider access)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def new_ca(common_name: str, days: int = 3650) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass(frozen=True)
class Leaf:
    """What a member certificate says about its holder."""

    common_name: str
    uris: Sequence[str] = ()
    dns_names: Sequence[str] = ()
    ips: Sequence[str] = ()
    server: bool = False
    client: bool = False
    not_before: dt.datetime | None = None
    not_after: dt.datetime | None = None


def issue(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, leaf: Leaf, days: int = 825
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in leaf.uris]
    alt_names += [x509.DNSName(d) for d in leaf.dns_names]
    alt_names += [x509.IPAddress(ipaddress.ip_address(i)) for i in leaf.ips]
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] * leaf.server + [ExtendedKeyUsageOID.CLIENT_AUTH] * leaf.client
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, leaf.common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(leaf.not_before or now - dt.timedelta(minutes=5))
        .not_valid_after(leaf.not_after or now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def node_leaf(federation: str, node_id: str) -> Leaf:
    return Leaf(
        common_name=f"node {node_id}",
        uris=[identity.node_uri(federation, node_id)],
        dns_names=[identity.node_tls_name(federation, node_id), "localhost"],
        ips=["127.0.0.1", "::1"],
        server=True,
    )


def gateway_leaf(federation: str, gateway_id: str) -> Leaf:
    return Leaf(
        common_name=f"gateway {gateway_id}",
        uris=[identity.gateway_uri(federation, gateway_id)],
        client=True,
    )


@dataclass
class DevPki:
    """File layout of a generated federation PKI under one directory."""

    root: Path
    federation: str
    nodes: list[str] = field(default_factory=list)
    gateways: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Absolute, so configurations that name these files work from anywhere.
        self.root = Path(self.root).resolve()

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.pem"

    @property
    def ca_key(self) -> Path:
        return self.root / "ca.key"

    @property
    def jwks(self) -> Path:
        return self.root / "gateway-keys.jwks.json"

    def node_cert(self, node_id: str) -> Path:
        return self.root / "nodes" / f"{node_id}.pem"

    def node_key(self, node_id: str) -> Path:
        return self.root / "nodes" / f"{node_id}.key"

    def gateway_cert(self, gateway_id: str) -> Path:
        return self.root / "gateways" / f"{gateway_id}.pem"

    def gateway_key(self, gateway_id: str) -> Path:
        return self.root / "gateways" / f"{gateway_id}.key"

    def signing_key(self, gateway_id: str) -> Path:
        return self.root / "gateways" / f"{gateway_id}-signing.key"

    @staticmethod
    def signing_kid(gateway_id: str) -> str:
        return f"{gateway_id}-1"

    def create(self) -> DevPki:
        self.root.mkdir(parents=True, exist_ok=True)
        ca_key, ca_cert = new_ca(f"{self.federation} federation CA")
        write_private(self.ca_key, key_pem(ca_key))
        self.ca_cert.write_bytes(cert_pem(ca_cert))
        for node_id in self.nodes:
            self._write_leaf(ca_key, ca_cert, node_leaf(self.federation, node_id),
                             self.node_cert(node_id), self.node_key(node_id))
        jwks = []
        for gateway_id in self.gateways:
            self._write_leaf(ca_key, ca_cert, gateway_leaf(self.federation, gateway_id),
                             self.gateway_cert(gateway_id), self.gateway_key(gateway_id))
            signing = ed25519.Ed25519PrivateKey.generate()
            write_private(self.signing_key(gateway_id), key_pem(signing))
            jwks.append(tokens.public_jwk(tokens.SigningKey(self.signing_kid(gateway_id), signing), gateway_id))
        self.jwks.write_text(json.dumps({"keys": jwks}, indent=2) + "\n")
        return self

    @staticmethod
    def _write_leaf(ca_key, ca_cert, leaf: Leaf, cert_path: Path, key_path: Path) -> None:
        key, cert = issue(ca_key, ca_cert, leaf)
        write_private(key_path, key_pem(key))
        cert_path.write_bytes(cert_pem(cert))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="icse-pki",
        description="Create a development federation PKI: CA, node server certificates, "
        "gateway client certificates and token-signing keys. Not for production use.",
    )
    parser.add_argument("--out", type=Path, required=True, help="directory to write (e.g. certs/dev)")
    parser.add_argument("--federation", default="dev.icse.test", help="federation trust domain")
    parser.add_argument("--nodes", required=True, help="comma-separated node ids, e.g. FR,DE,NL")
    parser.add_argument("--gateways", default="eu-1", help="comma-separated gateway ids")
    args = parser.parse_args(argv)
    try:
        nodes = [identity.check_member_id(n.strip(), "node id") for n in args.nodes.split(",") if n.strip()]
        gateways = [identity.check_member_id(g.strip(), "gateway id") for g in args.gateways.split(",") if g.strip()]
    except ValueError as exc:
        parser.error(str(exc))
    DevPki(args.out, args.federation, nodes, gateways).create()
    print(f"wrote federation PKI for {args.federation} to {args.out}: "
          f"{len(nodes)} node(s), {len(gateways)} gateway(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
