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
from each dev question's first ``eval_passages`` passages, at every k of ``eval_top_k``, with the
default answer selection (:data:`dpr_jax.reader.span.DEFAULT_SELECTION`).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpr_jax.cache import memo
from dpr_jax.convert import read_hf
from dpr_jax.data.tokenize import DPRTokenizer
from dpr_jax.errors import UserError
from dpr_jax.model_dir import (
    MODEL_JSON,
    check_params,
    check_tokenizer_fits,
    load_model,
    model_config,
    read_model_meta,
    resolve_model_dir,
    save_model,
)
from dpr_jax.models.bert import BertConfig, bert_forward_flops
from dpr_jax.models.kinds import KINDS
from dpr_jax.parallel import (
    gather_to_host,
    global_batch_from_local,
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
from dpr_jax.reader.model import READER, Reader, init_reader_params
from dpr_jax.reader.span import ReaderPredictor, evaluate_predictions
from dpr_jax.reader.step import make_train_step
from dpr_jax.training.config import RunConfig, unset_variables_note
from dpr_jax.training.config import expand_path as _expand
from dpr_jax.training.config import minilm_path as _minilm_path
from dpr_jax.training.optimizer import make_optimizer, optimizer_key
from dpr_jax.training.state import TrainState
from dpr_jax.training.trainer import BuiltStep, Trainer


@dataclasses.dataclass(frozen=True)
class ReaderTrainConfig(RunConfig):
    """A reader training run: :class:`~dpr_jax.training.config.RunConfig`'s fields with DPR's
    reader defaults, plus the reader's data layout and dev evaluation.

    Model: ``init_from`` is a dpr-jax model directory of any kind (a biencoder gives its passage
    tower), a Hugging Face directory (BertModel, DPRReader, DPR encoder), or "minilm" (the
    offline MiniLM package); empty: a random BERT from ``model`` (a BertConfig dict) with the
    tokenizer ``tokenizer``. Fresh span / relevance heads are initialised unless the source is a
    reader.
    """

    name: str = "reader"
    batch_size: int = 16  # questions per global batch (DPR: 16)
    eval_batch_size: int = 32  # sequences per forward pass of the dev evaluation
    # DPR's reader: lr 1e-5, eps 1e-8, clip 1.0, no warmup, no weight decay, one epoch
    learning_rate: float = 1e-5
    num_epochs: float = 1.0
    max_grad_norm: float = 1.0
    eval_at_start: bool = False
    # -- data
    data_format: str = "auto"  # auto | retrieval | biencoder | squad
    passages_per_question: int = 24  # M, positive included (DPR: 24)
    max_negatives: int = 50  # negatives drawn from the first ones of each question
    max_answers: int = 10  # gold spans kept per positive (DPR's max_n_answers)
    max_length: int = 350  # tokens per (question, passage) sequence (DPR: 350)
    max_question_length: int = 64
    trailing_sep: bool = False
    # each training batch padded to its longest sequence rounded up to a multiple of this many
    # tokens, not to max_length (0: max_length); the loss is the same, the step shorter
    bucket: int = 32
    # sort questions by length within groups of this many batches (Hugging Face's
    # group_by_length), then shuffle the batches: less padding left with bucket (0: off)
    length_groups: int = 0
    # -- dev evaluation
    eval_passages: int = 50  # passages read per dev question (DPR: 50)
    eval_top_k: tuple[int, ...] = (1, 50)
    max_answer_length: int = 10

    INIT_FROM: typing.ClassVar[str] = "a model directory, a Hugging Face directory or 'minilm'"
    MODEL_HINT: typing.ClassVar[str] = "'{...}' (a BertConfig dict)"
    parse_model = staticmethod(BertConfig.from_dict)

    def check(self, bad) -> None:
        for f in ("passages_per_question", "max_answers", "eval_passages", "max_answer_length",
                  "eval_batch_size", "log_every"):  # fmt: skip
            if getattr(self, f) < 1:
                bad(f, "must be >= 1")
        for f in ("max_negatives", "bucket", "length_groups"):
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        if self.data_format not in FORMATS:
            bad("data_format", f"must be one of {FORMATS}")
        ReaderInputConfig(self.max_length, self.max_question_length, self.trailing_sep)
        if not self.eval_top_k or min(self.eval_top_k) < 1:
            bad("eval_top_k", "must be positive integers")

    @property
    def input_config(self):
        return ReaderInputConfig(self.max_length, self.max_question_length, self.trailing_sep)


# Fields that fix the data order: a checkpoint written with other values cannot be resumed.
_RESUME_FIELDS = (
    "train_path", "data_format", "max_train_examples", "batch_size", "passages_per_question",
    "max_negatives", "max_answers", "max_length", "max_question_length", "trailing_sep", "seed",
    "length_groups",
)  # fmt: skip


def _init_reader(bert_config, rng):
    # one compilation instead of one per eager initializer op
    init = memo(("reader_init",), lambda: jax.jit(init_reader_params, static_argnums=0))
    return init(bert_config, rng)


def _source(config: ReaderTrainConfig) -> tuple[str, Path | None]:
    """Where the reader starts: ("random" | "model" | "hf", path)."""
    src = _expand(config.init_from)
    if not src:
        return "random", None
    path = Path(_minilm_path() if src == "minilm" else src)
    if (path / MODEL_JSON).is_file() or (path / "model" / MODEL_JSON).is_file():
        return "model", path
    if (path / "config.json").is_file():
        return "hf", path
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: no such model directory (ReaderTrainConfig.init_from"
            f"{unset_variables_note(config.init_from)})"
        )
    raise FileNotFoundError(
        f"{path}: neither a dpr-jax model directory nor a Hugging Face one (no config.json)"
    )


def architecture(config: ReaderTrainConfig, planning: bool = False) -> tuple[BertConfig, str]:
    """(BertConfig, note) of the reader ``config`` trains, as :func:`build_reader` finds it,
    without reading any weights. ``planning``: a source that is not on this machine gives way
    to the config's ``model`` dict ("minilm" to its preset), and the note says so."""
    note = ""
    try:
        where, path = _source(config)
    except (FileNotFoundError, UserError):
        if not planning:
            raise
        if _expand(config.init_from) == "minilm":  # the package is not installed here
            where, path = "preset", None
        else:
            where, path, note = "random", None, config.stand_in_note()
    if where == "preset":
        bert = BertConfig.from_dict("all-MiniLM-L6-v2")
    elif where == "random":
        bert = BertConfig.from_dict(config.model)
    elif where == "model":
        meta = read_model_meta(path)
        bert = KINDS[meta["kind"]].bert_of(model_config(meta, path))
    else:
        bert = BertConfig.from_json_file(path / "config.json")
    if planning and 0 < config.bucket < config.max_length:
        note = "; ".join(filter(None, [note, _bucket_note(config)]))
    return config.with_dropout(bert), note


def _bucket_note(config: ReaderTrainConfig) -> str:
    """What a plan of a length-bucketed reader config measures: its longest step."""
    return (
        f"the step at max_length {config.max_length}, the longest a step can be: training pads "
        f"each batch to its own longest sequence rounded up to {config.bucket} tokens "
        "(`bucket`), so memory is right and FLOPs and step time are an upper bound "
        "(`--set bucket=0` pads every step to max_length)"
    )


def build_reader(config: ReaderTrainConfig, rng: jax.Array):
    """-> (BertConfig, float32 reader params, DPRTokenizer, description of the source)."""

    where, path = _source(config)
    params = bert = None
    info: dict[str, Any] = {"init_from": str(path) if path else "random"}
    if where == "random":
        bert_cfg = BertConfig.from_dict(config.model)
    elif where == "model":
        kind, cfg, p, _ = load_model(path)
        spec = KINDS[kind]
        info["kind"] = kind
        bert_cfg = spec.bert_of(cfg)
        if spec is READER:
            params = p
        else:  # a BERT, or a bi-encoder's passage tower: it reads passages, as the reader does
            bert, tower = spec.bert_body(cfg, p)
            if tower:
                info["tower"] = tower
    else:
        ck = read_hf(path)
        info["architecture"] = ck.arch
        bert_cfg = ck.bert
        if ck.arch == "DPRReader":
            params = ck.flax_params()
        else:
            bert = ck.bert_body()
    tok_path = None if path is None else resolve_model_dir(path) if where == "model" else path
    bert_cfg = config.with_dropout(bert_cfg)
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
    check_params(params, READER.abstract_params(bert_cfg), f"reader from {path or 'random'}")
    if config.tokenizer == "minilm":
        tok_path = _minilm_path()
    elif config.tokenizer:
        tok_path = _expand(config.tokenizer)
    tokenizer = DPRTokenizer(tok_path)
    check_tokenizer_fits(f"ReaderTrainConfig.init_from {path or 'random'}", bert_cfg, tokenizer,
                         config.max_length, trained=where != "random")  # fmt: skip
    info["tokenizer"] = tokenizer.path
    return bert_cfg, params, tokenizer, info


# ---------------------------------------------------------------------------------------------
# Data and evaluation


def read_examples(config: ReaderTrainConfig, which: str) -> list:
    path = getattr(config, f"{which}_path")
    if not path:
        raise UserError(f"ReaderTrainConfig.{which}_path is empty")
    path = _expand(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file (ReaderTrainConfig.{which}_path)")
    examples = read_reader_examples(path, config.data_format, config.max_negatives, config.seed)
    limit = config.max_train_examples if which == "train" else config.max_dev_examples
    examples = sample_examples(examples, limit, config.seed)
    if not examples:
        raise UserError(f"{path}: no questions")
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


def build_reader_step(config, bert_cfg, mesh, total: int, warmup: int) -> BuiltStep:
    """The train step of a reader ``config`` over ``mesh`` (real or abstract devices): the one
    builder both ``dpr-jax train-reader`` and ``dpr-jax plan`` use. Reads no parameters."""
    model = Reader(bert_cfg, jnp.dtype(config.dtype), config.remat, matmul_dtype=config.products)
    tx, schedule = make_optimizer(config, total, warmup)
    abstract = jax.eval_shape(lambda p: TrainState.create(p, tx), READER.abstract_params(bert_cfg))
    placed = jax.tree.map(lambda _: replicated(mesh), abstract)
    create = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=placed)
    return BuiltStep(schedule, abstract, placed, create, make_train_step(model, tx, mesh))


def batch_shapes(config: ReaderTrainConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of one global batch (:class:`ReaderTrainData` makes them)."""
    b, m, t, a = (config.batch_size, config.passages_per_question, config.max_length,
                  config.max_answers)  # fmt: skip
    i32, f32 = jnp.int32, jnp.float32
    return {
        "input_ids": ((b, m, t), i32), "attention_mask": ((b, m, t), i32),
        "passage_mask": ((b, m), f32), "start_positions": ((b, a), i32),
        "end_positions": ((b, a), i32), "answer_mask": ((b, a), f32), "question_mask": ((b,), f32),
    }  # fmt: skip


def towers(config: ReaderTrainConfig, bert: BertConfig) -> list:
    """[(BertConfig, sequences, tokens)] one step encodes: B*M (question, passage) pairs."""
    return [(bert, config.batch_size * config.passages_per_question, config.max_length)]


def reader_forward_flops(bert: BertConfig, sequences: int, tokens: int) -> float:
    """Forward FLOPs of the reader on ``sequences`` x ``tokens``: BERT's
    (:func:`bert_forward_flops`), the span head (2 x 2H a token) and the relevance head (2H a
    sequence)."""
    fwd = bert_forward_flops(bert, sequences, tokens)
    return (
        fwd + 2.0 * sequences * tokens * 2 * bert.hidden_size + 2.0 * sequences * bert.hidden_size
    )


def model_flops(config: ReaderTrainConfig, bert: BertConfig) -> float:
    """Model FLOPs of one step over the global batch: 3 x the reader's forward FLOPs of B*M
    sequences x max_length."""
    seqs, t = config.batch_size * config.passages_per_question, config.max_length
    return 3.0 * reader_forward_flops(bert, seqs, t)


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
        self.model = Reader(self.bert_cfg, jnp.dtype(config.dtype), config.remat, config.products)
        self.rtok = ReaderTokenizer(self.tokenizer, config.input_config)
        self.train = ReaderTrainData(
            read_examples(config, "train"), self.rtok, config.passages_per_question,
            config.max_answers, config.max_negatives, config.seed, "train",
            config.progress and primary, config.bucket, config.length_groups,
        )  # fmt: skip
        self.steps_per_epoch = self.train.batches_per_epoch(config.batch_size)
        self.total_steps, self.warmup = config.total_steps(self.steps_per_epoch)
        self.evaluator = None
        if config.dev_path:
            predictor = ReaderPredictor(
                self.params, self.bert_cfg, self.rtok, max_answer_length=config.max_answer_length,
                batch_size=config.eval_batch_size, dtype=config.dtype,
            )  # fmt: skip
            self.evaluator = DevEvaluator(read_examples(config, "dev"), predictor, config)
        self.has_evaluator = self.evaluator is not None
        total, warmup, bert_cfg = self.total_steps, self.warmup, self.bert_cfg
        built = memo(
            ("reader_step", self.bert_cfg, config.dtype, config.products, config.remat,
             optimizer_key(config), total, warmup, mesh),
            lambda: build_reader_step(config, bert_cfg, mesh, total, warmup),
        )  # fmt: skip
        self.create_state, self.schedule, self.train_step = built.create, built.schedule, built.step
        self.abstract = built.abstract_state
        self.rows = process_slice(config.batch_size, mesh)

    def resolved(self) -> dict[str, Any]:
        return {"model": self.bert_cfg.to_dict(), "init": self.init_info,
                "train_data": self.train.stats, "warmup_steps": self.warmup}  # fmt: skip

    def init_state(self) -> TrainState:
        return self.create_state(self.params)

    def abstract_state(self):
        rep = replicated(self.mesh)
        return jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), self.abstract
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
            workdir / "model", params, READER.name, self.bert_cfg, self.tokenizer,
            extra={"reader_input": self.config.input_config.to_dict(),
                   "train_config": self.config.to_dict(), "step": step, "dev_metrics": dev,
                   "init": self.init_info},
        )  # fmt: skip


# the trainer of the reader kind (fields in order: see dpr_jax.training.trainer.Trainer)
TRAINER = Trainer(READER, ReaderTrainConfig, ReaderTask, architecture, build_reader_step,
                  batch_shapes, towers, model_flops)  # fmt: skip
train_and_evaluate = TRAINER.train_and_evaluate
load_config = TRAINER.load_config
