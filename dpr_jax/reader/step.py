"""The reader's train step: one ``jax.jit`` over a 1-D ``"data"`` mesh of all devices, the batch
of questions split over the devices, parameters and optimizer state replicated, and XLA
inserting the gradient all-reduce. Dropout keys are ``fold_in(rng, step)``."""

from __future__ import annotations

import jax
import optax

from dpr_jax.parallel import batch_sharding, replicated
from dpr_jax.reader.loss import reader_loss
from dpr_jax.training.state import TrainState

BATCH_FIELDS = ("input_ids", "attention_mask", "passage_mask", "start_positions",
                "end_positions", "answer_mask", "question_mask")  # fmt: skip


def make_train_step(model, tx, mesh):
    """Jitted ``(state, batch, rng) -> (state, metrics)``; batch split over ``mesh``'s "data"."""

    def loss_fn(params, batch, rng):
        out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          deterministic=False, rngs={"dropout": rng})  # fmt: skip
        return reader_loss(out.start_logits, out.end_logits, out.relevance_logits, batch)

    def step(state, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state), metrics

    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, {k: data for k in BATCH_FIELDS}, rep),
                   out_shardings=(rep, rep), donate_argnums=0)  # fmt: skip
