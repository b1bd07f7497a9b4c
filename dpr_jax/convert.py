"""Hugging Face <-> dpr-jax checkpoints, both directions (Karpukhin et al. 2020, sec. 3.1 and 6.1).

DPR's bi-encoder is two BERT towers E_Q and E_P (sec. 3.1) and its reader a BERT with span and
passage-selection heads (sec. 6.1). Hugging Face ships them as ``DPRQuestionEncoder``,
``DPRContextEncoder`` and ``DPRReader``; DPR itself starts training from a plain ``BertModel``.
The Flax modules here name their parameters after Hugging Face's state-dict keys, so converting
is a rename, a transpose of every Linear weight (``kernel = weight.T``), ``LayerNorm.weight`` <->
``scale`` and ``Embedding.weight`` <-> ``embedding``:

=========================================================  ===========================================
Hugging Face key                                           Flax path
=========================================================  ===========================================
``embeddings.word_embeddings.weight``                      ``embeddings/word_embeddings/embedding``
``embeddings.LayerNorm.weight``                            ``embeddings/LayerNorm/scale``
``encoder.layer.3.attention.self.query.weight``            ``encoder_layer_3/attention_self/query/kernel``
``encoder.layer.3.attention.output.dense.bias``            ``encoder_layer_3/attention_output_dense/bias``
``encoder.layer.3.output.LayerNorm.weight``                ``encoder_layer_3/output_LayerNorm/scale``
``pooler.dense.weight``                                    ``pooler_dense/kernel``
``question_encoder.bert_model.<bert key>``                 ``question_encoder/bert_model/<bert path>``
``question_encoder.encode_proj.weight``                    ``question_encoder/encode_proj/kernel``
``ctx_encoder.bert_model.<bert key>``                      ``ctx_encoder/bert_model/<bert path>``
``span_predictor.encoder.bert_model.<bert key>``           ``encoder/bert_model/<bert path>``
``span_predictor.qa_outputs.weight``                       ``qa_outputs/kernel``
``span_predictor.qa_classifier.weight``                    ``qa_classifier/kernel``
=========================================================  ===========================================

The two pure functions :func:`hf_state_dict_to_flax` and :func:`flax_to_hf_state_dict` work on
numpy arrays (no torch) and are strict: the expected key set and every shape follow from the
config, and a missing key, an extra key or a wrong shape raises ``ValueError`` naming the key.
A few legacy layouts are normalised first (:func:`normalize_hf_state_dict`): ``LayerNorm.gamma /
beta``, the ``position_ids`` / ``token_type_ids`` buffers, a ``bert.`` prefix with task heads
(``BertForPreTraining`` and friends; the heads are dropped and listed) and the unused BERT pooler
that transformers 4 kept inside DPR encoders (transformers 5 builds them with
``add_pooling_layer=False`` and DPR reads the [CLS] vector of the last layer).

Command line (``dpr-jax convert``)::

    # Hugging Face -> dpr-jax model directory
    dpr-jax convert --from-hf SRC --out DIR [--kind auto|biencoder|bert|reader]
                    [--ctx-from SRC2] [--shared] [--pooling cls|mean|pooler]
                    [--normalize | --no-normalize] [--tokenizer PATH]

    SRC / SRC2: a local directory (config.json + model.safetensors, a sharded safetensors index or
    pytorch_model.bin) or a hub id (downloaded with huggingface_hub). What is built:
      BertModel (or BertFor*)      -> biencoder, both towers initialised from it (DPR's start
                                      point); --shared: one tower; --kind bert: the BERT itself;
                                      --kind reader: reader with freshly initialised heads (--seed)
      DPRQuestionEncoder           -> biencoder; the passage tower comes from --ctx-from (a
                                      DPRContextEncoder or a BertModel) or, with --shared, the
                                      question tower serves both. One of the two is required: a
                                      DPR question encoder alone has no passage tower.
      DPRContextEncoder            -> with --shared only (the one tower serves both)
      DPRReader                    -> reader

    Pooling and normalisation of a bi-encoder: ``--pooling`` (default [CLS], as DPR) and
    ``--normalize`` (L2-normalised vectors: dot product = cosine). A sentence-transformers
    directory (one with ``modules.json``, e.g. all-MiniLM-L6-v2) keeps the similarity it was
    trained with: without ``--pooling``, its Pooling and Normalize modules set both
    (:mod:`dpr_jax.st_format`; all-MiniLM-L6-v2: mean + normalize); ``--pooling`` ignores them.

    # facebookresearch/DPR checkpoint file -> dpr-jax model directory
    dpr-jax convert --from-dpr FILE.cp --out DIR --tokenizer TOK [--heads N]

      A bi-encoder .cp (question_model.* / ctx_model.*) becomes a bi-encoder with both towers
      ([CLS] pooling, encode_proj when DPR's projection_dim > 0), a reader .cp (encoder.*,
      qa_outputs, qa_classifier) a reader: the model --from-hf makes of the same weights in
      transformers' DPR classes (:mod:`dpr_jax.dpr_checkpoint` maps the keys as transformers'
      conversion script does, then the tables above apply). The BERT's shape comes from the
      weights; its heads from --heads, or from encoder_params' pretrained_model_cfg when it names
      bert-base-* (12) or bert-large-* (16). A .cp holds no tokenizer: --tokenizer (a directory or
      hub id, e.g. bert-base-uncased for DPR's released models) is required. The file is read
      without running code from it: torch.load(weights_only=True), else a restricted unpickler
      that refuses every global beyond tensors and DPR's option objects.

    # dpr-jax model directory -> Hugging Face
    dpr-jax convert --to-hf MODEL_DIR --out DST [--tower question|ctx|both]
                    [--as dpr|bert|sentence-transformers] [--allow-missing-pooler]

      biencoder --as dpr   DST/question_encoder (DPRQuestionEncoder), DST/ctx_encoder
                           (DPRContextEncoder); needs pooling "cls" (what DPR's classes compute)
      biencoder --as bert  DST/question_encoder, DST/ctx_encoder as plain BertModel; refused when
                           the towers have an encode_proj (BertModel has no place for it)
      biencoder --as sentence-transformers
                           DST/question_encoder, DST/ctx_encoder as sentence-transformers
                           directories (BertModel + modules.json, 1_Pooling, 2_Normalize when
                           the model normalises) that ``SentenceTransformer(DST/...)`` loads;
                           needs pooling cls or mean and no encode_proj. sentence-transformers
                           never reads the BERT pooler, so none is needed: a tower without one
                           is exported without one and sentence_bert_config.json tells
                           sentence-transformers to build the BertModel without it
                           (``model_args: {add_pooling_layer: false}``), so it loads with no
                           missing-weights report. Note that dpr-jax
                           encodes a passage as "[CLS] title [SEP] text [SEP]"; the exported
                           model encodes whatever text it is given.
      bert                 DST as BertModel
      reader               DST as DPRReader

  ``BertModel.from_pretrained`` always builds a pooler. A model directory without pooler weights
  (a bi-encoder converted with the default [CLS] pooling drops it) is refused for ``--as bert``
  unless ``--allow-missing-pooler``: the export then has no ``pooler.dense`` weights and
  transformers reports them missing and initialises them randomly. ``last_hidden_state`` (and so
  [CLS] / mean embeddings) is exact; only ``pooler_output`` is meaningless.

Every output is written into a temporary sibling directory and renamed into place once complete,
after every check has passed; an existing non-empty destination is replaced only with
``--overwrite``. Exported Hugging Face directories carry ``dpr_jax_export.json`` (what made them).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shutil
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from safetensors.numpy import load_file, save_file

from dpr_jax.errors import optional_import
from dpr_jax.io import HF_EXPORT, MODEL, check_output, read_json_object, staged_dir
from dpr_jax.model_dir import load_model, resolve_model_dir, save_model
from dpr_jax.models.bert import BertConfig
from dpr_jax.models.kind import without_pooler
from dpr_jax.reader.model import init_reader_params
from dpr_jax.retriever.model import EncoderConfig
from dpr_jax.st_format import DEFAULT_MAX_SEQ_LENGTH, read_st_modules, write_st_modules

ARCHITECTURES = ("BertModel", "DPRQuestionEncoder", "DPRContextEncoder", "DPRReader")
EXPORT_FORMATS = ("dpr", "bert", "sentence-transformers")  # convert --to-hf --as
DPR_ENCODERS = ("DPRQuestionEncoder", "DPRContextEncoder")
# HF key prefix of the BERT inside each architecture, and the Flax path it maps to.
_BERT_PREFIX = {
    "BertModel": ("", ()),
    "DPRQuestionEncoder": ("question_encoder.bert_model.", ("question_encoder", "bert_model")),
    "DPRContextEncoder": ("ctx_encoder.bert_model.", ("ctx_encoder", "bert_model")),
    "DPRReader": ("span_predictor.encoder.bert_model.", ("encoder", "bert_model")),
}
_TOWER = {"DPRQuestionEncoder": "question_encoder", "DPRContextEncoder": "ctx_encoder"}
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # non-persistent in HF
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


class _Entry(NamedTuple):
    hf_key: str
    flax_path: tuple[str, ...]
    hf_shape: tuple[int, ...]
    transpose: bool  # Linear weight (out, in) <-> Dense kernel (in, out)


def _linear(hf: str, flax: tuple[str, ...], n_in: int, n_out: int) -> Iterator[_Entry]:
    yield _Entry(f"{hf}.weight", (*flax, "kernel"), (n_out, n_in), True)
    yield _Entry(f"{hf}.bias", (*flax, "bias"), (n_out,), False)


def _layer_norm(hf: str, flax: tuple[str, ...], n: int) -> Iterator[_Entry]:
    yield _Entry(f"{hf}.weight", (*flax, "scale"), (n,), False)
    yield _Entry(f"{hf}.bias", (*flax, "bias"), (n,), False)


def _bert_entries(cfg: BertConfig, pooler: bool, hf_pre: str, fx: tuple[str, ...]):
    h, i = cfg.hidden_size, cfg.intermediate_size
    for name, n in (
        ("word_embeddings", cfg.vocab_size),
        ("position_embeddings", cfg.max_position_embeddings),
        ("token_type_embeddings", cfg.type_vocab_size),
    ):
        yield _Entry(
            f"{hf_pre}embeddings.{name}.weight",
            (*fx, "embeddings", name, "embedding"),
            (n, h),
            False,
        )
    yield from _layer_norm(f"{hf_pre}embeddings.LayerNorm", (*fx, "embeddings", "LayerNorm"), h)
    for n in range(cfg.num_hidden_layers):
        hl, fl = f"{hf_pre}encoder.layer.{n}.", (*fx, f"encoder_layer_{n}")
        for qkv in ("query", "key", "value"):
            yield from _linear(f"{hl}attention.self.{qkv}", (*fl, "attention_self", qkv), h, h)
        yield from _linear(f"{hl}attention.output.dense", (*fl, "attention_output_dense"), h, h)
        yield from _layer_norm(
            f"{hl}attention.output.LayerNorm", (*fl, "attention_output_LayerNorm"), h
        )
        yield from _linear(f"{hl}intermediate.dense", (*fl, "intermediate_dense"), h, i)
        yield from _linear(f"{hl}output.dense", (*fl, "output_dense"), i, h)
        yield from _layer_norm(f"{hl}output.LayerNorm", (*fl, "output_LayerNorm"), h)
    if pooler:
        yield from _linear(f"{hf_pre}pooler.dense", (*fx, "pooler_dense"), h, h)


def _check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch!r} is not supported (have {ARCHITECTURES})")


def param_entries(
    arch: str, bert: BertConfig, projection_dim: int = 0, add_pooling_layer: bool = False
) -> list[_Entry]:
    """Every (HF key, Flax path, HF shape, transpose) that ``arch`` with this config holds."""
    _check_arch(arch)
    if arch != "BertModel" and add_pooling_layer:
        raise ValueError(f"{arch} has no BERT pooler in transformers 5 (add_pooling_layer=False)")
    if projection_dim and arch not in DPR_ENCODERS:
        raise ValueError(f"projection_dim={projection_dim} only exists for {DPR_ENCODERS}")
    hf_pre, fx = _BERT_PREFIX[arch]
    entries = list(_bert_entries(bert, add_pooling_layer, hf_pre, fx))
    h = bert.hidden_size
    if projection_dim:
        tower = _TOWER[arch]
        entries += _linear(f"{tower}.encode_proj", (tower, "encode_proj"), h, projection_dim)
    if arch == "DPRReader":
        entries += _linear("span_predictor.qa_outputs", ("qa_outputs",), h, 2)
        entries += _linear("span_predictor.qa_classifier", ("qa_classifier",), h, 1)
    return entries


def hf_param_shapes(
    arch: str, bert: BertConfig, projection_dim: int = 0, add_pooling_layer: bool = False
) -> dict[str, tuple[int, ...]]:
    """HF state-dict key -> shape that ``arch`` with this config has (buffers excluded)."""
    return {
        e.hf_key: e.hf_shape for e in param_entries(arch, bert, projection_dim, add_pooling_layer)
    }


def _check_keys(got: Mapping[str, tuple], want: Mapping[str, tuple], where: str, what: str):
    missing = [k for k in want if k not in got]
    extra = sorted(k for k in got if k not in want)
    if missing:
        raise ValueError(f"{where}: missing {what} {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise ValueError(f"{where}: unexpected {what} {extra[0]!r} ({len(extra)} unexpected)")
    for k, shape in want.items():
        if tuple(got[k]) != tuple(shape):
            raise ValueError(
                f"{where}: {what} {k!r} has shape {tuple(got[k])}, the config implies {tuple(shape)}"
            )


def normalize_hf_state_dict(
    state_dict: Mapping[str, Any], arch: str
) -> tuple[dict[str, Any], list[str]]:
    """Legacy layouts -> transformers-5 keys. Returns (state dict, dropped keys).

    Renames ``LayerNorm.gamma/beta`` to ``weight/bias``; drops the ``position_ids`` /
    ``token_type_ids`` buffers; for ``BertModel``, strips a ``bert.`` prefix and drops the task
    heads outside it (``cls.*``, ``classifier.*``: BertForPreTraining and friends); for DPR
    models, drops the BERT pooler that transformers 4 kept (DPR never uses it).
    """
    _check_arch(arch)
    orig: dict[str, str] = {}  # normalised key -> key in the checkpoint
    for k in state_dict:
        new = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)
        orig[re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", new)] = k
    dropped: list[str] = []
    if arch == "BertModel" and not any(k.startswith("embeddings.") for k in orig):
        if any(k.startswith("bert.embeddings.") for k in orig):
            dropped += [orig[k] for k in orig if not k.startswith("bert.")]
            orig = {k[len("bert.") :]: v for k, v in orig.items() if k.startswith("bert.")}
    drop = {k for k in orig if k.endswith(_BUFFERS)}
    if arch != "BertModel":
        drop |= {k for k in orig if re.search(r"bert_model\.pooler\.dense\.(weight|bias)$", k)}
    dropped += [orig[k] for k in drop]
    sd = {k: state_dict[o] for k, o in orig.items() if k not in drop}
    return sd, sorted(dropped)


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def hf_state_dict_to_flax(
    state_dict: Mapping[str, Any],
    arch: str,
    bert: BertConfig,
    projection_dim: int = 0,
    add_pooling_layer: bool | None = None,
    where: str = "state dict",
) -> dict:
    """A Hugging Face state dict (numpy-convertible arrays) -> Flax parameters (float32 numpy).

    The result for ``BertModel`` is a :class:`BertModule` tree; for a DPR encoder, the tower's
    subtree of a :class:`BiEncoder` (``{"question_encoder": {"bert_model", ["encode_proj"]}}`` or
    ``{"ctx_encoder": ...}``); for ``DPRReader``, a :class:`Reader` tree.
    ``add_pooling_layer=None``: a BertModel's pooler is converted when present. Legacy layouts
    are normalised (:func:`normalize_hf_state_dict`); anything else that does not match the
    config (missing key, extra key, wrong shape) raises ``ValueError`` naming the key.
    """
    sd, _ = normalize_hf_state_dict(state_dict, arch)
    if add_pooling_layer is None:
        add_pooling_layer = arch == "BertModel" and "pooler.dense.weight" in sd
    entries = param_entries(arch, bert, projection_dim, add_pooling_layer)
    _check_keys(
        {k: np.shape(v) for k, v in sd.items()},
        {e.hf_key: e.hf_shape for e in entries},
        where,
        "key",
    )
    params: dict = {}
    for e in entries:
        a = np.asarray(sd[e.hf_key], dtype=np.float32)
        _set(params, e.flax_path, np.ascontiguousarray(a.T if e.transpose else a))
    return params


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, str(k))))
        else:
            out[(*prefix, str(k))] = v
    return out


def flax_to_hf_state_dict(
    params: Mapping,
    arch: str,
    bert: BertConfig,
    projection_dim: int = 0,
    add_pooling_layer: bool | None = None,
    where: str = "params",
) -> dict[str, np.ndarray]:
    """Flax parameters (the trees :func:`hf_state_dict_to_flax` returns) -> HF state dict.

    Float32, C-contiguous numpy arrays, ready for ``safetensors.numpy.save_file``. A missing,
    extra or mis-shaped parameter raises ``ValueError`` naming its path.
    """
    flat = _flatten(params)
    if add_pooling_layer is None:
        add_pooling_layer = arch == "BertModel" and ("pooler_dense", "kernel") in flat
    entries = param_entries(arch, bert, projection_dim, add_pooling_layer)
    want = {
        "/".join(e.flax_path): (e.hf_shape[::-1] if e.transpose else e.hf_shape) for e in entries
    }
    _check_keys({"/".join(k): np.shape(v) for k, v in flat.items()}, want, where, "parameter")
    sd = {}
    for e in entries:
        a = np.asarray(flat[e.flax_path], dtype=np.float32)
        sd[e.hf_key] = np.ascontiguousarray(a.T if e.transpose else a)
    return sd


# --------------------------------------------------------------------------------------------
# Hugging Face directories
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint read into numpy: where from, what it is, its weights."""

    path: Path
    source: str  # what the user named (directory or hub id)
    arch: str  # one of ARCHITECTURES
    bert: BertConfig
    projection_dim: int
    state_dict: dict[str, np.ndarray]  # normalised (see normalize_hf_state_dict)
    weights_file: Path  # model.safetensors, its index or pytorch_model.bin (named in errors)
    dropped: list[str]  # keys normalize_hf_state_dict dropped
    has_tokenizer: bool

    @property
    def has_pooler(self) -> bool:
        return "pooler.dense.weight" in self.state_dict

    def bert_body(self) -> dict:
        """The BERT's parameters without its pooler: a BertModel's, a DPR encoder's tower's or a
        DPRReader's encoder's (what a reader or a [CLS] tower starts from)."""
        if self.arch == "BertModel":
            return self.flax_params(add_pooling_layer=False)
        if self.arch == "DPRReader":
            return self.flax_params()["encoder"]["bert_model"]
        return without_pooler(self.flax_params()[_TOWER[self.arch]]["bert_model"])

    def flax_params(self, add_pooling_layer: bool | None = None) -> dict:
        """Flax parameters; ``add_pooling_layer=False`` leaves a BertModel's pooler out."""
        sd = self.state_dict
        if add_pooling_layer is False:
            sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
        return hf_state_dict_to_flax(
            sd, self.arch, self.bert, self.projection_dim, add_pooling_layer,
            where=str(self.weights_file),
        )  # fmt: skip


