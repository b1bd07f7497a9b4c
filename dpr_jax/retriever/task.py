"""Training the DPR bi-encoder: the loop around the pure train step (Karpukhin et al. 2020, sec. 5.2).

``train_and_evaluate(config, workdir)`` fine-tunes the question and passage towers with DPR's
recipe: in-batch negatives plus BM25 hard negatives (sec. 3.2), AdamW with a linear warmup then
linear decay of the learning rate, gradient-norm clipping, dropout 0.1 (DPR's
``train_dense_encoder.py`` / ``conf/train/biencoder_nq.yaml``). The step itself
(:mod:`dpr_jax.retriever.step`) is a jitted pure function over a device mesh; this module feeds it
deterministic batches (:mod:`dpr_jax.retriever.batching`), logs, validates, checkpoints and resumes.

Work directory::

    WORKDIR/config.json        the resolved config (TrainConfig fields + derived values)
    WORKDIR/metrics.jsonl      one JSON line per log / validation: {"step", "split", ...}
    WORKDIR/checkpoints/<step> orbax: {"state": {step, params, opt_state},
                                       "data": {position, config, model}}
    WORKDIR/model/             the exported model directory (dpr_jax.model_dir.save_model)

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

Divergence and damage (:mod:`dpr_jax.finite`, enforced by the loop): a non-finite training loss
or gradient norm stops the run with a :class:`~dpr_jax.finite.DivergenceError` naming the step; a
state with a NaN or infinity is never checkpointed nor exported; validation of non-finite scores
reports NaN and stops the run, never "accuracy 1"; a checkpoint whose restored state is not
finite is refused with a :class:`CheckpointError` naming it.

Multi-process runs train, validate, checkpoint and export jointly: for WORKDIR/model every
process takes part in gathering the parameters to the host and process 0 writes it.

Precision: parameters and optimizer state are float32 (master weights); ``config.dtype`` is the
compute dtype of the encoders ("float32" or "bfloat16").
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dpr_jax.cache import memo
from dpr_jax.data.formats import read_biencoder
from dpr_jax.data.loader import GrainBatches
from dpr_jax.data.records import is_record_dir, open_biencoder_records
from dpr_jax.data.tokenize import DPRTokenizer
from dpr_jax.errors import UserError
from dpr_jax.finite import rank_of_positive
from dpr_jax.model_dir import (
    check_tokenizer_fits,
    load_model,
    model_config,
    read_model_meta,
    resolve_model_dir,
    save_model,
)
from dpr_jax.models.bert import bert_forward_flops
from dpr_jax.parallel import (
    batch_sharding,
    gather_to_host,
    global_batch_from_local,
    make_mesh,
    process_slice,
    replicated,
    state_shardings,
)
from dpr_jax.retriever.batching import BatchSpec, BiencoderBatches, DataPosition
from dpr_jax.retriever.loss import LOSSES, LossConfig, dpr_loss
from dpr_jax.retriever.model import BIENCODER, BiEncoder, EncoderConfig, init_biencoder_params
from dpr_jax.retriever.step import make_train_step
from dpr_jax.training.config import RunConfig, unset_variables_note
from dpr_jax.training.config import expand_path as _expand
from dpr_jax.training.config import minilm_path as _minilm_path
from dpr_jax.training.optimizer import make_optimizer, optimizer_key
from dpr_jax.training.state import TrainState
from dpr_jax.training.trainer import BuiltStep, Trainer

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


@dataclasses.dataclass(frozen=True)
class TrainConfig(RunConfig):
    """A bi-encoder training run: :class:`~dpr_jax.training.config.RunConfig`'s fields (data,
    model source, optimizer, loop) with DPR's defaults, plus the batch layout, the loss and the
    memory levers. ``model`` is an ``EncoderConfig`` dict; ``init_from`` a bi-encoder model
    directory (e.g. from ``dpr-jax convert``)."""

    # -- batches
    n_hard: int = 1  # hard negatives per question; G = 1 + n_hard
    q_max_len: int = 64
    p_max_len: int = 256
    bucket: int = 0  # 0: pad to the max lengths; k: pad each batch to a multiple of k
    shuffle_hard: bool = True
    # -- memory (with remat: a jax.checkpoint_policies name, e.g.
    # "dots_with_no_batch_dims_saveable" keeps the matmul outputs and recomputes only the cheap
    # elementwise ops; "": save nothing)
    remat_policy: str = ""
    # FSDP (ZeRO-3): parameters and optimizer state sharded over the devices (dpr_jax.parallel)
    fsdp: bool = False
    grad_cache_chunk: int = 0  # 0: off; c: GradCache with c sequences per device per call
    # -- loss (dpr_jax.retriever.loss.LOSSES names the choices)
    loss: str = "nll"
    scale: float = 1.0  # multiplies q.p (DPR: 1, plain dot product)
    in_batch: bool = True
    # DPR's defaults (train_dense_encoder.py, conf/train/biencoder_nq.yaml): eval_batch_size 0
    # means batch_size; the optimizer fields are RunConfig's

    MODEL_HINT: typing.ClassVar[str] = (
        '\'{"bert": "bert-base-uncased"}\' (a preset of dpr_jax.models.bert.PRESETS, or a '
        "BertConfig dict)"
    )
    parse_model = staticmethod(EncoderConfig.from_dict)

    def check(self, bad) -> None:
        for f in ("n_hard", "bucket", "grad_cache_chunk"):
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        if self.q_max_len < 2 or self.p_max_len < 3:
            bad("q_max_len" if self.q_max_len < 2 else "p_max_len", "too small")
        if not self.scale > 0:
            bad("scale", "must be > 0")
        if self.loss not in LOSSES:
            bad("loss", f"must be one of {tuple(LOSSES)} (dpr_jax.retriever.loss.LOSSES)")
        if self.remat_policy and not hasattr(jax.checkpoint_policies, self.remat_policy):
            bad("remat_policy", "must name a jax.checkpoint_policies policy")


def _resolve_tokenizer_path(config: TrainConfig) -> str:
    if config.tokenizer == "minilm":
        return _minilm_path()
    if config.tokenizer:
        return _expand(config.tokenizer)

    return str(resolve_model_dir(_expand(config.init_from)))


def encoder_config(config: TrainConfig, planning: bool = False) -> EncoderConfig:
    """The EncoderConfig to train: ``init_from``'s (read from its metadata) or ``model``, with
    the ``dropout`` override applied. Reads no parameters. ``planning``: an ``init_from`` that
    does not exist here gives way to ``model`` (:func:`architecture`)."""
    return architecture(config, planning)[0]


def architecture(config: TrainConfig, planning: bool = False) -> tuple[EncoderConfig, str]:
    """(EncoderConfig, note): :func:`encoder_config`, and a note when planning took the
    architecture from ``model`` because ``init_from`` is not on this machine."""
    note = ""
    src = _expand(config.init_from)
    if src and not Path(src).exists():
        if planning:
            src, note = "", config.stand_in_note()
        elif unset := unset_variables_note(config.init_from):
            raise UserError(f"TrainConfig.init_from {config.init_from}: no such directory{unset}")
    if src:
        meta = read_model_meta(src)
        if meta["kind"] != BIENCODER.name:
            raise UserError(
                f"TrainConfig.init_from {config.init_from}: holds a {meta['kind']!r} model, not a "
                "'biencoder' (convert a BERT with `dpr-jax convert --from-hf ... --out DIR`)"
            )
        enc_cfg = model_config(meta, src)
    else:
        enc_cfg = EncoderConfig.from_dict(config.model)
    return dataclasses.replace(enc_cfg, bert=config.with_dropout(enc_cfg.bert)), note


def remat_setting(config) -> bool | str:
    """The models' ``remat`` argument: False, True, or the ``remat_policy`` name."""
    return (config.remat_policy or True) if config.remat else False


