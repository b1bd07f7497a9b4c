"""DPR's NLL loss: hand-computed values, a numpy reference, and the 8-device sharded form.

The sharded test is the proof that every device's questions see (and send gradients to) the
passages of every device: loss, metrics and gradients w.r.t. q and p equal the single-device
reference on the same global batch, and a DPR-style loss that detaches remote passages fails the
same comparison.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from dpr_jax.parallel import make_mesh
from dpr_jax.retriever import loss as losses
from dpr_jax.retriever.loss import sharded_dpr_loss

RTOL = 1e-5
# One compilation per call signature (eager mode would compile every primitive separately).
dpr_loss = jax.jit(losses.dpr_loss, static_argnames=("group_size", "scale", "in_batch"))


def np_dpr_loss(q, p, g, scale=1.0, in_batch=True, valid=None):
    """Independent float64 loop: mean_i valid_i * (logsumexp_j s_ij - s_i,iG) / sum valid."""
    q, p = np.asarray(q, np.float64), np.asarray(p, np.float64)
    b = len(q)
    valid = np.ones(b) if valid is None else np.asarray(valid, np.float64)
    total = 0.0
    for i in range(b):
        if valid[i] == 0:
            continue
        cands = [j for j in range(b * g) if valid[j // g] > 0 and (in_batch or j // g == i)]
        s = np.array([scale * q[i] @ p[j] for j in cands])
        pos = scale * q[i] @ p[i * g]
        total += valid[i] * (np.log(np.exp(s - s.max()).sum()) + s.max() - pos)
    return total / valid.sum()


# q . p scores: question 0 -> [1, 0, 0, 0], question 1 -> [0, 0, 1, 0] (each positive scores 1).
Q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
PS = np.array([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0], [0.0, 0.0]], np.float32)


def test_hand_computed_in_batch():
    loss, m = dpr_loss(jnp.asarray(Q), jnp.asarray(PS), group_size=2)
    assert float(loss) == pytest.approx(math.log(math.e + 3) - 1, rel=RTOL)
    assert float(m["accuracy"]) == 1.0 and float(m["rank"]) == 0.0
    assert float(m["candidates"]) == 4.0 and float(m["questions"]) == 2.0


def test_hand_computed_own_group_only_and_scale():
    loss, m = dpr_loss(jnp.asarray(Q), jnp.asarray(PS), group_size=2, in_batch=False)
    assert float(loss) == pytest.approx(math.log(math.e + 1) - 1, rel=RTOL)
    assert float(m["candidates"]) == 2.0
    loss, _ = dpr_loss(jnp.asarray(Q), jnp.asarray(PS), group_size=2, scale=2.0)
    assert float(loss) == pytest.approx(math.log(math.e**2 + 3) - 2, rel=RTOL)


def test_rank_and_accuracy_hand_checked():
    # 1-D vectors make the scores q_i * p_j. G = 2, passages [pos0, neg0, pos1, neg1, pos2, neg2].
    q = jnp.array([[1.0], [1.0], [-1.0]])
    p = jnp.array([[3.0], [5.0], [3.0], [1.0], [2.0], [0.0]])
    # question 0: scores [3,5,3,1,2,0], positive 3 at index 0; above it: 5 (index 1) -> rank 1.
    # question 1: same scores, positive at index 2: 5 above, and the tie 3 at index 0 ranks
    #             first under argmax order -> rank 2.
    # question 2: scores [-3,-5,-3,-1,-2,0], positive -2 at index 4: -1 and 0 above -> rank 2.
    _, m = dpr_loss(q, p, group_size=2)
    assert float(m["rank"]) == pytest.approx((1 + 2 + 2) / 3)
    assert float(m["accuracy"]) == 0.0
    _, m = dpr_loss(q, p, group_size=2, in_batch=False)
    # own groups: q0 [3,5] rank 1; q1 [3,1] rank 0; q2 [-2,0] rank 1.
    assert float(m["rank"]) == pytest.approx(2 / 3)
    assert float(m["accuracy"]) == pytest.approx(1 / 3)
    assert float(m["candidates"]) == 2.0


@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("g", [1, 3])
def test_matches_numpy_reference(in_batch, g):
    rng = np.random.default_rng(0)
    q = rng.normal(size=(5, 7)).astype(np.float32)
    p = rng.normal(size=(5 * g, 7)).astype(np.float32)
    loss, _ = dpr_loss(jnp.asarray(q), jnp.asarray(p), g, scale=0.7, in_batch=in_batch)
    assert float(loss) == pytest.approx(np_dpr_loss(q, p, g, 0.7, in_batch), rel=RTOL)


def test_padding_equals_unpadded_batch():
    rng = np.random.default_rng(1)
    q = rng.normal(size=(6, 4)).astype(np.float32)
    p = rng.normal(size=(12, 4)).astype(np.float32)
    valid = np.array([1, 1, 1, 1, 0, 0], np.float32)
    loss, m = dpr_loss(jnp.asarray(q), jnp.asarray(p), 2, valid=jnp.asarray(valid))
    ref, mref = dpr_loss(jnp.asarray(q[:4]), jnp.asarray(p[:8]), 2)
    assert float(loss) == pytest.approx(float(ref), rel=RTOL)
    assert float(loss) == pytest.approx(np_dpr_loss(q, p, 2, valid=valid), rel=RTOL)
    assert float(m["candidates"]) == 8.0 and float(m["questions"]) == 4.0
    assert float(m["rank"]) == pytest.approx(float(mref["rank"]))
    # A padding passage (p_valid = 0) is nobody's candidate: same as dropping its column.
    p_valid = np.ones(12, np.float32)
    p_valid[3] = 0
    loss, m = dpr_loss(jnp.asarray(q), jnp.asarray(p), 2, p_valid=jnp.asarray(p_valid))
    s = q @ p.T
    s = np.delete(s, 3, axis=1)
    pos = [0, 2, 3, 5, 7, 9]  # positives 0,2,4,6,8,10 shift left after column 3
    ref = np.mean([np.log(np.exp(s[i]).sum()) - s[i, pos[i]] for i in range(6)])
    assert float(loss) == pytest.approx(ref, rel=RTOL)
    assert float(m["candidates"]) == 11.0


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="expected B\\*G"):
        dpr_loss(jnp.zeros((2, 3)), jnp.zeros((5, 3)), 2)
    with pytest.raises(ValueError, match="valid must have shape"):
        dpr_loss(jnp.zeros((2, 3)), jnp.zeros((4, 3)), 2, valid=jnp.ones(3))


# ------------------------------------------------------------------ sharded over 8 devices


def _detached_remote_loss(q, p, group_size, axis_name):
    """DPR's PyTorch behaviour: remote passages gathered without gradient (must NOT match)."""
    n = jax.lax.axis_size(axis_name)
    idx = jax.lax.axis_index(axis_name)
    p_all = jax.lax.all_gather(jax.lax.stop_gradient(p), axis_name)  # (n, P_l, D)
    p_all = jnp.where((jnp.arange(n) == idx)[:, None, None], p[None], p_all).reshape(-1, p.shape[1])
    s = q @ p_all.T
    labels = idx * p.shape[0] + jnp.arange(q.shape[0]) * group_size
    nll = jax.nn.logsumexp(s, 1) - jnp.take_along_axis(s, labels[:, None], 1)[:, 0]
    return jax.lax.psum(nll.sum(), axis_name) / (n * q.shape[0])


