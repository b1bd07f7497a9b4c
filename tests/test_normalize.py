"""L2-normalised bi-encoders (``EncoderConfig.normalize``): the towers output unit vectors equal
to the unnormalised towers' outputs divided by their norms (numpy reference); the flag is saved
in the model directory and read back (old directories without it load as unnormalised); the
corpus/question encoders and dense retrieval use it (ranking = brute-force cosine); training
scores cosines times ``scale``: the 8-device train step's loss and gradients equal ``jax.grad``
of DPR's reference loss on hand-normalised vectors."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close_to_scale

from dpr_jax.model_dir import MODEL_JSON, load_model, save_model
from dpr_jax.models.bert import BertConfig
from dpr_jax.parallel import make_mesh
from dpr_jax.retriever import loss as losses
from dpr_jax.retriever.model import BiEncoder, EncoderConfig, init_biencoder_params, l2_normalize
from dpr_jax.retriever.step import LossConfig, TrainState, make_train_step

VOCAB, B, G, TQ, TP = 99, 8, 2, 7, 10
BERT = BertConfig(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
    intermediate_size=37, max_position_embeddings=32,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip


def _ids(n, t, seed):
    rs = np.random.RandomState(seed)
    ids = rs.randint(1, VOCAB, (n, t)).astype(np.int32)
    lengths = rs.randint(2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    return ids * mask, mask


def _np_normalize(v):
    v = np.asarray(v, np.float64)
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("pooling,proj", [("cls", 0), ("mean", 0), ("mean", 16)])
def test_normalized_tower_is_the_unit_vector_of_the_plain_tower(pooling, proj):
    plain = EncoderConfig(BERT, pooling=pooling, projection_dim=proj)
    unit = dataclasses.replace(plain, normalize=True)
    params = init_biencoder_params(plain, jax.random.PRNGKey(1))
    # normalisation adds no parameters: the same tree serves both
    shapes = lambda c: jax.tree.map(jnp.shape, init_biencoder_params(c, jax.random.PRNGKey(1)))
    assert shapes(unit) == jax.tree.map(jnp.shape, params)
    ids, mask = _ids(5, TP, 0)
    for method in (BiEncoder.encode_question, BiEncoder.encode_passage):
        raw = BiEncoder(plain).apply({"params": params}, ids, mask, method=method)
        got = BiEncoder(unit).apply({"params": params}, ids, mask, method=method)
        assert got.dtype == jnp.float32
        assert np.abs(np.linalg.norm(raw, axis=1) - 1).min() > 0.1  # really unnormalised
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)
        np.testing.assert_allclose(got, _np_normalize(raw), atol=1e-6)


def test_l2_normalize_zero_row_and_gradient():
    v = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(l2_normalize(v), [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    g = jax.grad(lambda x: l2_normalize(x).sum())(v)
    assert np.isfinite(np.asarray(g)).all()
    # d/dv of sum(v/|v|) at (3, 4): (1 - v (v.1)/|v|^2) / |v| = ([1,1] - [3,4]*7/25) / 5
    np.testing.assert_allclose(g[0], (np.ones(2) - np.array([3, 4]) * 7 / 25) / 5, atol=1e-6)


def test_config_round_trip_and_old_directories(tmp_path):
    cfg = EncoderConfig(BERT, pooling="mean", normalize=True)
    assert EncoderConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    old = cfg.to_dict()
    del old["normalize"]  # a model directory written before the field existed
    assert EncoderConfig.from_dict(old).normalize is False
    with pytest.raises(ValueError, match="normalize"):
        EncoderConfig(BERT, normalize="yes")

    params = init_biencoder_params(cfg, jax.random.PRNGKey(0))
    out = save_model(tmp_path / "m", params, "biencoder", cfg)
    meta = json.loads((out / MODEL_JSON).read_text())
    assert meta["model"]["normalize"] is True and meta["model"]["pooling"] == "mean"
    _, loaded, _, _ = load_model(out)
    assert loaded == cfg


@pytest.fixture(scope="module")
def unit_model_dir(tiny_biencoder_dir, tmp_path_factory):
    """The shared tiny bi-encoder's parameters, as a mean-pooled normalised model."""
    _, cfg, params, _ = load_model(tiny_biencoder_dir)
    cfg = dataclasses.replace(cfg, pooling="mean", normalize=True)
    out = tmp_path_factory.mktemp("unit") / "model"
    return save_model(out, params, "biencoder", cfg, tokenizer=tiny_biencoder_dir)


