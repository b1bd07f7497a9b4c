"""DPR's training loss: negative log-likelihood of the positive passage (Karpukhin et al. 2020, 3.2).

Each question q_i comes with a group of G = 1 + n passages: its positive p_i^+ and n hard
negatives. With in-batch negatives every passage of the batch is a candidate for every question
(sec. 3.2, "In-batch negatives"), and the loss is

    L = mean_i  -log softmax_j( scale * q_i . p_j )[pos(i)]

Batch layout used everywhere in dpr-jax (the data pipeline produces it, the train step consumes
it): B questions, B*G passages, question i's positive is passage ``i*G`` and its hard negatives
are passages ``i*G+1 .. i*G+G-1``. Sharded along the leading axis, every device holds whole
question groups.

Two entry points compute the same number:

* :func:`dpr_loss` - the single-device reference on the global batch;
* :func:`sharded_dpr_loss` - the per-device form for ``jax.shard_map``. It ``all_gather`` s the
  passages of every device (tiled), scores the local questions against all of them, and offsets
  the labels by ``axis_index * P_local`` (as in tevatron's ``tevax/loss.py``). ``all_gather`` is
  differentiable, so gradients reach the passages of every device (unlike DPR's PyTorch code,
  which detaches remote vectors); ``tests/test_losses.py`` proves loss and gradients equal the
  reference.

Masking: an optional per-question weight ``valid`` (B,) (0 for padding questions; ``valid > 0``
also makes the question's passages candidates) and an optional per-passage ``p_valid`` (B*G,)
(0 for padding passages, e.g. a question with fewer hard negatives) remove candidates by setting
their score to a large negative number; a padded batch then gives exactly the loss of the
unpadded one. The loss is sum_i valid_i * nll_i / sum_i valid_i, in float32.

Metrics (all averaged with the ``valid`` weights): ``loss``; ``accuracy`` (the positive has the
top score; ties broken towards the lower passage index, like ``argmax``); ``rank`` (number of
candidates ranked above the positive under that order, 0 = top); ``candidates`` (candidates per
question); ``questions`` (sum of weights).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from dpr_jax.errors import UserError

Array = jax.Array

# Score given to masked-out candidates: finite (a fully masked row stays finite, so a padding
# question with weight 0 contributes 0, not NaN) and far below any real scaled score.
MASKED_SCORE = -1e9

METRIC_NAMES = ("loss", "accuracy", "rank", "candidates", "questions")


def _check_shapes(q: Array, p: Array, group_size: int, where: str) -> None:
    if group_size < 1:
        raise UserError(f"{where}: group_size must be >= 1, got {group_size}")
    if q.ndim != 2 or p.ndim != 2 or q.shape[1] != p.shape[1]:
        raise UserError(
            f"{where}: expected q (B, D) and p (B*G, D), got q {q.shape} and p {p.shape}"
        )
    if p.shape[0] != q.shape[0] * group_size:
        raise UserError(
            f"{where}: p has {p.shape[0]} rows, expected B*G = {q.shape[0]}*{group_size} "
            f"(question i's positive is passage i*G, its hard negatives i*G+1..i*G+G-1)"
        )


def _weights(valid: Array | None, p_valid: Array | None, b: int, group_size: int):
    """Question weights (B,) float32 and passage candidacy (B*G,) bool."""
    w = jnp.ones((b,), jnp.float32) if valid is None else jnp.asarray(valid, jnp.float32)
    if w.shape != (b,):
        raise UserError(f"valid must have shape ({b},), got {w.shape}")
    cand = jnp.repeat(w > 0, group_size)  # (B*G,)
    if p_valid is not None:
        p_valid = jnp.asarray(p_valid)
        if p_valid.shape != (b * group_size,):
            raise UserError(f"p_valid must have shape ({b * group_size},), got {p_valid.shape}")
        cand = cand & (p_valid > 0)
    return w, cand


def nll(scores: Array, labels: Array) -> Array:
    """DPR's loss: -log softmax(scores)[label] per question. scores (b, N) float32, masked
    candidates already at :data:`MASKED_SCORE`; labels (b,) -> (b,)."""
    pos = jnp.take_along_axis(scores, labels[:, None], axis=1)[:, 0]  # (b,)
    return jax.nn.logsumexp(scores, axis=1) - pos


# The losses a run can train with (``TrainConfig.loss``). Each maps the (b, N) scores of the
# local questions against every candidate (masked ones at MASKED_SCORE) and the (b,) column of
# each question's positive to a (b,) per-question loss; the reference and the sharded forms
# below weight, sum and average it the same way, so a new loss is one function and one entry.
LOSSES: dict[str, Callable[[Array, Array], Array]] = {"nll": nll}


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """How questions are scored: G = 1 + hard negatives, score scale, in-batch negatives on/off,
    and which loss of :data:`LOSSES`."""

    group_size: int
    scale: float = 1.0
    in_batch: bool = True
    name: str = "nll"

    def __post_init__(self):
        if self.group_size < 1:
            raise UserError(f"LossConfig.group_size must be >= 1, got {self.group_size}")
        if not self.scale > 0:
            raise UserError(f"LossConfig.scale must be > 0, got {self.scale}")
        if self.name not in LOSSES:
            raise UserError(f"LossConfig.name must be one of {tuple(LOSSES)}, got {self.name!r}")

    @classmethod
    def coerce(cls, cfg: LossConfig | Mapping[str, Any] | Any) -> LossConfig:
        """Accepts a LossConfig, a mapping, or any object with the fields as attributes."""
        if isinstance(cfg, cls):
            return cfg
        names = [f.name for f in dataclasses.fields(cls)]
        if isinstance(cfg, Mapping):
            unknown = set(cfg) - set(names)
            if unknown:
                raise UserError(f"unknown loss config fields {sorted(unknown)} (have {names})")
            return cls(**cfg)
        return cls(**{n: getattr(cfg, n) for n in names if hasattr(cfg, n)})


def _loss_and_stats(scores: Array, labels: Array, cand: Array, w: Array, loss: str = "nll"):
    """Per-question weighted sums of the loss, accuracy, rank and candidate count.

    scores (b, N) float32, labels (b,) int, cand (b, N) bool, w (b,) float32.
    Returns a dict of scalar sums (to be divided by the weight sum, possibly after a psum).
    """
    scores = jnp.where(cand, scores, MASKED_SCORE)
    per_question = LOSSES[loss](scores, labels)  # (b,)
    pos = jnp.take_along_axis(scores, labels[:, None], axis=1)  # (b, 1)
    # Rank under a stable descending sort: strictly higher scores, plus ties at lower indices.
    s = jax.lax.stop_gradient(scores)
    ps = jax.lax.stop_gradient(pos)
    col = jnp.arange(scores.shape[1])[None, :]
    above = cand & ((s > ps) | ((s == ps) & (col < labels[:, None])))
    rank = above.sum(1).astype(jnp.float32)
    ncand = cand.sum(1).astype(jnp.float32)
    return {
        "loss": jnp.sum(w * per_question),
        "accuracy": jnp.sum(w * (rank == 0)),
        "rank": jnp.sum(w * rank),
        "candidates": jnp.sum(w * ncand),
        "questions": jnp.sum(w),
    }


def _finish(sums: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
    denom = jnp.maximum(sums["questions"], 1e-12)
    metrics = {k: (v if k == "questions" else v / denom) for k, v in sums.items()}
    return metrics["loss"], metrics


def _group_mask(b: int, group_size: int, n_cand: int, first_label: Array) -> Array:
    """(b, n_cand) True on each question's own group: columns label_i .. label_i + G - 1."""
    labels = first_label + jnp.arange(b) * group_size  # (b,)
    col = jnp.arange(n_cand)[None, :]
    return (col >= labels[:, None]) & (col < labels[:, None] + group_size)


