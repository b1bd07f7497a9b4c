"""Corpus encoding: equals direct model output, length bucketing changes nothing, resume is exact."""

from collections import namedtuple

import jax
import numpy as np
import pytest

from dpr_jax.embeddings import load_embeddings
from dpr_jax.model_dir import load_model, load_tokenizer
from dpr_jax.retriever.encode import TowerEncoder, encode_corpus, shard_range
from dpr_jax.retriever.model import BiEncoder

Psg = namedtuple("Psg", "id text title")
WORDS = "the river flows north through old city walls where merchants traded silk and tea".split()


def _corpus(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        Psg(f"p{i}", " ".join(rng.choice(WORDS, rng.integers(3, 40))), f"Title {i % 7}")
        for i in range(n)
    ]


def _reference(model_dir, passages):
    """Un-jitted, un-bucketed, one passage at a time, padded to max length: the plain model."""
    _, cfg, params, _ = load_model(model_dir)
    tok = load_tokenizer(model_dir)
    model = BiEncoder(cfg)
    fn = jax.jit(lambda i, m: model.apply({"params": params}, i, m, method=model.encode_passage))
    out = []
    for p in passages:  # one at a time, so no batch or bucketing effect can hide
        ids, mask = tok.passages([p.title], [p.text], max_length=64, bucket=None)
        out.append(np.asarray(fn(ids, mask))[0])
    return np.stack(out)


def test_tower_encoder_matches_plain_model_with_bucketing(tiny_biencoder_dir):
    passages = _corpus(19)
    ref = _reference(tiny_biencoder_dir, passages)
    for bucket in (None, 8):
        enc = TowerEncoder(
            tiny_biencoder_dir, "passage", batch_size=8, max_length=64, bucket=bucket
        )
        assert len(jax.local_devices()) == 8 and enc.batch_size == 8
        np.testing.assert_allclose(enc.encode(passages), ref, atol=2e-5, rtol=1e-5)


def test_bfloat16_encoding_on_a_cpu_equals_the_mixed_model_with_float32_params(
    tiny_biencoder_dir,
):
    """``TowerEncoder(compute_dtype="bfloat16")`` on a CPU keeps the encoder's kernels in
    bfloat16 (``mixed_inference_params``): the same vectors as the bfloat16 model applied to the
    float32 parameters, in one batch of the same padding."""
    import jax.numpy as jnp

    passages = _corpus(8, seed=1)
    enc = TowerEncoder(tiny_biencoder_dir, "passage", batch_size=8, max_length=64, bucket=None,
                       compute_dtype="bfloat16")  # fmt: skip
    assert any(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(enc.params))
    _, cfg, params, _ = load_model(tiny_biencoder_dir)
    ids, mask = load_tokenizer(tiny_biencoder_dir).passages(
        [p.title for p in passages], [p.text for p in passages], max_length=64, bucket=None
    )
    model = BiEncoder(cfg, dtype=jnp.bfloat16)
    want = model.apply({"params": params}, ids, mask, method=model.encode_passage)
    got = enc.encode(passages)
    np.testing.assert_array_equal(got, np.asarray(want).astype(got.dtype))


def test_shard_range_covers_everything_once():
    for n, k in [(10, 3), (7, 7), (5, 8), (100, 1)]:
        ranges = [shard_range(n, i, k) for i in range(k)]
        covered = [j for a, b in ranges for j in range(a, b)]
        assert covered == list(range(n))
    with pytest.raises(ValueError, match="shard 3"):
        shard_range(10, 3, 3)


def test_interrupted_encoding_resumes_to_identical_result(tiny_biencoder_dir, tmp_path):
    passages = _corpus(45, seed=1)
    kw = dict(chunk_size=10, batch_size=8, max_length=64, bucket=16, out_dtype="float32",
              show_progress=False)  # fmt: skip
    full = tmp_path / "full"
    for s in range(2):
        encode_corpus(tiny_biencoder_dir, passages, full, shard=s, num_shards=2, **kw)
    ids_full, emb_full = load_embeddings(full)

    part = tmp_path / "part"
    encode_corpus(tiny_biencoder_dir, passages, part, shard=0, num_shards=2, max_chunks=1, **kw)
    first = {p.name: p.stat().st_mtime_ns for p in part.glob("emb-000-000000.npy")}
    # a chunk killed half-way: embeddings written, no .done marker -> must be recomputed
    np.save(part / "emb-000-000001.npy", np.zeros((3, 32), np.float32))
    for s in range(2):
        encode_corpus(tiny_biencoder_dir, passages, part, shard=s, num_shards=2, **kw)
    ids_part, emb_part = load_embeddings(part)
    assert {p.name: p.stat().st_mtime_ns for p in part.glob("emb-000-000000.npy")} == first
    assert ids_part.tolist() == ids_full.tolist() == [p.id for p in passages]
    np.testing.assert_array_equal(emb_part, emb_full)
    np.testing.assert_allclose(emb_full, _reference(tiny_biencoder_dir, passages), atol=2e-5)


def test_encoding_into_a_directory_of_another_model_is_refused(tiny_biencoder_dir, tmp_path):
    passages = _corpus(5)
    out = tmp_path / "emb"
    encode_corpus(tiny_biencoder_dir, passages, out, out_dtype="float32", show_progress=False)
    with pytest.raises(ValueError, match="config.json"):
        encode_corpus(tiny_biencoder_dir, passages, out, out_dtype="float16", show_progress=False)


def test_encode_questions_command_matches_the_question_tower(tiny_biencoder_dir, tmp_path):
    from dpr_jax.cli.encode import cli_main

    rng = np.random.default_rng(5)
    questions = [" ".join(rng.choice(WORDS, rng.integers(2, 12))) + "?" for _ in range(11)]
    qas = tmp_path / "q.tsv"
    qas.write_text("".join(f"{q}\t['x']\n" for q in questions))
    out = tmp_path / "vecs" / "q.npy"
    assert cli_main(["--model", str(tiny_biencoder_dir), "--questions", str(qas),
                     "--out", str(out), "--batch-size", "8", "--bucket", "4"]) == 0  # fmt: skip
    got = np.load(out)
    _, cfg, params, _ = load_model(tiny_biencoder_dir)
    tok = load_tokenizer(tiny_biencoder_dir)
    model = BiEncoder(cfg)
    fn = jax.jit(lambda i, m: model.apply({"params": params}, i, m, method=model.encode_question))
    for q, vec in zip(questions, got):  # one at a time, unbucketed: the plain model
        ids, mask = tok.questions([q], 64, None)
        np.testing.assert_allclose(vec, np.asarray(fn(ids, mask))[0], atol=2e-5, rtol=1e-5)
    assert got.shape == (11, cfg.embedding_dim) and not list(out.parent.glob("*.tmp*"))
