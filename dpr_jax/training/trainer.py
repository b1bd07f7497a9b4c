"""What a trainer is, for everything that runs or plans one: the one interface both model
kinds' trainers (the bi-encoder's :data:`dpr_jax.retriever.task.TRAINER`, the reader's
:data:`dpr_jax.reader.task.TRAINER`) fill in, registered in :mod:`dpr_jax.trainers`.

``dpr-jax train`` / ``train-reader`` run a trainer's ``task`` in the shared loop
(:mod:`dpr_jax.training.loop`); ``dpr-jax plan`` compiles the very step its ``build_step``
returns over abstract devices, with the batch shapes of ``batch_shapes``: no second copy of the
trainer exists anywhere.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dpr_jax.models.kind import ModelKind
from dpr_jax.parallel import make_mesh
from dpr_jax.training import config as training_config
from dpr_jax.training import loop


@dataclasses.dataclass(frozen=True)
class BuiltStep:
    """What a trainer builds for a config over a mesh (real or abstract devices): the
    learning-rate schedule, the state's abstract shapes and placement, a function placing real
    parameters into a fresh state, the jitted train step, and the trainer's loss settings."""

    schedule: Any
    abstract_state: Any  # TrainState of ShapeDtypeStructs
    placed: Any  # TrainState of shardings
    create: Any  # params -> placed TrainState
    step: Any  # (state, batch, rng) -> (state, metrics)
    loss_cfg: Any = None


@dataclasses.dataclass(frozen=True)
class Trainer:
    """One kind's trainer.

    - ``kind``: the model kind it trains and exports;
    - ``config_cls``: its config (a :class:`~dpr_jax.training.config.RunConfig`);
    - ``task(config)``: the loop's task (data, step, evaluation, export);
    - ``architecture(config, planning)``: ``(model config, note)`` without reading weights;
      ``planning``: a source missing here falls back to the config's ``model`` dict (the note
      says so);
    - ``build_step(config, model_cfg, mesh, total_steps, warmup_steps)``: a :class:`BuiltStep`;
    - ``batch_shapes(config)``: ``{field: (shape, dtype)}`` of one global batch;
    - ``towers(config, model_cfg)``: ``[(BertConfig, sequences, tokens)]`` a step runs;
    - ``model_flops(config, model_cfg)``: model FLOPs of one step over the global batch.
    """

    kind: ModelKind
    config_cls: type
    task: Callable[[Any], Any]
    architecture: Callable[[Any, bool], tuple[Any, str]]
    build_step: Callable[..., BuiltStep]
    batch_shapes: Callable[[Any], dict[str, tuple[tuple[int, ...], Any]]]
    towers: Callable[[Any, Any], list]
    model_flops: Callable[[Any, Any], float]

    def train_and_evaluate(self, config, workdir: str | Path) -> dict[str, float]:
        """Train (or resume) ``config`` in ``workdir`` on every device
        (:func:`dpr_jax.training.loop.train_and_evaluate`); returns the final dev metrics (or the
        last train metrics when there is no dev set), with ``step``."""
        return loop.train_and_evaluate(self.task(config), workdir, make_mesh())

    def load_config(self, path: str | Path, overrides: list[str] | None = None):
        """A config file of this trainer (``get_config()`` -> its config, or a dict of its
        fields) with ``key=value`` overrides applied."""
        return training_config.load_config(path, self.config_cls, overrides)
