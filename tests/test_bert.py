"""Flax BertModule against Hugging Face's PyTorch BertModel (the reference), BertConfig against
transformers' config.json, and the errors a bad config raises."""

import functools
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="BERT tests need torch: pip install 'dpr-jax[torch]'")
transformers = pytest.importorskip("transformers")

from conftest import assert_close_to_scale  # noqa: E402

from dpr_jax.convert import hf_state_dict_to_flax  # noqa: E402
from dpr_jax.models.bert import BertConfig, BertModule  # noqa: E402

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
)
# bfloat16 compute vs float32 on the tiny random model (5 seeds, values |h| <= ~4): measured
# max |diff| 0.016-0.020 (embeddings), 0.021-0.033 (last layer), 0.007-0.012 (pooler), [CLS]
# cosine >= 0.99997. The bounds below leave a 2-3x margin.
BF16_HIDDEN_ATOL = 0.08
BF16_POOLED_ATOL = 0.03
BF16_MIN_COSINE = 0.9995


@functools.lru_cache
def _jitted(cfg: BertConfig, dtype=jnp.float32, pooler=True, hidden=False, deterministic=True):
    """One compiled BertModule.apply per configuration (eager dispatch of a whole BERT is slow)."""
    module = BertModule(cfg, dtype=dtype, add_pooling_layer=pooler)
    return jax.jit(
        lambda p, *args: module.apply(
            {"params": p}, *args, deterministic=deterministic, output_hidden_states=hidden
        )
    )


def _torch_bert(seed: int, **overrides):
    """A random HF BertModel; LayerNorm and biases randomised too (HF inits them to 1 / 0)."""
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("LayerNorm.weight") else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def _flax(model):
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    cfg = BertConfig.from_dict(model.config.to_dict())
    return cfg, hf_state_dict_to_flax(sd, "BertModel", cfg)


def _torch_last_hidden(model, ids, mask, types) -> np.ndarray:
    with torch.no_grad():
        return model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long),
        ).last_hidden_state.numpy()