def _resolve_source(src: str | Path) -> Path:
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"{path}: expected a directory with config.json and the weights")
        return path
    s = str(src)
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(f"{path}: no such directory (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *_TOKENIZER_FILES]
    local = Path(snapshot_download(s, allow_patterns=patterns))
    if not list(local.glob("*.safetensors")):
        local = Path(snapshot_download(s, allow_patterns=[*patterns, "pytorch_model.bin"]))
    return local


def _load_weights(path: Path) -> tuple[dict[str, np.ndarray], Path]:
    """-> (state dict, the file it came from)."""

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        try:
            return load_file(single), single
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise ValueError(f"{single}: cannot read ({type(e).__name__}: {e})") from e
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(
                f"{index}: not a safetensors index (field 'weight_map': {e})"
            ) from None
        sd: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(load_file(path / shard))
        return sd, index
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        torch = optional_import("torch", "torch", f"{binary}: reading pytorch_model.bin")
        sd = torch.load(binary, map_location="cpu", weights_only=True)
        sd = {
            k: (v.float() if v.is_floating_point() else v).numpy()
            for k, v in sd.items()
            if isinstance(v, torch.Tensor)
        }
        return sd, binary
    raise FileNotFoundError(
        f"{path}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _detect_arch(config: dict, keys: list[str], config_path: Path) -> str:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for a in archs:
        if a in ARCHITECTURES:
            return a
    if model_type == "bert" or any(a.startswith("Bert") for a in archs):
        return "BertModel"
    if model_type == "dpr":
        for arch, (pre, _) in _BERT_PREFIX.items():
            if pre and any(k.startswith(pre) for k in keys):
                return arch
        raise ValueError(
            f"{config_path}: model_type 'dpr' but neither the field 'architectures' ({archs}) nor "
            "the weight names say which DPR model this is"
        )
    raise ValueError(
        f"{config_path}: field 'model_type' is {model_type!r} and 'architectures' {archs}: not a "
        f"BERT or DPR checkpoint (supported: {ARCHITECTURES} and BertFor* models)"
    )


def read_hf(src: str | Path) -> HFCheckpoint:
    """Read a Hugging Face BERT / DPR checkpoint (local directory or hub id) into numpy."""
    path = _resolve_source(src)
    config_path = path / "config.json"
    config = read_json_object(config_path, error=ValueError, missing="config file not found")
    try:
        bert = BertConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_path}: bad BERT config ({e})") from None
    raw, weights_file = _load_weights(path)
    arch = _detect_arch(config, list(raw), config_path)
    projection_dim = int(config.get("projection_dim") or 0)
    if arch == "DPRReader" and projection_dim:
        raise ValueError(
            f"{config_path}: field 'projection_dim' is {projection_dim}; a DPRReader with an "
            "encode_proj is not supported (its span heads read the BERT output)"
        )
    if arch == "BertModel":
        projection_dim = 0
    sd, dropped = normalize_hf_state_dict(raw, arch)
    has_tok = any((path / f).is_file() for f in _TOKENIZER_FILES)
    return HFCheckpoint(
        path, str(src), arch, bert, projection_dim, sd, weights_file, dropped, has_tok
    )


def hf_config_dict(arch: str, bert: BertConfig, projection_dim: int = 0) -> dict[str, Any]:
    """config.json for ``arch`` (``DPRConfig`` = BERT fields + projection_dim)."""
    _check_arch(arch)
    d = bert.to_hf_dict(architectures=[arch])
    if arch != "BertModel":
        d["model_type"] = "dpr"
        d["projection_dim"] = int(projection_dim)
    return d


def write_hf_dir(
    out: Path, arch: str, bert: BertConfig, state_dict: Mapping[str, np.ndarray],
    projection_dim: int = 0, tokenizer_from: Path | None = None,
) -> None:  # fmt: skip
    """config.json + model.safetensors (+ tokenizer files) into ``out`` (new or empty)."""

    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config_dict(arch, bert, projection_dim)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_from is not None:
        for name in _TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, out / name)


