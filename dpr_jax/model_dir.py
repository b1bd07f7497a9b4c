"""Model directories: orbax parameters + the resolved config + the tokenizer, validated on load.

A *model directory* is what ``dpr-jax convert`` writes and what ``encode`` / ``retrieve`` /
``ask`` read::

    MODEL_DIR/
      dpr_jax_model.json   {"kind": "biencoder"|"bert"|"reader", "model": {...}, "created_by": ...}
      params/              orbax checkpoint of the parameter pytree (float32)
      tokenizer files      (tokenizer.json, vocab.txt, ...)
      manifest.json        size and sha256 of every file above (:mod:`dpr_jax.io`)

``dpr_jax_model.json`` also records ``params_sha256``, a hash of the parameter bytes
(:func:`dpr_jax.io.fingerprint_arrays`): the model's identity wherever it is stored, which
embeddings and indexes record so that a question encoder can be matched to its passage index.

Loading first checks every file against the manifest (a flipped byte, an edited config or a
planted file is refused by name), then the stored tree against the parameters the config implies
(a missing key, an extra key or a wrong shape names the key, a head count that does not divide
the hidden size is refused by the config), then the parameters against ``params_sha256`` and for finite values.
Saving refuses a path that holds anything but a model directory (:func:`dpr_jax.io.check_output`),
then writes into a temporary sibling directory and swaps it into place
(:func:`dpr_jax.io.replace_dir`), so a failed save never leaves a half-written model where a good
one was, and the path never stops naming a complete model. Model directories written before
manifests existed are refused with a message; ``dpr-jax add-manifest DIR``
adds one to a directory you trust.

Training work directories (``dpr-jax train``) hold orbax ``CheckpointManager`` steps and, once
training ends, a model directory ``WORKDIR/model``; ``resolve_model_dir`` accepts either.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax.traverse_util import flatten_dict

from dpr_jax import __version__
from dpr_jax.data.tokenize import DPRTokenizer
from dpr_jax.errors import UserError
from dpr_jax.io import (
    MANIFEST,
    MODEL,
    IntegrityError,
    check_output,
    fingerprint_arrays,
    read_json_object,
    staged_dir,
    verify_manifest,
    write_manifest,
)
from dpr_jax.models.kinds import KINDS, model_kind

MODEL_JSON = "dpr_jax_model.json"
MODEL_FORMAT = "dpr-jax-model/1"


class ModelIntegrityError(IntegrityError):
    """A model directory's file is missing, altered, unlisted or inconsistent with its config."""


def check_params(params: dict, expected: dict, where: str) -> None:
    """Raise ValueError naming the first missing / extra / mis-shaped key."""
    got = {"/".join(k): v for k, v in flatten_dict(params).items()}
    want = {"/".join(k): v for k, v in flatten_dict(expected).items()}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing:
        raise UserError(f"{where}: missing parameter {missing[0]!r} ({len(missing)} missing)")
    if extra:
        raise UserError(f"{where}: unexpected parameter {extra[0]!r} ({len(extra)} extra)")
    for k in sorted(want):
        if tuple(got[k].shape) != tuple(want[k].shape):
            raise UserError(
                f"{where}: parameter {k!r} has shape {tuple(got[k].shape)}, "
                f"the config expects {tuple(want[k].shape)}"
            )


def save_model(
    out_dir: str | Path,
    params: dict,
    kind: str,
    config,
    tokenizer=None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a model directory atomically. ``tokenizer``: a DPRTokenizer, a HF tokenizer or a path."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    spec = model_kind(kind, f"save_model({out_dir})")
    check_params(params, spec.abstract_params(config), f"save_model({out_dir})")
    check_output(out_dir, MODEL, what="model path")  # only a model directory is replaced
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: exists (pass overwrite=True to replace it)")
    with staged_dir(out_dir) as tmp:
        params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
        # this process alone: in a multi-process job one process writes the model directory
        # (training/loop.py), and orbax's default checkpointer would wait for all of them
        me = jax.process_index()
        alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me})
        ckptr = ocp.StandardCheckpointer(multiprocessing_options=alone)
        ckptr.save(tmp / "params", params)
        ckptr.wait_until_finished()
        ckptr.close()
        meta = {
            "kind": spec.name,
            "model": spec.config_to_dict(config),
            "created_by": f"dpr-jax {__version__}",
            "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            **(extra or {}),
            "params_sha256": fingerprint_arrays(params),
        }
        (tmp / MODEL_JSON).write_text(json.dumps(meta, indent=2))
        if tokenizer is not None:
            if isinstance(tokenizer, (str, Path)):
                tokenizer = DPRTokenizer(tokenizer)
            save = getattr(tokenizer, "save", None) or tokenizer.save_pretrained
            save(str(tmp))
        write_manifest(tmp, MODEL_FORMAT)
    return out_dir


def read_model_meta(model_dir: str | Path) -> dict[str, Any]:
    model_dir = resolve_model_dir(model_dir)
    path = model_dir / MODEL_JSON
    meta = read_json_object(path, "model directory", error=UserError)
    model_kind(meta.get("kind"), f"{path}: field 'kind'")
    if "model" not in meta:
        raise UserError(f"{path}: field 'model' is missing")
    return meta


