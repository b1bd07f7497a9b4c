"""``dpr-jax plan``: will a training config fit a TPU slice, and how fast would it run?

The planner AOT-compiles the train step that ``dpr-jax train`` (or ``dpr-jax train-reader``)
would run, for an abstract TPU topology (``jax.experimental.topologies``: libtpu's compiler, no
TPU needed), and reads the compiler's own answer: bytes per chip (arguments, temporaries,
outputs) against the chip's HBM, XLA's FLOP count, and the collectives in the compiled HLO. It
builds the step exactly as the trainers do (:func:`dpr_jax.retriever.task.load_config`,
:func:`~dpr_jax.retriever.task.encoder_config`, :func:`~dpr_jax.retriever.task.make_optimizer`,
:func:`dpr_jax.retriever.step.make_train_step`) but with abstract parameters (``jax.eval_shape``):
no weights are read, no device memory is used.

``--fit`` searches GradCache chunk sizes, rematerialisation (optionally with a
``jax.checkpoint_policies`` policy) and FSDP for the cheapest setting that fits. Compiles take
minutes for a bert-base step on a CPU host, so an analytic memory model
(:func:`estimate_memory`) ranks and prunes the candidates first and only the promising ones are
compiled; the answer is always a compiled, confirmed setting.

Numbers (per chip):

- memory: ``compiled.memory_analysis()``: argument + output - aliased (donated state) +
  temporaries.
- model FLOPs per step (:func:`model_flops`): 3x the forward FLOPs (forward, then backward at
  twice the forward) of the encoder matmuls and attention, the convention of Kaplan et al.
  2020 ("6 N D") and of PaLM's MFU (Chowdhery et al. 2022, app. B). Recomputation (remat,
  GradCache's extra forward) is not model work and is excluded.
- XLA FLOPs: ``compiled.cost_analysis()["flops"]`` x chips. XLA counts a loop body once, so
  with GradCache (a ``lax.scan`` over chunks) it undercounts.
- est. step time: a roofline, ``max(executed FLOPs / peak, HBM bytes / HBM bandwidth,
  collective bytes / ICI bandwidth)`` (perfect overlap), and MFU = model FLOPs / (chips x
  peak x step time).

Environment: the real JAX runtime stays on the CPU (``JAX_PLATFORMS=cpu`` keeps libtpu from
probing for TPU chips and cloud metadata at start-up) while the compile targets the abstract
TPU devices; the command sets both variables when it starts a fresh process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpr_jax.errors import UserError

GIB = 1 << 30
TPU_INSTALL_HINT = "pip install 'dpr-jax[tpu]'"
TOPOLOGY_EXAMPLES = ("v4:2x2x1", "v5e:2x2", "v5e:4x4", "v5e:16x16", "v5p:2x2x1", "v6e:4x4")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# The remat policy --fit tries besides full remat: keep every matmul output that has no batch
# dimension (the weight matmuls), recompute the elementwise ops and attention.
FIT_REMAT_POLICY = "dots_with_no_batch_dims_saveable"


class PlanError(UserError):
    """A planner input that cannot be planned (topology, config, missing libtpu)."""


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one TPU generation (bf16 peak, HBM, ICI)."""

    name: str
    hbm_gib: float  # usable HBM: the nominal capacity less 0.25 GiB that the runtime reserves
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes_s: float
    ici_bytes_s: float  # bidirectional inter-chip interconnect bandwidth per chip
    source: str