def _prepare_out(out: Path, overwrite: bool) -> Path:
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    return out


def _check_out(out: str | Path, kind: str, *inputs: str | Path | None) -> None:
    """Refuse ``--out`` equal to, above or inside a local input, or holding anything but a
    ``kind`` (:func:`dpr_jax.io.check_output`), before anything is read or deleted."""

    check_output(out, kind, [i for i in inputs if i is not None and Path(i).exists()])


# --------------------------------------------------------------------------------------------
# Hugging Face -> model directory
# --------------------------------------------------------------------------------------------


def _tower(ckpt: HFCheckpoint, keep_pooler: bool) -> dict:
    """{"bert_model": ..., ["encode_proj": ...]} from a BertModel or a DPR encoder."""
    if ckpt.arch == "BertModel":
        if keep_pooler and not ckpt.has_pooler:
            raise ValueError(
                f"{ckpt.path}: pooling 'pooler' needs the BERT pooler, this checkpoint has none"
            )
        return {"bert_model": ckpt.flax_params(add_pooling_layer=keep_pooler)}
    if ckpt.arch in DPR_ENCODERS:
        if keep_pooler:
            raise ValueError(f"{ckpt.path}: a {ckpt.arch} has no BERT pooler (pooling 'pooler')")
        return ckpt.flax_params()[_TOWER[ckpt.arch]]
    raise ValueError(f"{ckpt.path}: a {ckpt.arch} is not a bi-encoder tower")