def training_model(config, enc_cfg) -> BiEncoder:
    """The biencoder a training ``config`` trains (and evaluates on its dev set)."""
    dtype = jnp.dtype(config.dtype)
    return BiEncoder(enc_cfg, dtype, remat_setting(config), matmul_dtype=config.products)


def initial_params(config: TrainConfig, enc_cfg, rng: jax.Array) -> dict:
    """float32 parameters to start from: ``init_from``'s, or a random init from ``rng``."""

    if config.init_from:
        params = load_model(_expand(config.init_from), BIENCODER.name)[2]
    else:  # jitted: one compilation instead of one per eager initializer op
        init = memo(("init",), lambda: jax.jit(init_biencoder_params, static_argnums=0))
        params = init(enc_cfg, rng)
    return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def training_tokenizer(config: TrainConfig, enc_cfg):
    tokenizer = DPRTokenizer(_resolve_tokenizer_path(config))
    check_tokenizer_fits(f"TrainConfig.init_from {config.init_from or 'random'}", enc_cfg.bert,
                         tokenizer, trained=bool(config.init_from))  # fmt: skip
    return tokenizer


def read_examples(
    path: str, limit: int = 0, what: str = "train_path", shuffle_seed: int | None = None
) -> list:
    """Biencoder records of ``path`` (those with a positive); with ``shuffle_seed`` in a seeded
    random order; the first ``limit`` if > 0. ``path`` is a DPR biencoder JSON file, or a record
    directory of ``dpr-jax convert-data``, read lazily (each process reads only the records of
    its rows, :mod:`dpr_jax.data.records`)."""

    if not path:
        raise UserError(f"TrainConfig.{what} is empty: give a DPR biencoder JSON file")
    path = _expand(path)
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file (TrainConfig.{what})")
    if Path(path).is_dir():
        examples = open_biencoder_records(path)
    else:
        examples = read_biencoder(path)[0]
    if shuffle_seed is not None:
        order = np.random.default_rng(shuffle_seed).permutation(len(examples))
        examples = (
            examples.take(order) if hasattr(examples, "take") else [examples[i] for i in order]
        )
    if limit:
        examples = examples[:limit]
    if not examples:
        raise UserError(f"{path}: no usable records (every record lacks positive_ctxs?)")
    return examples