def dpr_loss(
    q: Array,
    p: Array,
    group_size: int,
    scale: float = 1.0,
    in_batch: bool = True,
    valid: Array | None = None,
    p_valid: Array | None = None,
    loss: str = "nll",
) -> tuple[Array, dict[str, Array]]:
    """DPR's NLL loss (or another of :data:`LOSSES`) on a whole (global) batch, on one device: the reference.

    Args:
      q: (B, D) question vectors.
      p: (B*G, D) passage vectors; question i's positive is row i*G, hard negatives follow.
      group_size: G = 1 + number of hard negatives per question.
      scale: multiplies the dot products (1 / temperature); DPR uses 1.
      in_batch: if False, each question sees only its own group (positive + hard negatives).
      valid: optional (B,) question weights; 0 marks padding (its passages stop being candidates).
      p_valid: optional (B*G,) passage mask; 0 removes a passage from every question's candidates.

    Returns:
      (loss, metrics): float32 scalar loss and the dict described in the module docstring.
    """
    _check_shapes(q, p, group_size, "dpr_loss")
    b = q.shape[0]
    q = q.astype(jnp.float32)
    p = p.astype(jnp.float32)
    scores = scale * jnp.einsum("bd,nd->bn", q, p)  # (B, D) . (D, B*G) -> (B, B*G)
    labels = jnp.arange(b) * group_size  # (B,)
    w, cand = _weights(valid, p_valid, b, group_size)
    cand = jnp.broadcast_to(cand[None, :], scores.shape)  # (B, B*G)
    if not in_batch:
        cand = cand & _group_mask(b, group_size, scores.shape[1], 0)
    return _finish(_loss_and_stats(scores, labels, cand, w, loss))