def _st_similarity(ckpt: HFCheckpoint, made: dict, pooling, normalize) -> tuple[str, bool]:
    """Pooling and normalisation of a biencoder converted from ``ckpt``: a sentence-transformers
    model keeps its own similarity unless ``pooling`` is given; else [CLS], unnormalised."""
    if pooling is None:
        st = read_st_modules(ckpt.path, ckpt.bert.hidden_size)
        if st is not None:
            pooling = st.pooling
            normalize = st.normalize if normalize is None else normalize
            print(f"{st.modules_file}: sentence-transformers {st.describe()} "
                  f"(normalize={normalize}; --pooling overrides)", file=sys.stderr)  # fmt: skip
            made["sentence_transformers"] = {
                "pooling": st.pooling, "normalize": st.normalize,
                "max_seq_length": st.max_seq_length,
            }  # fmt: skip
    return pooling or "cls", bool(normalize)


def _ctx_tower(ckpt: HFCheckpoint, ctx_from: str | Path, keep_pooler: bool) -> tuple[dict, str]:
    """The passage tower from ``--ctx-from``, checked to match the question tower's shape."""
    ctx = read_hf(ctx_from)
    for k in ctx.dropped:
        print(f"{ctx.path}: ignoring {k}", file=sys.stderr)
    if ctx.arch not in ("DPRContextEncoder", "BertModel"):
        raise ValueError(
            f"{ctx.path}: --ctx-from must be a DPRContextEncoder or a BertModel, found a {ctx.arch}"
        )
    if ctx.bert != ckpt.bert or ctx.projection_dim != ckpt.projection_dim:
        diff = [
            f"{f.name}: {getattr(ckpt.bert, f.name)} vs {getattr(ctx.bert, f.name)}"
            for f in dataclasses.fields(BertConfig)
            if getattr(ckpt.bert, f.name) != getattr(ctx.bert, f.name)
        ]
        if ctx.projection_dim != ckpt.projection_dim:
            diff.append(f"projection_dim: {ckpt.projection_dim} vs {ctx.projection_dim}")
        raise ValueError(
            f"{ckpt.path / 'config.json'} and {ctx.path / 'config.json'} describe "
            f"different towers ({'; '.join(diff)})"
        )
    return _tower(ctx, keep_pooler), ctx.source