# Public sources (Cloud TPU system architecture pages). The 0.25 GiB reserve is what a v5e chip
# reports (15.75 GiB of 16 GiB usable, the figure of the project's issue 10); it is assumed
# for the other generations.
CHIPS: dict[str, Chip] = {
    # 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps, ICI 2400 Gbps; one JAX device per chip
    # (megacore): https://cloud.google.com/tpu/docs/v4
    "v4": Chip("TPU v4", 32 - 0.25, 275e12, 1200e9, 300e9, "https://cloud.google.com/tpu/docs/v4"),
    # 197 TFLOPs bf16, 16 GB HBM2 at 819 GBps, ICI 400 GBps: https://cloud.google.com/tpu/docs/v5e
    "v5e": Chip(
        "TPU v5e", 16 - 0.25, 197e12, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"
    ),
    # 459 TFLOPs bf16, 95 GB HBM2e at 2765 GBps, ICI 1200 GBps:
    # https://cloud.google.com/tpu/docs/v5p
    "v5p": Chip(
        "TPU v5p", 95 - 0.25, 459e12, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"
    ),
    # 918 TFLOPs bf16, 32 GB HBM at 1638 GBps, ICI 800 GBps: https://cloud.google.com/tpu/docs/v6e
    "v6e": Chip(
        "TPU v6e", 32 - 0.25, 918e12, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"
    ),
}


# ---------------------------------------------------------------------------------------------
# Environment and topology


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def tpu_topology(name: str) -> tuple[Chip, list]:
    """(chip figures, abstract devices) of a topology name such as ``v5e:4x4``."""
    if not libtpu_available():
        raise PlanError(f"compiling for TPU needs libtpu: {TPU_INSTALL_HINT}")
    gen = name.split(":", 1)[0].lower()
    examples = ", ".join(TOPOLOGY_EXAMPLES)
    if gen not in CHIPS or ":" not in name:
        raise PlanError(
            f"--topology {name!r}: expected GENERATION:SHAPE with GENERATION one of "
            f"{sorted(CHIPS)}, e.g. {examples}"
        )
    from jax.experimental import topologies

    kwargs = {"chip_config_name": "megacore"} if gen == "v4" else {}
    try:
        topo = topologies.get_topology_desc(
            platform="tpu", topology_name=f"{gen}:{name.split(':', 1)[1]}", **kwargs
        )
    except Exception as e:  # libtpu's message says what is wrong with the shape
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"--topology {name!r}: {first} (examples: {examples})") from None
    return CHIPS[gen], list(topo.devices)


@contextlib.contextmanager
def _tracing_for_tpu() -> Iterator[None]:
    """The models pick a CPU-only attention kernel when ``jax.default_backend()`` is "cpu"
    (inference without dropout). Here the runtime is the CPU but the program is for the TPU."""
    import jax

    saved = jax.default_backend
    jax.default_backend = lambda: "tpu"
    try:
        yield
    finally:
        jax.default_backend = saved


# ---------------------------------------------------------------------------------------------
# The step to compile


@dataclasses.dataclass
class Job:
    """A train step ready to lower: ``step.lower(*args)``, and what the estimates need."""

    kind: str  # "retriever" | "reader"
    config: Any
    step: Any
    args: tuple
    param_count: int
    model_flops: float
    towers: list  # [(BertConfig, sequences per step, tokens per sequence), ...] trained
    note: str = ""


def _is_reader(config) -> bool:
    from dpr_jax.reader.task import ReaderTrainConfig

    return isinstance(config, ReaderTrainConfig)


def load_any_config(path: str, overrides: list[str]):
    """A bi-encoder ``TrainConfig`` or a ``ReaderTrainConfig`` file, with ``--set`` applied."""
    from dpr_jax.reader import task as train_reader
    from dpr_jax.retriever import task as train

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: config file not found")
    try:
        return train.load_config(p, overrides)
    except ValueError as e:
        if "not TrainConfig" not in str(e):
            raise
    return train_reader.load_config(p, overrides)


def _exists(path: str) -> bool:
    return bool(path) and Path(os.path.expanduser(os.path.expandvars(path))).exists()


def _bert_flops_fwd(bert, sequences: int, tokens: int) -> float:
    """Forward FLOPs of ``sequences`` x ``tokens`` through BERT's layers: the weight matmuls
    (2 x tokens x (4H^2 + 2HI) a layer) and attention's two batched matmuls (QK^T and PV,
    2 x 2 x T^2 x H a layer per sequence). Embedding lookups, LayerNorm, softmax, biases and
    the last layer's [CLS]-only shortcut are not counted."""
    h, i, n_layers = bert.hidden_size, bert.intermediate_size, bert.num_hidden_layers
    matmul = 2.0 * sequences * tokens * (4 * h * h + 2 * h * i)
    attention = 4.0 * sequences * tokens * tokens * h
    return n_layers * (matmul + attention)