def _sharded(fn, mesh, n_in):
    return jax.jit(
        jax.shard_map(fn, mesh=mesh, in_specs=(P("data"),) * n_in, out_specs=P())
    )  # fmt: skip


@pytest.mark.parametrize("in_batch", [True, False])
def test_sharded_equals_reference_with_gradients(in_batch):
    mesh = make_mesh()
    assert mesh.size == 8
    g, b, d = 3, 16, 5  # 2 questions and 6 passages per device
    rng = np.random.default_rng(2)
    q = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    p = jnp.asarray(rng.normal(size=(b * g, d)), jnp.float32)
    valid = jnp.asarray((np.arange(b) != 5).astype(np.float32))  # one padding question

    kw = dict(group_size=g, scale=1.3, in_batch=in_batch)
    shard = _sharded(
        lambda q, p, v: sharded_dpr_loss(q, p, axis_name="data", valid=v, **kw), mesh, 3
    )
    ref = jax.jit(lambda q, p, v: losses.dpr_loss(q, p, valid=v, **kw))

    (loss, m), (loss_ref, m_ref) = shard(q, p, valid), ref(q, p, valid)
    assert float(loss) == pytest.approx(float(loss_ref), rel=RTOL)
    assert float(loss_ref) == pytest.approx(
        np_dpr_loss(q, p, g, 1.3, in_batch, np.asarray(valid)), rel=RTOL
    )
    for k in m_ref:
        assert float(m[k]) == pytest.approx(float(m_ref[k]), rel=RTOL), k

    grad = jax.jit(jax.grad(lambda q, p: shard(q, p, valid)[0], argnums=(0, 1)))
    grad_ref = jax.jit(jax.grad(lambda q, p: ref(q, p, valid)[0], argnums=(0, 1)))
    (gq, gp), (gq_ref, gp_ref) = grad(q, p), grad_ref(q, p)
    np.testing.assert_allclose(gq, gq_ref, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(gp, gp_ref, rtol=RTOL, atol=1e-7)
    assert np.abs(gp_ref).max() > 1e-3


def test_gradient_reaches_remote_passages():
    """Only device 0's questions are nonzero: every gradient on the passages of devices 1..7
    comes through the all_gather, and must equal the reference (nonzero) gradient."""
    mesh = make_mesh()
    g, b, d = 2, 8, 4  # 1 question per device
    rng = np.random.default_rng(3)
    q = np.zeros((b, d), np.float32)
    q[0] = 0.3 * rng.normal(size=d)  # small scores: every candidate keeps softmax mass
    p = jnp.asarray(rng.normal(size=(b * g, d)), jnp.float32)
    q = jnp.asarray(q)
    loss_fn = functools.partial(sharded_dpr_loss, group_size=g, axis_name="data")
    shard = _sharded(lambda q, p: loss_fn(q, p)[0], mesh, 2)
    gp = jax.jit(jax.grad(shard, argnums=1))(q, p)
    gp_ref = jax.jit(jax.grad(lambda q, p: dpr_loss(q, p, g)[0], argnums=1))(q, p)
    remote = np.asarray(gp[g:])  # passages held by devices 1..7
    assert np.all(np.abs(remote).sum(1) > 1e-3)
    np.testing.assert_allclose(gp, gp_ref, rtol=RTOL, atol=1e-7)

    # A loss that detaches remote passages has zero gradient there: the comparison catches it.
    detached = _sharded(lambda q, p: _detached_remote_loss(q, p, g, "data"), mesh, 2)
    assert float(detached(q, p)) == pytest.approx(float(shard(q, p)), rel=RTOL)
    gp_detached = jax.jit(jax.grad(detached, argnums=1))(q, p)
    assert np.abs(np.asarray(gp_detached[g:])).max() == 0.0
    assert not np.allclose(gp_detached, gp_ref, rtol=RTOL, atol=1e-7)


def test_a_new_loss_is_one_function_and_one_name(monkeypatch):
    """Registering a per-question loss in LOSSES is all a new loss takes: the reference, the
    8-device sharded form (and its gradients) and TrainConfig.loss pick it up. Here a hinge on
    the margin between the positive and the best other candidate, checked by hand in numpy."""
    from dpr_jax.retriever.task import TrainConfig

    def hinge(scores, labels):
        pos = jnp.take_along_axis(scores, labels[:, None], axis=1)[:, 0]
        others = scores.at[jnp.arange(scores.shape[0]), labels].set(losses.MASKED_SCORE)
        return jax.nn.relu(1.0 - pos + others.max(axis=1))

    monkeypatch.setitem(losses.LOSSES, "hinge", hinge)
    assert TrainConfig(init_from="x", loss="hinge").loss == "hinge"
    with pytest.raises(ValueError, match="TrainConfig.loss: must be one of"):
        TrainConfig(init_from="x", loss="nope")

    mesh = make_mesh()
    g, b, d = 2, 16, 4
    rng = np.random.default_rng(5)
    q = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    p = jnp.asarray(rng.normal(size=(b * g, d)), jnp.float32)
    s = np.asarray(q) @ np.asarray(p).T  # (B, B*G): in-batch, every passage a candidate
    pos = s[np.arange(b), np.arange(b) * g]
    s[np.arange(b), np.arange(b) * g] = -np.inf
    want = np.maximum(0.0, 1.0 - pos + s.max(1)).mean()

    kw = dict(group_size=g, loss="hinge")
    ref = jax.jit(lambda q, p: losses.dpr_loss(q, p, **kw)[0])
    shard = _sharded(lambda q, p: sharded_dpr_loss(q, p, axis_name="data", **kw)[0], mesh, 2)
    assert float(ref(q, p)) == pytest.approx(want, rel=RTOL)
    assert float(shard(q, p)) == pytest.approx(want, rel=RTOL)
    assert float(losses.dpr_loss(q, p, g)[0]) != pytest.approx(want, rel=1e-3)  # not the NLL
    gq, gp = jax.grad(lambda q, p: shard(q, p), argnums=(0, 1))(q, p)
    gq_ref, gp_ref = jax.grad(ref, argnums=(0, 1))(q, p)
    np.testing.assert_allclose(gq, gq_ref, rtol=RTOL, atol=1e-7)
    np.testing.assert_allclose(gp, gp_ref, rtol=RTOL, atol=1e-7)
