"""facebookresearch/DPR's own checkpoint files (``*.cp``), read safely into Hugging Face layouts.

DPR (Karpukhin et al. 2020; github.com/facebookresearch/DPR) saves ``torch.save`` of
``CheckpointState._asdict()`` (``dpr/utils/model_utils.py``): ``model_dict`` (the state dict),
``optimizer_dict``, ``scheduler_dict``, ``offset``, ``epoch`` and ``encoder_params`` (the encoder's
options: a plain dict in old checkpoints, ``{"do_lower_case", "encoder": <omegaconf DictConfig>}``
in the hydra versions). Each encoder is an ``HFBertEncoder`` (``dpr/models/hf_models.py``), a
``BertModel`` with its pooler and, for ``projection_dim > 0``, an ``encode_proj`` Linear:

=====================================  ==============================================================
DPR ``model_dict`` key                 transformers key (as ``convert_dpr_original_checkpoint_to_pytorch``)
=====================================  ==============================================================
``question_model.<bert key>``          ``question_encoder.bert_model.<bert key>`` (DPRQuestionEncoder)
``question_model.encode_proj.*``       ``question_encoder.encode_proj.*``
``ctx_model.<bert key>``               ``ctx_encoder.bert_model.<bert key>`` (DPRContextEncoder)
``ctx_model.encode_proj.*``            ``ctx_encoder.encode_proj.*``
``encoder.<bert key>`` (reader)        ``span_predictor.encoder.bert_model.<bert key>`` (DPRReader)
``qa_outputs.*``, ``qa_classifier.*``  ``span_predictor.qa_outputs.*``, ``span_predictor.qa_classifier.*``
=====================================  ==============================================================

A reader's ``encoder.encode_proj`` (DPR builds one when ``projection_dim > 0``) is dropped: the
reader's heads read the BERT output, never the projection. The BERT pooler and the
``position_ids`` buffer are left for :func:`dpr_jax.convert.normalize_hf_state_dict` to drop.

The architecture is not stored: :func:`infer_bert_config` reads it from the weight shapes, except
the number of attention heads, which comes from the caller or from ``pretrained_model_cfg`` when
it names a known BERT.

Loading runs no code from the file: ``torch.load(weights_only=True)`` first; when that refuses a
global (DPR stores option objects beside the weights), a restricted unpickler that resolves only
tensor rebuilding, a few builtin containers and ``argparse.Namespace``, and turns omegaconf option
objects into inert stand-ins that merely hold their state. Any other global is refused by name.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import builtins
import collections
import pickle
import re
import types
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from dpr_jax.errors import UserError, optional_import
from dpr_jax.models.bert import BertConfig

CP_FIELDS = ("model_dict", "optimizer_dict", "scheduler_dict", "offset", "epoch", "encoder_params")
# heads and hidden size of the BERTs DPR's configs name (pretrained_model_cfg)
KNOWN_BERTS = {"bert-base": (12, 768), "bert-large": (16, 1024)}
_BIENCODER = {  # DPR tower prefix -> (transformers architecture, transformers tower prefix)
    "question_model.": ("DPRQuestionEncoder", "question_encoder."),
    "ctx_model.": ("DPRContextEncoder", "ctx_encoder."),
}
# transformers architecture -> the prefix of its BERT's keys in DPR's model_dict
DPR_BERT_PREFIX = {"DPRQuestionEncoder": "question_model.", "DPRContextEncoder": "ctx_model.",
                   "DPRReader": "encoder."}  # fmt: skip


class DPRCheckpoint(NamedTuple):
    """A DPR ``.cp`` file mapped onto transformers' DPR classes."""

    path: Path
    kind: str  # "biencoder" or "reader"
    # transformers architecture -> its state dict (numpy float32), in DPR's tower order
    state_dicts: dict[str, dict[str, np.ndarray]]
    bert_keys: dict[str, dict[str, tuple]]  # architecture -> {BertModel key: shape}
    options: dict[str, Any]  # encoder_params, flattened to plain values
    dropped: list[str]  # DPR keys not carried over (a reader's encoder.encode_proj.*)
    epoch: Any
    offset: Any