def model_flops(kind: str, config, model_cfg) -> float:
    """Model FLOPs of one training step over the global batch (see the module docstring).

    Retriever: 3 x [BERT forward of B questions x q_max_len + B*G passages x p_max_len
    (+ the projection) + the score matrix (2 x B x B*G x D)]. Reader: 3 x [BERT forward of
    B*M sequences x max_length + the span head (2 x 2H a token) + the relevance head]."""
    if kind == "retriever":
        bert = model_cfg.bert
        b, g = config.batch_size, 1 + config.n_hard
        fwd = _bert_flops_fwd(bert, b, config.q_max_len) + _bert_flops_fwd(
            bert, b * g, config.p_max_len
        )
        if model_cfg.projection_dim:
            fwd += 2.0 * b * (1 + g) * bert.hidden_size * model_cfg.projection_dim
        fwd += 2.0 * b * (b * g if config.in_batch else g) * model_cfg.embedding_dim
        return 3.0 * fwd
    bert = model_cfg
    seqs = config.batch_size * config.passages_per_question
    fwd = _bert_flops_fwd(bert, seqs, config.max_length)
    fwd += 2.0 * seqs * config.max_length * 2 * bert.hidden_size + 2.0 * seqs * bert.hidden_size
    return 3.0 * fwd


def _retriever_model_cfg(config):
    """EncoderConfig as :func:`dpr_jax.retriever.task.encoder_config` gives it; when ``init_from`` does
    not exist here, the architecture comes from the config's ``model`` dict."""
    from dpr_jax.retriever.task import encoder_config

    if not config.init_from or _exists(config.init_from):
        return encoder_config(config), ""
    if not config.model:
        raise PlanError(
            f"init_from {config.init_from} does not exist here and the config has no `model` "
            "dict: give the architecture with --set model='{\"bert\": {...}}' or the model "
            "directory with --set init_from=DIR"
        )
    stand_in = dataclasses.replace(config, init_from="", tokenizer=config.tokenizer or "-")
    return encoder_config(stand_in), f"init_from {config.init_from} not found: using `model`"


def _reader_model_cfg(config):
    """The reader's BertConfig as :func:`dpr_jax.reader.task.build_reader` finds it, without
    reading any weights."""
    from dpr_jax.checkpoint import MODEL_JSON, model_config_from_dict, read_model_meta
    from dpr_jax.models.bert import BertConfig

    note = ""
    src = os.path.expanduser(os.path.expandvars(config.init_from))
    if not src:
        bert = BertConfig.from_dict(config.model)
    elif src == "minilm":
        from dpr_jax.training.config import minilm_path as _minilm_path

        bert = BertConfig.from_json_file(Path(_minilm_path()) / "config.json")
    elif (Path(src) / MODEL_JSON).is_file() or (Path(src) / "model" / MODEL_JSON).is_file():
        meta = read_model_meta(src)
        cfg = model_config_from_dict(meta["kind"], meta["model"])
        bert = {"reader": lambda c: c, "bert": lambda c: c[0], "biencoder": lambda c: c.bert}[
            meta["kind"]
        ](cfg)
    elif (Path(src) / "config.json").is_file():
        bert = BertConfig.from_json_file(Path(src) / "config.json")
    elif config.model:
        bert, note = BertConfig.from_dict(config.model), f"init_from {src} not found: using `model`"
    else:
        raise PlanError(
            f"init_from {src} does not exist here and the config has no `model` dict: give the "
            "architecture with --set model='{...}' (a BertConfig dict) or --set init_from=DIR"
        )
    if config.dropout >= 0:
        bert = dataclasses.replace(bert, hidden_dropout_prob=config.dropout,
                                   attention_probs_dropout_prob=config.dropout)  # fmt: skip
    return bert, note