# ---------------------------------------------------------------------------------------------
# Checkpoints


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
        self._encode, self._metrics = memo(key, lambda: self._build(model, mesh, loss_cfg))

    @staticmethod
    def _build(model, mesh, loss_cfg):
        data = batch_sharding(mesh)

        def encode(params, batch):
            q = model.apply({"params": params}, batch["q_ids"], batch["q_mask"],
                            method=model.encode_question)  # fmt: skip
            p = model.apply({"params": params}, batch["p_ids"], batch["p_mask"],
                            method=model.encode_passage)  # fmt: skip
            return q, p

        g = loss_cfg.group_size

        def metrics(q, p, valid):
            return dpr_loss(q, p, g, loss_cfg.scale, loss_cfg.in_batch, valid, loss=loss_cfg.name)[
                1
            ]

        return (
            jax.jit(encode, in_shardings=(replicated(mesh), data), out_shardings=(data, data)),
            jax.jit(metrics),
        )

    def __call__(self, params) -> dict[str, float]:
        sums: dict[str, float] = {}
        qs, ps, valids = [], [], []
        finite = True
        for local in self.batches.eval_batches():
            batch = global_batch_from_local(local, self.mesh)
            q, p = self._encode(params, batch)
            q, p, valid = gather_to_host(q), gather_to_host(p), gather_to_host(batch["valid"])
            finite = finite and bool(np.isfinite(q).all() and np.isfinite(p).all())
            m = jax.device_get(self._metrics(q, p, valid))
            w = float(m["questions"])
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + (float(v) if k == "questions" else float(v) * w)
            qs.append(q)
            ps.append(p)
            valids.append(valid)
        n = max(sums["questions"], 1e-12)
        out = {k: (v if k == "questions" else v / n) for k, v in sums.items()}
        if not finite:  # NaN scores compare false with everything: rank 0, "accuracy 1"
            out.update(loss=math.nan, accuracy=math.nan, rank=math.nan)
        out.update(self._pool_metrics(qs, ps, valids))
        return out

    def _pool_metrics(self, qs, ps, valids) -> dict[str, float]:
        """Rank of each positive among the deduplicated passages of all evaluated questions
        (NaN metrics when any score is not finite)."""
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
        rank = rank_of_positive(scores, pos)  # NaN where a score is not finite
        finite = bool(np.isfinite(rank).all())
        return {
            "pool_rank": float(rank.mean()),
            "pool_top1": float((rank == 0).mean()) if finite else math.nan,
            "pool_top5": float((rank < 5).mean()) if finite else math.nan,
            "pool_size": float(len(pool)),
        }


def _dev_evaluator(config: TrainConfig, spec, tokenizer, model, mesh, loss_cfg):
    """The Evaluator of ``config.dev_path`` (None without one)."""

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
    # evaluated in the model's own dtype: matmul_dtype is a training form
    return Evaluator(model.clone(matmul_dtype=None), mesh, dev, loss_cfg)


def _loss_config(config: TrainConfig) -> LossConfig:
    return LossConfig(1 + config.n_hard, config.scale, config.in_batch, config.loss)


def _batch_spec(config: TrainConfig) -> BatchSpec:
    return BatchSpec(
        batch_size=config.batch_size, n_hard=config.n_hard, q_max_len=config.q_max_len,
        p_max_len=config.p_max_len, bucket=config.bucket or None,
        shuffle_hard=config.shuffle_hard, seed=config.seed,
    )  # fmt: skip