def _biencoder_from_hf(
    ckpt: HFCheckpoint, made: dict, ctx_from, shared: bool, pooling, normalize
) -> tuple[dict, EncoderConfig]:
    pooling, normalize = _st_similarity(ckpt, made, pooling, normalize)
    keep_pooler = pooling == "pooler"
    q = _tower(ckpt, keep_pooler)
    if ctx_from is not None and shared:
        raise ValueError("--ctx-from and --shared exclude each other")
    params = {"question_encoder": q}
    if ctx_from is not None:
        params["ctx_encoder"], made["ctx_from"] = _ctx_tower(ckpt, ctx_from, keep_pooler)
    elif ckpt.arch == "BertModel":
        if not shared:  # DPR's start point: both towers are copies of the same BERT
            params["ctx_encoder"] = _copy_tree(q)
    elif not shared:
        raise ValueError(
            f"{ckpt.path}: a {ckpt.arch} holds one tower; pass --ctx-from with the "
            "DPRContextEncoder, or --shared to use this tower for questions and passages"
        )
    elif ckpt.arch == "DPRContextEncoder":
        print(f"{ckpt.path}: DPRContextEncoder used for both towers (--shared)", file=sys.stderr)
    config = EncoderConfig(
        ckpt.bert, shared=shared, pooling=pooling, projection_dim=ckpt.projection_dim,
        add_pooling_layer=keep_pooler, normalize=normalize,
    )  # fmt: skip
    return params, config