# --------------------------------------------------------------------------------------------
# loading without running code from the file
# --------------------------------------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    def __init__(self, global_name: str):
        super().__init__(global_name)
        self.global_name = global_name


class _Inert:
    """Stand-in for an option object (an omegaconf node): keeps the pickled state, runs nothing."""

    qualname = "?"

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state):
        self.__dict__["state"] = state

    def __repr__(self):
        return f"<{self.qualname}>"


_INERT: dict[str, type] = {}
_INERT_MODULES = ("omegaconf.",)  # DPR's hydra versions pickle cfg.encoder, a DictConfig
_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "str", "bytes", "int", "float",
                  "bool", "complex", "object"}  # fmt: skip


def _safe_globals() -> dict[str, Any]:
    torch = optional_import("torch", "torch", "reading a DPR checkpoint")
    allowed: dict[str, Any] = {
        "collections.OrderedDict": collections.OrderedDict,
        "collections.defaultdict": collections.defaultdict,
        "argparse.Namespace": argparse.Namespace,
        "torch.Size": torch.Size,
        "torch.device": torch.device,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter",
                 "_rebuild_parameter_with_state"):  # fmt: skip
        if hasattr(torch._utils, name):
            allowed[f"torch._utils.{name}"] = getattr(torch._utils, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    allowed: dict[str, Any] = {}

    def find_class(self, module: str, name: str):
        # Python 2 names (protocol 2 writes ``__builtin__.dict``), as pickle's own find_class maps
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qual = f"{module}.{name}"
        if qual in self.allowed:
            return self.allowed[qual]
        if module == "builtins" and name in _SAFE_BUILTINS:
            return getattr(builtins, name)
        if module.startswith(_INERT_MODULES) or qual == "typing.Any":
            if qual not in _INERT:
                _INERT[qual] = type(name, (_Inert,), {"qualname": qual})
            return _INERT[qual]
        raise _Refused(qual)


def _restricted_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load``: torch subclasses its ``Unpickler`` (tensor storages
    come through torch's own ``persistent_load``) and calls its ``load`` for legacy headers."""
    mod = types.ModuleType("dpr_jax_restricted_pickle")

    class Unpickler(_RestrictedUnpickler):
        allowed = _safe_globals()

    def load(f, **kwargs):
        return Unpickler(f, **kwargs).load()

    mod.Unpickler, mod.load, mod.UnpicklingError = Unpickler, load, pickle.UnpicklingError
    return mod


def _unreadable(path: Path, e: BaseException) -> UserError:
    msg = " ".join(str(e).split())[:200]
    return UserError(
        f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: {msg}); "
        "is the file complete?"
    )


def load_cp(path: str | Path) -> Any:
    """``torch.load`` of a DPR checkpoint file without running code from it (module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file" + (" (a directory)" if path.is_dir() else "")
        )
    torch = optional_import("torch", "torch", f"{path}: reading a DPR checkpoint")
    unreadable = (RuntimeError, EOFError, ValueError, pickle.UnpicklingError, OSError)
    # torch.save's zip files are memory-mapped (a .cp also holds the Adam state: 3x the weights);
    # files from torch < 1.6 (the legacy format) are read whole
    mmap = zipfile.is_zipfile(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError:
        pass  # a global weights_only does not know (DPR's option objects), or a corrupt pickle
    except unreadable as e:
        raise _unreadable(path, e) from None
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, mmap=mmap,
            pickle_module=_restricted_pickle_module(),
        )  # fmt: skip
    except _Refused as e:
        raise UserError(
            f"{path}: refused to load: the file calls or builds {e.global_name}, which no DPR "
            "checkpoint holds (only tensors and option objects are loaded; nothing in the file runs)"
        ) from None
    except unreadable as e:
        raise _unreadable(path, e) from None


def _plain(obj: Any, depth: int = 0) -> Any:
    """Option objects (dicts, Namespaces, omegaconf stand-ins) -> plain Python values."""
    if depth > 20:
        return None
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, _Inert):
        state = obj.__dict__.get("state")
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[1], dict):
            state = {**(state[0] or {}), **state[1]}  # (dict, slots) states
        if isinstance(state, dict) and "_content" in state:
            return _plain(state["_content"], depth + 1)  # DictConfig / ListConfig
        if isinstance(state, dict) and "_val" in state:
            return _plain(state["_val"], depth + 1)  # a value node
        return None
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v, depth + 1) for v in obj]
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return repr(obj)


def encoder_options(encoder_params: Any) -> dict[str, Any]:
    """DPR's ``encoder_params`` (old flat dict, Namespace, or ``{"encoder": DictConfig}``) ->
    one flat dict of plain values (the ``encoder`` group's fields over the top level's)."""
    opts = _plain(encoder_params)
    if not isinstance(opts, dict):
        return {}
    enc = opts.pop("encoder", None)
    if isinstance(enc, dict):
        opts.update(enc)
    return opts


# --------------------------------------------------------------------------------------------
# DPR keys -> transformers keys, and the architecture from the shapes
# --------------------------------------------------------------------------------------------


def _numpy(path: Path, key: str, v) -> np.ndarray:
    if not hasattr(v, "detach"):
        raise UserError(f"{path}: model_dict[{key!r}] is a {type(v).__name__}, not a tensor")
    v = v.detach()
    return (v.float() if v.is_floating_point() else v).numpy()


def read_dpr_checkpoint(path: str | Path) -> DPRCheckpoint:
    """Read a DPR ``.cp`` file (bi-encoder or reader) into transformers DPR state dicts."""
    path = Path(path).expanduser()
    raw = load_cp(path)
    if not isinstance(raw, Mapping) or "model_dict" not in raw:
        have = ", ".join(repr(k) for k in list(raw)[:5]) if isinstance(raw, Mapping) else ""
        raise UserError(
            f"{path}: not a DPR checkpoint: no 'model_dict' "
            + (f"(its keys: {have})" if have else f"(it holds a {type(raw).__name__})")
            + "; DPR's train_dense_encoder.py / train_extractive_reader.py write "
            + "dicts with " + ", ".join(CP_FIELDS)
        )  # fmt: skip
    md = raw["model_dict"]
    if not isinstance(md, Mapping) or not md:
        raise UserError(f"{path}: 'model_dict' is not a non-empty state dict")
    keys = [str(k) for k in md]
    if all(k.startswith("module.") for k in keys):  # saved from inside DataParallel
        md = {k[len("module.") :]: v for k, v in md.items()}
    sd = {str(k): _numpy(path, str(k), v) for k, v in md.items()}
    options = encoder_options(raw.get("encoder_params"))
    model_type = options.get("encoder_model_type")
    if model_type not in (None, "hf_bert"):
        raise UserError(
            f"{path}: encoder_params' encoder_model_type is {model_type!r}; only DPR's "
            "Hugging Face BERT encoders (hf_bert) convert"
        )
    if any(k.startswith(tuple(_BIENCODER)) for k in sd):
        kind, state_dicts, bert_keys, dropped = "biencoder", {}, {}, []
        for pre, (arch, hf_pre) in _BIENCODER.items():
            tower = {k[len(pre) :]: v for k, v in sd.items() if k.startswith(pre)}
            if not tower:
                raise UserError(f"{path}: a bi-encoder checkpoint without {pre}* weights")
            state_dicts[arch] = {
                hf_pre + (k if k.startswith("encode_proj.") else "bert_model." + k): v
                for k, v in tower.items()
            }
            bert_keys[arch] = {k: v.shape for k, v in tower.items()}
        others = [k for k in sd if not k.startswith(tuple(_BIENCODER))]
    elif "qa_outputs.weight" in sd and any(k.startswith("encoder.") for k in sd):
        kind, dropped = "reader", []
        enc = {k[len("encoder.") :]: v for k, v in sd.items() if k.startswith("encoder.")}
        dropped = [f"encoder.{k}" for k in enc if k.startswith("encode_proj.")]
        hf = {"span_predictor.encoder.bert_model." + k: v for k, v in enc.items()
              if not k.startswith("encode_proj.")}  # fmt: skip
        for head in ("qa_outputs", "qa_classifier"):
            hf.update({f"span_predictor.{k}": v for k, v in sd.items() if k.startswith(head + ".")})
        state_dicts = {"DPRReader": hf}
        bert_keys = {"DPRReader": {k: v.shape for k, v in enc.items()}}
        others = [k for k in sd if not k.startswith(("encoder.", "qa_outputs.", "qa_classifier."))]
    else:
        raise UserError(
            f"{path}: model_dict holds neither a DPR bi-encoder (question_model.* and "
            f"ctx_model.* keys) nor a DPR reader (encoder.*, qa_outputs.*, qa_classifier.*); "
            f"its first key is {keys[0]!r}"
        )
    if others:
        raise UserError(
            f"{path}: unexpected key {others[0]!r} in a DPR {kind} model_dict "
            f"({len(others)} unexpected)"
        )
    return DPRCheckpoint(
        path, kind, state_dicts, bert_keys, options, dropped, raw.get("epoch"), raw.get("offset")
    )


def _known_bert(name: str) -> tuple[int, int] | None:
    base = re.sub(r"^(google-bert|google)/", "", name.strip().rstrip("/").lower())
    for prefix, spec in KNOWN_BERTS.items():
        if base == prefix or base.startswith(prefix + "-"):
            return spec
    return None


def infer_bert_config(
    bert_keys: Mapping[str, tuple], where: str, heads: int | None, options: Mapping[str, Any]
) -> BertConfig:
    """A BertConfig from a BertModel state dict's shapes (``{key: shape}``); the number of heads
    from ``heads`` or from ``options['pretrained_model_cfg']`` naming a known BERT."""

    def shape(key: str) -> tuple:
        for k in (key, key.replace(".weight", ".gamma")):
            if k in bert_keys:
                return tuple(bert_keys[k])
        raise UserError(f"{where}: missing BERT weight {key!r}; not a BERT encoder")

    vocab, hidden = shape("embeddings.word_embeddings.weight")
    layers = {int(m.group(1)) for k in bert_keys if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
    if not layers:
        raise UserError(f"{where}: no encoder.layer.N weights; not a BERT encoder")
    cfg_name = options.get("pretrained_model_cfg")
    if heads is None:
        known = _known_bert(str(cfg_name)) if cfg_name else None
        if known is None:
            raise UserError(
                f"{where}: the number of attention heads is not in the file, and "
                f"pretrained_model_cfg {cfg_name!r} is not a BERT it knows "
                f"({', '.join(k + '-*' for k in KNOWN_BERTS)}); pass --heads N"
            )
        heads, known_hidden = known
        if known_hidden != hidden:
            raise UserError(
                f"{where}: pretrained_model_cfg {cfg_name!r} has hidden size {known_hidden}, the "
                f"weights have {hidden}; pass --heads N"
            )
    if heads <= 0 or hidden % heads:
        raise UserError(f"{where}: hidden size {hidden} is not a multiple of --heads {heads}")
    fields: dict[str, Any] = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=max(layers) + 1,
        num_attention_heads=heads,
        intermediate_size=shape("encoder.layer.0.intermediate.dense.weight")[0],
        max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
    )
    dropout = options.get("dropout")
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and dropout:
        # HFBertEncoder.init_encoder: a non-zero encoder dropout replaces both BERT dropouts
        fields["hidden_dropout_prob"] = fields["attention_probs_dropout_prob"] = float(dropout)
    return BertConfig(**fields)


def projection_dim(bert_keys: Mapping[str, tuple]) -> int:
    """DPR's ``projection_dim``: the output size of ``encode_proj``, 0 without one."""
    shape = bert_keys.get("encode_proj.weight")
    return int(shape[0]) if shape is not None else 0


def jsonable_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The encoder options worth recording beside the converted model (plain values only)."""
    return {
        k: v for k, v in options.items()
        if v is None or isinstance(v, (str, int, float, bool))
    }  # fmt: skip


__all__ = [
    "DPR_BERT_PREFIX",
    "DPRCheckpoint",
    "encoder_options",
    "infer_bert_config",
    "jsonable_options",
    "load_cp",
    "projection_dim",
    "read_dpr_checkpoint",
]
