"""Embedding chunks on disk: atomic writes, resume, and refusal of damaged files."""

import json

import numpy as np
import pytest

from dpr_jax import embeddings as E
from dpr_jax.embeddings import EmbeddingWriter, chunk_paths, load_embeddings, read_config

CONFIG = {"model": "tiny", "dim": 8, "dtype": "float16"}


def _chunk(rng, start, n, dim=8, dtype=np.float16):
    ids = np.array([f"p{i}" for i in range(start, start + n)])
    return ids, rng.standard_normal((n, dim)).astype(dtype)


def test_two_shards_round_trip_in_order(tmp_path):
    rng = np.random.default_rng(0)
    want_ids, want_emb = [], []
    # shard 1 written first, chunks out of order: load must still return shard 0 chunk 0 first
    parts = {(0, 0): (0, 5), (0, 1): (5, 3), (1, 0): (8, 4), (1, 1): (12, 2)}
    data = {key: _chunk(rng, *span) for key, span in parts.items()}
    for shard, chunk in [(1, 1), (0, 1), (1, 0), (0, 0)]:
        w = EmbeddingWriter(tmp_path, shard=shard, num_shards=2, config={**CONFIG, "shard": shard})
        w.write_chunk(chunk, *data[shard, chunk])
    for key in sorted(data):
        want_ids.append(data[key][0])
        want_emb.append(data[key][1])
    ids, emb = load_embeddings(tmp_path)
    np.testing.assert_array_equal(ids, np.concatenate(want_ids))
    np.testing.assert_array_equal(emb, np.concatenate(want_emb).astype(np.float32))
    assert emb.dtype == np.float32
    assert ids.dtype.kind == "U"
    cfg = read_config(tmp_path)
    assert cfg["model"] == "tiny" and cfg["num_shards"] == 2 and "shard" not in cfg
    assert json.loads((tmp_path / "shard-001.json").read_text())["shard"] == 1
    _, emb16 = load_embeddings([tmp_path], dtype=np.float16)
    assert emb16.dtype == np.float16


def test_resume_skips_done_and_rewrites_half_written_chunk(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    w = EmbeddingWriter(tmp_path, config=CONFIG)
    c0, c1, c2 = _chunk(rng, 0, 4), _chunk(rng, 4, 4), _chunk(rng, 8, 3)
    w.write_chunk(0, *c0)
    w.write_chunk(1, *c1)

    # a job killed between the embeddings and the ids of chunk 2
    real_save = E._atomic_save_npy

    def dies_on_ids(path, array):
        if path.name.startswith("ids-"):
            raise KeyboardInterrupt("killed")
        real_save(path, array)

    monkeypatch.setattr(E, "_atomic_save_npy", dies_on_ids)
    with pytest.raises(KeyboardInterrupt):
        w.write_chunk(2, *c2)
    monkeypatch.setattr(E, "_atomic_save_npy", real_save)
    emb2, _, done2 = chunk_paths(tmp_path, 0, 2)
    assert emb2.exists() and not done2.exists()
    assert not list(tmp_path.glob(".*tmp*")), "temporary files left behind"

    resumed = EmbeddingWriter(tmp_path, config=CONFIG)
    assert resumed.done_chunks() == {0, 1}
    with pytest.raises(E.EmbeddingsIncompleteError, match=emb2.name):  # never used as complete
        load_embeddings(tmp_path)
    with pytest.warns(UserWarning, match=emb2.name):  # explicitly partial: the half is invisible
        ids, _ = load_embeddings(tmp_path, allow_partial=True)
    np.testing.assert_array_equal(ids, np.concatenate([c0[0], c1[0]]))

    resumed.write_chunk(2, *c2)
    assert resumed.done_chunks() == {0, 1, 2}
    ids, emb = load_embeddings(tmp_path)
    np.testing.assert_array_equal(ids, np.concatenate([c0[0], c1[0], c2[0]]))
    np.testing.assert_array_equal(emb[-3:], c2[1].astype(np.float32))


def test_truncated_or_corrupt_npy_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(2)
    w = EmbeddingWriter(tmp_path, config=CONFIG)
    w.write_chunk(0, *_chunk(rng, 0, 6))
    w.write_chunk(1, *_chunk(rng, 6, 6))
    emb1, ids1, _ = chunk_paths(tmp_path, 0, 1)
    good = emb1.read_bytes()

    emb1.write_bytes(good[:-10])  # truncated
    for verify in (True, False):
        with pytest.raises(ValueError, match=emb1.name):
            load_embeddings(tmp_path, verify=verify)

    flipped = bytearray(good)
    flipped[-5] ^= 0xFF  # same size, one byte changed
    emb1.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match=rf"{emb1.name}.*checksum"):
        load_embeddings(tmp_path)

    emb1.write_bytes(good)
    load_embeddings(tmp_path)
    ids1.write_bytes(b"not a numpy file")
    with pytest.raises(ValueError, match=ids1.name):
        load_embeddings(tmp_path)