def _bert_from_hf(ckpt: HFCheckpoint) -> tuple[dict, tuple[BertConfig, bool]]:
    if ckpt.arch == "DPRReader" or ckpt.projection_dim:
        raise ValueError(
            f"{ckpt.path}: --kind bert takes a BertModel or a DPR encoder without "
            f"encode_proj, not a {ckpt.arch}"
            + (f" with projection_dim={ckpt.projection_dim}" if ckpt.projection_dim else "")
        )
    return _tower(ckpt, ckpt.has_pooler)["bert_model"], (ckpt.bert, ckpt.has_pooler)


def _reader_from_hf(ckpt: HFCheckpoint, made: dict, seed: int) -> tuple[dict, BertConfig]:
    if ckpt.arch == "DPRReader":
        return ckpt.flax_params(), ckpt.bert
    if ckpt.arch != "BertModel":
        raise ValueError(f"{ckpt.path}: a {ckpt.arch} cannot become a reader")
    import jax

    fresh = init_reader_params(ckpt.bert, jax.random.PRNGKey(seed))
    made["fresh_heads_seed"] = seed
    params = {
        "encoder": {"bert_model": ckpt.flax_params(add_pooling_layer=False)},
        "qa_outputs": jax.tree.map(np.asarray, fresh["qa_outputs"]),
        "qa_classifier": jax.tree.map(np.asarray, fresh["qa_classifier"]),
    }
    return params, ckpt.bert


