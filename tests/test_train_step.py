"""The DPR train step over a mesh: 8 devices give the 1-device step; gradients match a plain
``jax.grad`` of the reference loss; training on a tiny synthetic task lowers the loss.

Tolerances (float32, matmul precision "highest"): loss and metrics rtol 1e-5; gradients
rtol 1e-4 / atol 1e-6 elementwise (measured: max abs difference 3e-8 to 6e-8 for gradients up to
0.1); parameters after one AdamW step atol 1e-4, against ~3e-3 moved per weight by a first AdamW
step at lr 3e-3. The parameter bound is loose because some gradients are zero up to rounding
(the passage tower's output bias: adding c to every passage adds q.c to all of a question's
scores, which the softmax ignores) and Adam's g / (|g| + eps) turns 1e-9 of rounding into
1e-5 of update (measured up to 1.2e-5). A gradient error would move weights by ~2 * lr.

Speed: steps are compiled once per configuration with XLA's backend optimisation off (the tests
check numbers, not speed), which halves the CPU compile time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpr_jax.models.bert import BertConfig
from dpr_jax.parallel import (
    batch_sharding,
    global_batch_from_local,
    make_mesh,
    process_slice,
    replicated,
)
from dpr_jax.retriever import loss as losses
from dpr_jax.retriever.model import BiEncoder, EncoderConfig, init_biencoder_params
from dpr_jax.retriever.step import LossConfig, TrainState, make_eval_step, make_train_step

B, G, TQ, TP, VOCAB = 16, 3, 8, 12, 99  # 2 questions / 6 passages per device on 8 devices
LOSS = LossConfig(group_size=G, scale=1.0)
GRAD_TOL = dict(rtol=1e-4, atol=1e-6)
PARAM_ATOL = 1e-4


def tiny_model(shared: bool = False, dropout: float = 0.1) -> BiEncoder:
    bert = BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=37, max_position_embeddings=32,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )  # fmt: skip
    return BiEncoder(EncoderConfig(bert, shared=shared, projection_dim=16))


def record_grads() -> optax.GradientTransformation:
    """Passes updates through and keeps the last ones (the gradients) in its state."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda updates, state, params=None: (updates, updates),
    )


TX = optax.chain(record_grads(), optax.adamw(3e-3, eps=1e-6, weight_decay=0.01))
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _init_params(config: EncoderConfig, seed: int):
    """Random parameters of the right tree and shapes, drawn in numpy (compiling Flax's
    initialisers costs more CPU than a train step)."""
    shapes = jax.eval_shape(functools.partial(init_biencoder_params, config), jax.random.key(0))
    rs = np.random.RandomState(seed)

    def draw(path, s):
        x = 0.02 * rs.standard_normal(s.shape)
        return (x + (jax.tree_util.keystr(path).endswith("'scale']"))).astype(s.dtype)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def fresh_state(model: BiEncoder, seed: int = 0) -> TrainState:
    """A new state (the train step donates its input)."""
    return TrainState.create(jax.tree.map(jnp.array, _init_params(model.config, seed)), TX)


def make_batch(seed: int, b: int = B, all_valid: bool = False, task: bool = False) -> dict:
    """Random DPR batch with one padding question (unless ``all_valid``); ``task``: each
    question is its positive passage's first TQ tokens."""
    rs = np.random.RandomState(seed)
    p_ids = rs.randint(1, VOCAB, (b * G, TP)).astype(np.int32)
    p_len = rs.randint(TP // 2, TP + 1, b * G)
    p_mask = (np.arange(TP)[None] < p_len[:, None]).astype(np.int32)
    q_ids = rs.randint(1, VOCAB, (b, TQ)).astype(np.int32)
    if task:
        q_ids = p_ids[::G, :TQ].copy()
    q_len = rs.randint(TQ // 2, TQ + 1, b)
    q_mask = (np.arange(TQ)[None] < q_len[:, None]).astype(np.int32)
    batch = dict(q_ids=q_ids * q_mask, q_mask=q_mask, p_ids=p_ids * p_mask, p_mask=p_mask)
    batch["valid"] = np.ones(b, np.float32)
    if not all_valid:
        batch["valid"][5] = 0.0  # a padding question (on device 2 of 8)
    return batch


@functools.cache
def jitted_step(n_devices: int, shared: bool, dropout: float, chunk: int | None = None):
    mesh = make_mesh(jax.devices()[:n_devices])
    return make_train_step(tiny_model(shared, dropout), TX, mesh, LOSS, grad_cache_chunk=chunk)


@functools.cache
def train_step_for(n_devices: int, shared: bool, dropout: float, chunk: int | None = None):
    """Compiled once per configuration (for batches shaped like make_batch's) and reused."""
    step = jitted_step(n_devices, shared, dropout, chunk)
    example = (fresh_state(tiny_model(shared, dropout)), make_batch(0), jax.random.key(0))
    return step.lower(*example).compile(compiler_options=FAST_COMPILE)


@functools.cache
def eval_step_for(shared: bool, dropout: float):
    return make_eval_step(tiny_model(shared, dropout), make_mesh(), LOSS)


def run_step(n_devices, shared, dropout, batch, chunk=None, seed=0):
    step = train_step_for(n_devices, shared, dropout, chunk)
    state, metrics = step(fresh_state(tiny_model(shared, dropout), seed), batch, jax.random.key(7))
    return jax.device_get((state, metrics))


def assert_same_step(a, b):
    (sa, ma), (sb, mb) = a, b
    assert int(sa.step) == int(sb.step) == 1
    for k in ma:
        assert float(ma[k]) == pytest.approx(float(mb[k]), rel=1e-5), k
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, **GRAD_TOL), sa.opt_state[0], sb.opt_state[0]
    )
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=PARAM_ATOL), sa.params, sb.params
    )