def test_length_mismatch_refused_even_with_consistent_marker(tmp_path):
    rng = np.random.default_rng(3)
    w = EmbeddingWriter(tmp_path, config=CONFIG)
    ids, emb = _chunk(rng, 0, 5)
    w.write_chunk(0, ids, emb)
    emb_p, ids_p, done_p = chunk_paths(tmp_path, 0, 0)
    np.save(ids_p, ids[:4], allow_pickle=False)  # one id short, marker updated to match
    marker = json.loads(done_p.read_text())
    marker["files"][ids_p.name] = {"size": ids_p.stat().st_size, "sha256": E.sha256_file(ids_p)}
    done_p.write_text(json.dumps(marker))
    with pytest.raises(ValueError, match=ids_p.name):
        load_embeddings(tmp_path)


def test_writer_refuses_bad_chunks_and_mixed_configs(tmp_path):
    rng = np.random.default_rng(4)
    w = EmbeddingWriter(tmp_path, config=CONFIG)
    with pytest.raises(ValueError, match="dim"):
        w.write_chunk(0, *_chunk(rng, 0, 3, dim=9))
    with pytest.raises(ValueError, match="dtype"):
        w.write_chunk(0, *_chunk(rng, 0, 3, dtype=np.float32))
    with pytest.raises(ValueError, match="does not match"):
        w.write_chunk(0, np.array(["a", "b"]), rng.standard_normal((3, 8)).astype(np.float16))
    # a writer that finished nothing leaves nothing to mix with: another config replaces it
    EmbeddingWriter(tmp_path, config={**CONFIG, "model": "other"})
    assert read_config(tmp_path)["model"] == "other"
    w = EmbeddingWriter(tmp_path, config=CONFIG)
    w.write_chunk(0, *_chunk(rng, 0, 3))
    with pytest.raises(ValueError, match=r"config\.json.*'model'"):
        EmbeddingWriter(tmp_path, config={**CONFIG, "model": "other"})
    with pytest.raises(ValueError, match="shard 2 is not in"):
        EmbeddingWriter(tmp_path / "x", shard=2, num_shards=2, config=CONFIG)


def test_dims_duplicates_and_gaps_across_directories(tmp_path):
    rng = np.random.default_rng(5)
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    EmbeddingWriter(a, config=CONFIG).write_chunk(0, *_chunk(rng, 0, 3))
    EmbeddingWriter(b, config={**CONFIG, "dim": 4}).write_chunk(0, *_chunk(rng, 3, 3, dim=4))
    with pytest.raises(ValueError, match="dim 4 != dim 8"):
        load_embeddings([a, b])
    EmbeddingWriter(c, config=CONFIG).write_chunk(0, *_chunk(rng, 2, 3))  # p2 again
    with pytest.raises(ValueError, match="duplicate passage id 'p2'"):
        load_embeddings([a, c])
    EmbeddingWriter(c, config=CONFIG).write_chunk(2, *_chunk(rng, 10, 3))  # chunk 1 missing
    with pytest.raises(E.EmbeddingsIncompleteError, match=r"lacks chunks \[1\]"):
        load_embeddings(c)
    with pytest.warns(UserWarning, match=r"lacks chunks \[1\]"):
        ids, _ = load_embeddings(c, allow_partial=True)
    assert len(ids) == 6
    with pytest.raises(ValueError, match="no finished chunks"):
        load_embeddings(EmbeddingWriter(tmp_path / "empty", config=CONFIG).out_dir)
