"""RFC 9497 OPRF, mode 0x00 (OPRF), suite ristretto255-SHA512; and the federation's
private-matching conventions built on it (``digest_input``, ``bucket_of``).

Every group operation is libsodium's (``crypto_core_ristretto255_*``,
``crypto_scalarmult_ristretto255*``) through ``rbcl``, a binding that ships its own
libsodium: nothing here does curve arithmetic. What is written here is the
protocol around those operations, from RFC 9497 §3 and §4.1: the context string,
``HashToGroup``/``HashToScalar`` (RFC 9380 ``expand_message_xmd`` with SHA-512,
plain hashing), ``DeriveKeyPair``, ``Blind``, ``BlindEvaluate``, ``Finalize`` and
``Evaluate``. The RFC's own test vectors (Appendix A.1.1) pass (tests/test_oprf.py).

Roles: a gateway blinds and finalizes; a node evaluates blinded elements with
its secret key and, at import, computes each stored digest's output directly
(``evaluate``), which equals what a gateway's ``finalize`` gives for the same
input. A node never sees an input it does not hold, and cannot tell whether a
blinded element it evaluated was for one it holds.

Scalars and elements are 32-byte strings, scalars little-endian and reduced
(as RFC 9496/9497 serialise them); outputs are 64 bytes (SHA-512).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import rbcl

MODE_OPRF = 0x00
SUITE = "ristretto255-SHA512"
CONTEXT = b"OPRFV1-" + bytes([MODE_OPRF]) + b"-" + SUITE.encode("ascii")
HASH_TO_GROUP_DST = b"HashToGroup-" + CONTEXT
HASH_TO_SCALAR_DST = b"HashToScalar-" + CONTEXT
DERIVE_KEY_PAIR_DST = b"DeriveKeyPair" + CONTEXT

SCALAR_BYTES = 32
ELEMENT_BYTES = 32
OUTPUT_BYTES = 64
MAX_INPUT_BYTES = 0xFFFF  # I2OSP(len(input), 2)

# The federation's conventions (PROTOCOL.md, "Private exact matching").
BUCKET_TAG = b"icse.v1.bucket\x00"
MAX_BUCKET_BITS = 32

_IDENTITY = bytes(ELEMENT_BYTES)


def _forget_library_copy() -> None:
    """rbcl writes its libsodium to a temporary file and loads it from there at
    import, without removing it: once mapped, the file is not needed (Linux keeps
    the mapping), so it is removed rather than left behind by every process."""
    name = getattr(rbcl._sodium, "_name", "")
    if name and Path(name).parent == Path(tempfile.gettempdir()) and Path(name).name.startswith("tmp"):
        with contextlib.suppress(OSError):
            os.unlink(name)


_forget_library_copy()


class OprfError(ValueError):
    """An input the protocol rejects (RFC 9497 InputValidationError / InvalidInputError)."""


def expand_message_xmd(message: bytes, dst: bytes, length: int) -> bytes:
    """RFC 9380 §5.3.1 with SHA-512 (b_in_bytes 64, s_in_bytes 128)."""
    if len(dst) > 255:
        raise OprfError("expand_message_xmd: domain separation tag longer than 255 bytes")
    ell = -(-length // 64)
    if ell > 255 or length > 0xFFFF:
        raise OprfError("expand_message_xmd: requested length too large")
    dst_prime = dst + bytes([len(dst)])
    b0 = hashlib.sha512(bytes(128) + message + length.to_bytes(2, "big") + b"\x00" + dst_prime).digest()
    blocks = [hashlib.sha512(b0 + b"\x01" + dst_prime).digest()]
    for i in range(2, ell + 1):
        mixed = bytes(a ^ b for a, b in zip(b0, blocks[-1], strict=True))
        blocks.append(hashlib.sha512(mixed + bytes([i]) + dst_prime).digest())
    return b"".join(blocks)[:length]


def hash_to_group(data: bytes) -> bytes:
    """``HashToGroup``: ristretto255's one-way map of 64 uniform bytes (RFC 9496 §4.3.4)."""
    return rbcl.crypto_core_ristretto255_from_hash(expand_message_xmd(data, HASH_TO_GROUP_DST, 64))


def hash_to_scalar(data: bytes, dst: bytes = HASH_TO_SCALAR_DST) -> bytes:
    """``HashToScalar``: 64 uniform bytes reduced modulo the group order."""
    return rbcl.crypto_core_ristretto255_scalar_reduce(expand_message_xmd(data, dst, 64))


def _check_input(data: bytes) -> None:
    if len(data) > MAX_INPUT_BYTES:
        raise OprfError(f"OPRF input of {len(data)} bytes; at most {MAX_INPUT_BYTES}")


def _check_scalar(scalar: bytes, what: str) -> None:
    if len(scalar) != SCALAR_BYTES:
        raise OprfError(f"{what} is {len(scalar)} bytes; a ristretto255 scalar is {SCALAR_BYTES}")
    # Canonical (below the group order) and non-zero: reducing changes nothing.
    if rbcl.crypto_core_ristretto255_scalar_reduce(scalar + bytes(32)) != scalar or scalar == bytes(32):
        raise OprfError(f"{what} is not a canonical non-zero ristretto255 scalar")


def check_element(element: bytes, what: str = "element") -> None:
    """RFC 9497 ``DeserializeElement``: a canonical encoding of a group element
    that is not the identity; ``OprfError`` otherwise."""
    if len(element) != ELEMENT_BYTES:
        raise OprfError(f"{what} is {len(element)} bytes; a ristretto255 element is {ELEMENT_BYTES}")
    if element == _IDENTITY or not rbcl.crypto_core_ristretto255_is_valid_point(element):
        raise OprfError(f"{what} is not a valid ristretto255 element (or is the identity)")


