"""Test vectors of private exact matching (``protos/testvectors/oprf.json``), written by
``python -m federation.vectors`` with the others: RFC 9497's own, then the federation's use of them.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from federation import buckets, oprf
from federation.query import (
    DiscloseItem,
    PrivateItem,
    disclose_bytes,
    disclose_sha256,
    private_match_bytes,
    private_match_sha256,
    private_request,
)

# RFC 9497 Appendix A.1.1 inputs (OPRF, ristretto255-SHA512): the outputs are computed below and
# tests/test_oprf.py compares them with the RFC's printed values.
RFC_SEED = bytes.fromhex("a3" * 32)
RFC_KEY_INFO = b"test key"
RFC_BLIND = bytes.fromhex("64d37aed22a27f5191de1c1d69fadb899d8862b58eb4220029e036ec4c1f6706")
PRIVATE_DIGESTS = [("md5", bytes(range(16))), ("sha1", bytes(range(20))), ("sha256", bytes(range(32)))]


def oprf_vectors() -> dict[str, Any]:
    """RFC 9497's own vectors, then the federation's use of them: digest inputs, buckets,
    outputs (under the RFC's key and blind) and the private requests' ``qh``."""
    secret, _ = oprf.derive_key_pair(RFC_SEED, RFC_KEY_INFO)
    rfc = []
    for data in (b"\x00", b"\x5a" * 17):
        blind, blinded = oprf.blind(data, RFC_BLIND)
        evaluated = oprf.blind_evaluate(secret, blinded)
        rfc.append({"input": data.hex(), "blind": blind.hex(), "blinded_element": blinded.hex(),
                    "evaluation_element": evaluated.hex(), "output": oprf.finalize(data, blind, evaluated).hex()})
    digests = []
    private_items, disclose_items = [], []
    for algorithm, digest in PRIVATE_DIGESTS:
        data = oprf.digest_input(algorithm, digest)
        blind, blinded = oprf.blind(data, RFC_BLIND)
        evaluated = oprf.blind_evaluate(secret, blinded)
        output = oprf.evaluate(secret, data)
        digests.append({"algorithm": algorithm, "digest_hex": digest.hex(), "input": data.hex(),
                        "bucket_32": oprf.bucket_of(data, 32), "bucket_16": oprf.bucket_of(data, 16),
                        "blind": blind.hex(), "blinded_element": blinded.hex(),
                        "evaluation_element": evaluated.hex(), "output": output.hex()})
        private_items.append(PrivateItem(algorithm, oprf.bucket_of(data, 16), 16, blinded))
        disclose_items.append(DiscloseItem(algorithm, output))
    key = oprf.key_id(secret)
    # One bucket's answer, 12 fingerprints: the three outputs above and nine more under the same key.
    outputs = [oprf.evaluate(secret, oprf.digest_input(a, d)) for a, d in PRIVATE_DIGESTS]
    outputs += [oprf.evaluate(secret, oprf.digest_input("sha256", hashlib.sha256(bytes([i])).digest()))
                for i in range(9)]
    prefixes = np.array(sorted(int.from_bytes(o[:8], "big") for o in outputs), dtype=np.uint64)
    answers = [{"encoding": "PRIVATE_BUCKET_ENCODING_FIXED", "fingerprint_bits": 32,
                "bucket_answer_hex": buckets.encode(prefixes, buckets.FIXED, 32).hex()},
               {"encoding": "PRIVATE_BUCKET_ENCODING_ELIAS_FANO", "fingerprint_bits": 24,
                "bucket_answer_hex": buckets.encode(prefixes, buckets.ELIAS_FANO, 24).hex()},
               {"encoding": "PRIVATE_BUCKET_ENCODING_ELIAS_FANO", "fingerprint_bits": 19,
                "bucket_answer_hex": buckets.encode(prefixes, buckets.ELIAS_FANO, 19).hex()}]
    request = private_request(private_items)
    return {
        "description": "Private exact matching (PROTOCOL.md, 'Private exact matching'). rfc9497_a_1_1: the RFC's "
                       "vectors for OPRF mode 0x00, ristretto255-SHA512. digests: the OPRF input of a digest "
                       "(algorithm, 0x00, raw digest), its buckets (16 and 32 bits of SHA-256('icse.v1.bucket' 0x00 "
                       "input)) and output, under the RFC's key and blind. private_match / disclose: a request's "
                       "packed groups (v2) and the exact bytes whose SHA-256 is its qh, for the digests above. "
                       "bucket_answers: one bucket's fingerprints (the first bits of these outputs, sorted) "
                       "in each encoding, each answer starting with u16be(count).",
        "rfc9497_a_1_1": {"seed": RFC_SEED.hex(), "key_info": RFC_KEY_INFO.hex(), "sk_sm": secret.hex(),
                          "vectors": rfc},
        "key_id": key,
        "digests": digests,
        "private_match": {"prefix_bits": request.prefix_bits,
                          "groups": [{"algorithm": g.algorithm, "buckets_hex": g.buckets.hex(),
                                      "blinded_elements_hex": g.blinded.hex()} for g in request.groups],
                          "canonical_hex": private_match_bytes(request).hex(), "qh": private_match_sha256(request)},
        "disclose": {"key_id": key, "canonical_hex": disclose_bytes(key, disclose_items).hex(),
                     "qh": disclose_sha256(key, disclose_items)},
        "bucket_answers": {"outputs": [o.hex() for o in outputs], "answers": answers},
    }
