"""OPRF outputs stored with the segments: computed at import, carried by merges,
hidden by tombstones, computed in the background for segments that lack them,
rotated; and the ``[private]`` configuration. Real stores on disk, no node."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from federation import buckets, oprf
from federation.config import ConfigError
from node import config as node_config, private_arrays, private_key, private_service, private_view
from node.merge import merge
from node.private_builder import PrivateBuilder
from node.records import HashRecord
from node.store import Store

BITS = 8


def _records(rng: random.Random, count: int, prefix: str) -> list[HashRecord]:
    sizes = {"md5": 16, "sha1": 20, "sha256": 32}
    out = []
    for i in range(count):
        algorithm = rng.choice(sorted(sizes))
        out.append(HashRecord(algorithm, rng.randbytes(sizes[algorithm]), f"{prefix}-{i}", "1", None, "", ""))
    return out


def _bucket(view: private_view.PrivateView, record: HashRecord) -> set[bytes]:
    """The 8-byte output prefixes in the record's bucket (fixed encoding, 64-bit fingerprints)."""
    data = oprf.digest_input(record.algorithm, record.digest)
    found = view.bucket_answers(np.array([oprf.bucket_of(data, BITS)]), BITS, buckets.FIXED, 64).data[2:]
    return {found[i:i + 8] for i in range(0, len(found), 8)}


def _proof(keys: private_key.PrivateKeys, record: HashRecord) -> bytes:
    return oprf.evaluate(keys.active, oprf.digest_input(record.algorithm, record.digest))


async def test_import_computes_outputs_that_answer_buckets_and_proofs(tmp_path: Path) -> None:
    store_path = tmp_path / "store.sqlite"
    keys, created = private_key.init(store_path)
    assert created and private_key.init(store_path) == (keys, False)
    records = _records(random.Random(1), 400, "A")
    async with await Store.open(store_path) as store:
        await store.add([records])
        live = await store.snapshot()
    (segment,) = [s.segment for s in live.segments]
    assert sorted(segment.private) == ["md5", "sha1", "sha256"]
    assert all(list(by_key) == [keys.active_id] for by_key in segment.private.values())
    view = private_view.build(live, keys)
    assert view.stored == view.covered == 400
    for record in records[:50]:
        assert _proof(keys, record)[:8] in _bucket(view, record)
    # Every bucket together holds each output exactly once.
    every = np.arange(2**BITS)
    everything = view.bucket_answers(every, BITS, buckets.FIXED, 64)
    assert everything.distinct == 2**BITS and len(everything.data) == 2 * 2**BITS + 400 * 8
    # Asked twice, a bucket is answered once.
    assert view.bucket_answers(np.concatenate([every, every[::-1]]), BITS, buckets.FIXED, 64) == everything
    # The Elias-Fano answer of every bucket holds the same fingerprints, in fewer bytes.
    coded = view.bucket_answers(every, BITS, buckets.ELIAS_FANO, 24).data
    fixed_at = buckets.split(everything.data, 2**BITS, buckets.FIXED, 64)
    coded_at = buckets.split(coded, 2**BITS, buckets.ELIAS_FANO, 24)
    assert len(coded) < len(everything.data)
    for bucket in range(2**BITS):
        fixed = everything.data[fixed_at[bucket]:fixed_at[bucket + 1]]
        compact = coded[coded_at[bucket]:coded_at[bucket + 1]]
        assert (buckets.decode(compact, buckets.ELIAS_FANO, 24) == buckets.decode(fixed, buckets.FIXED, 64) >> 40).all()
    found = view.disclose(keys.active_id, [(r.algorithm, _proof(keys, r)) for r in records[:20]])
    rows = live.records([f for f in found if f is not None])
    assert [rows[f].record.reference for f in found if f is not None] == [r.reference for r in records[:20]]
    # A proof under another algorithm's name, or off by one bit, finds nothing.
    proof = _proof(keys, records[0])
    other = "md5" if records[0].algorithm != "md5" else "sha1"
    near = [proof[:-1] + bytes([(proof[-1] + step) % 256]) for step in (1, -1)]  # sort beside it, both sides
    assert view.disclose(keys.active_id, [(other, proof), *((records[0].algorithm, p) for p in near)]) == [
        None, None, None]


async def test_tombstones_hide_outputs_and_merges_carry_them_without_computing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store_path = tmp_path / "store.sqlite"
    keys, _ = private_key.init(store_path)
    rng = random.Random(2)
    first, second = _records(rng, 150, "A"), _records(rng, 150, "B")
    gone = first[7]
    async with await Store.open(store_path) as store:
        await store.add([first])
        await store.add([second])
        await store.remove([[(gone.algorithm, gone.digest)]])
        live = await store.snapshot()
        view = private_view.build(live, keys)
        assert view.stored == view.covered == 299
        assert _proof(keys, gone)[:8] not in _bucket(view, gone)
        assert view.disclose(keys.active_id, [(gone.algorithm, _proof(keys, gone))]) == [None]
        kept = first[8]
        assert _proof(keys, kept)[:8] in _bucket(view, kept)

        def not_again(*_args: object, **_kwargs: object) -> np.ndarray:
            raise AssertionError("a merge computed an output its inputs had")

        monkeypatch.setattr(private_arrays, "evaluate_all", not_again)
        result = await merge(store)
        assert result is not None and result.rows == 299
        merged = await store.snapshot()
    view = private_view.build(merged, keys)
    assert len(merged.segments) == 1 and view.stored == view.covered == 299
    for record in [*first[8:20], *second[:12]]:
        assert _proof(keys, record)[:8] in _bucket(view, record)
    assert _proof(keys, gone)[:8] not in _bucket(view, gone)