def convert_from_hf(
    src: str | Path,
    out: str | Path,
    kind: str = "auto",
    ctx_from: str | Path | None = None,
    shared: bool = False,
    pooling: str | None = None,
    tokenizer: str | Path | None = None,
    seed: int = 0,
    overwrite: bool = False,
    normalize: bool | None = None,
) -> Path:
    """Hugging Face checkpoint(s) -> dpr-jax model directory (see the module docstring).

    ``pooling=None``: a sentence-transformers source's own pooling (and, unless ``normalize``
    is given, its normalisation), else "cls". ``normalize=None``: the source's, else False.
    """

    _check_out(out, MODEL, src, ctx_from, tokenizer)
    out = _prepare_out(Path(out), overwrite)
    ckpt = read_hf(src)
    for k in ckpt.dropped:
        print(f"{ckpt.path}: ignoring {k}", file=sys.stderr)
    if kind == "auto":
        kind = "reader" if ckpt.arch == "DPRReader" else "biencoder"
    if kind not in ("biencoder", "bert", "reader"):
        raise ValueError(f"kind must be auto, biencoder, bert or reader; got {kind!r}")
    if kind != "biencoder" and (ctx_from or shared or pooling or normalize is not None):
        raise ValueError(
            "--ctx-from, --shared, --pooling and --normalize only apply to --kind biencoder"
        )
    made = {"source": ckpt.source, "architecture": ckpt.arch, "kind": kind}
    if kind == "biencoder":
        params, config = _biencoder_from_hf(ckpt, made, ctx_from, shared, pooling, normalize)
    elif kind == "bert":
        params, config = _bert_from_hf(ckpt)
    else:
        params, config = _reader_from_hf(ckpt, made, seed)

    tok = Path(tokenizer) if tokenizer is not None else (ckpt.path if ckpt.has_tokenizer else None)
    if tok is None:
        raise FileNotFoundError(
            f"{ckpt.path}: no tokenizer files ({', '.join(_TOKENIZER_FILES[:3])}); "
            "pass --tokenizer with a directory that has them"
        )
    return save_model(out, params, kind, config, tokenizer=tok, extra={"converted_from": made})


def convert_from_dpr(
    src: str | Path,
    out: str | Path,
    tokenizer: str | Path | None = None,
    heads: int | None = None,
    overwrite: bool = False,
) -> Path:
    """facebookresearch/DPR checkpoint file (``.cp``) -> dpr-jax model directory.

    A bi-encoder file becomes a bi-encoder (both towers, [CLS] pooling, their ``encode_proj``
    when DPR's ``projection_dim`` > 0), a reader file a reader (span and relevance heads): the
    model ``convert_from_hf`` makes of the equivalent transformers DPR classes. The file is read
    without running code from it (:mod:`dpr_jax.dpr_checkpoint`); the BERT's shape comes from the
    weights, its number of attention heads from ``heads`` or from encoder_params'
    ``pretrained_model_cfg`` when that names a known BERT. ``tokenizer`` (a directory or hub id)
    is required: a ``.cp`` file holds none (DPR tokenizes with ``pretrained_model_cfg``'s).
    """
    from dpr_jax.dpr_checkpoint import (
        DPR_BERT_PREFIX,
        infer_bert_config,
        jsonable_options,
        projection_dim,
        read_dpr_checkpoint,
    )

    _check_out(out, src, tokenizer)
    out = _prepare_out(Path(out), overwrite)
    if tokenizer is None:  # before reading a file of several GB
        raise FileNotFoundError(
            f"{src}: a DPR checkpoint holds no tokenizer; pass --tokenizer with the tokenizer of "
            "its pretrained_model_cfg (a directory or hub id: bert-base-uncased for DPR's "
            "released models)"
        )
    cp = read_dpr_checkpoint(src)
    towers: dict[str, HFCheckpoint] = {}
    ignored = list(cp.dropped)
    bert = None
    for arch, sd in cp.state_dicts.items():
        bert_keys = cp.bert_keys[arch]
        where = f"{cp.path} ({DPR_BERT_PREFIX[arch]}* weights)"
        bert = bert or infer_bert_config(bert_keys, where, heads, cp.options)
        proj = projection_dim(bert_keys) if arch in DPR_ENCODERS else 0
        norm, dropped = normalize_hf_state_dict(sd, arch)
        ignored += [_dpr_key_names(repr(k)).strip("'") for k in dropped]  # pooler, position_ids
        towers[arch] = HFCheckpoint(
            cp.path, str(src), arch, bert, proj, norm, cp.path, dropped, False
        )
    try:
        if cp.kind == "biencoder":
            q, c = towers["DPRQuestionEncoder"], towers["DPRContextEncoder"]
            if q.projection_dim != c.projection_dim:
                raise ValueError(
                    f"{cp.path}: question_model projects to {q.projection_dim or 'nothing'}, "
                    f"ctx_model to {c.projection_dim or 'nothing'}; DPR's towers share one "
                    "projection_dim"
                )
            params = {
                "question_encoder": q.flax_params()["question_encoder"],
                "ctx_encoder": c.flax_params()["ctx_encoder"],
            }
            config: Any = EncoderConfig(bert, pooling="cls", projection_dim=q.projection_dim)
        else:
            params, config = towers["DPRReader"].flax_params(), bert
    except ValueError as e:  # a key or shape check: name the keys as the .cp file spells them
        if not str(e).startswith(str(cp.path)):
            raise
        raise ValueError(_dpr_key_names(str(e))) from None
    if ignored:  # BERT poolers ([CLS] is read), buffers, a reader's encode_proj
        print(f"{cp.path}: ignoring {len(ignored)} entries the DPR model never reads "
              f"({', '.join(ignored[:4])}{', ...' if len(ignored) > 4 else ''})", file=sys.stderr)  # fmt: skip
    made = {
        "source": str(src), "format": "facebookresearch/DPR checkpoint", "kind": cp.kind,
        "encoder_params": jsonable_options(cp.options), "epoch": _plain_number(cp.epoch),
        "offset": _plain_number(cp.offset), "num_attention_heads": bert.num_attention_heads,
    }  # fmt: skip
    return save_model(out, params, cp.kind, config, tokenizer=tokenizer,
                      extra={"converted_from": made})  # fmt: skip