def _total_steps(config) -> tuple[int, int]:
    """The schedule's length only sets constants of the program; without the data, use
    ``num_steps`` or 1000."""
    total = config.num_steps or 1000
    return total, config.warmup_steps or int(config.warmup_fraction * total)


@functools.cache
def _abstract_params(kind: str, model_cfg):
    """Parameter shapes (``jax.eval_shape`` of the init), once per architecture: --fit builds
    dozens of candidate steps over the same model."""
    from dpr_jax.checkpoint import abstract_params

    return abstract_params(kind, model_cfg)


def _count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def build_job(config, devices) -> Job:
    """The train step of ``config`` over ``devices`` (abstract TPU devices), as the trainers
    build it, with abstract state, batch and rng carrying their shardings."""
    import jax
    import jax.numpy as jnp

    from dpr_jax.parallel import batch_sharding, make_mesh, replicated
    from dpr_jax.training.optimizer import make_optimizer
    from dpr_jax.training.state import TrainState

    mesh = make_mesh(devices)
    n = mesh.devices.size
    if config.batch_size % n:
        raise PlanError(
            f"batch_size {config.batch_size} is not a multiple of the {n} chips of the topology"
        )
    total, warmup = _total_steps(config)
    tx, _ = make_optimizer(config, total, warmup)
    rep, data = replicated(mesh), batch_sharding(mesh)
    i32, f32 = jnp.int32, jnp.float32

    def sds(shape, dtype, sharding=data):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    rng = sds((2,), jnp.uint32, rep)
    b = config.batch_size
    if _is_reader(config):
        from dpr_jax.reader.model import Reader
        from dpr_jax.reader.step import make_train_step

        bert, note = _reader_model_cfg(config)
        model = Reader(bert, dtype=jnp.dtype(config.dtype), remat=config.remat)
        params = _abstract_params("reader", bert)
        state = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
        state = jax.tree.map(lambda x: sds(x.shape, x.dtype, rep), state)
        m, t, a = config.passages_per_question, config.max_length, config.max_answers
        batch = {
            "input_ids": sds((b, m, t), i32), "attention_mask": sds((b, m, t), i32),
            "passage_mask": sds((b, m), f32), "start_positions": sds((b, a), i32),
            "end_positions": sds((b, a), i32), "answer_mask": sds((b, a), f32),
            "question_mask": sds((b,), f32),
        }  # fmt: skip
        step = make_train_step(model, tx, mesh)
        return Job("reader", config, step, (state, batch, rng), _count(params),
                   model_flops("reader", config, bert), [(bert, b * m, t)], note)  # fmt: skip

    from dpr_jax.retriever.model import BiEncoder
    from dpr_jax.retriever.step import LossConfig, make_train_step
    from dpr_jax.retriever.task import remat_setting
    from dpr_jax.sharding import state_shardings

    enc_cfg, note = _retriever_model_cfg(config)
    model = BiEncoder(enc_cfg, dtype=jnp.dtype(config.dtype), remat=remat_setting(config))
    loss_cfg = LossConfig(group_size=1 + config.n_hard, scale=config.scale,
                          in_batch=config.in_batch)  # fmt: skip
    params = _abstract_params("biencoder", enc_cfg)
    abstract = jax.eval_shape(lambda p: TrainState.create(p, tx), params)
    placed = state_shardings(abstract, mesh, config.fsdp)
    state = jax.tree.map(lambda x, s: sds(x.shape, x.dtype, s), abstract, placed)
    g = loss_cfg.group_size
    batch = {
        "q_ids": sds((b, config.q_max_len), i32), "q_mask": sds((b, config.q_max_len), i32),
        "p_ids": sds((b * g, config.p_max_len), i32), "p_mask": sds((b * g, config.p_max_len), i32),
        "valid": sds((b,), f32),
    }  # fmt: skip
    chunk = config.grad_cache_chunk or None
    step = make_train_step(model, tx, mesh, loss_cfg, chunk, state_sharding=placed)
    towers = [(enc_cfg.bert, b, config.q_max_len), (enc_cfg.bert, b * g, config.p_max_len)]
    return Job("retriever", config, step, (state, batch, rng), _count(params),
               model_flops("retriever", config, enc_cfg), towers, note)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Analytic estimates (for ranking and pruning --fit candidates)


