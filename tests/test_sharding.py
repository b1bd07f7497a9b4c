"""FSDP (sharded parameters and optimizer state) and remat policies change where and how the step
computes, not what: on 8 CPU devices, three FSDP steps end with the parameters of three
replicated steps (same global batches, dropout on), with and without GradCache, and a step under
a ``jax.checkpoint_policies`` policy equals the plain one. Tolerances: float32 with
``jax_default_matmul_precision=highest`` (tests/conftest.py); both sides run the same
per-device computation, only the placement of the state differs.
"""

import dataclasses
import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from multihost_worker import build_squad_biencoder
from test_train_step import GRAD_TOL, LOSS, TX, fresh_state, make_batch, tiny_model

from dpr_jax.model_dir import load_model
from dpr_jax.parallel import FSDP_MIN_SIZE, leaf_spec, make_mesh, state_shardings
from dpr_jax.retriever.step import make_train_step
from dpr_jax.retriever.task import load_config, train_and_evaluate
from dpr_jax.training.state import TrainState

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]
PARAM_TOL = dict(rtol=1e-5, atol=1e-6)


def test_leaf_spec_rule():
    assert leaf_spec((30522, 768), 8) == P(None, "data")  # 30522 is not divisible by 8
    assert leaf_spec((3072, 768), 8) == P("data")  # the largest divisible dimension
    assert leaf_spec((768, 768), 8) == P("data")  # ties: the first
    assert leaf_spec((768,), 8) == P()  # small: replicated
    assert leaf_spec((), 8) == P()
    assert leaf_spec((999, 333), 8, min_size=1) == P()  # nothing divisible
    assert leaf_spec((1024, 1024), 1) == P()  # one device
    assert leaf_spec((256, 256), 8) == P("data") and 256 * 256 >= FSDP_MIN_SIZE


def _run(fsdp: bool, chunk=None, remat=False, steps=3, min_size=1, tx=TX):
    model = tiny_model(False, 0.1)
    if remat:
        model = model.clone(remat=remat)
    mesh = make_mesh(jax.devices()[:8])
    state = fresh_state(model)
    if tx is not TX:
        state = TrainState.create(state.params, tx)
    placed = state_shardings(jax.eval_shape(lambda s: s, state), mesh, fsdp, min_size=min_size)
    step = make_train_step(model, tx, mesh, LOSS, chunk, state_sharding=placed)
    state = jax.device_put(state, placed)
    losses = []
    for i in range(steps):
        state, metrics = step(state, make_batch(30 + i), jax.random.key(7))
        losses.append(float(metrics["loss"]))
    return state, losses


def _assert_same(a, b, tol=PARAM_TOL):
    (sa, la), (sb, lb) = a, b
    assert int(sa.step) == int(sb.step)
    np.testing.assert_allclose(la, lb, rtol=1e-6)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol),
                 jax.device_get(sa.params), jax.device_get(sb.params))  # fmt: skip


@functools.cache
def _plain(chunk=None):
    return _run(False, chunk)


@pytest.mark.parametrize("chunk", [None, 1])
def test_fsdp_steps_equal_replicated_steps(chunk):
    """With GradCache the FSDP step reduce-scatters each chunk's gradient and sums the chunks,
    the plain step sums the chunks and then all-reduces: the same float32 terms in another order
    (gradients equal to ~2e-8, test_fsdp_gradient_equals_replicated), which AdamW's
    normalisation amplifies for near-zero gradients over three steps: the reordered-sum bound of
    test_remat_policy_equals_plain (1e-4) applies there; without chunks the tight one."""
    sharded = _run(True, chunk)
    state = sharded[0]
    # the state really is split: every kernel of this tiny model has a dimension divisible by 8
    kernel = state.params["ctx_encoder"]["bert_model"]["encoder_layer_0"]["intermediate_dense"]
    assert kernel["kernel"].sharding.spec in (P("data"), P(None, "data"))
    assert len(kernel["kernel"].addressable_shards[0].data.shape) == 2
    assert kernel["kernel"].addressable_shards[0].data.size == kernel["kernel"].size // 8
    mu = jax.tree.leaves(state.opt_state)  # AdamW moments are placed like the parameters
    assert sum(x.sharding.spec != P() for x in mu) > 0
    _assert_same(sharded, _plain(chunk), PARAM_TOL if chunk is None else dict(rtol=0, atol=1e-4))
    if chunk is None:  # AdamW's update ignores a gradient's scale: the last step's gradients too
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **GRAD_TOL),
                     jax.device_get(state.opt_state[0]), jax.device_get(_plain()[0].opt_state[0]))  # fmt: skip


