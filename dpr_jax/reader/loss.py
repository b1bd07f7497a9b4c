"""DPR's reader loss (Karpukhin et al. 2020, sec. 6.1; DPR's ``dpr/models/reader.py:
compute_loss`` and ``_calc_mml``).

The loss of a question (its positive passage at index 0 of its M passages):

- passage selection: cross-entropy of the relevance logits over the M passages, label 0;
- span: the marginal log-likelihood of *all* gold spans (s_k, e_k) of the positive passage,
  ``-log sum_k P_start(s_k) * P_end(e_k)``, with P_start / P_end the softmax of the start / end
  logits over the positive's tokens. (DPR's ``_calc_mml`` over ``loss_k = CE_start(s_k) +
  CE_end(e_k)``: ``exp(-loss_k) = P_start(s_k) P_end(e_k)``, a joint marginal over spans.)

Differences from DPR, all deliberate: the loss is the *mean* over questions (DPR sums over the
batch, which ties the step size to the batch size); padding tokens are masked out of the
start/end softmax (DPR keeps them, where they only absorb probability) and padding passage
slots out of the selection softmax; gold spans are masked explicitly (DPR recognises them by a
loss of exactly 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_NEG = -1e9  # logit of masked positions / passages


def reader_loss(
    start_logits: jax.Array,  # (N, M, T)
    end_logits: jax.Array,  # (N, M, T)
    relevance_logits: jax.Array,  # (N, M)
    batch: dict[str, jax.Array],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPR's reader loss (see the module docstring), mean over ``question_mask``ed questions.

    ``batch``: attention_mask (N, M, T), passage_mask (N, M), start_positions / end_positions /
    answer_mask (N, A), question_mask (N,); the positive passage is index 0.
    """
    f32 = jnp.float32
    pm = batch["passage_mask"].astype(f32)
    qm = batch["question_mask"].astype(f32)
    am = batch["answer_mask"].astype(f32)
    rel = jnp.where(pm > 0, relevance_logits.astype(f32), _NEG)  # (N, M)
    select_loss = jax.nn.logsumexp(rel, axis=1) - rel[:, 0]  # (N,)

    tok = batch["attention_mask"][:, 0] > 0  # (N, T) real tokens of the positive
    logp_s = jax.nn.log_softmax(jnp.where(tok, start_logits[:, 0].astype(f32), _NEG), axis=-1)
    logp_e = jax.nn.log_softmax(jnp.where(tok, end_logits[:, 0].astype(f32), _NEG), axis=-1)
    ls = jnp.take_along_axis(logp_s, batch["start_positions"], axis=1)  # (N, A)
    le = jnp.take_along_axis(logp_e, batch["end_positions"], axis=1)  # (N, A)
    span_ll = jnp.where(am > 0, ls + le, _NEG)
    has_span = am.sum(axis=1) > 0
    span_loss = jnp.where(has_span, -jax.nn.logsumexp(span_ll, axis=1), 0.0)  # (N,)

    n = jnp.maximum(qm.sum(), 1.0)
    mean = lambda x: (x * qm).sum() / n
    hit = lambda logp, pos: ((jnp.argmax(logp, -1)[:, None] == pos) & (am > 0)).any(axis=1)
    metrics = {
        "select_loss": mean(select_loss),
        "span_loss": mean(span_loss),
        "select_acc": mean((jnp.argmax(rel, axis=1) == 0).astype(f32)),
        "start_acc": mean(hit(logp_s, batch["start_positions"]).astype(f32)),
        "end_acc": mean(hit(logp_e, batch["end_positions"]).astype(f32)),
        "questions": qm.sum(),
    }
    loss = mean(select_loss + span_loss)
    metrics["loss"] = loss
    return loss, metrics