def resolve_model_dir(path: str | Path) -> Path:
    """A model directory, or a training workdir whose ``model/`` subdirectory is one."""
    path = Path(path)
    if (path / MODEL_JSON).is_file():
        return path
    if (path / "model" / MODEL_JSON).is_file():
        return path / "model"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model directory")
    raise FileNotFoundError(
        f"{path}: not a dpr-jax model directory (no {MODEL_JSON}); convert one with "
        "`dpr-jax convert --from-hf ...` or train one with `dpr-jax train`"
    )


def load_model(model_dir: str | Path, expect_kind: str | None = None):
    """-> (kind, config, params, meta). Refuses a checkpoint that does not match its config."""

    model_dir = resolve_model_dir(model_dir)
    verify_model_files(model_dir)
    meta = read_model_meta(model_dir)
    kind = meta["kind"]
    if expect_kind is not None and kind != expect_kind:
        raise UserError(f"{model_dir}: holds a {kind!r} model, expected {expect_kind!r}")
    config = model_config(meta, model_dir / MODEL_JSON)
    params = _restore(model_dir)
    params_dir = model_dir / "params"
    check_params(params, KINDS[kind].abstract_params(config), str(params_dir))
    want = meta.get("params_sha256")
    got = fingerprint_arrays(params)
    if want != got:
        raise ModelIntegrityError(
            f"{model_dir / MODEL_JSON}: field 'params_sha256' is {want!r} but the parameters in "
            f"{params_dir} hash to {got!r} (altered); re-create the model directory"
        )
    for key, leaf in flatten_dict(params).items():
        if not np.isfinite(np.asarray(leaf)).all():
            raise ModelIntegrityError(f"{params_dir}: parameter {'/'.join(key)!r} is not finite")
    return kind, config, params, meta


def model_config(meta: dict, where: object = "model config"):
    """The config of the model that ``meta`` (a ``dpr_jax_model.json``) describes (a head count
    that does not divide the hidden size is refused by BertConfig)."""
    try:
        return KINDS[meta["kind"]].config_from_dict(meta["model"])
    except (TypeError, KeyError, ValueError) as e:
        raise UserError(f"{where}: bad model config ({e})") from None


def _restore(model_dir: Path) -> dict:
    import orbax.checkpoint as ocp

    params_dir = model_dir / "params"
    if not params_dir.is_dir():
        raise FileNotFoundError(f"{params_dir}: parameters missing")
    try:
        return ocp.StandardCheckpointer().restore(params_dir.absolute())
    except Exception as e:  # orbax raises many types for truncated / foreign data
        raise UserError(
            f"{params_dir}: cannot read the parameters ({type(e).__name__}: {e})"
        ) from e


def verify_model_files(model_dir: str | Path) -> dict:
    """Every file of a model directory against its manifest (sha256), none unlisted."""
    model_dir = Path(model_dir)
    return verify_manifest(
        model_dir,
        checksums=True,
        required=(MODEL_JSON,),
        what="model directory",
        error=ModelIntegrityError,
        missing_hint="model directories carry a manifest of checksums since dpr-jax 0.2; "
        "re-create this one (`dpr-jax convert --from-hf ...` or `dpr-jax train`), or, if you "
        f"trust its files, run `dpr-jax add-manifest {model_dir}`",
    )


def add_manifest(model_dir: str | Path) -> Path:
    """Give a model directory written before manifests its ``params_sha256`` and manifest.

    Only for a directory you trust: its files are taken as they are (the config and the
    parameter shapes are still checked against each other)."""
    model_dir = resolve_model_dir(model_dir)
    if (model_dir / MANIFEST).exists():
        raise FileExistsError(f"{model_dir / MANIFEST}: exists already")
    meta = read_model_meta(model_dir)
    config = model_config(meta, model_dir / MODEL_JSON)
    params = _restore(model_dir)
    check_params(params, KINDS[meta["kind"]].abstract_params(config), str(model_dir / "params"))
    meta["params_sha256"] = fingerprint_arrays(params)
    (model_dir / MODEL_JSON).write_text(json.dumps(meta, indent=2))
    write_manifest(model_dir, MODEL_FORMAT)
    return model_dir


def check_tokenizer_fits(
    where, bert, tokenizer, max_length: int | None = None, trained: bool = True
) -> None:
    """Refuse a tokenizer whose ids the model cannot embed (more tokens than its vocabulary) or,
    for a ``trained`` model, one that covers much less of it (a small vocabulary would turn most
    words into [UNK]: not the model's tokenizer), and a ``max_length`` beyond the model's
    position embeddings. The one check of encoding, reading and both trainers."""
    n_tok, n_model = tokenizer.vocab_size, bert.vocab_size
    if n_tok > n_model or (trained and n_tok < n_model // 2):
        raise UserError(
            f"{where}: its tokenizer ({tokenizer.path}) has {n_tok:,} tokens but the model's "
            f"vocabulary {n_model:,} (vocab_size); the tokenizer is not the model's: save the "
            "model with the tokenizer it was trained with"
        )
    if max_length is not None and max_length > bert.max_position_embeddings:
        raise UserError(
            f"{where}: max_length {max_length} exceeds the model's {bert.max_position_embeddings} "
            "positions (max_position_embeddings); give at most that"
        )


def load_tokenizer(model_dir: str | Path):
    return DPRTokenizer(resolve_model_dir(model_dir))