async def test_the_builder_computes_missing_outputs_and_rotates_the_key(tmp_path: Path) -> None:
    store_path = tmp_path / "store.sqlite"
    records = _records(random.Random(3), 120, "A")
    async with await Store.open(store_path) as store:
        await store.add([records])  # no key yet: no outputs
        live = await store.snapshot()
        assert all(not s.segment.private for s in live.segments)
        keys, _ = private_key.init(store_path)
        assert private_view.build(live, keys).covered == 0
        builder = PrivateBuilder(store_path)
        builder.consider(live)
        assert await builder.run_once()
        live = await store.snapshot()
        assert private_view.build(live, keys).covered == 120
        builder.consider(live)
        assert not await builder.run_once()  # nothing left to do

        rotated = private_key.rotate(store_path)
        with pytest.raises(private_key.KeyFileError, match="under way"):
            private_key.rotate(store_path)
        assert rotated.next is not None
        next_id = oprf.key_id(rotated.next)
        assert await builder.run_once()  # outputs under the next key; still answering under the old one
        live = await store.snapshot()
        assert private_key.load(store_path) == rotated
        builder.consider(live)
        assert await builder.run_once()  # all segments have them: promoted
        promoted = private_key.load(store_path)
        assert promoted is not None and promoted.active_id == next_id and promoted.previous == keys.active
        view = private_view.build(live, promoted)
        assert view.key_id == next_id and view.covered == 120
        assert _proof(promoted, records[0])[:8] in _bucket(view, records[0])
        # Proofs under the previous key still disclose.
        assert view.disclose(keys.active_id, [(records[0].algorithm, _proof(keys, records[0]))])[0] is not None

        # A second rotation drops the outputs of the key two rotations back.
        private_key.rotate(store_path)
        for _ in range(3):
            builder.consider(await store.snapshot())
            await builder.run_once()
        final = private_key.load(store_path)
        assert final is not None and final.previous == promoted.active
        (segment,) = [s.segment for s in (await store.snapshot()).segments]
        held = {key_id for by_key in segment.private.values() for key_id in by_key}
        assert held == {final.active_id, promoted.active_id}
        assert not list(segment.directory.glob(f"*.private-{keys.active_id}.*"))


def test_key_file_is_owner_only_and_never_quoted_in_errors(tmp_path: Path) -> None:
    store_path = tmp_path / "store.sqlite"
    keys, _ = private_key.init(store_path)
    path = private_key.key_path(store_path)
    assert path.stat().st_mode & 0o777 == 0o600
    document = json.loads(path.read_text())
    assert document["active"] == keys.active.hex()
    path.write_text(json.dumps({"active": "ff" * 32}))  # not a canonical scalar
    with pytest.raises(private_key.KeyFileError) as caught:
        private_key.load(store_path)
    assert "ff" * 8 not in str(caught.value)


@pytest.mark.parametrize(("table", "message"), [
    ("prefix_bits = 7", "must be 8 to 24"), ("prefix_bits = 25", "must be 8 to 24"),
    ("output_bytes = 2", "must be 3 to 8"), ("enabled = 1", "expected bool"), ("bucket = 3", "bucket"),
    ('encoding = "bloom"', "expected one of fixed, elias-fano"), ("fingerprint_bits = 15", "must be 16 to 48"),
    ("false_candidate_bits = 3", "must be 4 to 32"),
])
def test_private_settings_are_validated(tmp_path: Path, table: str, message: str) -> None:
    path = tmp_path / "node.toml"
    path.write_text(f'[node]\nid = "FR"\ncountry = "FR"\nfederation = "x.test"\nstore = "s.sqlite"\n\n'
                    f"[private]\n{table}\n")
    with pytest.raises(ConfigError, match=message):
        node_config.load(path, for_serving=False)


def test_private_settings_defaults_and_bounds(tmp_path: Path) -> None:
    path = tmp_path / "node.toml"
    base = '[node]\nid = "FR"\ncountry = "FR"\nfederation = "x.test"\nstore = "s.sqlite"\n'
    path.write_text(base)
    assert node_config.load(path, for_serving=False).private == node_config.PrivateSettings(False, 16, 4)
    # Elias-Fano fingerprints by default, as wide as the mean bucket size needs for a 2^-11 false-candidate
    # chance: 19 bits at 10 M digests and 16-bit buckets.
    assert node_config.PrivateSettings().bits(10_000_000 / 2**16) == 19
    assert node_config.PrivateSettings().bits(0.5) == 16
    assert node_config.PrivateSettings(false_candidate_bits=12).bits(10_000_000 / 2**16) == 20
    assert node_config.PrivateSettings(encoding="fixed").bits(152.6) == 32
    path.write_text(base + "[private]\nenabled = true\nprefix_bits = 24\noutput_bytes = 8\n")
    assert node_config.load(path, for_serving=False).private == node_config.PrivateSettings(True, 24, 8)
    path.write_text(base + '[private]\nencoding = "elias-fano"\nfingerprint_bits = 20\n')
    loaded = node_config.load(path, for_serving=False).private
    assert (loaded.encoding, loaded.bits(152.6)) == ("elias-fano", 20)


def test_an_answer_too_large_for_one_message_is_refused_in_words() -> None:
    private_service.check_answer_size(10, 10_000, limit=10_320)  # 10 * 32 + 10,000 fits
    with pytest.raises(private_service.AnswerTooLarge, match="send at most about 9 items per request"):
        private_service.check_answer_size(10, 10_000, limit=10_319)
