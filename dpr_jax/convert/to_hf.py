"""dpr-jax model directories -> Hugging Face directories (``dpr-jax convert --to-hf``): DPR's
classes, plain BertModel, or sentence-transformers directories. What each model kind exports as
is one function per kind, :data:`TO_HF`."""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dpr_jax.convert.hf_dir import check_out, prepare_out, write_hf_dir
from dpr_jax.convert.tables import flax_to_hf_state_dict
from dpr_jax.errors import UserError
from dpr_jax.io import HF_EXPORT, staged_dir
from dpr_jax.model_dir import load_model, resolve_model_dir
from dpr_jax.models.bert import BERT, BertConfig
from dpr_jax.reader.model import READER
from dpr_jax.retriever.model import BIENCODER
from dpr_jax.st_format import DEFAULT_MAX_SEQ_LENGTH, write_st_modules

EXPORT_FORMATS = ("dpr", "bert", "sentence-transformers")  # convert --to-hf --as


# (relative dir, arch, bert config, projection_dim, HF state dict) of one exported directory
_Export = tuple[str, str, BertConfig, int, dict]


def _pooler_ok(model_dir: Path, has_pooler: bool, what: str, allow_missing: bool) -> bool:
    """Whether to export the BERT pooler; refuse a missing one unless ``allow_missing``."""
    if has_pooler:
        return True
    if not allow_missing:
        raise UserError(
            f"{model_dir}: {what} has no BERT pooler weights, and BertModel.from_pretrained "
            "always builds a pooler (it would be initialised randomly). Pass "
            "--allow-missing-pooler to export without it (last_hidden_state is exact, "
            "pooler_output is not), or use --as dpr"
        )
    print(f"{model_dir}: {what}: exporting without pooler weights", file=sys.stderr)
    return False


def _dpr_tower_export(model_dir: Path, config, tp: dict, name: str, hf_dir: str) -> _Export:
    if config.pooling != "cls":
        raise UserError(
            f"{model_dir}: pooling is {config.pooling!r}, DPR's Hugging Face classes "
            "take the [CLS] vector; export with --as sentence-transformers, or --as bert "
            "and pool yourself"
        )
    if config.normalize:
        raise UserError(
            f"{model_dir}: the model L2-normalises its vectors, DPR's Hugging Face "
            "classes do not; export with --as sentence-transformers"
        )
    arch = "DPRQuestionEncoder" if name == "question" else "DPRContextEncoder"
    bert_p = {k: v for k, v in tp["bert_model"].items() if k != "pooler_dense"}
    tree = {hf_dir: {"bert_model": bert_p}}
    if config.projection_dim:
        tree[hf_dir]["encode_proj"] = tp["encode_proj"]
    sd = flax_to_hf_state_dict(
        tree, arch, config.bert, config.projection_dim, False, where=str(model_dir)
    )
    return hf_dir, arch, config.bert, config.projection_dim, sd


def _biencoder_exports(
    model_dir: Path, config, params: dict, tower: str, as_: str, allow_missing_pooler: bool
) -> list[_Export]:
    """One directory per tower asked for (``--tower``)."""
    towers = {"question": "question_encoder", "ctx": "ctx_encoder"}
    todo = []
    for name in list(towers) if tower == "both" else [tower]:
        src_tower = "question_encoder" if config.shared else towers[name]
        tp = params[src_tower]
        if as_ == "dpr":
            todo.append(_dpr_tower_export(model_dir, config, tp, name, towers[name]))
            continue
        if config.projection_dim:
            raise UserError(
                f"{model_dir}: the towers have an encode_proj (projection_dim="
                f"{config.projection_dim}) that BertModel cannot hold; use --as dpr"
            )
        pool = "pooler_dense" in tp["bert_model"]
        if as_ != "sentence-transformers":  # sentence-transformers never reads the BERT pooler
            pool = _pooler_ok(model_dir, pool, f"tower {src_tower}", allow_missing_pooler)
        sd = flax_to_hf_state_dict(
            tp["bert_model"], "BertModel", config.bert, 0, pool, where=str(model_dir)
        )
        todo.append((towers[name], "BertModel", config.bert, 0, sd))
    return todo


def _bert_export(model_dir: Path, config, params: dict, tower, as_, allow_missing_pooler):
    bert = config.bert
    pool = _pooler_ok(model_dir, "pooler_dense" in params, "the model", allow_missing_pooler)
    sd = flax_to_hf_state_dict(params, "BertModel", bert, 0, pool, where=str(model_dir))
    return [("", "BertModel", bert, 0, sd)]


def _reader_export(model_dir: Path, config, params: dict, tower, as_, allow_missing_pooler):
    sd = flax_to_hf_state_dict(params, "DPRReader", config, where=str(model_dir))
    return [("", "DPRReader", config, 0, sd)]