def reference_loss(model, params, batch):
    """The reference loss of the global batch on one device (deterministic encoders)."""
    q, p = model.apply(
        {"params": params}, batch["q_ids"], batch["q_mask"], batch["p_ids"], batch["p_mask"]
    )
    return losses.dpr_loss(q, p, G, valid=batch["valid"])


def reference_grads(model, params, batch):
    """Plain single-device jax.grad of the reference loss."""
    loss = functools.partial(reference_loss, model, batch=batch)
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_8_devices_equal_1_device_with_dropout():
    batch = make_batch(0)
    eight = run_step(8, False, 0.1, batch)
    one = run_step(1, False, 0.1, batch)
    assert_same_step(eight, one)
    state, metrics = eight
    assert float(metrics["questions"]) == B - 1 and float(metrics["candidates"]) == (B - 1) * G
    assert float(metrics["grad_norm"]) > 0
    assert set(state.params) == {"question_encoder", "ctx_encoder"}
    # Dropout is really on: the deterministic loss of the same params differs.
    det = eval_step_for(False, 0.1)(fresh_state(tiny_model(False, 0.1)).params, batch)
    assert abs(float(det["loss"]) - float(metrics["loss"])) > 1e-4


def test_shared_towers_match_plain_grad():
    model = tiny_model(shared=True, dropout=0.0)
    batch = make_batch(1)
    eight = run_step(8, True, 0.0, batch)
    state, metrics = eight
    assert set(state.params) == {"question_encoder"}
    (loss, m), grads = reference_grads(model, fresh_state(model).params, batch)
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert float(metrics["accuracy"]) == pytest.approx(float(m["accuracy"]))
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, **GRAD_TOL), state.opt_state[0], grads
    )


def test_eval_step_matches_reference_loss():
    model = tiny_model(False, 0.1)
    params = fresh_state(model).params
    batch = make_batch(2)
    metrics = jax.device_get(eval_step_for(False, 0.1)(params, batch))
    _, m = jax.jit(functools.partial(reference_loss, model))(params, batch)
    for k in m:
        assert float(metrics[k]) == pytest.approx(float(m[k]), rel=1e-5), k


def test_training_lowers_the_loss():
    """Questions are prefixes of their positive passages; 40 AdamW steps on fresh batches."""
    step = train_step_for(8, False, 0.1)
    state = fresh_state(tiny_model(False, 0.1))
    rng = jax.random.key(0)
    curve = []
    for i in range(40):
        state, metrics = step(state, make_batch(100 + i, all_valid=True, task=True), rng)
        curve.append(float(metrics["loss"]))
    assert int(state.step) == 40
    first, last = np.mean(curve[:3]), np.mean(curve[-3:])
    assert first > 3.0  # about log(48) for random towers
    assert last < 0.6 * first, curve


def test_bad_batches_raise_naming_the_field():
    step = jitted_step(8, False, 0.1)  # the checks run when the step is traced
    state = fresh_state(tiny_model(False, 0.1))
    batch = make_batch(3)
    bad = dict(batch, p_ids=batch["p_ids"][:-1], p_mask=batch["p_mask"][:-1])
    with pytest.raises(ValueError, match="'p_ids'.*B\\*G"):
        step(state, bad, jax.random.key(0))
    with pytest.raises(ValueError, match="unknown fields \\['vaild'\\]"):
        step(state, dict(batch, vaild=batch["valid"]), jax.random.key(0))
    with pytest.raises(ValueError, match="'q_ids'.*split over 8 devices"):
        step(state, make_batch(3, b=12), jax.random.key(0))
    with pytest.raises(ValueError, match="missing fields \\['p_mask'\\]"):
        step(state, {k: v for k, v in batch.items() if k != "p_mask"}, jax.random.key(0))
    with pytest.raises(ValueError, match="group_size"):
        LossConfig(group_size=0)


def test_parallel_helpers_single_process():
    mesh = make_mesh()
    assert mesh.axis_names == ("data",) and mesh.size == 8
    assert process_slice(32, mesh) == (0, 32)
    assert process_slice(32) == (0, 32)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        process_slice(12, mesh)
    batch = make_batch(4)
    glob = global_batch_from_local(batch, mesh)
    dev3 = mesh.devices[3]

    def on_dev3(x):
        return np.asarray(next(s.data for s in x.addressable_shards if s.device == dev3))

    for k, v in batch.items():
        assert glob[k].sharding == batch_sharding(mesh)
        assert on_dev3(glob[k]).shape[0] == v.shape[0] // 8
        np.testing.assert_array_equal(np.asarray(glob[k]), v)
    # Device 3 holds questions 6, 7 and exactly their passage groups 18..23.
    np.testing.assert_array_equal(on_dev3(glob["q_ids"]), batch["q_ids"][6:8])
    np.testing.assert_array_equal(on_dev3(glob["p_ids"]), batch["p_ids"][18:24])
    assert replicated(mesh).is_fully_replicated