def _recompute_factor(config) -> float:
    """Executed / model FLOPs: remat adds a forward (1/3 of a step), a policy that keeps the
    matmul outputs ~nothing; GradCache adds a forward pass of both towers."""
    extra = 0.0
    if config.remat and not getattr(config, "remat_policy", ""):
        extra += 1 / 3
    if getattr(config, "grad_cache_chunk", 0):
        extra += 1 / 3
    return 1.0 + extra


def _activation_bytes(bert, sequences: int, tokens: int, cbytes: int, remat, policy) -> float:
    """Activation memory kept for the backward pass of one tower. Per layer and token, without
    remat, ~34H + 5aT 16-bit values' worth of bytes (Korthikanti et al. 2023, "Reducing
    Activation Recomputation in Large Transformer Models", sec. 4.1), scaled by the compute
    dtype's size; with remat, the layer inputs plus one layer's worth; with a dots-saveable
    policy, the matmul outputs (3H + H + I + H values) a layer."""
    h, a, n_layers = bert.hidden_size, bert.num_attention_heads, bert.num_hidden_layers
    per_layer = sequences * tokens * (34 * h + 5 * a * tokens) * cbytes / 2
    if not remat:
        return n_layers * per_layer
    if policy:
        return n_layers * sequences * tokens * (5 * h + bert.intermediate_size) * cbytes + per_layer
    return n_layers * sequences * tokens * h * cbytes + per_layer


def estimate_memory(job: Job, n_chips: int) -> float:
    """Bytes per chip, analytically: state (float32 params + 2 AdamW moments, sharded with FSDP),
    a float32 gradient, FSDP's gathered float32 parameters, and the activations of the local
    batch (of one GradCache chunk of one tower at a time)."""
    config = job.config
    p = job.param_count
    fsdp = getattr(config, "fsdp", False)
    state = 12.0 * p / (n_chips if fsdp else 1)
    grads = 4.0 * p
    gathered = 4.0 * p if fsdp else 0.0
    cbytes = 2 if config.dtype == "bfloat16" else 4
    remat, policy = config.remat, getattr(config, "remat_policy", "")
    chunk = getattr(config, "grad_cache_chunk", 0)
    acts = []
    for bert, seqs, tokens in job.towers:
        local = seqs // n_chips
        if chunk:  # the chunk counts questions; a passage chunk holds chunk * G passages
            local = chunk * (local // (config.batch_size // n_chips))
        acts.append(_activation_bytes(bert, local, tokens, cbytes, remat, policy))
    activations = max(acts) if chunk else sum(acts)
    return state + grads + gathered + activations


def estimate_step_s(job: Job, chip: Chip, n_chips: int) -> float:
    """Roofline compute time of the executed FLOPs (model FLOPs x recomputation)."""
    return job.model_flops * _recompute_factor(job.config) / n_chips / chip.peak_flops


# ---------------------------------------------------------------------------------------------
# Compile and read the compiler's answer

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1,
    "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
    "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_SHAPE = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\]")