def test_encode_and_retrieve_use_cosine(unit_model_dir, tiny_biencoder_dir):
    from dpr_jax.data.formats import Passage
    from dpr_jax.index import build_index
    from dpr_jax.retriever.encode import TowerEncoder
    from dpr_jax.search import DenseRetriever

    passages = [
        Passage(text=f"passage number {i} about topic {i % 3}", title=f"t{i}", id=str(i))
        for i in range(12)
    ]
    questions = ["which passage is about topic 1", "number 7", "what is it about"]
    _, plain_cfg, params, _ = load_model(tiny_biencoder_dir)
    plain_cfg = dataclasses.replace(plain_cfg, pooling="mean")
    enc_p = TowerEncoder(unit_model_dir, "passage", batch_size=8)
    enc_q = TowerEncoder(unit_model_dir, "question", batch_size=8)
    emb, qv = enc_p.encode(passages), enc_q.encode(questions)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    # reference: the unnormalised mean-pooled model on the same tokens, normalised in numpy
    ids, mask = enc_p.tokenizer.passages(
        [p.title for p in passages], [p.text for p in passages], 256
    )
    raw = BiEncoder(plain_cfg).apply({"params": params}, ids, mask, method=BiEncoder.encode_passage)
    np.testing.assert_allclose(emb, _np_normalize(raw), atol=1e-5)

    index = build_index("exact", emb, [p.id for p in passages])
    scores, got = DenseRetriever(unit_model_dir, index).search(questions, k=5)
    cos = _np_normalize(qv) @ _np_normalize(emb).T  # brute-force cosine
    want = np.argsort(-cos, axis=1, kind="stable")[:, :5]
    assert [list(r) for r in got] == [[passages[j].id for j in row] for row in want]
    np.testing.assert_allclose(scores, np.take_along_axis(cos, want, 1), atol=1e-5)


def test_train_step_scores_scaled_cosines():
    """8 devices, scale 20: loss and gradients equal jax.grad of DPR's reference loss on
    vectors normalised by hand from the unnormalised model."""
    plain = EncoderConfig(BERT, pooling="mean", projection_dim=16)
    unit = dataclasses.replace(plain, normalize=True)
    params = init_biencoder_params(plain, jax.random.PRNGKey(3))
    q_ids, q_mask = _ids(B, TQ, 1)
    p_ids, p_mask = _ids(B * G, TP, 2)
    batch = dict(q_ids=q_ids, q_mask=q_mask, p_ids=p_ids, p_mask=p_mask)
    scale = 20.0

    def reference(prm):
        m = BiEncoder(plain)
        q = m.apply({"params": prm}, q_ids, q_mask, method=m.encode_question)
        p = m.apply({"params": prm}, p_ids, p_mask, method=m.encode_passage)
        q = q / jnp.linalg.norm(q, axis=1, keepdims=True)
        p = p / jnp.linalg.norm(p, axis=1, keepdims=True)
        return losses.dpr_loss(q, p, G, scale)[0]

    ref_loss, ref_grads = jax.jit(jax.value_and_grad(reference))(params)
    keep = optax.GradientTransformation(
        lambda p: jax.tree.map(jnp.zeros_like, p), lambda u, s, p=None: (u, u)
    )
    step = make_train_step(
        BiEncoder(unit), keep, make_mesh(jax.devices()[:8]), LossConfig(group_size=G, scale=scale)
    )
    state, metrics = step(TrainState.create(params, keep), batch, jax.random.PRNGKey(0))
    np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
    for got, want in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(ref_grads)):
        assert_close_to_scale(got, want, rtol=1e-4)
