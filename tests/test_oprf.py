"""RFC 9497 OPRF (ristretto255-SHA512, mode 0x00): the RFC's own test vectors
(Appendix A.1.1), RFC 9380's expand_message_xmd vectors, and the protocol
properties the federation relies on (blind round trip equals direct evaluation,
bad elements refused, buckets)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from federation import oprf

ROOT = Path(__file__).resolve().parent.parent

# RFC 9497 Appendix A.1.1, OPRF(ristretto255, SHA-512), mode 0x00: copied from the RFC's text.
SEED = bytes.fromhex("a3" * 32)
KEY_INFO = bytes.fromhex("74657374206b6579")
SK_SM = "5ebcea5ee37023ccb9fc2d2019f9d7737be85591ae8652ffa9ef0f4d37063b0e"
RFC_VECTORS = [
    {
        "input": "00",
        "blind": "64d37aed22a27f5191de1c1d69fadb899d8862b58eb4220029e036ec4c1f6706",
        "blinded_element": "609a0ae68c15a3cf6903766461307e5c8bb2f95e7e6550e1ffa2dc99e412803c",
        "evaluation_element": "7ec6578ae5120958eb2db1745758ff379e77cb64fe77b0b2d8cc917ea0869c7e",
        "output": "527759c3d9366f277d8c6020418d96bb393ba2afb20ff90df23fb7708264e2f3"
                  "ab9135e3bd69955851de4b1f9fe8a0973396719b7912ba9ee8aa7d0b5e24bcf6",
    },
    {
        "input": "5a" * 17,
        "blind": "64d37aed22a27f5191de1c1d69fadb899d8862b58eb4220029e036ec4c1f6706",
        "blinded_element": "da27ef466870f5f15296299850aa088629945a17d1f5b7f5ff043f76b3c06418",
        "evaluation_element": "b4cbf5a4f1eeda5a63ce7b77c7d23f461db3fcab0dd28e4e17cecb5c90d02c25",
        "output": "f4a74c9c592497375e796aa837e907b1a045d34306a749db9f34221f7e750cb4"
                  "f2a6413a6bf6fa5e19ba6348eb673934a722a7ede2e7621306d18951e7cf2c73",
    },
]


def test_derive_key_pair_gives_the_rfc_key() -> None:
    secret, public = oprf.derive_key_pair(SEED, KEY_INFO)
    assert secret.hex() == SK_SM
    assert public == oprf.public_key(secret)


@pytest.mark.parametrize("vector", RFC_VECTORS, ids=lambda v: f"input={v['input'][:8]}")
def test_rfc_9497_a_1_1(vector: dict[str, str]) -> None:
    secret = bytes.fromhex(SK_SM)
    data = bytes.fromhex(vector["input"])
    blind, blinded = oprf.blind(data, bytes.fromhex(vector["blind"]))
    assert blind.hex() == vector["blind"]
    assert blinded.hex() == vector["blinded_element"]
    evaluated = oprf.blind_evaluate(secret, blinded)
    assert evaluated.hex() == vector["evaluation_element"]
    assert oprf.finalize(data, blind, evaluated).hex() == vector["output"]
    assert oprf.evaluate(secret, data).hex() == vector["output"]


def test_the_vector_file_holds_the_rfc_values() -> None:
    """protos/testvectors/oprf.json carries the RFC's vectors as the RFC gives them."""
    document = json.loads((ROOT / "protos" / "testvectors" / "oprf.json").read_text(encoding="utf-8"))
    rfc = document["rfc9497_a_1_1"]
    assert rfc["seed"] == SEED.hex() and rfc["key_info"] == KEY_INFO.hex() and rfc["sk_sm"] == SK_SM
    assert rfc["vectors"] == RFC_VECTORS


# RFC 9380 Appendix K.3, expand_message_xmd(SHA-512), DST "QUUX-V01-CS02-with-expander-SHA512-256".
XMD_DST = b"QUUX-V01-CS02-with-expander-SHA512-256"


def test_expand_message_xmd_rfc_9380_vectors() -> None:
    assert oprf.expand_message_xmd(b"abcdef0123456789", XMD_DST, 32).hex() == (
        "087e45a86e2939ee8b91100af1583c4938e0f5fc6c9db4b107b83346bc967f58")
    assert oprf.expand_message_xmd(b"abc", XMD_DST, 0x80).hex() == (
        "7f1dddd13c08b543f2e2037b14cefb255b44c83cc397c1786d975653e36a6b11bdd7732d8b38adb4a0edc26a0cef4bb4"
        "5217135456e58fbca1703cd6032cb1347ee720b87972d63fbf232587043ed2901bce7f22610c0419751c065922b488431851"
        "041310ad659e4b23520e1772ab29dcdeb2002222a363f0c2b1c972b3efe1")


def test_random_blind_round_trip_equals_direct_evaluation() -> None:
    secret = oprf.generate_key()
    data = oprf.digest_input("sha256", hashlib.sha256(b"x").digest())
    blind, blinded = oprf.blind(data)
    other_blind, other_blinded = oprf.blind(data)
    assert blinded != other_blinded  # a fresh blind each time: the node cannot link two queries
    out = oprf.finalize(data, blind, oprf.blind_evaluate(secret, blinded))
    assert out == oprf.finalize(data, other_blind, oprf.blind_evaluate(secret, other_blinded))
    assert out == oprf.evaluate(secret, data)
    assert out != oprf.evaluate(oprf.generate_key(), data)


@pytest.mark.parametrize("element", [bytes(32), b"\xff" * 32, b"\x01" * 31, b"\x01" * 33],
                         ids=["identity", "not-canonical", "short", "long"])
def test_bad_blinded_elements_are_refused(element: bytes) -> None:
    with pytest.raises(oprf.OprfError):
        oprf.blind_evaluate(oprf.generate_key(), element)


def test_digest_inputs_of_different_algorithms_never_collide() -> None:
    digest = bytes(range(16))
    assert oprf.digest_input("md5", digest) == b"md5\x00" + digest
    assert oprf.digest_input("md5", digest) != oprf.digest_input("sha1", digest)


def test_bucket_is_a_prefix_of_a_tagged_sha256() -> None:
    data = oprf.digest_input("sha256", bytes(32))
    full = int.from_bytes(hashlib.sha256(b"icse.v1.bucket\x00" + data).digest()[:4], "big")
    assert oprf.bucket_of(data, 32) == full
    assert oprf.bucket_of(data, 16) == full >> 16
    assert oprf.bucket_of(data, 1) == full >> 31
    with pytest.raises(ValueError):
        oprf.bucket_of(data, 0)


def test_key_id_names_the_public_key() -> None:
    secret = oprf.generate_key()
    assert oprf.key_id(secret) == hashlib.sha256(b"icse.v1.oprf-key\x00" + oprf.public_key(secret)).hexdigest()[:16]
    assert oprf.key_id(secret) != oprf.key_id(oprf.generate_key())