def sharded_dpr_loss(
    q_local: Array,
    p_local: Array,
    group_size: int,
    axis_name: str = "data",
    scale: float = 1.0,
    in_batch: bool = True,
    *,
    valid: Array | None = None,
    p_valid: Array | None = None,
    loss: str = "nll",
) -> tuple[Array, dict[str, Array]]:
    """DPR's NLL loss (or another of :data:`LOSSES`) for use inside ``jax.shard_map`` over ``axis_name``: every device's
    questions are scored against the passages of every device.

    Args are the per-device shards of :func:`dpr_loss`'s: ``q_local`` (B_l, D), ``p_local``
    (B_l*G, D), ``valid`` (B_l,), ``p_valid`` (B_l*G,), with device d holding global questions
    d*B_l .. (d+1)*B_l - 1 and their passage groups.

    Returns (loss, metrics) equal on every device (invariant over ``axis_name``): the mean over
    all questions of all devices (a psum of weighted sums over a psum of weights), so
    ``jax.grad`` of it inside ``shard_map`` is the gradient of the global mean.
    """
    _check_shapes(q_local, p_local, group_size, "sharded_dpr_loss")
    b = q_local.shape[0]
    n_local = p_local.shape[0]
    q_local = q_local.astype(jnp.float32)
    p_local = p_local.astype(jnp.float32)
    w, cand_local = _weights(valid, p_valid, b, group_size)
    if in_batch:
        # Differentiable: its transpose (psum_scatter) returns every device's score gradients to
        # the device that owns the passage.
        p_all = jax.lax.all_gather(p_local, axis_name, tiled=True)  # (B*G, D), device-major
        cand_all = jax.lax.all_gather(cand_local, axis_name, tiled=True)  # (B*G,)
        offset = jax.lax.axis_index(axis_name) * n_local  # this device's first passage
    else:  # own groups only: they are all local, no gather needed
        p_all, cand_all, offset = p_local, cand_local, 0
    scores = scale * jnp.einsum("bd,nd->bn", q_local, p_all)  # (B_l, D) . (D, N) -> (B_l, N)
    labels = offset + jnp.arange(b) * group_size  # (B_l,)
    cand = jnp.broadcast_to(cand_all[None, :], scores.shape)
    if not in_batch:
        cand = cand & _group_mask(b, group_size, scores.shape[1], offset)
    sums = _loss_and_stats(scores, labels, cand, w, loss)
    sums = jax.lax.psum(sums, axis_name)
    return _finish(sums)