def _batch(seed: int, b=4, t=16, lengths=(16, 9, 4, 1)):
    """Right-padded random ids, random token types (0/1) so token_type_embeddings count."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(5, TINY["vocab_size"], size=(b, t)).astype(np.int32)
    types = rng.integers(0, 2, size=(b, t)).astype(np.int32)
    mask = np.zeros((b, t), np.int32)
    for i, length in enumerate(lengths):
        mask[i, :length] = 1
    return np.where(mask == 1, ids, 0).astype(np.int32), mask, types


@pytest.mark.parametrize("act", ["gelu", "gelu_new", "relu"])
def test_matches_torch_bert_all_hidden_states_and_pooler(act):
    model = _torch_bert(0, hidden_act=act)
    cfg, params = _flax(model)
    assert cfg.hidden_act == act
    ids, mask, types = _batch(1)
    out = _jitted(cfg, hidden=True)(params, ids, mask, types)
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long),
            output_hidden_states=True,
        )
    assert len(out.hidden_states) == len(ref.hidden_states) == TINY["num_hidden_layers"] + 1
    for i, (got, want) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=0, err_msg=f"layer {i}")
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=1e-5)
    np.testing.assert_allclose(out.pooler_output, ref.pooler_output.numpy(), atol=1e-5)


@pytest.mark.parametrize("batch", [1, 3, 12])
def test_cpu_looped_and_batched_attention_both_match_torch(batch):
    """Inference on CPU loops over (example, head) blocks, G = gcd(B, 8 devices) = 1, 1, 4
    examples a step; training (deterministic=False) takes the batched path. Both equal torch."""
    model = _torch_bert(4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg, params = _flax(model)
    lengths = [16, 9, 4, 1, 12, 7, 16, 2, 3, 5, 8, 11][:batch]
    ids, mask, types = _batch(5, b=batch, lengths=lengths)
    ref = _torch_last_hidden(model, ids, mask, types)
    assert jax.default_backend() == "cpu"
    for deterministic in (True, False):  # dropout rates are 0: the paths differ, not the math
        out = _jitted(cfg, deterministic=deterministic)(params, ids, mask, types)
        np.testing.assert_allclose(out.last_hidden_state, ref, atol=1e-5, err_msg=deterministic)


def test_looped_attention_keeps_a_sharded_batch_sharded():
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    cfg, params = _flax(_torch_bert(6))
    ids, mask, types = _batch(7, b=16, lengths=[16, 9, 4, 1] * 4)
    mesh = Mesh(np.array(jax.devices()), ("data",))
    assert mesh.size == 8
    data = NamedSharding(mesh, P("data"))
    fn = jax.jit(
        lambda p, i, m, t: BertModule(cfg).apply({"params": p}, i, m, t).last_hidden_state,
        in_shardings=(None, data, data, data),
        out_shardings=data,
    )
    hlo = fn.lower(params, ids, mask, types).compile().as_text()
    assert "all-gather" not in hlo and "while" in hlo
    sharded = fn(params, ids, mask, types)
    single = _jitted(cfg)(params, ids, mask, types).last_hidden_state
    np.testing.assert_allclose(sharded, single, atol=1e-6)


@pytest.mark.parametrize("remat", [False, True])
def test_first_token_only_equals_position_0_of_the_full_model_and_its_gradient(remat):
    """[CLS] pooling computes the last layer at position 0 alone; the vector, the pooler and
    the gradient w.r.t. every parameter equal those of the full computation, and torch's."""
    model = _torch_bert(8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg, params = _flax(model)
    ids, mask, types = _batch(9, b=3, lengths=(16, 5, 1))
    module = BertModule(cfg, remat=remat)

    def run(p, first, deterministic=True):
        out = module.apply({"params": p}, ids, mask, types, deterministic=deterministic,
                           first_token_only=first)  # fmt: skip
        return out.last_hidden_state, out.pooler_output

    full, full_pooled = jax.jit(run, static_argnums=(1,))(params, False)
    first, first_pooled = jax.jit(run, static_argnums=(1,))(params, True)
    assert first.shape == (3, 1, cfg.hidden_size)
    np.testing.assert_allclose(first, full[:, :1], atol=1e-6)
    np.testing.assert_allclose(first_pooled, full_pooled, atol=1e-6)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids, dtype=torch.long),
                    attention_mask=torch.tensor(mask, dtype=torch.long),
                    token_type_ids=torch.tensor(types, dtype=torch.long))  # fmt: skip
    np.testing.assert_allclose(first[:, 0], ref.last_hidden_state[:, 0].numpy(), atol=1e-5)

    def loss(p, first):  # the training path (deterministic=False; dropout rates are 0)
        h, pooled = run(p, first, deterministic=False)
        return jnp.sum(h[:, 0] ** 2) + jnp.sum(pooled)

    g_full = jax.jit(jax.grad(loss), static_argnums=(1,))(params, False)
    g_first = jax.jit(jax.grad(loss), static_argnums=(1,))(params, True)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(g_full), jax.tree_util.tree_leaves(g_first)
    ):
        assert_close_to_scale(b, a, rtol=1e-5, err_msg=str(path))


def test_explicit_position_ids_and_no_pooler():
    model = _torch_bert(2)
    cfg, params = _flax(model)
    del params["pooler_dense"]
    ids, mask, types = _batch(3, b=2, t=8, lengths=(8, 5))
    pos = np.array([np.arange(8) + 3, np.arange(8)[::-1]], np.int32)
    out = BertModule(cfg, add_pooling_layer=False).apply({"params": params}, ids, mask, types, pos)
    assert out.pooler_output is None
    with torch.no_grad():
        ref = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.tensor(mask, dtype=torch.long),
            token_type_ids=torch.tensor(types, dtype=torch.long),
            position_ids=torch.tensor(pos, dtype=torch.long),
        )
    np.testing.assert_allclose(out.last_hidden_state, ref.last_hidden_state.numpy(), atol=1e-5)


