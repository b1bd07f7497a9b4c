"""The registry of trainers (:class:`dpr_jax.training.trainer.Trainer`), one per trainable model
kind. A new trainable kind is one task module that defines its ``TRAINER``, plus one entry here;
``dpr-jax plan`` and the config loader find it through :func:`trainer_for`."""

from __future__ import annotations

from pathlib import Path

from dpr_jax.errors import UserError
from dpr_jax.reader.task import TRAINER as READER_TRAINER
from dpr_jax.retriever.task import TRAINER as BIENCODER_TRAINER
from dpr_jax.training import config as training_config
from dpr_jax.training.trainer import Trainer

TRAINERS: dict[str, Trainer] = {t.kind.name: t for t in (BIENCODER_TRAINER, READER_TRAINER)}


def trainer_for(config) -> Trainer:
    """The trainer whose config class ``config`` is."""
    for trainer in TRAINERS.values():
        if isinstance(config, trainer.config_cls):
            return trainer
    raise UserError(f"{type(config).__name__} is no trainer's config (have {list(TRAINERS)})")


def load_any_config(path: str | Path, overrides: list[str] | None = None):
    """A config file of any trainer (``get_config()`` returns its config, or a dict, taken as the
    first trainer's whose fields it has), with ``key=value`` overrides applied."""
    classes = tuple(t.config_cls for t in TRAINERS.values())
    return training_config.load_config(path, classes, overrides)
