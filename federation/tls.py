"""Mutual-TLS credentials and peer identity, for both sides of a call."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: the federation CA, this member's certificate chain and key."""

    ca: Path
    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Accepts only clients whose certificate chains to the federation CA."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(
        root_certificates=ca, private_key=key, certificate_chain=cert
    )


def peer_uris(auth_context: Mapping[str, Iterable[bytes]]) -> list[str]:
    """URI names in the verified peer certificate (empty without mutual TLS)."""
    names = [v.decode("utf-8", "replace") for v in auth_context.get("x509_subject_alternative_name", ())]
    return [n for n in names if "://" in n]


def thumbprint(pem: bytes) -> str:
    """RFC 8705 ``x5t#S256``: base64url SHA-256 of the (first) certificate's DER."""
    der = x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)
    return base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode("ascii")


def peer_thumbprint(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """Thumbprint of the verified client certificate on this connection."""
    first = next(iter(auth_context.get("x509_pem_cert", ())), None)
    return thumbprint(first) if first is not None else None