def test_bfloat16_compute_close_to_float32():
    worst = {"hidden": 0.0, "pooled": 0.0, "cos": 1.0}
    for seed in range(3):
        cfg, params = _flax(_torch_bert(seed))
        ids, mask, types = _batch(seed)
        f32 = _jitted(cfg, hidden=True)(params, ids, mask, types)
        b16 = _jitted(cfg, jnp.bfloat16, hidden=True)(params, ids, mask, types)
        assert b16.last_hidden_state.dtype == jnp.bfloat16
        for got, want in zip(b16.hidden_states, f32.hidden_states):
            diff = float(jnp.abs(got.astype(jnp.float32) - want).max())
            worst["hidden"] = max(worst["hidden"], diff)
        pooled = float(jnp.abs(b16.pooler_output.astype(jnp.float32) - f32.pooler_output).max())
        worst["pooled"] = max(worst["pooled"], pooled)
        a, b = b16.last_hidden_state[:, 0].astype(jnp.float32), f32.last_hidden_state[:, 0]
        cos = jnp.sum(a * b, -1) / (jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1))
        worst["cos"] = min(worst["cos"], float(cos.min()))
    assert worst["hidden"] <= BF16_HIDDEN_ATOL, worst
    assert worst["pooled"] <= BF16_POOLED_ATOL, worst
    assert worst["cos"] >= BF16_MIN_COSINE, worst
    assert worst["hidden"] > 1e-3, "bf16 gave float32 results: is the dtype ignored?"


def test_config_round_trips_through_hf_config_json(tmp_path):
    ours = BertConfig(**TINY, hidden_act="gelu_new", layer_norm_eps=1e-7, type_vocab_size=3)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ours.to_hf_dict(architectures=["BertModel"])))
    hf = transformers.BertConfig.from_pretrained(tmp_path)
    for field, value in ours.to_dict().items():
        assert getattr(hf, field) == value, field
    assert hf.architectures == ["BertModel"]
    # transformers' own config.json -> ours
    hf.save_pretrained(tmp_path / "hf")
    assert BertConfig.from_json_file(tmp_path / "hf" / "config.json") == ours
    assert BertConfig.from_dict(ours.to_dict()) == ours
    assert ours.head_dim == 8


def test_invalid_configs_raise(tmp_path):
    with pytest.raises(
        ValueError, match="hidden_size 30 is not a multiple of num_attention_heads 4"
    ):
        BertConfig(**{**TINY, "hidden_size": 30})
    with pytest.raises(ValueError, match="hidden_act 'swish' is not supported"):
        BertConfig(**{**TINY, "hidden_act": "swish"})
    with pytest.raises(ValueError, match="position_embedding_type 'relative_key'"):
        BertConfig.from_dict({**TINY, "position_embedding_type": "relative_key"})
    missing = tmp_path / "nope" / "config.json"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        BertConfig.from_json_file(missing)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=f"{broken}: not valid JSON"):
        BertConfig.from_json_file(broken)
    bad_type = tmp_path / "bad_type.json"
    bad_type.write_text(json.dumps({**TINY, "hidden_size": "32"}))
    with pytest.raises(ValueError, match=f"{bad_type}: bad BERT config"):
        BertConfig.from_json_file(bad_type)
    cfg = BertConfig(**TINY)
    ids = np.zeros((1, TINY["max_position_embeddings"] + 1), np.int32)
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_position_embeddings 64"):
        BertModule(cfg).init(jax.random.PRNGKey(0), ids)