_COMP_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][a-z\-]*)\(")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def collective_bytes(hlo: str) -> dict[str, int]:
    """Bytes each kind of collective produces per chip per step, from optimized HLO text: the
    result size of every all-gather / all-reduce / reduce-scatter / all-to-all /
    collective-permute (async pairs counted once, at ``-done``), times the trip count of the
    while loops around it (``known_trip_count``)."""
    comps: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo.splitlines():
        m = _COMP_HEADER.match(line)
        if m and "=" not in line.split("{")[0]:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is not None:
            comps[current].append(line)
    # multiplicity of each computation: entry 1; a while body x its trip count; called ones x1
    mult = {entry: 1} if entry else {}
    order = [entry] if entry else []
    while order:
        name = order.pop()
        for line in comps.get(name, []):
            trip = _TRIP.search(line)
            for key, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations|"
                                          r"true_computation|false_computation)=\{?%?([\w.\-]+)",
                                          line):  # fmt: skip
                if key == "to_apply" or callee not in comps:
                    continue
                k = mult[name] * (int(trip.group(1)) if key == "body" and trip else 1)
                if mult.get(callee, 0) < k:
                    mult[callee] = k
                    order.append(callee)
    out = dict.fromkeys(COLLECTIVES, 0)
    for name, lines in comps.items():
        for line in lines:
            m = _INSTR.match(line)
            if not m:
                continue
            shape, op = m.group(1), m.group(2)
            if op.endswith("-start"):
                continue
            base = op[: -len("-done")] if op.endswith("-done") else op
            if base in out:
                out[base] += _shape_bytes(shape) * mult.get(name, 1)
    return out


@dataclasses.dataclass
class Plan:
    """The compiler's answer for one setting (per chip unless named otherwise)."""

    topology: str
    chips: int
    chip: str
    hbm_gib: float
    argument_gib: float
    output_gib: float
    alias_gib: float
    temp_gib: float
    per_chip_gib: float
    fits: bool
    params: int
    xla_flops_per_step: float
    model_flops_per_step: float
    hbm_bytes_per_chip: float
    collective_bytes: dict
    est_step_s: float
    est_mfu: float
    est_memory_gib: float
    compile_s: float
    overrides: list
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def compile_plan(config, chip: Chip, devices, topology: str, overrides: list[str]) -> Plan:
    """AOT-compile ``config``'s train step for ``devices`` and read memory, FLOPs, collectives."""
    job = build_job(config, devices)
    n = len(devices)
    t0 = time.perf_counter()
    with _tracing_for_tpu():
        lowered = job.step.lower(*job.args)
    try:
        compiled = lowered.compile()
    except Exception as e:  # XLA:TPU refuses a program over HBM: RESOURCE_EXHAUSTED, "Used X of Y"
        used = _oom_used_bytes(str(e))
        if used is None:
            raise
        return _oom_plan(job, chip, n, topology, overrides, used, time.perf_counter() - t0)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    coll = collective_bytes(compiled.as_text())
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    total = arg + out - alias + temp
    xla_flops = float(cost.get("flops", 0.0)) * n
    hbm_bytes = float(cost.get("bytes accessed", 0.0))
    executed = max(job.model_flops * _recompute_factor(config), xla_flops) / n
    step_s = max(executed / chip.peak_flops, hbm_bytes / chip.hbm_bytes_s,
                 sum(coll.values()) / chip.ici_bytes_s)  # fmt: skip
    mfu = job.model_flops / n / chip.peak_flops / step_s if step_s > 0 else 0.0
    return Plan(
        topology=topology, chips=n, chip=chip.name, hbm_gib=chip.hbm_gib,
        argument_gib=arg / GIB, output_gib=out / GIB, alias_gib=alias / GIB, temp_gib=temp / GIB,
        per_chip_gib=total / GIB, fits=total <= chip.hbm_gib * GIB, params=job.param_count,
        xla_flops_per_step=xla_flops, model_flops_per_step=job.model_flops,
        hbm_bytes_per_chip=hbm_bytes, collective_bytes=coll, est_step_s=step_s, est_mfu=mfu,
        est_memory_gib=estimate_memory(job, n) / GIB, compile_s=compile_s,
        overrides=list(overrides), note=job.note,
    )  # fmt: skip


# XLA:TPU's two out-of-memory messages: "Used 34.60G of 15.75G hbm" (the whole program) and
# "the total memory required for HLO temporaries (20.93G) exceeds available HBM" (temporaries
# alone: the program needs at least that)
_OOM = re.compile(
    r"Used\s+([\d.]+)([KMGT]?)i?B?\s+of\s+[\d.]+[KMGT]?i?B?\s+hbm"
    r"|memory required for HLO temporaries \(([\d.]+)([KMGT]?)i?B?\)",
    re.I,
)


