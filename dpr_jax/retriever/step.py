"""DPR bi-encoder train and eval steps over a device mesh (Karpukhin et al. 2020, sec. 3.2, 5.1).

One step encodes the global batch's questions and passages, scores every question against every
passage of every device (:func:`dpr_jax.retriever.loss.sharded_dpr_loss`, inside ``jax.shard_map``: each
device scores its questions against the ``all_gather`` ed passages of all devices) and applies
the optimizer to the gradient of the mean NLL over the global batch. It is a pure function::

    train_step(state, batch, rng) -> (state, metrics)

jitted with explicit shardings: ``state`` replicated (and donated), ``batch`` split along its
leading axis over the mesh axis ``"data"``, ``rng`` replicated.

Batch layout (global; see :mod:`dpr_jax.retriever.loss`)::

    q_ids   (B, Tq) int32    q_mask (B, Tq)
    p_ids   (B*G, Tp) int32  p_mask (B*G, Tp)   # question i: positive i*G, hard negs i*G+1..
    valid   (B,) float32     optional question weight, 0 for padding questions
    p_valid (B*G,) float32   optional, 0 for padding passages

Dropout. Each example's masks depend on its index in the global batch: the dropout rng of a
tower is ``fold_in(fold_in(rng, step), 0 | 1)`` (0 questions, 1 passages) and every Dropout
layer hashes its key with the example's global row index
(:func:`dpr_jax.models.bert.dropout_keep_mask`). The masks depend neither on the number of
devices nor on gradient-cache chunking, so an 8-device step equals a 1-device step and a cached
step equals an uncached one with dropout on (the tests check both), while the encoder runs as
one batched computation.

Gradient caching (GradCache, Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup"), ``grad_cache_chunk=c``: (1) encode each tower in chunks of ``c``
sequences per device without building a backward pass; (2) compute the full cross-device loss
and its gradient with respect to the embeddings; (3) re-encode each chunk under ``jax.vjp`` with
the same dropout keys and accumulate parameter gradients from the cached embedding gradients
(``lax.scan``, so activation memory is that of one chunk). The loss keeps *every* negative of the
global batch: unlike micro-batch accumulation it does not shrink the in-batch negatives. It costs
one extra forward pass of both towers.

Precision: parameters and optimizer state stay float32 (master weights); the model's ``dtype``
sets the compute dtype of the encoders; encoder outputs, scores and the loss are float32.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpr_jax.errors import UserError
from dpr_jax.models.fsdp import FsdpGather, gather_dims
from dpr_jax.parallel import DATA_AXIS, batch_sharding, replicated
from dpr_jax.retriever.loss import LossConfig, sharded_dpr_loss
from dpr_jax.retriever.model import BiEncoder
from dpr_jax.training.state import TrainState

Array = jax.Array
Batch = Mapping[str, Array]

REQUIRED_FIELDS = ("q_ids", "q_mask", "p_ids", "p_mask")
OPTIONAL_FIELDS = ("valid", "p_valid")
_QUESTION_ROWS = ("q_ids", "q_mask", "valid")  # fields with B rows; the others have B*G


# ---------------------------------------------------------------------------------------------
# Encoders with per-example dropout masks


def _tower_names(model: BiEncoder) -> tuple[str, str]:
    """Parameter subtrees used by the question and passage towers."""
    q = "question_encoder"
    return q, (q if model.config.shared else "ctx_encoder")


def _has_dropout(model: BiEncoder) -> bool:
    b = model.config.bert
    return b.hidden_dropout_prob > 0 or b.attention_probs_dropout_prob > 0


def _make_encoder(model: BiEncoder, method: str, tower: str, key: Array | None) -> Callable:
    """``enc(tower_params, ids, mask, rows) -> (N, D) float32``; ``rows`` (N,) are the examples'
    indices in the global batch (their dropout masks depend on them and on ``key``; None: a
    model without dropout). ``key`` None: evaluation (deterministic). A training encoder is
    never deterministic, even without dropout: the model's inference forms (mixed bfloat16 on
    a CPU, looped attention) are not what it trains, nor what the planner compiles for TPUs."""

    def enc(tower_params, ids, mask, rows):
        variables = {"params": {tower: tower_params}}
        if key is None:
            return model.apply(variables, ids, mask, True, method=method)
        return model.apply(variables, ids, mask, False, rows, rngs={"dropout": key}, method=method)

    return enc


def _chunked(x: Array | None, chunk: int) -> Array | None:
    if x is None:
        return None
    return x.reshape((x.shape[0] // chunk, chunk) + x.shape[1:])


def _encode_chunks(enc, tower_params, chunk, ids, mask, rows) -> Array:
    """Forward only, ``chunk`` sequences at a time (no residuals kept for a backward pass)."""
    xs = (_chunked(ids, chunk), _chunked(mask, chunk), _chunked(rows, chunk))
    out = jax.lax.map(lambda a: enc(tower_params, *a), xs)  # (N/c, c, D)
    return out.reshape((ids.shape[0],) + out.shape[2:])


def _vjp_chunks(enc, tower_params, chunk, ids, mask, rows, emb_grad, acc, sharded=False):
    """acc + sum over chunks of (d emb_chunk / d params)^T emb_grad_chunk; one chunk in memory.
    ``sharded`` (FSDP): each chunk's gradient arrives reduce-scattered; an optimization barrier
    keeps XLA from sinking those reductions out of the loop (its all-reduce code motion would
    accumulate whole, unscattered gradients across chunks: the whole model's size again)."""

    def body(acc, a):
        i, m, k, g = a
        _, vjp = jax.vjp(lambda prm: enc(prm, i, m, k), tower_params)
        (grad,) = vjp(g)
        if sharded:
            grad = jax.lax.optimization_barrier(grad)
        return jax.tree.map(jnp.add, acc, grad), None

    xs = tuple(_chunked(x, chunk) for x in (ids, mask, rows, emb_grad))
    acc, _ = jax.lax.scan(body, acc, xs)
    return acc


# ---------------------------------------------------------------------------------------------
# Batch checks


def check_batch(batch: Batch, group_size: int, num_shards: int, chunk: int | None = None) -> None:
    """Raises ValueError naming the field if ``batch`` does not follow the DPR batch layout."""
    missing = [k for k in REQUIRED_FIELDS if k not in batch]
    if missing:
        raise UserError(f"batch is missing fields {missing} (needs {list(REQUIRED_FIELDS)})")
    unknown = sorted(set(batch) - set(REQUIRED_FIELDS) - set(OPTIONAL_FIELDS))
    if unknown:
        raise UserError(
            f"batch has unknown fields {unknown} (allowed: {list(REQUIRED_FIELDS + OPTIONAL_FIELDS)})"
        )
    b = batch["q_ids"].shape[0]
    for name, x in batch.items():
        rows = b if name in _QUESTION_ROWS else b * group_size
        want_ndim = 1 if name in OPTIONAL_FIELDS else 2
        if x.ndim != want_ndim or x.shape[0] != rows:
            what = "B" if name in _QUESTION_ROWS else f"B*G = {b}*{group_size}"
            raise UserError(
                f"batch field {name!r} has shape {tuple(x.shape)}, expected {want_ndim}-D with "
                f"{what} = {rows} rows"
            )
    for a, m in (("q_ids", "q_mask"), ("p_ids", "p_mask")):
        if batch[a].shape != batch[m].shape:
            raise UserError(
                f"batch fields {a!r} {tuple(batch[a].shape)} and {m!r} "
                f"{tuple(batch[m].shape)} differ in shape"
            )
    if b % num_shards:
        raise UserError(
            f"batch field 'q_ids': {b} questions do not split over {num_shards} devices"
        )
    if chunk is not None and (b // num_shards) % chunk:
        raise UserError(
            f"grad_cache_chunk {chunk} does not divide the {b // num_shards} questions per device "
            f"(batch field 'q_ids' has {b} rows over {num_shards} devices)"
        )


class CheckedStep:
    """A jitted step that checks the batch layout (shapes only, microseconds) before each call,
    so a malformed batch fails with a message naming the field rather than a sharding error.
    ``lower`` gives AOT lowering; ``jitted`` is the bare ``jax.jit`` function."""

    def __init__(self, jitted: Callable, check: Callable[[Batch], None]):
        self.jitted = jitted
        self._check = check

    def __call__(self, state_or_params, batch: Batch, *rest):
        self._check(batch)
        return self.jitted(state_or_params, batch, *rest)

    def lower(self, state_or_params, batch: Batch, *rest):
        self._check(batch)
        return self.jitted.lower(state_or_params, batch, *rest)


# ---------------------------------------------------------------------------------------------
# Per-device computation (inside shard_map)


def _loss_fn(cfg: LossConfig, axis: str, batch: Batch) -> Callable:
    return functools.partial(
        sharded_dpr_loss,
        group_size=cfg.group_size,
        axis_name=axis,
        scale=cfg.scale,
        in_batch=cfg.in_batch,
        loss=cfg.name,
        valid=batch.get("valid"),
        p_valid=batch.get("p_valid"),
    )


def _local_grads(model, cfg: LossConfig, axis: str, chunk: int | None, specs, params, batch, key):
    """Per device: gradient of the global loss w.r.t. the params, and metrics. ``specs``: the
    params' PartitionSpecs (FSDP: split leaves arrive as local shards, which the model gathers
    layer by layer; their gradients come out reduce-scattered, the transpose of the gather),
    or None (all replicated)."""
    q_tower, p_tower = _tower_names(model)
    enc_q = _make_encoder(model, "encode_question", q_tower, jax.random.fold_in(key, 0))
    enc_p = _make_encoder(model, "encode_passage", p_tower, jax.random.fold_in(key, 1))
    nq, np_ = batch["q_ids"].shape[0], batch["p_ids"].shape[0]
    if _has_dropout(model):  # global batch indices of this device's rows
        dev = jax.lax.axis_index(axis)
        q_rows = dev * nq + jnp.arange(nq, dtype=jnp.int32)
        p_rows = dev * np_ + jnp.arange(np_, dtype=jnp.int32)
    else:
        q_rows = p_rows = None
    loss_fn = _loss_fn(cfg, axis, batch)
    # Differentiate w.r.t. a device-varying copy of the whole params: the gradient is then this
    # device's contribution to d(global loss)/d(params), summed over devices by a psum at the end.
    # FSDP shards are device-varying already, and their gradients arrive summed (psum_scatter).
    whole = (
        jax.tree.map(lambda _: True, params)
        if specs is None
        else jax.tree.map(
            lambda s: all(a is None for a in s), specs, is_leaf=lambda x: isinstance(x, P)
        )
    )
    params = jax.tree.map(lambda x, w: jax.lax.pcast(x, axis, to="varying") if w else x,
                          params, whole)  # fmt: skip
    q_in = (batch["q_ids"], batch["q_mask"], q_rows)
    p_in = (batch["p_ids"], batch["p_mask"], p_rows)

    if chunk is None:

        def objective(prm):
            q = enc_q(prm[q_tower], *q_in)  # (B_l, D)
            p = enc_p(prm[p_tower], *p_in)  # (B_l*G, D)
            return loss_fn(q, p)

        (_, metrics), grads = jax.value_and_grad(objective, has_aux=True)(params)
    else:
        q = _encode_chunks(enc_q, params[q_tower], chunk, *q_in)  # (B_l, D), no backward state
        p = _encode_chunks(enc_p, params[p_tower], chunk, *p_in)  # (B_l*G, D)
        (_, metrics), (gq, gp) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(q, p)
        grads = jax.tree.map(jnp.zeros_like, params)
        fsdp = specs is not None
        grads[q_tower] = _vjp_chunks(enc_q, params[q_tower], chunk, *q_in, gq, grads[q_tower], fsdp)
        grads[p_tower] = _vjp_chunks(enc_p, params[p_tower], chunk, *p_in, gp, grads[p_tower], fsdp)
    grads = jax.tree.map(lambda g, w: jax.lax.psum(g, axis) if w else g, grads, whole)
    return grads, metrics


def _local_metrics(model, cfg: LossConfig, axis: str, params, batch):
    q_tower, p_tower = _tower_names(model)
    q = _make_encoder(model, "encode_question", q_tower, None)(
        params[q_tower], batch["q_ids"], batch["q_mask"], None
    )
    p = _make_encoder(model, "encode_passage", p_tower, None)(
        params[p_tower], batch["p_ids"], batch["p_mask"], None
    )
    return _loss_fn(cfg, axis, batch)(q, p)[1]


# ---------------------------------------------------------------------------------------------
# Public steps


def _param_specs(state_sharding: Any):
    """PartitionSpecs of the params of a TrainState of shardings, or None when nothing is split
    (replicated state: the plain data-parallel step)."""
    params = getattr(state_sharding, "params", None)
    if params is None:
        return None
    specs = jax.tree.map(lambda s: s.spec, params)
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    return specs if any(any(a is not None for a in s) for s in leaves) else None


def make_train_step(
    model: BiEncoder,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    loss_cfg: LossConfig | Mapping[str, Any],
    grad_cache_chunk: int | None = None,
    axis: str = DATA_AXIS,
    state_sharding: Any = None,
) -> CheckedStep:
    """Build the jitted ``train_step(state, batch, rng) -> (state, metrics)``.

    Args:
      model: the BiEncoder (its ``dtype`` is the compute dtype; dropout rates from its config).
      tx: optax optimizer; applied to the gradient of the global mean loss.
      mesh: device mesh with axis ``axis``; the batch is split over it, state replicated.
      loss_cfg: :class:`LossConfig` (or a mapping / object with its fields).
      grad_cache_chunk: if set, GradCache with this many sequences per encoder call per device;
        must divide the per-device question count. None: encode the whole local batch at once.
      axis: mesh axis name of the batch.
      state_sharding: where ``state`` lives, a pytree of shardings matching it (e.g.
        :func:`dpr_jax.parallel.state_shardings` with ``fsdp=True``); None: replicated. With
        split parameters (FSDP) the step itself is sharded: the encoders receive the local
        shards and gather one layer at a time (:mod:`dpr_jax.models.fsdp`), the gradients are
        reduce-scattered to the same placement, so no device holds the whole model or its
        whole gradient outside one layer. The loss and gradients do not depend on it.

    The returned step takes ``rng`` (a PRNG key, the same every step is fine: it is folded with
    ``state.step``) and returns metrics ``loss, accuracy, rank, candidates, questions,
    grad_norm`` (float32 scalars, replicated). ``state`` is donated.
    """
    cfg = LossConfig.coerce(loss_cfg)
    if grad_cache_chunk is not None and grad_cache_chunk < 1:
        raise UserError(f"grad_cache_chunk must be >= 1 or None, got {grad_cache_chunk}")
    n_shards = mesh.shape[axis]
    specs = _param_specs(state_sharding)
    if specs is not None:
        model = model.clone(fsdp=FsdpGather(axis, gather_dims(specs)))
    local = functools.partial(_local_grads, model, cfg, axis, grad_cache_chunk, specs)
    pspec = P() if specs is None else specs
    sharded = jax.shard_map(
        local, mesh=mesh, in_specs=(pspec, P(axis), P()), out_specs=(pspec, P())
    )

    def train_step(state: TrainState, batch: Batch, rng: Array):
        key = jax.random.fold_in(rng, state.step)
        grads, metrics = sharded(state.params, dict(batch), key)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads))
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    rep = replicated(mesh)
    state_sharding = rep if state_sharding is None else state_sharding
    jitted = jax.jit(
        train_step,
        in_shardings=(state_sharding, batch_sharding(mesh, axis), rep),
        out_shardings=(state_sharding, rep),
        donate_argnums=0,
    )
    return CheckedStep(jitted, functools.partial(
        check_batch, group_size=cfg.group_size, num_shards=n_shards, chunk=grad_cache_chunk
    ))  # fmt: skip


def make_eval_step(
    model: BiEncoder,
    mesh: Mesh,
    loss_cfg: LossConfig | Mapping[str, Any],
    axis: str = DATA_AXIS,
) -> CheckedStep:
    """Build the jitted ``eval_step(params, batch) -> metrics``: no dropout, no update.

    Metrics are those of the train step without ``grad_norm``; ``questions`` (the weight sum) lets
    callers average over batches: sum(metric * questions) / sum(questions).
    """
    cfg = LossConfig.coerce(loss_cfg)
    n_shards = mesh.shape[axis]
    local = functools.partial(_local_metrics, model, cfg, axis)
    sharded = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(axis)), out_specs=P())

    def eval_step(params, batch: Batch):
        return sharded(params, dict(batch))

    rep = replicated(mesh)
    jitted = jax.jit(eval_step, in_shardings=(rep, batch_sharding(mesh, axis)), out_shardings=rep)
    return CheckedStep(
        jitted, functools.partial(check_batch, group_size=cfg.group_size, num_shards=n_shards)
    )
