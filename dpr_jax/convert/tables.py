"""Hugging Face state-dict keys <-> dpr-jax Flax parameter paths: the key tables, both ways.

The Flax modules name their parameters after Hugging Face's state-dict keys, so converting is a
rename, a transpose of every Linear weight (``kernel = weight.T``), ``LayerNorm.weight`` <->
``scale`` and ``Embedding.weight`` <-> ``embedding`` (the table is in :mod:`dpr_jax.convert`).
:func:`hf_state_dict_to_flax` and :func:`flax_to_hf_state_dict` work on numpy arrays (no torch)
and are strict: the expected key set and every shape follow from the config, and a missing key,
an extra key or a wrong shape raises ``ValueError`` naming the key. A few legacy layouts are
normalised first (:func:`normalize_hf_state_dict`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from dpr_jax.errors import UserError
from dpr_jax.models.bert import BertConfig

ARCHITECTURES = ("BertModel", "DPRQuestionEncoder", "DPRContextEncoder", "DPRReader")


DPR_ENCODERS = ("DPRQuestionEncoder", "DPRContextEncoder")


# HF key prefix of the BERT inside each architecture, and the Flax path it maps to.
BERT_PREFIX = {
    "BertModel": ("", ()),
    "DPRQuestionEncoder": ("question_encoder.bert_model.", ("question_encoder", "bert_model")),
    "DPRContextEncoder": ("ctx_encoder.bert_model.", ("ctx_encoder", "bert_model")),
    "DPRReader": ("span_predictor.encoder.bert_model.", ("encoder", "bert_model")),
}


TOWER = {"DPRQuestionEncoder": "question_encoder", "DPRContextEncoder": "ctx_encoder"}


_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")  # non-persistent in HF


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


def check_arch(arch: str) -> None:
    if arch not in ARCHITECTURES:
        raise UserError(f"architecture {arch!r} is not supported (have {ARCHITECTURES})")


def param_entries(
    arch: str, bert: BertConfig, projection_dim: int = 0, add_pooling_layer: bool = False
) -> list[_Entry]:
    """Every (HF key, Flax path, HF shape, transpose) that ``arch`` with this config holds."""
    check_arch(arch)
    if arch != "BertModel" and add_pooling_layer:
        raise UserError(f"{arch} has no BERT pooler in transformers 5 (add_pooling_layer=False)")
    if projection_dim and arch not in DPR_ENCODERS:
        raise UserError(f"projection_dim={projection_dim} only exists for {DPR_ENCODERS}")
    hf_pre, fx = BERT_PREFIX[arch]
    entries = list(_bert_entries(bert, add_pooling_layer, hf_pre, fx))
    h = bert.hidden_size
    if projection_dim:
        tower = TOWER[arch]
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
        raise UserError(f"{where}: missing {what} {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise UserError(f"{where}: unexpected {what} {extra[0]!r} ({len(extra)} unexpected)")
    for k, shape in want.items():
        if tuple(got[k]) != tuple(shape):
            raise UserError(
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
    check_arch(arch)
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
