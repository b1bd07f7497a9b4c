"""The registry of model kinds (:class:`dpr_jax.models.kind.ModelKind`): a model directory's
``kind`` field names one of these. A new kind is one module that defines its ``ModelKind``
beside its Flax module, plus one line here."""

from __future__ import annotations

from dpr_jax.errors import UserError
from dpr_jax.models.bert import BERT
from dpr_jax.models.kind import ModelKind
from dpr_jax.reader.model import READER
from dpr_jax.retriever.model import BIENCODER

KINDS: dict[str, ModelKind] = {k.name: k for k in (BIENCODER, BERT, READER)}


def model_kind(name: object, where: object = "model kind") -> ModelKind:
    """The registered kind called ``name``; a :class:`UserError` naming ``where`` otherwise."""
    if name not in KINDS:
        raise UserError(f"{where}: model kind must be one of {tuple(KINDS)}, got {name!r}")
    return KINDS[name]
