"""What a model *kind* is: the one object every layer asks about a model directory's ``kind``.

A :class:`ModelKind` knows its config's dict form, how to initialise its parameters (real or
abstract), which BERT it is built on and the BERT body a reader or a tower can start from. The
three kinds (``biencoder``, ``bert``, ``reader``) are defined beside their Flax modules and
registered in :mod:`dpr_jax.models.kinds`; model directories (:mod:`dpr_jax.model_dir`),
conversion, the planner and the trainers look a kind up there instead of switching on its name.
Training a kind is the business of its trainer (:mod:`dpr_jax.trainers`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax


def without_pooler(bert_params: dict) -> dict:
    """A BERT's parameters without its pooler (a reader or a [CLS] tower does not use it)."""
    return {k: v for k, v in bert_params.items() if not k.startswith("pooler")}


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """One kind of model directory.

    ``config_from_dict`` / ``config_to_dict``: the ``model`` field of ``dpr_jax_model.json``;
    ``init(config, rng)``: float32 parameters; ``bert_of(config)``: the BERT's config;
    ``bert_body(config, params)``: the parameters of the BERT a reader (or a tower) starts from,
    without the pooler, and which tower it was (``""`` for a single BERT)."""

    name: str
    config_from_dict: Callable[[dict[str, Any]], Any]
    config_to_dict: Callable[[Any], dict[str, Any]]
    init: Callable[[Any, jax.Array], dict]
    bert_of: Callable[[Any], Any]
    bert_body: Callable[[Any, dict], tuple[dict, str]]

    def abstract_params(self, config) -> dict:
        """The parameter shapes ``config`` implies (no FLOPs, no memory); traced once per
        config (``plan --fit`` builds dozens of steps over one model)."""
        return _abstract_params(self, config)

    def __repr__(self) -> str:
        return f"ModelKind({self.name!r})"


@functools.lru_cache(maxsize=64)
def _abstract_params(kind: ModelKind, config) -> dict:
    return jax.eval_shape(lambda: kind.init(config, jax.random.PRNGKey(0)))