def evaluate_model(config: TrainConfig) -> dict[str, float]:
    """Validation metrics of ``config.init_from`` (or the random init) on ``config.dev_path``,
    without training: the "before" of a run, or any model directory with ``init_from``."""
    if not config.dev_path:
        raise UserError("TrainConfig.dev_path is empty: nothing to evaluate")
    mesh = make_mesh()
    enc_cfg = encoder_config(config)
    tokenizer = training_tokenizer(config, enc_cfg)
    model = training_model(config, enc_cfg)
    evaluator = _dev_evaluator(
        config, _batch_spec(config), tokenizer, model, mesh, _loss_config(config)
    )
    init_rng = jax.random.split(jax.random.PRNGKey(config.seed))[0]
    params = jax.device_put(initial_params(config, enc_cfg, init_rng), replicated(mesh))
    t0 = time.perf_counter()
    metrics = evaluator(params)
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


def build_train_step(config: TrainConfig, enc_cfg, mesh, total: int, warmup: int) -> BuiltStep:
    """The train step of ``config`` over ``mesh`` (real or abstract devices): the one builder
    both ``dpr-jax train`` and ``dpr-jax plan`` use. Reads no parameters."""
    model = training_model(config, enc_cfg)
    loss_cfg = _loss_config(config)
    tx, schedule = make_optimizer(config, total, warmup)
    abstract = jax.eval_shape(
        lambda p: TrainState.create(p, tx), BIENCODER.abstract_params(enc_cfg)
    )
    placed = state_shardings(abstract, mesh, config.fsdp)
    create = jax.jit(lambda p: TrainState.create(p, tx), out_shardings=placed)
    chunk = config.grad_cache_chunk or None
    step = make_train_step(model, tx, mesh, loss_cfg, chunk, state_sharding=placed)
    return BuiltStep(schedule, abstract, placed, create, step, loss_cfg)


class RetrieverTask:
    """The bi-encoder's part of :func:`dpr_jax.training.loop.train_and_evaluate`: biencoder
    batches with a resumable :class:`DataPosition`, the cross-device DPR step, the dev
    :class:`Evaluator`, and the export of a ``biencoder`` model directory."""

    resume_fields = _RESUME_FIELDS
    log_keys = ("loss", "accuracy", "rank", "grad_norm")
    rate_name = "examples_per_s"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.enc_cfg = encoder_config(config)
        # ArrayRecord training data is read through grain (its iterator state is checkpointed)
        self.data_loader = bool(config.train_path) and is_record_dir(_expand(config.train_path))
        self.loader = None

    def expect(self) -> dict[str, Any]:
        return {"model": self.enc_cfg.to_dict(), "config": self.config.to_dict()}

    def prepare(self, mesh) -> None:
        config, enc_cfg = self.config, self.enc_cfg
        self.mesh = mesh
        self.tokenizer = training_tokenizer(config, enc_cfg)
        self.model = training_model(config, enc_cfg)
        self.loss_cfg = loss_cfg = _loss_config(config)
        self.train_examples = read_examples(
            config.train_path, config.max_train_examples, "train_path"
        )
        spec = _batch_spec(config)
        rows = process_slice(config.batch_size, mesh)
        self.train = BiencoderBatches(
            self.train_examples, self.tokenizer, spec, rows, True, config.train_path
        )
        if self.data_loader:  # the same batches, read through grain (the records extra)
            self.train = self.loader = GrainBatches(self.train)
        self.evaluator = _dev_evaluator(config, spec, self.tokenizer, self.model, mesh, loss_cfg)
        self.has_evaluator = self.evaluator is not None
        self.steps_per_epoch = self.train.batches_per_epoch
        self.total_steps, self.warmup = config.total_steps(self.steps_per_epoch)
        chunk = config.grad_cache_chunk or None
        total, warmup = self.total_steps, self.warmup
        built = memo(
            ("train", enc_cfg, config.dtype, config.products, remat_setting(config),
             optimizer_key(config), total,
             warmup, mesh, loss_cfg, chunk, config.fsdp),
            lambda: build_train_step(config, enc_cfg, mesh, total, warmup),
        )  # fmt: skip
        self.create_state, self.schedule = built.create, built.schedule
        self.train_step, self.placed = built.step, built.placed

    def resolved(self) -> dict[str, Any]:
        return {
            "model": self.enc_cfg.to_dict(),
            "tokenizer": self.tokenizer.path,
            "train_examples": len(self.train_examples),
            "warmup_steps": self.warmup,
            "group_size": self.loss_cfg.group_size,
        }

    def init_state(self) -> TrainState:
        init_rng = jax.random.split(jax.random.PRNGKey(self.config.seed))[0]
        return self.create_state(initial_params(self.config, self.enc_cfg, init_rng))

    def abstract_state(self):
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
            jax.eval_shape(self.create_state, BIENCODER.abstract_params(self.enc_cfg)),
            self.placed,
        )

    def initial_position(self) -> DataPosition:
        return DataPosition()

    def position_from_dict(self, d: dict[str, Any]) -> DataPosition:
        return DataPosition.from_dict(d)

    def iterate(self, position: DataPosition):
        for pos, local in self.train.iterate(position):
            yield pos, global_batch_from_local(local, self.mesh)

    def next_position(self, position: DataPosition) -> DataPosition:
        return self.train.next_position(position)

    def epoch(self, position: DataPosition, step: int) -> float:
        return position.epoch + position.batch / self.steps_per_epoch

    def evaluate(self, state) -> dict[str, float]:
        params = state.params
        if self.config.fsdp:  # the evaluator's jitted encoder takes replicated parameters
            params = jax.device_put(params, replicated(self.mesh))
        return self.evaluator(params)

    def eval_line(self, m: dict[str, float], step: int) -> str:
        return (
            f"loss {m['loss']:.4f} acc {m['accuracy']:.4f} rank {m['rank']:.3f} "
            f"pool_rank {m.get('pool_rank', float('nan')):.2f} "
            f"pool_top1 {m.get('pool_top1', float('nan')):.4f}"
        )

    def postfix(self, m: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{m['loss']:.4f}", "acc": f"{m['accuracy']:.3f}",
                "rank": f"{m['rank']:.2f}"}  # fmt: skip

    def export(self, workdir: Path, params, step: int, dev: dict | None) -> Path:
        return save_model(
            workdir / "model", params, BIENCODER.name, self.enc_cfg, self.tokenizer,
            extra={"train_config": self.config.to_dict(), "step": step, "dev_metrics": dev},
        )  # fmt: skip


