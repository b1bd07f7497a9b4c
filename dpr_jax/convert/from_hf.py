"""Hugging Face checkpoints and facebookresearch/DPR ``.cp`` files -> dpr-jax model directories
(``dpr-jax convert --from-hf`` / ``--from-dpr``; what each source becomes is in
:mod:`dpr_jax.cli.convert`'s help). How a checkpoint becomes each model kind is one function per
kind, :data:`FROM_HF`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np

from dpr_jax.convert.hf_dir import TOKENIZER_FILES, HFCheckpoint, check_out, prepare_out, read_hf
from dpr_jax.convert.tables import DPR_ENCODERS, TOWER, normalize_hf_state_dict
from dpr_jax.dpr_checkpoint import (
    DPR_BERT_PREFIX,
    infer_bert_config,
    jsonable_options,
    projection_dim,
    read_dpr_checkpoint,
)
from dpr_jax.errors import UserError
from dpr_jax.io import MODEL
from dpr_jax.model_dir import save_model
from dpr_jax.models.bert import BERT, BertConfig, PlainBertConfig
from dpr_jax.reader.model import READER, init_reader_params
from dpr_jax.retriever.model import BIENCODER, EncoderConfig
from dpr_jax.st_format import read_st_modules


def _tower(ckpt: HFCheckpoint, keep_pooler: bool) -> dict:
    """{"bert_model": ..., ["encode_proj": ...]} from a BertModel or a DPR encoder."""
    if ckpt.arch == "BertModel":
        if keep_pooler and not ckpt.has_pooler:
            raise UserError(
                f"{ckpt.path}: pooling 'pooler' needs the BERT pooler, this checkpoint has none"
            )
        return {"bert_model": ckpt.flax_params(add_pooling_layer=keep_pooler)}
    if ckpt.arch in DPR_ENCODERS:
        if keep_pooler:
            raise UserError(f"{ckpt.path}: a {ckpt.arch} has no BERT pooler (pooling 'pooler')")
        return ckpt.flax_params()[TOWER[ckpt.arch]]
    raise UserError(f"{ckpt.path}: a {ckpt.arch} is not a bi-encoder tower")


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
        raise UserError(
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
        raise UserError(
            f"{ckpt.path / 'config.json'} and {ctx.path / 'config.json'} describe "
            f"different towers ({'; '.join(diff)})"
        )
    return _tower(ctx, keep_pooler), ctx.source


def _biencoder_from_hf(
    ckpt: HFCheckpoint, made: dict, ctx_from, shared: bool, pooling, normalize, seed
) -> tuple[dict, EncoderConfig]:
    pooling, normalize = _st_similarity(ckpt, made, pooling, normalize)
    keep_pooler = pooling == "pooler"
    q = _tower(ckpt, keep_pooler)
    if ctx_from is not None and shared:
        raise UserError("--ctx-from and --shared exclude each other")
    params = {"question_encoder": q}
    if ctx_from is not None:
        params["ctx_encoder"], made["ctx_from"] = _ctx_tower(ckpt, ctx_from, keep_pooler)
    elif ckpt.arch == "BertModel":
        if not shared:  # DPR's start point: both towers are copies of the same BERT
            params["ctx_encoder"] = _copy_tree(q)
    elif not shared:
        raise UserError(
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


def _no_tower_options(kind: str, ctx_from, shared, pooling, normalize) -> None:
    if ctx_from or shared or pooling or normalize is not None:
        raise UserError(
            f"--ctx-from, --shared, --pooling and --normalize only apply to --kind biencoder, "
            f"not {kind}"
        )


def _bert_from_hf(ckpt: HFCheckpoint, made: dict, seed, **tower_options):
    _no_tower_options(BERT.name, **tower_options)
    if ckpt.arch == "DPRReader" or ckpt.projection_dim:
        raise UserError(
            f"{ckpt.path}: --kind bert takes a BertModel or a DPR encoder without "
            f"encode_proj, not a {ckpt.arch}"
            + (f" with projection_dim={ckpt.projection_dim}" if ckpt.projection_dim else "")
        )
    return _tower(ckpt, ckpt.has_pooler)["bert_model"], PlainBertConfig(ckpt.bert, ckpt.has_pooler)


def _reader_from_hf(ckpt: HFCheckpoint, made: dict, seed: int, **tower_options):
    _no_tower_options(READER.name, **tower_options)
    if ckpt.arch == "DPRReader":
        return ckpt.flax_params(), ckpt.bert
    if ckpt.arch != "BertModel":
        raise UserError(f"{ckpt.path}: a {ckpt.arch} cannot become a reader")
    import jax

    fresh = init_reader_params(ckpt.bert, jax.random.PRNGKey(seed))
    made["fresh_heads_seed"] = seed
    params = {
        "encoder": {"bert_model": ckpt.flax_params(add_pooling_layer=False)},
        "qa_outputs": jax.tree.map(np.asarray, fresh["qa_outputs"]),
        "qa_classifier": jax.tree.map(np.asarray, fresh["qa_classifier"]),
    }
    return params, ckpt.bert


# model kind -> how a Hugging Face checkpoint becomes one: (ckpt, made, ctx_from, shared, pooling,
# normalize, seed) -> (params, config); a new kind adds its entry (tests/test_convert.py checks)
FROM_HF = {
    BIENCODER.name: _biencoder_from_hf,
    BERT.name: _bert_from_hf,
    READER.name: _reader_from_hf,
}


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

    check_out(out, MODEL, src, ctx_from, tokenizer)
    out = prepare_out(Path(out), overwrite)
    ckpt = read_hf(src)
    for k in ckpt.dropped:
        print(f"{ckpt.path}: ignoring {k}", file=sys.stderr)
    if kind == "auto":
        kind = READER.name if ckpt.arch == "DPRReader" else BIENCODER.name
    if kind not in FROM_HF:
        raise UserError(f"kind must be auto or one of {tuple(FROM_HF)}; got {kind!r}")
    made = {"source": ckpt.source, "architecture": ckpt.arch, "kind": kind}
    options = {"ctx_from": ctx_from, "shared": shared, "pooling": pooling,
               "normalize": normalize, "seed": seed}  # fmt: skip
    params, config = FROM_HF[kind](ckpt, made, **options)

    tok = Path(tokenizer) if tokenizer is not None else (ckpt.path if ckpt.has_tokenizer else None)
    if tok is None:
        raise FileNotFoundError(
            f"{ckpt.path}: no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}); "
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
    check_out(out, MODEL, src, tokenizer)
    out = prepare_out(Path(out), overwrite)
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
        if cp.kind == BIENCODER.name:
            q, c = towers["DPRQuestionEncoder"], towers["DPRContextEncoder"]
            if q.projection_dim != c.projection_dim:
                raise UserError(
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
        raise UserError(_dpr_key_names(str(e))) from None
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
