"""DPR's optimizer for both trainers: AdamW with linear warmup then linear decay
(``dpr/utils/model_utils.py: get_schedule_linear``), global-norm clipping, no weight decay on
biases and LayerNorm (DPR's ``no_decay``)."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import optax
from flax.traverse_util import flatten_dict, unflatten_dict

# The config fields the optimizer reads (both TrainConfig and ReaderTrainConfig have them).
OPTIMIZER_FIELDS = ("learning_rate", "weight_decay", "adam_b1", "adam_b2", "adam_eps",
                    "max_grad_norm")  # fmt: skip


def dpr_schedule(learning_rate: float, warmup_steps: int, total_steps: int):
    """DPR's ``get_schedule_linear``: lr * step/warmup, then lr * (total-step)/(total-warmup)."""

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(1, warmup_steps)
        decay = jnp.maximum(1e-7, (total_steps - count) / max(1, total_steps - warmup_steps))
        return learning_rate * jnp.where(count < warmup_steps, warm, decay)

    return schedule


def _decay_mask(params):
    """Weight decay on kernels and embeddings; not on biases and LayerNorm (DPR's no_decay)."""
    flat = flatten_dict(params)
    return unflatten_dict({k: k[-1] in ("kernel", "embedding") for k in flat})


def make_optimizer(config: Any, total_steps: int, warmup_steps: int):
    """``(optax transformation, schedule)`` from a config's :data:`OPTIMIZER_FIELDS`."""
    schedule = dpr_schedule(config.learning_rate, warmup_steps, total_steps)
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def optimizer_key(config: Any) -> tuple:
    """What identifies the optimizer's program (a key for :func:`dpr_jax.cache.memo`)."""
    return tuple(getattr(config, f) for f in OPTIMIZER_FIELDS)