def batch_shapes(config: TrainConfig) -> dict[str, tuple[tuple[int, ...], Any]]:
    """Shapes and dtypes of one global batch (:class:`BiencoderBatches` makes them)."""
    b, g = config.batch_size, 1 + config.n_hard
    q, p = (b, config.q_max_len), (b * g, config.p_max_len)
    return {"q_ids": (q, jnp.int32), "q_mask": (q, jnp.int32), "p_ids": (p, jnp.int32),
            "p_mask": (p, jnp.int32), "valid": ((b,), jnp.float32)}  # fmt: skip


def towers(config: TrainConfig, enc_cfg: EncoderConfig) -> list:
    """[(BertConfig, sequences, tokens)] one step encodes: the questions and the passages."""
    b, g = config.batch_size, 1 + config.n_hard
    return [(enc_cfg.bert, b, config.q_max_len), (enc_cfg.bert, b * g, config.p_max_len)]


def model_flops(config: TrainConfig, enc_cfg: EncoderConfig) -> float:
    """Model FLOPs of one step over the global batch: 3 x [BERT forward of B questions x
    q_max_len + B*G passages x p_max_len (the last layer at [CLS] only, unless mean pooling) +
    the projection + the score matrix (2 x B x B*G x D)] (forward, then backward at twice it)."""
    bert, first = enc_cfg.bert, enc_cfg.pooling != "mean"
    b, g = config.batch_size, 1 + config.n_hard
    fwd = bert_forward_flops(bert, b, config.q_max_len, first)
    fwd += bert_forward_flops(bert, b * g, config.p_max_len, first)
    if enc_cfg.projection_dim:
        fwd += 2.0 * b * (1 + g) * bert.hidden_size * enc_cfg.projection_dim
    fwd += 2.0 * b * (b * g if config.in_batch else g) * enc_cfg.embedding_dim
    return 3.0 * fwd


# the trainer of the biencoder kind (fields in order: see dpr_jax.training.trainer.Trainer)
TRAINER = Trainer(BIENCODER, TrainConfig, RetrieverTask, architecture, build_train_step,
                  batch_shapes, towers, model_flops)  # fmt: skip
train_and_evaluate = TRAINER.train_and_evaluate
load_config = TRAINER.load_config
