"""Finiteness guards for training: a diverged or damaged state never passes for a good one.

A NaN or infinite value anywhere in the parameters spreads to every score the model computes,
and comparisons with NaN are all false: a rank counted as "scores strictly above the positive"
is then 0 for every question, which reads as perfect accuracy. The training loops
(:mod:`dpr_jax.training.loop`, for both models) therefore

- stop with :class:`DivergenceError`, naming the step, as soon as a step's loss or gradient
  norm is not finite (:func:`check_step_metrics`);
- refuse to checkpoint or export a state with a non-finite value (:func:`nonfinite_leaves`), so
  checkpoint rotation only ever replaces finite checkpoints with finite ones;
- refuse to resume from a checkpoint whose restored state is not finite (flipped bytes that
  still decode), naming the checkpoint;
- report ranks and accuracies of non-finite scores as NaN (:func:`rank_of_positive`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpr_jax.errors import UserError


class DivergenceError(UserError):
    """Training produced a non-finite loss, gradient norm, parameter or validation score."""


def _key(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


@jax.jit
def _leaf_flags(leaves: list) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_leaves(tree: Any) -> list[str]:
    """Paths ("params/ctx_encoder/.../kernel") of the floating-point leaves of ``tree`` that hold
    a NaN or an infinity; [] when all are finite. Works on host numpy trees and on (replicated,
    possibly multi-process) jax arrays; one small jitted reduction, no host copy of the tree."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    items = [(_key(p), x) for p, x in flat if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    if not items:
        return []
    flags = _leaf_flags([x for _, x in items])
    if isinstance(flags, jax.Array) and not flags.is_fully_addressable:
        flags = flags.addressable_data(0)
    return [k for (k, _), ok in zip(items, np.asarray(flags)) if not ok]


Hint = str | Callable[[], str]


def _text(hint: Hint) -> str:
    return hint() if callable(hint) else hint


def check_finite_state(tree: Any, step: int, what: str, hint: Hint = "") -> None:
    """Raise :class:`DivergenceError` if ``tree`` (a train state or parameters) has a non-finite
    value: ``"step 7: the parameters are not finite (NaN/inf in params/...)"``. ``hint``: text
    appended to the message (or a function giving it, called only on failure)."""
    bad = nonfinite_leaves(tree)
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise DivergenceError(
            f"step {step}: {what} not finite (NaN/inf in {bad[0]}{more}){_text(hint)}"
        )


def check_step_metrics(
    records: Iterable[tuple[int, Mapping[str, Any]]],
    keys: tuple[str, ...] = ("loss", "grad_norm"),
    hint: Hint = "",
) -> None:
    """Raise :class:`DivergenceError` naming the first step whose metric in ``keys`` is not
    finite. ``records``: ``(step, host metrics)`` pairs in step order; ``hint`` as in
    :func:`check_finite_state`."""
    for step, m in records:
        for k in keys:
            if k in m and not np.isfinite(float(m[k])):
                others = ", ".join(f"{o} {float(m[o]):.4g}" for o in keys if o in m and o != k)
                raise DivergenceError(
                    f"step {step}: the training {k} is {float(m[k])}"
                    f"{f' ({others})' if others else ''}: training diverged{_text(hint)}"
                )


def divergence_hint(last_checkpoint: str | None, learning_rate: float) -> str:
    """What to do after a divergence, for :class:`DivergenceError` messages."""
    where = (
        f"the last finite checkpoint is {last_checkpoint}"
        if last_checkpoint
        else "no checkpoint was written"
    )
    return (
        f"; nothing non-finite was saved and no model was exported ({where}). Lower "
        f"learning_rate (now {learning_rate:g}) or check the data, then run again (a resumed "
        "run starts from the last finite checkpoint)"
    )


def rank_of_positive(scores: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Rank (0 = top) of each row's positive column: the number of strictly higher scores.

    NaN for a row whose scores are not all finite: a NaN compares false with everything, so the
    plain count would give rank 0 (a "perfect" hit) to a broken model.
    scores (Q, N) float, pos (Q,) int -> (Q,) float64.
    """
    scores = np.asarray(scores)
    gold = scores[np.arange(len(pos)), pos]
    rank = (scores > gold[:, None]).sum(1).astype(np.float64)
    return np.where(np.isfinite(scores).all(1), rank, np.nan)
