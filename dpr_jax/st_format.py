"""sentence-transformers directories: the pooling and normalisation a model was trained with.

A sentence-transformers model (Reimers & Gurevych 2019, "Sentence-BERT", sec. 3) is a Hugging
Face BERT plus a pipeline of modules listed in ``modules.json``::

    [{"idx": 0, "name": "0", "path": "",           "type": "sentence_transformers.models.Transformer"},
     {"idx": 1, "name": "1", "path": "1_Pooling",   "type": "sentence_transformers.models.Pooling"},
     {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]

``1_Pooling/config.json`` names the pooling, in the legacy form (``pooling_mode_cls_token``,
``pooling_mode_mean_tokens``, ... booleans; none set means mean) or the current one
(``"pooling_mode": "mean"``); ``Normalize`` (no files) L2-normalises the pooled vector, so that
the model's similarity is the cosine. all-MiniLM-L6-v2 is mean pooling + Normalize: converted with
[CLS] pooling or without the normalisation it loses most of its accuracy.

:func:`read_st_modules` maps such a pipeline onto a bi-encoder tower's ``pooling`` and
``normalize`` (pure JSON, no torch); anything a tower cannot compute (max pooling, a ``Dense``
layer, several poolings) is refused with an error naming the file. :func:`write_st_modules` writes
the module files of an exported tower in the legacy form, which every sentence-transformers
version (2.x to 6.x) loads.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from dpr_jax.errors import UserError
from dpr_jax.io import read_json

MODULES_JSON = "modules.json"
ST_CONFIG = "sentence_bert_config.json"
DEFAULT_MAX_SEQ_LENGTH = 256  # DPR's passage length; sentence_bert_config.json's when absent

# legacy Pooling config key -> pooling mode (sentence-transformers' own names)
_LEGACY_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}
_SUPPORTED_POOLING = ("cls", "mean")  # what the bi-encoder tower computes
_TYPE_PREFIX = "sentence_transformers.models."


@dataclasses.dataclass(frozen=True)
class STModules:
    """What a sentence-transformers pipeline means for a bi-encoder tower."""

    pooling: str  # "cls" or "mean"
    normalize: bool
    max_seq_length: int | None  # sentence_bert_config.json's, None when absent
    modules_file: Path

    def describe(self) -> str:
        return f"pooling {self.pooling!r}" + (" + Normalize" if self.normalize else "")


def is_st_dir(path: str | Path) -> bool:
    return (Path(path) / MODULES_JSON).is_file()


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, error=UserError, missing=f"{what} not found")


def _pooling_mode(config: Any, path: Path, hidden_size: int | None) -> str:
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    dim = config.get("embedding_dimension", config.get("word_embedding_dimension"))
    if hidden_size is not None and dim is not None and int(dim) != hidden_size:
        raise UserError(
            f"{path}: the pooling's embedding dimension is {dim}, the BERT's hidden size "
            f"{hidden_size}"
        )
    if "pooling_mode" in config:  # sentence-transformers >= 5
        mode = config["pooling_mode"]
        modes = [mode] if isinstance(mode, str) else list(mode)
    else:  # legacy booleans; none set means mean, as sentence-transformers reads them
        modes = [m for k, m in _LEGACY_POOLING.items() if config.get(k)] or ["mean"]
    if len(modes) != 1 or modes[0] not in _SUPPORTED_POOLING:
        raise UserError(
            f"{path}: pooling {modes} is not supported (a bi-encoder tower pools with one of "
            f"{_SUPPORTED_POOLING}); convert with --pooling to choose one explicitly"
        )
    return modes[0]


def read_st_modules(path: str | Path, hidden_size: int | None = None) -> STModules | None:
    """The pooling and normalisation of a sentence-transformers directory; None when ``path``
    has no ``modules.json`` (a plain Hugging Face model)."""
    path = Path(path)
    modules_file = path / MODULES_JSON
    if not modules_file.is_file():
        return None
    modules = _read_json(modules_file, "module list")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise UserError(f"{modules_file}: expected a JSON list of module objects")
    kinds = []
    for i, m in enumerate(sorted(modules, key=lambda m: m.get("idx", 0))):
        kind = str(m.get("type", "")).rsplit(".", 1)[-1]
        kinds.append((kind, m, i))
    names = [k for k, _, _ in kinds]
    pooling = None
    normalize = False
    for pos, (kind, m, i) in enumerate(kinds):
        if kind == "Transformer":
            if pos != 0:
                raise UserError(f"{modules_file}: module {i} (Transformer) is not the first")
            if str(m.get("path", "")) not in ("", "."):
                raise UserError(
                    f"{modules_file}: the Transformer lives in {m.get('path')!r}; convert that "
                    "folder's BERT with --pooling instead"
                )
        elif kind == "Pooling":
            if pooling is not None:
                raise UserError(f"{modules_file}: more than one Pooling module")
            cfg_path = path / str(m.get("path", "")) / "config.json"
            pooling = _pooling_mode(_read_json(cfg_path, "pooling config"), cfg_path, hidden_size)
        elif kind == "Normalize":
            if pooling is None or pos != len(kinds) - 1:
                raise UserError(
                    f"{modules_file}: Normalize must come last, after the Pooling ({names})"
                )
            normalize = True
        else:
            raise UserError(
                f"{modules_file}: module {i} is a {m.get('type')!r}; only Transformer, Pooling "
                "and Normalize map onto a bi-encoder tower (convert with --pooling to take the "
                "BERT alone)"
            )
    if not names or names[0] != "Transformer":
        raise UserError(f"{modules_file}: the first module must be a Transformer, got {names}")
    if pooling is None:
        raise UserError(f"{modules_file}: no Pooling module (token embeddings only)")
    max_len = None
    st_cfg_path = path / ST_CONFIG
    if st_cfg_path.is_file():
        st_cfg = _read_json(st_cfg_path, "config")
        if isinstance(st_cfg, dict) and st_cfg.get("max_seq_length") is not None:
            max_len = int(st_cfg["max_seq_length"])
    return STModules(pooling, normalize, max_len, modules_file)


def write_st_modules(
    out: str | Path,
    pooling: str,
    normalize: bool,
    hidden_size: int,
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH,
    add_pooling_layer: bool = True,
) -> None:
    """modules.json, sentence_bert_config.json, 1_Pooling/config.json and (``normalize``)
    2_Normalize/ into ``out``, which already holds the BertModel (config.json + weights).

    ``add_pooling_layer=False`` (weights without the BERT pooler, which sentence-transformers
    never reads) is recorded as ``model_args`` in sentence_bert_config.json, so that
    ``SentenceTransformer`` builds the BertModel without a pooler instead of reporting its
    weights missing and initialising them randomly."""
    if pooling not in _SUPPORTED_POOLING:
        raise UserError(
            f"pooling {pooling!r} has no sentence-transformers Pooling mode (have "
            f"{_SUPPORTED_POOLING})"
        )
    out = Path(out)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": _TYPE_PREFIX + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _TYPE_PREFIX + "Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": _TYPE_PREFIX + "Normalize"})  # fmt: skip
        (out / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (out / MODULES_JSON).write_text(json.dumps(modules, indent=2) + "\n")
    st_config: dict[str, Any] = {"max_seq_length": int(max_seq_length), "do_lower_case": False}
    if not add_pooling_layer:  # passed to AutoModel.from_pretrained (every version since 2.0)
        st_config["model_args"] = {"add_pooling_layer": False}
    (out / ST_CONFIG).write_text(json.dumps(st_config, indent=2) + "\n")
    pool = {"word_embedding_dimension": int(hidden_size)}
    # the four keys sentence-transformers 2.0 already knew (later ones would be refused by it)
    pool.update({k: m == pooling for k, m in list(_LEGACY_POOLING.items())[:4]})
    (out / "1_Pooling").mkdir(parents=True, exist_ok=True)
    (out / "1_Pooling" / "config.json").write_text(json.dumps(pool, indent=2) + "\n")
