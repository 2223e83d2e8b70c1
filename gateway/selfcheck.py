"""The gateway checks its own client certificate and key before it dials anyone.

A node refuses a bad client certificate during the TLS handshake, and all the
gateway then sees is ``UNAVAILABLE: Socket closed`` from every member — the same
as a federation that is down. So before the first call the gateway looks at its
own certificate the way the nodes will (validity dates, chain to the
federation CA, client-auth usage, the SPIFFE URI naming this gateway) and at
whether its key belongs to it, and says in words what is wrong.

Chain building and signature checks are ``cryptography``'s X.509 verifier's;
nothing here does crypto arithmetic.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from federation import identity
from federation.tls import TlsFiles


class CertificateProblem(ValueError):
    """The gateway's own certificate or key would be refused by the nodes."""


@dataclass(frozen=True)
class ClientIdentity:
    """Who the nodes must recognise: this gateway of this federation."""

    federation: str
    gateway_id: str

    @property
    def uri(self) -> str:
        return identity.gateway_uri(self.federation, self.gateway_id)


_USAGE_NAMES = {
    ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth",
    ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth",
    ExtendedKeyUsageOID.CODE_SIGNING: "codeSigning",
    ExtendedKeyUsageOID.EMAIL_PROTECTION: "emailProtection",
    ExtendedKeyUsageOID.TIME_STAMPING: "timeStamping",
    ExtendedKeyUsageOID.OCSP_SIGNING: "OCSPSigning",
}


# An issuer must say it is a CA (OpenSSL requires it too); the rest of the Web PKI
# profile is not what member PKIs are held to.
_CA_POLICY = verification.ExtensionPolicy.permit_all().require_present(
    x509.BasicConstraints, verification.Criticality.AGNOSTIC, None)


def _day(moment: dt.datetime) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC")


def _load_certs(path_text: str, data: bytes, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise CertificateProblem(f"{what} {path_text}: no PEM certificate in it")
    return certs


def _load_key(path_text: str, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateProblem(f"client key {path_text}: is encrypted with a passphrase; "
                                 "the gateway needs it unencrypted (and readable only by its user)") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CertificateProblem(f"client key {path_text}: not a PEM private key") from None


def _public_der(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _verifier_reason(error: verification.VerificationError) -> str:
    """The verifier's reason without its prefix and its object dump."""
    text = re.sub(r"^validation failed:\s*", "", str(error))
    text = re.sub(r"^candidates exhausted:\s*", "", text)
    return re.sub(r"\s*\(encountered processing .*\)\s*$", "", text) or "no path to a trusted CA"


def check_client(files: TlsFiles, who: ClientIdentity, now: dt.datetime | None = None) -> None:
    """Raises CertificateProblem naming what the nodes would refuse; returns if all is well."""
    current = now or dt.datetime.now(dt.UTC)
    cert_path, key_path, ca_path = str(files.cert), str(files.key), str(files.ca)
    chain = _load_certs(cert_path, files.cert.read_bytes(), "client certificate")
    anchors = _load_certs(ca_path, files.ca.read_bytes(), "CA file")
    key = _load_key(key_path, files.key.read_bytes())
    leaf = chain[0]
    where = f"client certificate {cert_path}"

    if current < leaf.not_valid_before_utc:
        raise CertificateProblem(f"{where} is not valid yet: valid from {_day(leaf.not_valid_before_utc)} "
                                 f"(now {_day(current)}); check the clock or the certificate")
    if current > leaf.not_valid_after_utc:
        raise CertificateProblem(f"{where} expired on {_day(leaf.not_valid_after_utc)} "
                                 f"(now {_day(current)}); renew it")
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise CertificateProblem(f"client key {key_path} does not belong to {where} (their public keys differ)")

    try:
        usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = None  # no restriction: any usage, client authentication included
    if usages is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usages:
        names = ", ".join(_USAGE_NAMES.get(u, u.dotted_string) for u in usages) or "none"
        raise CertificateProblem(f"{where} is not for client authentication: its extendedKeyUsage "
                                 f"allows {names}, not clientAuth")

    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if who.uri not in uris:
        found = ", ".join(uris) if uris else "no URI name"
        raise CertificateProblem(f"{where} names {found}; the nodes expect the URI {who.uri} "
                                 f"(gateway {who.gateway_id!r} of federation {who.federation!r}) "
                                 "in its subjectAltName")

    # Chain and signatures, by the library's verifier. Its extension profiles are
    # relaxed to what the nodes' TLS stack requires; usage and names were checked above.
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(anchors))
        .time(current)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=verification.ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, chain[1:])
    except verification.VerificationError as exc:
        raise CertificateProblem(f"{where} does not chain to the federation CA in {ca_path}: "
                                 f"{_verifier_reason(exc)}; it was issued by {leaf.issuer.rfc4514_string()}"
                                 ) from None