def test_hashed_dropout_rate_scale_and_independence():
    """Dropout's hashed masks: the rate and inverted scaling of flax's Dropout, masks that
    differ from key to key and are uncorrelated (with each other and along the array)."""
    from dpr_jax.models.bert import Dropout, dropout_keep_mask

    shape = (64, 12, 128)  # 98,304 elements: the rate is known to +-0.003 (3 sigma 0.0029)
    key = jax.random.PRNGKey(3)
    for rate in (0.1, 0.5):
        keep = np.asarray(dropout_keep_mask(key, shape, rate))
        assert abs(keep.mean() - (1 - rate)) < 0.003, (rate, keep.mean())
    a = np.asarray(dropout_keep_mask(jax.random.PRNGKey(1), shape, 0.1)).ravel()
    b = np.asarray(dropout_keep_mask(jax.random.PRNGKey(2), shape, 0.1)).ravel()
    assert (a != b).any()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.02  # two keys
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.02  # neighbours in one mask
    assert abs(np.corrcoef(a[:-128], a[128:])[0, 1]) < 0.02  # the same column, next row

    x = jnp.full(shape, 2.0)
    drop = Dropout(0.1)
    y = np.asarray(drop.apply({}, x, False, rngs={"dropout": key}))
    np.testing.assert_allclose(np.unique(y), [0.0, 2.0 / 0.9], rtol=1e-6)
    assert abs(y.mean() - 2.0) < 0.02  # inverted dropout keeps the expectation
    np.testing.assert_array_equal(drop.apply({}, x, True), x)  # deterministic: identity
    np.testing.assert_array_equal(Dropout(0.0).apply({}, x, False), x)
    np.testing.assert_array_equal(Dropout(1.0).apply({}, x, False, rngs={"dropout": key}), 0 * x)


def test_dropout_rows_make_each_rows_mask_its_own():
    """With ``rows``, row b's mask depends on the key, rows[b] and the row shape only: the same
    row id gives the same mask in any batch and at any position (what keeps the train step equal
    on 1 and 8 devices and with GradCache chunks), other ids give uncorrelated masks."""
    from dpr_jax.models.bert import Dropout, dropout_keep_mask

    key, shape, rate = jax.random.PRNGKey(5), (12, 128), 0.1
    ids = jnp.array([7, 3, 100, 4], jnp.int32)
    batch = np.asarray(dropout_keep_mask(key, (4, *shape), rate, ids))
    for b, i in enumerate(ids.tolist()):
        alone = np.asarray(dropout_keep_mask(key, (1, *shape), rate, jnp.array([i])))
        np.testing.assert_array_equal(batch[b], alone[0])
    flipped = np.asarray(dropout_keep_mask(key, (4, *shape), rate, ids[::-1]))
    np.testing.assert_array_equal(flipped, batch[::-1])
    two = np.asarray(dropout_keep_mask(key, (2, 768, 128), rate, jnp.array([0, 1])))
    assert abs(np.corrcoef(two[0].ravel(), two[1].ravel())[0, 1]) < 0.02  # 6 sigma
    many = np.asarray(dropout_keep_mask(key, (64, *shape), rate, jnp.arange(64)))
    assert abs(many.mean() - (1 - rate)) < 0.003
    other_key = np.asarray(dropout_keep_mask(jax.random.PRNGKey(6), (4, *shape), rate, ids))
    assert (other_key != batch).any()
    with pytest.raises(ValueError, match="do not match the leading axis"):
        dropout_keep_mask(key, (4, *shape), rate, jnp.arange(3))
    x = jnp.ones((4, *shape))
    drop = functools.partial(Dropout(rate).apply, {}, deterministic=False, rngs={"dropout": key})
    y = np.asarray(drop(x, rows=ids))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / (1 - rate)], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(drop(x, rows=ids[::-1])), y[::-1])  # row-keyed