@dataclasses.dataclass(frozen=True)
class Exporter:
    """How one model kind exports: the ``--as`` formats it takes, whether ``--tower`` applies,
    and ``export(model_dir, config, params, tower, as_, allow_missing_pooler)`` -> the
    directories to write."""

    formats: tuple[str, ...]
    towers: bool
    export: Callable[..., list[_Export]]


# model kind -> its export; a new kind adds its entry (tests/test_convert.py checks they match)
TO_HF: dict[str, Exporter] = {
    BIENCODER.name: Exporter(EXPORT_FORMATS, True, _biencoder_exports),
    BERT.name: Exporter(("bert",), False, _bert_export),
    READER.name: Exporter(("dpr",), False, _reader_export),
}


def _write_exports(
    out: Path, todo: list[_Export], record: dict, model_dir: Path, st_export
) -> None:
    """Write every exported directory into a temporary sibling of ``out``, then swap it in."""
    with staged_dir(out) as tmp:
        for rel, arch, bert, proj, sd in todo:
            d = tmp / rel if rel else tmp
            write_hf_dir(d, arch, bert, sd, proj, tokenizer_from=model_dir)
            if st_export:
                pooler = "pooler.dense.weight" in sd  # a tower without one loads without one
                write_st_modules(d, *st_export[:2], bert.hidden_size, st_export[2], pooler)
            (d / "dpr_jax_export.json").write_text(
                json.dumps({**record, "architecture": arch}, indent=2) + "\n"
            )


def convert_to_hf(
    model_dir: str | Path,
    out: str | Path,
    tower: str = "both",
    as_: str = "dpr",
    allow_missing_pooler: bool = False,
    overwrite: bool = False,
) -> list[Path]:
    """dpr-jax model directory -> Hugging Face directories (see the module docstring).

    Returns the written directories (``out/question_encoder``, ``out/ctx_encoder`` for a
    bi-encoder; ``out`` itself for a bert or reader model).
    """

    if tower not in ("question", "ctx", "both"):
        raise UserError(f"tower must be question, ctx or both; got {tower!r}")
    if as_ not in EXPORT_FORMATS:
        raise UserError(f"--as must be one of {EXPORT_FORMATS}; got {as_!r}")
    model_dir = resolve_model_dir(model_dir)
    check_out(out, HF_EXPORT, model_dir)
    out = prepare_out(Path(out), overwrite)
    kind, config, params, meta = load_model(model_dir)
    params = _flatten_to_dict(params)

    exporter = TO_HF[kind]
    if as_ not in exporter.formats:
        raise UserError(
            f"{model_dir}: a {kind} model exports with --as {' or --as '.join(exporter.formats)}"
        )
    if tower != "both" and not exporter.towers:
        raise UserError(f"--tower only applies to bi-encoders; {model_dir} holds a {kind}")
    st_export = None  # (pooling, normalize, max_seq_length) for --as sentence-transformers
    if as_ == "sentence-transformers":
        st_export = _st_export_settings(model_dir, config, meta)
    todo = exporter.export(model_dir, config, params, tower, as_, allow_missing_pooler)

    record = {
        "source": str(model_dir.absolute()),
        "source_kind": kind,
        "source_model": meta.get("model"),
        "tower": tower,
        "as": as_,
        "allow_missing_pooler": allow_missing_pooler,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    _write_exports(out, todo, record, model_dir, st_export)
    return [out / rel if rel else out for rel, *_ in todo]


def _st_export_settings(model_dir: Path, config, meta: dict) -> tuple[str, bool, int]:
    """(pooling, normalize, max_seq_length) of a bi-encoder's sentence-transformers export, or
    ValueError."""

    if config.pooling not in ("cls", "mean"):
        raise UserError(
            f"{model_dir}: pooling {config.pooling!r} has no sentence-transformers Pooling mode "
            "(cls and mean do)"
        )
    if config.projection_dim:
        raise UserError(
            f"{model_dir}: the towers have an encode_proj (projection_dim="
            f"{config.projection_dim}); the sentence-transformers export holds BERT + pooling "
            "(+ Normalize) only"
        )
    st = ((meta.get("converted_from") or {}).get("sentence_transformers")) or {}
    return config.pooling, config.normalize, int(st.get("max_seq_length") or DEFAULT_MAX_SEQ_LENGTH)


def _flatten_to_dict(tree) -> dict:
    """Orbax / flax containers -> plain nested dicts of numpy arrays."""
    if isinstance(tree, Mapping):
        return {str(k): _flatten_to_dict(v) for k, v in tree.items()}
    return np.asarray(tree)
