"""The train step in bfloat16 compute (``TrainConfig.dtype = "bfloat16"``; parameters and optimizer
state stay float32): 8 devices give the 1-device step, and the loss stays close to float32's.

bfloat16 keeps 8 bits of mantissa (relative rounding 2**-9 = 0.2%), and the matmuls of a device's
slice of the batch need not round like those of the whole batch, so the two device counts agree to
bf16 rounding, not to float32's 1e-5 (test_train_step.py). Measured on this tiny model (3 AdamW
steps at lr 3e-3, dropout 0.1, matmul precision "highest"; CPU):

- loss, 8 vs 1 device: relative difference <= 9.1e-6 (bound 1e-3);
- last step's gradient, 8 vs 1: |g8 - g1| <= 0.0061 of the global gradient norm for every tensor
  (bound 0.03); relative to the tensor's own norm <= 0.040 for tensors whose gradient is at least
  1e-3 of the global norm (bound 0.1). The others are 0 in exact arithmetic (key biases, the
  passage projection bias: the softmax ignores a shift shared by all scores) or nearly so, and
  their relative difference is rounding noise (up to 1.5);
- parameters, 8 vs 1: |p8 - p1| <= 0.093 of how far the tensor moved (|p1 - p0|) for the tensors
  whose gradient counts (bound PARAM_RTOL_MOVED = 0.25); on the others Adam's division by
  sqrt(v) turns the rounding noise into steps of up to lr (measured up to 1.2 x the summed step
  sizes, elementwise; bound 2 x);
- bfloat16 vs float32 loss, same parameters and batches: relative difference <= 9.8e-5 over the
  3 steps (bound 2e-3; the loss is ~3.8).

A wrong batch row, label offset or missing gradient would change the loss by whole units and the
gradients by their own size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from test_train_step import FAST_COMPILE, LOSS, TX, _init_params, make_batch, tiny_model

from dpr_jax.parallel import make_mesh
from dpr_jax.retriever.model import BiEncoder
from dpr_jax.retriever.step import TrainState, make_train_step

STEPS = 3
LR = 3e-3  # test_train_step.TX's AdamW learning rate
LOSS_RTOL_DEVICES = 1e-3
GRAD_ATOL_GLOBAL = 0.03  # |g8 - g1| per tensor, as a fraction of the global gradient norm
GRAD_RTOL_TENSOR = 0.1  # |g8 - g1| / |g1| for tensors with |g1| >= 1e-3 of the global norm
PARAM_RTOL_MOVED = 0.25  # |p8 - p1| / |p1 - p0| per tensor
LOSS_RTOL_F32 = 2e-3


def bf16_model(dropout: float = 0.1) -> BiEncoder:
    f32 = tiny_model(False, dropout)
    return BiEncoder(f32.config, dtype=jnp.bfloat16)


@functools.cache
def step_for(n_devices: int, dtype: str):
    model = bf16_model() if dtype == "bfloat16" else tiny_model(False, 0.1)
    step = make_train_step(model, TX, make_mesh(jax.devices()[:n_devices]), LOSS)
    state = fresh(model)
    return step.lower(state, make_batch(0), jax.random.key(0)).compile(
        compiler_options=FAST_COMPILE
    )


def fresh(model: BiEncoder) -> TrainState:
    return TrainState.create(jax.tree.map(jnp.array, _init_params(model.config, 0)), TX)


@functools.cache
def run(n_devices: int, dtype: str, steps: int = STEPS):
    """(final state, per-step metrics) of ``steps`` steps on batches 0, 1, ..."""
    step = step_for(n_devices, dtype)
    state = fresh(tiny_model(False, 0.1))
    history = []
    for i in range(steps):
        state, metrics = step(state, make_batch(i), jax.random.key(7))
        history.append(jax.device_get(metrics))
    return jax.device_get(state), history


def _norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64)))


def test_bf16_8_devices_equal_1_device():
    (s8, h8), (s1, h1) = run(8, "bfloat16"), run(1, "bfloat16")
    assert int(s8.step) == int(s1.step) == STEPS
    for m8, m1 in zip(h8, h1):
        np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=LOSS_RTOL_DEVICES)
        assert float(m8["questions"]) == float(m1["questions"]) == 15
    # the last step's gradients (recorded by test_train_step.TX), tensor by tensor
    names = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_flatten_with_path(s1.params)[0]]
    g8, g1 = jax.tree.leaves(s8.opt_state[0]), jax.tree.leaves(s1.opt_state[0])
    g_norm = _norm(np.concatenate([g.ravel() for g in g1]))
    assert g_norm > 0.1
    checked = 0
    for name, a, b in zip(names, g8, g1):
        diff = _norm(a - b)
        assert diff <= GRAD_ATOL_GLOBAL * g_norm, (name, diff / g_norm)
        if _norm(b) >= 1e-3 * g_norm:
            assert diff <= GRAD_RTOL_TENSOR * _norm(b), (name, diff / _norm(b))
            checked += 1
    assert checked >= len(names) // 2
    p8, p1 = jax.tree.leaves(s8.params), jax.tree.leaves(s1.params)
    p0 = jax.tree.leaves(_init_params(tiny_model(False, 0.1).config, 0))
    for name, a, b, c, g in zip(names, p8, p1, p0, g1):
        moved = _norm(b - c)
        assert moved > 0, name  # every tensor took steps
        if _norm(g) >= 1e-3 * g_norm:
            assert _norm(a - b) <= PARAM_RTOL_MOVED * moved, (name, _norm(a - b) / moved)
        else:  # Adam's steps on rounding noise: bounded by the step sizes only
            np.testing.assert_allclose(a, b, rtol=0, atol=2 * STEPS * LR, err_msg=name)


def test_bf16_loss_close_to_float32():
    """The same parameters and batches: bfloat16's loss within LOSS_RTOL_F32 of float32's, for
    the first step (identical parameters) and the next ones (parameters that drifted by bf16's
    gradients)."""
    (_, h16), (_, h32) = run(8, "bfloat16"), run(8, "float32")
    for m16, m32 in zip(h16, h32):
        np.testing.assert_allclose(m16["loss"], m32["loss"], rtol=LOSS_RTOL_F32)
        assert float(m32["loss"]) > 1.0  # about log(B * G) for random towers: not trivial