def _dots(jaxpr) -> list:
    """Every dot_general of a (closed) jaxpr, sub-jaxprs (scan / map bodies, jit) included."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            out.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            out += _dots(sub)
    return out


def test_cpu_bfloat16_inference_runs_mixed_and_is_closer_to_float32():
    """bfloat16 inference on XLA:CPU (``cpu_mixed_inference``) keeps activations in float32 and
    rounds only the products' inputs (accumulated in float32): the fast form there, and closer
    to the float32 forward pass than bfloat16 throughout, which training keeps."""
    import dpr_jax.models.bert as bert_mod

    assert jax.default_backend() == "cpu"
    cfg, params = _flax(_torch_bert(0))
    ids, mask, types = _batch(0)

    def apply(dtype, deterministic=True):
        module = BertModule(cfg, dtype=dtype)
        return lambda p: module.apply({"params": p}, ids, mask, types,
                                      deterministic=deterministic, rngs={"dropout": jax.random.key(0)})  # fmt: skip

    # inference: every product takes bfloat16 inputs and accumulates in float32
    dots = _dots(jax.make_jaxpr(apply(jnp.bfloat16))(params).jaxpr)
    assert len(dots) >= 6 * cfg.num_hidden_layers  # q, k, v, attention out, 2 FFN; attention
    for eqn in dots:
        assert [v.aval.dtype for v in eqn.invars] == [jnp.bfloat16] * 2, eqn
        assert eqn.params["preferred_element_type"] == jnp.float32, eqn
    # training: the dtype's own products (what the planner compiles for TPUs)
    train_dots = _dots(jax.make_jaxpr(apply(jnp.bfloat16, deterministic=False))(params).jaxpr)
    assert train_dots and all(e.outvars[0].aval.dtype == jnp.bfloat16 for e in train_dots)

    worst = {"mixed": [], "bf16": []}
    for seed in range(3):
        cfg, params = _flax(_torch_bert(seed))
        ids, mask, types = _batch(seed)
        want = jax.jit(apply(jnp.float32))(params).last_hidden_state
        mixed = jax.jit(apply(jnp.bfloat16))(params).last_hidden_state
        assert mixed.dtype == jnp.bfloat16  # the same output dtype as before
        orig = bert_mod.cpu_mixed_inference
        bert_mod.cpu_mixed_inference = lambda *a: False
        try:
            pure = jax.jit(apply(jnp.bfloat16))(params).last_hidden_state
        finally:
            bert_mod.cpu_mixed_inference = orig
        for name, got in (("mixed", mixed), ("bf16", pure)):
            worst[name].append(float(jnp.abs(got.astype(jnp.float32) - want).mean()))
    # measured mean |diff| 0.0016-0.0017 mixed (most of it the output's own bfloat16 rounding)
    # against 0.0034-0.0036 in bfloat16 throughout
    assert max(worst["mixed"]) < 0.75 * min(worst["bf16"]), worst
    assert min(worst["mixed"]) > 1e-4, "mixed inference gave float32 results"


def test_mixed_inference_params_store_the_rounded_kernels_and_change_no_number():
    """``mixed_inference_params`` (what ``ReaderPredictor`` reads bfloat16 with on a CPU) stores
    in bfloat16 exactly the kernels whose products mixed inference rounds, so the outputs are
    bit-identical to float32 parameters; the heads, embeddings, biases and LayerNorms stay."""
    from dpr_jax.models.bert import mixed_inference_params
    from dpr_jax.reader.model import Reader, init_reader_params

    assert jax.default_backend() == "cpu"
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    params = init_reader_params(cfg, jax.random.PRNGKey(3))
    low = mixed_inference_params(params, jnp.bfloat16)
    cast = {
        jax.tree_util.keystr(path)
        for path, x in jax.tree_util.tree_leaves_with_path(low)
        if x.dtype == jnp.bfloat16
    }
    per_layer = ("attention_self']['query", "attention_self']['key", "attention_self']['value",
                 "attention_output_dense", "intermediate_dense", "output_dense")  # fmt: skip
    assert len(cast) == 6 * cfg.num_hidden_layers
    assert all(c.endswith("['kernel']") and any(f"{n}'" in c for n in per_layer) for c in cast)
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(1, cfg.vocab_size, (2, 3, 16)), jnp.int32)
    mask = jnp.asarray(np.arange(16)[None, None] < rng.integers(4, 17, (2, 3, 1)), jnp.int32)
    model = Reader(cfg, dtype=jnp.bfloat16)
    run = jax.jit(lambda p: model.apply({"params": p}, ids, mask))
    for a, b in zip(run(params), run(low)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(
        x.dtype == jnp.float32 for x in jax.tree.leaves(mixed_inference_params(params, jnp.float32))
    )


def test_matmul_dtype_rounds_every_dense_product_forward_and_backward():
    """``_trainable_products`` (training with ``matmul_dtype``): the forward product and both
    gradient products take bfloat16 inputs (the incoming gradient rounded too) and return
    float32, against the same products of the rounded values in float64."""
    from dpr_jax.models.bert import _trainable_products

    rng = np.random.default_rng(0)
    x, c = rng.normal(size=(3, 5, 8)), rng.normal(size=(3, 5, 6))
    w = rng.normal(size=(8, 6))
    dense = _trainable_products("bfloat16")
    dn = (((2,), (0,)), ((), ()))
    x32, w32, c32 = (jnp.asarray(a, jnp.float32) for a in (x, w, c))
    grad = jax.value_and_grad(lambda a, b: jnp.sum(dense(a, b, dn) * c32), argnums=(0, 1))
    y, (dx, dw) = grad(x32, w32)

    def r(a):  # the bfloat16 value, exactly, in float64
        return np.asarray(jnp.asarray(a, jnp.float32).astype(jnp.bfloat16), np.float64)

    assert dx.dtype == dw.dtype == jnp.float32
    np.testing.assert_allclose(float(y), np.sum((r(x) @ r(w)) * c), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), r(c) @ r(w).T, rtol=1e-5, atol=1e-5)
    want_dw = r(x).reshape(-1, 8).T @ r(c).reshape(-1, 6)
    np.testing.assert_allclose(np.asarray(dw), want_dw, rtol=1e-5, atol=1e-5)
    # the float32 gradient differs by the roundings (so they happened)
    assert np.abs(np.asarray(dw) - x.reshape(-1, 8).T @ c.reshape(-1, 6)).max() > 1e-3
    with pytest.raises(ValueError, match="not a Dense"):
        dense(x32, w32.T, (((2,), (1,)), ((), ())))


def test_matmul_dtype_training_gradient_runs_dense_products_in_bfloat16():
    """A BERT trained with ``matmul_dtype="bfloat16"``: every Dense product of the layers and the
    pooler, forward and backward (3 each), takes bfloat16 inputs into float32; attention's own
    products stay float32, with or without dropout (``deterministic``: a retriever without
    dropout trains so); the gradient is the float32 one to bfloat16's precision (not equal
    to it); a 16-bit ``dtype`` with it is refused."""
    cfg, params = _flax(_torch_bert(0))
    ids, mask, types = _batch(0)

    def loss(matmul_dtype, deterministic=False):
        module = BertModule(cfg, matmul_dtype=matmul_dtype)

        def f(p):
            out = module.apply({"params": p}, ids, mask, types, deterministic=deterministic,
                               rngs={"dropout": jax.random.key(0)})  # fmt: skip
            return jnp.sum(out.last_hidden_state**2) + jnp.sum(out.pooler_output**2)

        return f

    dots = _dots(jax.make_jaxpr(jax.grad(loss("bfloat16")))(params).jaxpr)
    low = [e for e in dots if [v.aval.dtype for v in e.invars] == [jnp.bfloat16] * 2]
    assert all(e.params["preferred_element_type"] == jnp.float32 for e in low)
    assert len(low) == 3 * (6 * cfg.num_hidden_layers + 1)  # 6 Dense a layer + the pooler
    rest = [e for e in dots if e not in low]
    assert len(rest) == 3 * 2 * cfg.num_hidden_layers  # QK^T and PV, forward and backward
    assert all(v.aval.dtype == jnp.float32 for e in rest for v in e.invars)
    no_dropout = _dots(jax.make_jaxpr(jax.grad(loss("bfloat16", True)))(params).jaxpr)
    assert sum(e.invars[0].aval.dtype == jnp.bfloat16 for e in no_dropout) == len(low)
    with pytest.raises(ValueError, match="needs dtype float32"):
        BertModule(cfg, dtype=jnp.bfloat16, matmul_dtype="bfloat16").apply(
            {"params": params}, ids, mask, types, deterministic=False,
            rngs={"dropout": jax.random.key(0)},
        )  # fmt: skip

    want = jax.jit(jax.grad(loss(None)))(params)
    got = jax.jit(jax.grad(loss("bfloat16")))(params)
    a, b = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (want, got))
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    # measured 1.3e-3 (bfloat16 keeps 8 bits: 2^-9 = 2e-3 a rounding)
    assert 1e-5 < rel < 2e-2, rel


def _has_loop(jaxpr) -> bool:
    """Whether a (closed) jaxpr runs a scan (``lax.map``) or a while loop, sub-jaxprs included."""
    return any(
        eqn.primitive.name in ("scan", "while")
        or any(_has_loop(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        for eqn in jaxpr.eqns
    )


def test_cpu_mixed_attention_is_batched_for_small_blocks_looped_otherwise_and_both_agree(
    monkeypatch,
):
    """Mixed inference (bfloat16 on XLA:CPU) reads attention batched while each device holds at
    least BATCHED_CPU_ATTENTION_ROWS rows and their scores fit in BATCHED_CPU_ATTENTION_BYTES,
    looped otherwise; float32 stays looped. Both forms give the same numbers, and torch's."""
    import dpr_jax.models.bert as bert_mod

    model = _torch_bert(3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cfg, params = _flax(model)
    assert jax.device_count() == 8
    ids, mask, types = _batch(3, b=32, lengths=[16, 9, 4, 1, 12, 7, 2, 5] * 4)  # 4 rows a device

    def run(dtype, b=32):
        module = BertModule(cfg, dtype=dtype)
        fn = lambda p: module.apply({"params": p}, ids[:b], mask[:b], types[:b],  # noqa: E731
                                    float32_output=True).last_hidden_state  # fmt: skip
        return _has_loop(jax.make_jaxpr(fn)(params).jaxpr), jax.jit(fn)(params)

    looped, batched = {}, {}
    scores = 4 * cfg.num_attention_heads * 16 * 16 * 4  # bytes of a device's float32 scores
    assert scores <= bert_mod.BATCHED_CPU_ATTENTION_BYTES
    assert not (got := run(jnp.bfloat16))[0]  # 4 rows a device, small scores: batched
    batched["bf16"] = got[1]
    assert run(jnp.bfloat16, b=8)[0]  # one row a device: looped
    assert run(jnp.float32)[0]
    monkeypatch.setattr(bert_mod, "BATCHED_CPU_ATTENTION_BYTES", scores)
    assert not run(jnp.bfloat16)[0]
    monkeypatch.setattr(bert_mod, "BATCHED_CPU_ATTENTION_BYTES", scores - 1)
    assert (got := run(jnp.bfloat16))[0]  # scores one byte over the limit: looped
    looped["bf16"] = got[1]
    np.testing.assert_allclose(batched["bf16"], looped["bf16"], atol=2e-5)
    ref = _torch_last_hidden(model, ids, mask, types)
    # bfloat16 products' inputs: within their rounding of torch's float32 (measured ~3e-3 mean)
    err = float(np.abs(np.asarray(batched["bf16"]) - ref).mean())
    assert 1e-5 < err < 1e-2, err