def test_fsdp_gradient_equals_replicated():
    """One SGD step of learning rate 1: the parameter change is the gradient itself, which the
    sharded GradCache step (per-layer gathers, each chunk's gradient reduce-scattered) computes
    to float32 rounding: what lets test_fsdp_steps_equal_replicated_steps[1] hold three AdamW
    steps to a looser bound. (Without chunks that test compares the gradients themselves.)"""
    sgd = optax.sgd(1.0)
    (a, _), (b, _) = (_run(f, 1, steps=1, tx=sgd) for f in (False, True))
    start = fresh_state(tiny_model(False, 0.1)).params
    for x0, x, y in zip(*(jax.tree.leaves(jax.device_get(t)) for t in (start, a.params, b.params))):
        np.testing.assert_allclose(x0 - y, x0 - x, rtol=0, atol=1e-7)


def test_remat_policy_equals_plain():
    """Recomputation fuses the float32 ops differently: last-bit differences in the gradient,
    which AdamW's normalisation (eps 1e-6) amplifies for near-zero gradients: up to ~2e-5 after
    three steps of lr 3e-3 (updates of ~1e-2), within the bound test_train_step.py uses for
    reordered float32 sums (1e-4). A wrong dropout mask in the recomputation would move the
    parameters by ~1e-3."""
    tol = dict(rtol=0, atol=1e-4)
    _assert_same(_run(False, remat="dots_with_no_batch_dims_saveable"), _plain(), tol)
    _assert_same(_run(False, remat=True), _plain(), tol)


def test_remat_policy_must_exist():
    with pytest.raises(ValueError, match="remat_policy: must name a jax.checkpoint_policies"):
        load_config(REPO / "configs" / "tiny.py", ["remat=true", "remat_policy=no_such_policy"])


@pytest.mark.slow
def test_train_with_fsdp_resumes_and_equals_replicated(tmp_path, data_dir, minilm_dir):
    """``dpr-jax train`` with fsdp=True: stopped at step 2 and resumed from its (sharded)
    checkpoint, it exports the parameters of a replicated run of 4 steps.

    One leaf is held to a looser bound: the bias of the passage tower's last LayerNorm. Adding
    a constant vector to every passage vector shifts each question's scores by the same amount,
    which the softmax ignores, so its true gradient is exactly zero and what either run computes
    is float32 rounding noise (~1e-9), whose sign AdamW turns into full-size steps. The FSDP
    program differs from the plain one (per-module gathers), so the noise does too; the bound
    for that leaf is what AdamW can move a parameter in 4 steps (lr 3e-3 each)."""
    train, _, _, _ = build_squad_biencoder(
        data_dir / "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json", tmp_path
    )
    base = load_config(REPO / "configs" / "tiny.py", [
        f"train_path={train}", "dev_path=", "batch_size=16", "num_steps=4", "log_every=1",
        "checkpoint_every=2", "eval_at_start=false",
    ])  # fmt: skip
    train_and_evaluate(base, tmp_path / "plain")
    fsdp = dataclasses.replace(base, fsdp=True)
    stopped = train_and_evaluate(dataclasses.replace(fsdp, stop_at_step=2), tmp_path / "fsdp")
    assert stopped["step"] == 2
    train_and_evaluate(fsdp, tmp_path / "fsdp")
    a = jax.tree_util.tree_flatten_with_path(load_model(tmp_path / "plain")[2])[0]
    b = jax.tree.leaves(load_model(tmp_path / "fsdp")[2])
    assert len(a) == len(b)
    zero_grad = "['ctx_encoder']['bert_model']['encoder_layer_1']['output_LayerNorm']['bias']"
    assert zero_grad in [jax.tree_util.keystr(p) for p, _ in a]
    for (path, x), y in zip(a, b):
        if jax.tree_util.keystr(path) == zero_grad:
            np.testing.assert_allclose(x, y, rtol=0, atol=4 * 3e-3)
        else:
            np.testing.assert_allclose(x, y, **PARAM_TOL)