def _plain_number(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


_DPR_PREFIXES = (  # transformers key prefix -> DPR's (the inverse of dpr_checkpoint's mapping)
    ("question_encoder.bert_model.", "question_model."),
    ("question_encoder.encode_proj", "question_model.encode_proj"),
    ("ctx_encoder.bert_model.", "ctx_model."),
    ("ctx_encoder.encode_proj", "ctx_model.encode_proj"),
    ("span_predictor.encoder.bert_model.", "encoder."),
    ("span_predictor.qa_", "qa_"),
)


def _dpr_key_names(message: str) -> str:
    for hf, dpr in _DPR_PREFIXES:
        message = message.replace(f"'{hf}", f"'{dpr}")
    return message


def _copy_tree(tree: dict) -> dict:
    return {k: _copy_tree(v) if isinstance(v, dict) else np.array(v) for k, v in tree.items()}


# --------------------------------------------------------------------------------------------
# model directory -> Hugging Face
# --------------------------------------------------------------------------------------------


# (relative dir, arch, bert config, projection_dim, HF state dict) of one exported directory
_Export = tuple[str, str, BertConfig, int, dict]


def _pooler_ok(model_dir: Path, has_pooler: bool, what: str, allow_missing: bool) -> bool:
    """Whether to export the BERT pooler; refuse a missing one unless ``allow_missing``."""
    if has_pooler:
        return True
    if not allow_missing:
        raise ValueError(
            f"{model_dir}: {what} has no BERT pooler weights, and BertModel.from_pretrained "
            "always builds a pooler (it would be initialised randomly). Pass "
            "--allow-missing-pooler to export without it (last_hidden_state is exact, "
            "pooler_output is not), or use --as dpr"
        )
    print(f"{model_dir}: {what}: exporting without pooler weights", file=sys.stderr)
    return False


def _dpr_tower_export(model_dir: Path, config, tp: dict, name: str, hf_dir: str) -> _Export:
    if config.pooling != "cls":
        raise ValueError(
            f"{model_dir}: pooling is {config.pooling!r}, DPR's Hugging Face classes "
            "take the [CLS] vector; export with --as sentence-transformers, or --as bert "
            "and pool yourself"
        )
    if config.normalize:
        raise ValueError(
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
    towers = {"question": "question_encoder", "ctx": "ctx_encoder"}
    todo = []
    for name in list(towers) if tower == "both" else [tower]:
        src_tower = "question_encoder" if config.shared else towers[name]
        tp = params[src_tower]
        if as_ == "dpr":
            todo.append(_dpr_tower_export(model_dir, config, tp, name, towers[name]))
            continue
        if config.projection_dim:
            raise ValueError(
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


def _single_export(
    model_dir: Path, kind: str, config, params: dict, as_: str, allow_missing_pooler: bool
) -> _Export:
    if kind == "bert":
        if as_ != "bert":
            raise ValueError(f"{model_dir}: a bert model exports as BertModel (--as bert)")
        bert, _ = config
        pool = _pooler_ok(model_dir, "pooler_dense" in params, "the model", allow_missing_pooler)
        sd = flax_to_hf_state_dict(params, "BertModel", bert, 0, pool, where=str(model_dir))
        return "", "BertModel", bert, 0, sd
    if as_ != "dpr":
        raise ValueError(f"{model_dir}: a reader exports as DPRReader (--as dpr)")
    sd = flax_to_hf_state_dict(params, "DPRReader", config, where=str(model_dir))
    return "", "DPRReader", config, 0, sd


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
        raise ValueError(f"tower must be question, ctx or both; got {tower!r}")
    if as_ not in EXPORT_FORMATS:
        raise ValueError(f"--as must be one of {EXPORT_FORMATS}; got {as_!r}")
    model_dir = resolve_model_dir(model_dir)
    _check_out(out, HF_EXPORT, model_dir)
    out = _prepare_out(Path(out), overwrite)
    kind, config, params, meta = load_model(model_dir)
    params = _flatten_to_dict(params)

    st_export = None  # (pooling, normalize, max_seq_length) for --as sentence-transformers
    if as_ == "sentence-transformers":
        st_export = _st_export_settings(model_dir, kind, config, meta)
    if kind == "biencoder":
        todo = _biencoder_exports(model_dir, config, params, tower, as_, allow_missing_pooler)
    elif tower != "both":
        raise ValueError(f"--tower only applies to bi-encoders; {model_dir} holds a {kind}")
    else:
        todo = [_single_export(model_dir, kind, config, params, as_, allow_missing_pooler)]

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


def _st_export_settings(model_dir: Path, kind: str, config, meta: dict) -> tuple[str, bool, int]:
    """(pooling, normalize, max_seq_length) of a sentence-transformers export, or ValueError."""

    if kind != "biencoder":
        raise ValueError(
            f"{model_dir}: holds a {kind} model; --as sentence-transformers exports bi-encoders"
        )
    if config.pooling not in ("cls", "mean"):
        raise ValueError(
            f"{model_dir}: pooling {config.pooling!r} has no sentence-transformers Pooling mode "
            "(cls and mean do)"
        )
    if config.projection_dim:
        raise ValueError(
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