def _oom_used_bytes(message: str) -> float | None:
    """Bytes the program needs, from XLA:TPU's out-of-memory compile error (None: another
    error)."""
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
        return None
    m = _OOM.search(message)
    if not m:
        return None
    value, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    return (
        float(value) * {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[unit.upper()]
    )


def _oom_plan(job, chip, n, topology, overrides, used, compile_s) -> Plan:
    """A plan for a program the compiler refused as too large: its total from the error; the
    rest (no HLO to read) from the analytic model."""
    step_s = estimate_step_s(job, chip, n)
    return Plan(
        topology=topology, chips=n, chip=chip.name, hbm_gib=chip.hbm_gib, argument_gib=0.0,
        output_gib=0.0, alias_gib=0.0, temp_gib=0.0, per_chip_gib=used / GIB, fits=False,
        params=job.param_count, xla_flops_per_step=0.0, model_flops_per_step=job.model_flops,
        hbm_bytes_per_chip=0.0, collective_bytes=dict.fromkeys(COLLECTIVES, 0),
        est_step_s=step_s, est_mfu=job.model_flops / n / chip.peak_flops / step_s,
        est_memory_gib=estimate_memory(job, n) / GIB, compile_s=compile_s,
        overrides=list(overrides),
        note="the TPU compiler refused the program: out of HBM (total from its error message)",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# --fit


def candidate_overrides(config, n_chips: int) -> list[dict[str, Any]]:
    """Settings --fit may choose: GradCache chunk (powers of two dividing the per-chip
    questions, and off), remat (off, full, the dots-saveable policy), FSDP (off, on). The reader
    has no GradCache or FSDP: remat only."""
    remats = [{"remat": False}, {"remat": True}]
    if _is_reader(config):
        return remats
    remats.insert(1, {"remat": True, "remat_policy": FIT_REMAT_POLICY})
    per_chip = config.batch_size // n_chips
    chunks = [0] + [c for c in (2**k for k in range(20)) if c < per_chip and per_chip % c == 0]
    out = []
    for fsdp in (False, True):
        for chunk in chunks:
            for r in remats:
                cand = {"grad_cache_chunk": chunk, "fsdp": fsdp, "remat_policy": "", **r}
                out.append(cand)
    return out


def _as_overrides(config, changes: dict[str, Any]) -> list[str]:
    """``key=value`` strings for the fields that differ from ``config``."""
    out = []
    for k, v in changes.items():
        if getattr(config, k) != v:
            out.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    return out


def fit(
    config,
    chip: Chip,
    devices,
    topology: str,
    base_overrides: list[str],
    max_compiles: int = 4,
    margin: float = 1.5,
    log=None,
    calibrated_margin: float = 1.1,
) -> tuple[Plan | None, list[dict]]:
    """The cheapest setting that fits: candidates ranked by estimated step time (then: no FSDP,
    larger GradCache chunks, fewer changes); those whose analytic memory exceeds ``margin`` x
    HBM are skipped; the others are compiled in order until one fits (at most
    ``max_compiles``). After each compile, the estimate is rescaled by measured / estimated and
    trusted more: from then on a candidate is skipped above ``calibrated_margin`` x HBM (a
    compile of bert-large takes ~20 min of one CPU core: a pod team should not wait for one
    that the measured scale already rules out).
    Returns (the plan that fits or None, a log of the candidates tried)."""
    log = log or functools.partial(print, flush=True)
    n = len(devices)
    scored = []
    for changes in candidate_overrides(config, n):
        cand = dataclasses.replace(config, **changes)
        try:
            job = build_job(cand, devices)
        except PlanError:
            continue
        key = (
            round(estimate_step_s(job, chip, n), 6),
            changes.get("fsdp", False),
            -(changes.get("grad_cache_chunk") or 1 << 30),
            len(_as_overrides(config, changes)),
        )
        scored.append((key, changes, cand, estimate_memory(job, n)))  # fmt: skip
    scored.sort(key=lambda s: s[0])
    scale = 1.0
    tried: list[dict] = []
    compiles = 0
    for _, changes, cand, est in scored:
        overrides = _as_overrides(config, changes)
        if est * scale > (calibrated_margin if compiles else margin) * chip.hbm_gib * GIB:
            tried.append({"overrides": overrides, "est_gib": est * scale / GIB, "skipped": True})
            continue
        if compiles >= max_compiles:
            break
        log(f"compiling {' '.join(overrides) or '(config as is)'} "
            f"(estimated {est * scale / GIB:.1f} GiB/chip)")  # fmt: skip
        plan = compile_plan(cand, chip, devices, topology, overrides)
        compiles += 1
        log(f"  -> {plan.per_chip_gib:.2f} GiB/chip: {'fits' if plan.fits else 'does not fit'} "
            f"(compiled in {plan.compile_s:.0f} s)")  # fmt: skip
        scale = plan.per_chip_gib * GIB / max(est, 1.0)
        tried.append({"overrides": overrides, "est_gib": est / GIB, "per_chip_gib":
                      plan.per_chip_gib, "fits": plan.fits, "compile_s": plan.compile_s})  # fmt: skip
        if plan.fits:
            return plan, tried
    return None, tried


# ---------------------------------------------------------------------------------------------
# CLI


def format_plan(p: Plan) -> str:
    coll = ", ".join(f"{k} {v / GIB:.3f}" for k, v in p.collective_bytes.items() if v) or "none"
    lines = [
        f"topology {p.topology}: {p.chips} x {p.chip} ({p.hbm_gib:.2f} GiB HBM each); "
        f"{p.params / 1e6:.1f}M parameters",
        f"per chip: arguments {p.argument_gib:.2f} GiB + outputs {p.output_gib:.2f} - aliased "
        f"{p.alias_gib:.2f} + temporaries {p.temp_gib:.2f} = {p.per_chip_gib:.2f} GiB "
        f"(analytic estimate {p.est_memory_gib:.2f}) -> "
        + ("FITS" if p.fits else f"DOES NOT FIT ({p.per_chip_gib / p.hbm_gib:.2f}x HBM)"),
        f"FLOPs per step: model {p.model_flops_per_step:.4g}, XLA {p.xla_flops_per_step:.4g}",
        f"collectives per chip per step (GiB): {coll}",
        f"roofline: {p.est_step_s * 1e3:.1f} ms/step, MFU {100 * p.est_mfu:.1f}% "
        f"(compiled in {p.compile_s:.0f} s)",
    ]
    if p.note:
        lines.insert(0, p.note)
    return "\n".join(lines)


def run(args) -> dict[str, Any]:
    """The planner behind the CLI; returns the JSON record."""
    if not libtpu_available():
        raise PlanError(f"compiling for TPU needs libtpu: {TPU_INSTALL_HINT}")
    config = load_any_config(args.config, args.set)
    chip, devices = tpu_topology(args.topology)
    if args.fit:
        plan, tried = fit(config, chip, devices, args.topology, list(args.set),
                          max_compiles=args.max_compiles)  # fmt: skip
        if plan is None:
            measured = [t["per_chip_gib"] for t in tried if "per_chip_gib" in t]
            record = {"fits": False, "overrides": None, "hbm_gib": chip.hbm_gib, "tried": tried,
                      "per_chip_gib": min(measured, default=None), "xla_flops_per_step": None,
                      "model_flops_per_step": None, "est_step_s": None, "est_mfu": None}  # fmt: skip
            print("no setting fits within --max-compiles; tried:\n" + json.dumps(tried, indent=1))
            return record
        print(format_plan(plan))
        print("fits with: " + (" ".join(f"--set {o}" for o in plan.overrides) or "(as is)"))
        record = plan.to_dict()
        record["tried"] = tried
        return record
    plan = compile_plan(config, chip, devices, args.topology, list(args.set))
    print(format_plan(plan))
    return plan.to_dict()
