"""Training DPR's extractive reader (Karpukhin et al. 2020, sec. 6.1; DPR's ``train_extractive_reader.py``).

Each training question comes with M passages, its positive at index 0 (:mod:`dpr_jax.reader.data`);
the loss is DPR's (:mod:`dpr_jax.reader.loss`) and the step (:mod:`dpr_jax.reader.step`) runs
data-parallel over every device. The run itself (work directory, resume, evaluation and
checkpoint cadence, export of a ``reader`` model directory) is the loop both models share,
:func:`dpr_jax.training.loop.train_and_evaluate`; this module is the reader's :class:`ReaderTask`
for it and the config :class:`ReaderTrainConfig`. Optimizer (shared with ``dpr-jax train``,
:mod:`dpr_jax.training.optimizer`): AdamW, linear warmup then linear decay (DPR's
``get_schedule_linear``), global-norm clipping.

The data order is a pure function of the step (:class:`dpr_jax.reader.data.ReaderTrainData`),
so a run resumed from its latest checkpoint ends with exactly the parameters of an uninterrupted
one. Dev evaluation: DPR's EM (and F1) of the answers read by :class:`dpr_jax.reader.span.ReaderPredictor`
from each dev question's first ``eval_passages`` passages, at every k of ``eval_top_k``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpr_jax.cache import memo
from dpr_jax.checkpoint import MODEL_JSON, abstract_params, check_params, load_model, save_model
from dpr_jax.data.tokenize import DPRTokenizer
from dpr_jax.models.bert import BertConfig
from dpr_jax.parallel import (
    gather_to_host,
    global_batch_from_local,
    make_mesh,
    process_slice,
    replicated,
)
from dpr_jax.reader.data import (
    FORMATS,
    ReaderInputConfig,
    ReaderTokenizer,
    ReaderTrainData,
    read_reader_examples,
    sample_examples,
)
from dpr_jax.reader.model import Reader, init_reader_params
from dpr_jax.reader.span import ReaderPredictor, evaluate_predictions
from dpr_jax.reader.step import make_train_step
from dpr_jax.training import config as training_config
from dpr_jax.training import loop
from dpr_jax.training.config import check_model_source, check_training_fields
from dpr_jax.training.config import expand_path as _expand
from dpr_jax.training.config import minilm_path as _minilm_path
from dpr_jax.training.optimizer import make_optimizer, optimizer_key
from dpr_jax.training.state import TrainState

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

        if self.data_format not in FORMATS:
            bad("data_format", f"must be one of {FORMATS}")
        ReaderInputConfig(self.max_length, self.max_question_length, self.trailing_sep)
        check_training_fields(self, bad)
        if not self.eval_top_k or min(self.eval_top_k) < 1:
            bad("eval_top_k", "must be positive integers")
        check_model_source(self, bad, BertConfig.from_dict,
                           "a model directory, a Hugging Face directory or 'minilm'")  # fmt: skip

    @property
    def input_config(self):
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


# ---------------------------------------------------------------------------------------------
# Loss and step


# ---------------------------------------------------------------------------------------------
# Model


def _no_pooler(bert: dict) -> dict:
    return {k: v for k, v in bert.items() if not k.startswith("pooler")}


def _init_reader(bert_config, rng):
    # one compilation instead of one per eager initializer op
    init = memo(("reader_init",), lambda: jax.jit(init_reader_params, static_argnums=0))
    return init(bert_config, rng)


def build_reader(config: ReaderTrainConfig, rng: jax.Array):
    """-> (BertConfig, float32 reader params, DPRTokenizer, description of the source)."""

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


def read_examples(config: ReaderTrainConfig, which: str) -> list:
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


@dataclasses.dataclass(frozen=True)
class StepPosition:
    """The reader's data position: its batches are a pure function of the step."""

    step: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step}


def build_reader_step(config, bert_cfg, mesh, total: int, warmup: int):
    """(optimizer, schedule, jitted train step) of a reader ``config`` over ``mesh`` (real or
    abstract devices): the one builder both ``dpr-jax train-reader`` and ``dpr-jax plan`` use."""
    model = Reader(bert_cfg, dtype=jnp.dtype(config.dtype), remat=config.remat)
    tx, schedule = make_optimizer(config, total, warmup)
    return tx, schedule, make_train_step(model, tx, mesh)