def _mult(scalar: bytes, element: bytes) -> bytes:
    try:
        return rbcl.crypto_scalarmult_ristretto255(scalar, element)
    except RuntimeError:  # libsodium: the product is the identity (or the point did not decode)
        raise OprfError("scalar multiplication gave the identity element") from None


def derive_key_pair(seed: bytes, info: bytes) -> tuple[bytes, bytes]:
    """RFC 9497 §3.2.1 ``DeriveKeyPair``: (secret key, public key)."""
    if len(seed) != 32:
        raise OprfError(f"seed is {len(seed)} bytes; DeriveKeyPair takes {32}")
    if len(info) > 0xFFFF:
        raise OprfError("key info longer than 65535 bytes")
    derive_input = seed + len(info).to_bytes(2, "big") + info
    for counter in range(256):
        secret = hash_to_scalar(derive_input + bytes([counter]), DERIVE_KEY_PAIR_DST)
        if secret != bytes(32):
            return secret, public_key(secret)
    raise OprfError("DeriveKeyPair: no non-zero scalar in 256 attempts")  # pragma: no cover - probability ~2^-64000


def generate_key() -> bytes:
    """A fresh secret key: a uniformly random non-zero scalar (libsodium's generator)."""
    while True:
        secret = rbcl.crypto_core_ristretto255_scalar_random()
        if secret != bytes(32):
            return secret


def public_key(secret: bytes) -> bytes:
    """``pkS = ScalarMultGen(skS)``."""
    _check_scalar(secret, "secret key")
    return rbcl.crypto_scalarmult_ristretto255_base(secret)


def key_id(secret: bytes) -> str:
    """A short public name for a key: 16 hex digits of SHA-256 over its public key.
    Says which key a node's outputs are under; reveals nothing about the key."""
    return hashlib.sha256(b"icse.v1.oprf-key\x00" + public_key(secret)).hexdigest()[:16]


def blind(input: bytes, rng_blind: bytes | None = None) -> tuple[bytes, bytes]:
    """RFC 9497 ``Blind``: (blind scalar, blinded element). ``rng_blind`` fixes the
    blind (test vectors only); by default it is random."""
    _check_input(input)
    scalar = rng_blind if rng_blind is not None else generate_key()
    _check_scalar(scalar, "blind")
    element = hash_to_group(input)
    if element == _IDENTITY:  # pragma: no cover - probability ~2^-252
        raise OprfError("input maps to the identity element")
    return scalar, _mult(scalar, element)


def blind_evaluate(sk: bytes, blinded: bytes) -> bytes:
    """RFC 9497 ``BlindEvaluate``: ``skS * blindedElement`` (the node's step).
    ``OprfError`` for a blinded element that is not a valid non-identity element."""
    check_element(blinded, "blinded element")
    return _mult(sk, blinded)


def blind_evaluate_many(sk: bytes, blinded: Sequence[bytes]) -> bytes:
    """``BlindEvaluate`` of many blinded elements, concatenated (a node's whole request). The
    node has checked each with ``check_element`` before charging the request, so it is not
    checked twice; libsodium still refuses an invalid encoding or an identity product
    (``OprfError``)."""
    mult = rbcl.crypto_scalarmult_ristretto255
    try:
        return b"".join([mult(sk, element) for element in blinded])
    except RuntimeError:
        raise OprfError("a blinded element is not a valid ristretto255 element") from None


def _finalize_hash(input: bytes, element: bytes) -> bytes:
    return hashlib.sha512(len(input).to_bytes(2, "big") + input + len(element).to_bytes(2, "big") + element
                          + b"Finalize").digest()


def finalize(input: bytes, blind: bytes, evaluated: bytes) -> bytes:
    """RFC 9497 ``Finalize``: unblinds the node's evaluation, hashes it with the input (64 bytes)."""
    _check_input(input)
    _check_scalar(blind, "blind")
    check_element(evaluated, "evaluated element")
    unblinded = _mult(rbcl.crypto_core_ristretto255_scalar_invert(blind), evaluated)
    return _finalize_hash(input, unblinded)


def evaluate(sk: bytes, input: bytes) -> bytes:
    """RFC 9497 ``Evaluate``: the output computed with the key directly (the node's
    import step); equal to ``finalize`` of a blinded round trip."""
    _check_input(input)
    element = hash_to_group(input)
    if element == _IDENTITY:  # pragma: no cover - probability ~2^-252
        raise OprfError("input maps to the identity element")
    return _finalize_hash(input, _mult(sk, element))


def digest_input(algorithm: str, digest: bytes) -> bytes:
    """The OPRF input for a stored or queried digest: algorithm name (as registered,
    UTF-8), 0x00, the raw digest. Distinct algorithms never share an input."""
    return algorithm.encode("utf-8") + b"\x00" + bytes(digest)


def bucket_of(input: bytes, bits: int) -> int:
    """The k-anonymity bucket of an input: the first ``bits`` bits (big-endian) of
    SHA-256("icse.v1.bucket" 0x00 || input), 1 <= bits <= 32."""
    if not 1 <= bits <= MAX_BUCKET_BITS:
        raise ValueError(f"bucket prefix of {bits} bits; 1 to {MAX_BUCKET_BITS}")
    value = int.from_bytes(hashlib.sha256(BUCKET_TAG + input).digest()[:4], "big")
    return value >> (MAX_BUCKET_BITS - bits)


def same_output(a: bytes, b: bytes) -> bool:
    """Constant-time comparison of two outputs (a disclosure proof against a stored one)."""
    return hmac.compare_digest(a, b)