class ReaderTask:
    """The reader's part of :func:`dpr_jax.training.loop.train_and_evaluate`: question batches
    that are a pure function of the step, DPR's reader loss, EM / F1 on dev questions, and the
    export of a ``reader`` model directory."""

    log_keys = None
    rate_name = "questions_per_s"

    def __init__(self, config: ReaderTrainConfig):
        self.config = config
        self.resume_fields = _RESUME_FIELDS
        init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
        self.bert_cfg, self.params, self.tokenizer, self.init_info = build_reader(config, init_rng)

    def expect(self) -> dict[str, Any]:
        return {"model": {"bert": self.bert_cfg.to_dict()}, "config": self.config.to_dict()}

    def prepare(self, mesh) -> None:
        config, primary = self.config, jax.process_index() == 0
        self.mesh = mesh
        self.model = Reader(self.bert_cfg, dtype=jnp.dtype(config.dtype), remat=config.remat)
        self.rtok = ReaderTokenizer(self.tokenizer, config.input_config)
        self.train = ReaderTrainData(
            read_examples(config, "train"), self.rtok, config.passages_per_question,
            config.max_answers, config.max_negatives, config.seed, "train",
            config.progress and primary,
        )  # fmt: skip
        self.steps_per_epoch = self.train.batches_per_epoch(config.batch_size)
        self.total_steps = config.num_steps or max(
            1, math.ceil(config.num_epochs * self.steps_per_epoch)
        )
        self.warmup = config.warmup_steps or int(config.warmup_fraction * self.total_steps)
        self.evaluator = None
        if config.dev_path:
            predictor = ReaderPredictor(
                self.params, self.bert_cfg, self.rtok, max_answer_length=config.max_answer_length,
                batch_size=config.eval_batch_size, dtype=config.dtype,
            )  # fmt: skip
            self.evaluator = DevEvaluator(read_examples(config, "dev"), predictor, config)
        self.has_evaluator = self.evaluator is not None
        total, warmup, bert_cfg = self.total_steps, self.warmup, self.bert_cfg
        self.tx, self.schedule, self.train_step = memo(
            ("reader_step", self.bert_cfg, config.dtype, config.remat, optimizer_key(config),
             total, warmup, mesh),
            lambda: build_reader_step(config, bert_cfg, mesh, total, warmup),
        )  # fmt: skip
        self.rows = process_slice(config.batch_size, mesh)

    def resolved(self) -> dict[str, Any]:
        return {"model": self.bert_cfg.to_dict(), "init": self.init_info,
                "train_data": self.train.stats, "warmup_steps": self.warmup}  # fmt: skip

    def init_state(self) -> TrainState:
        return jax.device_put(TrainState.create(self.params, self.tx), replicated(self.mesh))

    def abstract_state(self):
        rep = replicated(self.mesh)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
            jax.eval_shape(lambda p: TrainState.create(p, self.tx), self.params),
        )

    def initial_position(self) -> StepPosition:
        return StepPosition()

    def position_from_dict(self, d: dict[str, Any]) -> StepPosition:
        return StepPosition(int(d["step"]))

    def iterate(self, position: StepPosition):
        step = position.step
        while True:
            local = self.train.batch(step, self.config.batch_size, self.rows)
            step += 1
            yield StepPosition(step), global_batch_from_local(local, self.mesh)

    def next_position(self, position: StepPosition) -> StepPosition:
        return StepPosition(position.step + 1)

    def epoch(self, position: StepPosition, step: int) -> float:
        return step / self.steps_per_epoch

    def evaluate(self, state) -> dict[str, float]:
        params = state.params if jax.process_count() == 1 else gather_to_host(state.params)
        return self.evaluator(params)

    def eval_line(self, m: dict[str, float], step: int) -> str:
        ks = " ".join(f"EM@{k} {100 * m[f'em@{k}']:.2f} F1@{k} {100 * m[f'f1@{k}']:.2f}"
                      for k in self.evaluator.top_k)  # fmt: skip
        return f"{ks} ({int(m['questions'])} q)"

    def postfix(self, m: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{m['loss']:.3f}", "sel": f"{m['select_acc']:.2f}",
                "start": f"{m['start_acc']:.2f}"}  # fmt: skip

    def export(self, workdir: Path, params, step: int, dev: dict | None) -> Path:
        return save_model(
            workdir / "model", params, "reader", self.bert_cfg, self.tokenizer,
            extra={"reader_input": self.config.input_config.to_dict(),
                   "train_config": self.config.to_dict(), "step": step, "dev_metrics": dev,
                   "init": self.init_info},
        )  # fmt: skip


def train_and_evaluate(config: ReaderTrainConfig, workdir: str | Path) -> dict[str, float]:
    """Train (or resume) the reader of ``config`` in ``workdir``
    (:func:`dpr_jax.training.loop.train_and_evaluate`); returns the final dev metrics (or the
    last train metrics without a dev set), with ``step``."""
    return loop.train_and_evaluate(ReaderTask(config), workdir, make_mesh())


def load_config(path: str | Path, overrides: list[str] | None = None) -> ReaderTrainConfig:
    """A reader config file (``get_config()`` -> ReaderTrainConfig or a dict) with overrides."""
    return training_config.load_config(path, ReaderTrainConfig, overrides)
