"""``dpr-jax plan``: will a training config fit a TPU slice, and how fast would it run?

The planner AOT-compiles the train step that ``dpr-jax train`` (or ``dpr-jax train-reader``)
would run, for an abstract TPU topology (``jax.experimental.topologies``: libtpu's compiler, no
TPU needed) or for this machine's own devices (``--topology local``, which also runs it), and
reads the compiler's own answer. The step is built by the config's own trainer
(:class:`dpr_jax.training.trainer.Trainer`, registered in :mod:`dpr_jax.trainers`) with abstract
parameters (``jax.eval_shape``): no weights are read, no device memory is used;
the architecture comes from ``init_from`` where it exists here, else from the config's ``model``
(which may name a preset of :data:`dpr_jax.models.bert.PRESETS`).

``--fit`` searches GradCache chunk sizes, rematerialisation (optionally with a
``jax.checkpoint_policies`` policy) and FSDP for the cheapest setting that fits
(:func:`fit`): ranked by estimated step time, compiled in that order, skipped uncompiled only
when provably too large.

Numbers (per chip; :data:`DEFINITIONS` is written into the JSON record):

- memory: ``compiled.memory_analysis()``: argument + output - aliased (donated state) +
  temporaries.
- model FLOPs per step (:func:`model_flops`): 3x the forward FLOPs (forward, then backward at
  twice the forward) of the encoder matmuls and attention, the convention of Kaplan et al.
  2020 ("6 N D") and of PaLM's MFU (Chowdhery et al. 2022, app. B), the last layer at [CLS]
  only when the model pools [CLS]. Recomputation is not model work and is excluded.
- executed FLOPs, HBM bytes and collectives, every loop trip counted:
  :mod:`dpr_jax.step_costs` (from the traced step and the compiled HLO).
- est. step time: a roofline, ``max(executed FLOPs / peak, HBM bytes / HBM bandwidth,
  interconnect bytes / ICI bandwidth)`` (perfect overlap), the binding term named, and MFU =
  model FLOPs / (chips x peak x step time).

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
from typing import Any

from dpr_jax import step_costs
from dpr_jax.chips import CHIPS, Chip
from dpr_jax.errors import UserError
from dpr_jax.parallel import batch_sharding, make_mesh, replicated
from dpr_jax.step_costs import COLLECTIVES
from dpr_jax.trainers import load_any_config, trainer_for

GIB = 1 << 30
TPU_INSTALL_HINT = "pip install 'dpr-jax[tpu]'"
TOPOLOGY_EXAMPLES = ("v4:2x2x1", "v5e:2x2", "v5e:4x4", "v5e:16x16", "v5p:2x2x1", "v6e:4x4")
# The remat policy --fit tries besides full remat: keep every matmul output that has no batch
# dimension (the weight matmuls), recompute the elementwise ops and attention.
FIT_REMAT_POLICY = "dots_with_no_batch_dims_saveable"


class PlanError(UserError):
    """A planner input that cannot be planned (topology, config, missing libtpu)."""


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

    kind: str  # the model kind the trainer trains (dpr_jax.models.kinds)
    config: Any
    step: Any
    args: tuple
    param_count: int
    model_flops: float
    towers: list  # [(BertConfig, sequences per step, tokens per sequence), ...] trained
    note: str = ""


def _count(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def build_job(config, devices) -> Job:
    """The train step of ``config`` over ``devices`` (abstract TPU devices or the local ones),
    built by its trainer's own builder (:class:`dpr_jax.training.trainer.Trainer`, found in
    :mod:`dpr_jax.trainers`), with abstract state, batch and rng carrying their shardings. The
    schedule's length only sets constants of the program: without the data, ``num_steps`` or
    1000 steps."""
    import jax
    import jax.numpy as jnp

    trainer = trainer_for(config)
    mesh = make_mesh(devices)
    n = mesh.devices.size
    config.check_divides(n, "chips of the topology", ("batch_size",))
    model_cfg, note = trainer.architecture(config, True)
    built = trainer.build_step(config, model_cfg, mesh, *config.total_steps(None))
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                         built.abstract_state, built.placed)  # fmt: skip
    data = batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=data)
             for k, (shape, dtype) in trainer.batch_shapes(config).items()}  # fmt: skip
    rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated(mesh))
    return Job(trainer.kind.name, config, built.step, (state, batch, rng),
               _count(built.abstract_state.params), trainer.model_flops(config, model_cfg),
               trainer.towers(config, model_cfg), note)  # fmt: skip


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
    """Bytes per chip, analytically: state (float32 params + 2 AdamW moments), a float32
    gradient (both 1/n with FSDP, which also holds two layers' gathered float32 parameters at a
    time), and the activations of the local batch (of one GradCache chunk of one tower at a
    time). Used to rank --fit's candidates, never to rule one out."""
    config = job.config
    p = job.param_count
    fsdp = getattr(config, "fsdp", False)
    state = 12.0 * p / (n_chips if fsdp else 1)
    grads = 4.0 * p / (n_chips if fsdp else 1)
    layers = max(bert.num_hidden_layers for bert, _, _ in job.towers)
    gathered = 2 * 4.0 * p / layers if fsdp else 0.0
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


# Compile and read the compiler's answer


@dataclasses.dataclass
class Plan:
    """The compiler's answer for one setting (per chip unless named otherwise). FLOP counts:
    ``model_flops_per_step`` what the model computes (3 x forward, the [CLS] shortcut),
    ``executed_flops_per_step`` what the traced step runs (recomputation and every loop trip),
    ``xla_flops_per_step`` XLA's cost analysis (each loop body once); all over the global
    batch. HBM bytes: ``hbm_bytes_per_chip`` every loop trip, ``xla_hbm_bytes_per_chip`` XLA's
    (loop bodies once). Collectives: ``collective_bytes`` logical bytes per kind (each logical
    collective once, times its loop trips), ``collectives`` counts and interconnect bytes."""

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
    executed_flops_per_step: float
    hbm_bytes_per_chip: float
    xla_hbm_bytes_per_chip: float
    collective_bytes: dict
    collectives: dict
    ici_bytes_per_chip: float
    est_step_s: float
    est_mfu: float
    bound: str
    terms_s: dict
    est_memory_gib: float
    compile_s: float
    overrides: list
    unknown_loops: int = 0
    measured_step_s: float | None = None
    measured_mfu: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "definitions": DEFINITIONS}


# What each count in the JSON record is (written beside the figures)
DEFINITIONS = {
    "model_flops_per_step": "3 x forward matmul and attention FLOPs of the global batch, the last "
    "layer at [CLS] only when the model pools [CLS]; no recomputation",
    "executed_flops_per_step": "every dot_general of the traced step x its scan trips, over the "
    "global batch: remat and GradCache recomputation included",
    "xla_flops_per_step": "compiled.cost_analysis() flops x chips: every op, loop bodies once",
    "hbm_bytes_per_chip": "XLA's bytes accessed x (per-instruction HBM bytes with loop trips / "
    "with each loop once)",
    "collective_bytes": "per kind, the full array of each logical collective x its executions "
    "per step (an all-gather's result, a reduce-scatter's operand)",
    "ici_bytes_per_chip": "interconnect bytes a chip sends: ring (g-1)/g of the array, twice for "
    "all-reduce",
    "est_step_s": "max(executed FLOPs / peak, HBM bytes / HBM bandwidth, ICI bytes / ICI "
    "bandwidth) per chip",
    "est_mfu": "model FLOPs / (chips x peak x est_step_s)",
}


def _compile(job: Job, tpu: bool, n: int):
    with _tracing_for_tpu() if tpu else contextlib.nullcontext():
        lowered = job.step.lower(*job.args)
        jitted = getattr(job.step, "jitted", job.step)  # the reader's step is a bare jit
        executed, _ = step_costs.traced_flops(jitted, job.args, n)
    return lowered.compile(), executed


def compile_plan(
    config, chip: Chip, devices, topology: str, overrides: list[str], measure: int = 0
) -> Plan:
    """Compile ``config``'s train step for ``devices`` and read memory, FLOPs (every loop trip),
    HBM bytes and collectives; ``measure`` > 0 (local devices): also run the step that many
    times and report the measured step time beside the roofline's."""
    job = build_job(config, devices)
    n = len(devices)
    t0 = time.perf_counter()
    try:
        compiled, executed = _compile(job, tpu=not measure, n=n)
    except Exception as e:  # XLA:TPU refuses a program over HBM: RESOURCE_EXHAUSTED, "Used X of Y"
        used = _oom_used_bytes(str(e))
        if used is None:
            raise
        return _oom_plan(job, chip, n, topology, overrides, used, time.perf_counter() - t0)
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else (cost or {})
    module = step_costs.HloModule.parse(compiled.as_text())
    colls = step_costs.collectives(module, n)
    summary = step_costs.collective_summary(colls)
    _, unknown = module.multiplicities()
    xla_bytes = float(cost.get("bytes accessed", 0.0))
    once = step_costs.hbm_bytes(module, with_trips=False)
    hbm = xla_bytes * step_costs.hbm_bytes(module) / once if once else xla_bytes
    wire = sum(c.wire_bytes for c in colls)
    step_s, bound, terms = step_costs.roofline(
        executed, hbm, wire, chip.peak_flops, chip.hbm_bytes_s, chip.ici_bytes_s
    )
    arg, out = mem.argument_size_in_bytes, mem.output_size_in_bytes
    alias, temp = mem.alias_size_in_bytes, mem.temp_size_in_bytes
    total = arg + out - alias + temp
    measured = _measure(compiled, job, measure) if measure else None
    return Plan(
        topology=topology, chips=n, chip=chip.name, hbm_gib=chip.hbm_gib,
        argument_gib=arg / GIB, output_gib=out / GIB, alias_gib=alias / GIB, temp_gib=temp / GIB,
        per_chip_gib=total / GIB, fits=total <= chip.hbm_gib * GIB, params=job.param_count,
        xla_flops_per_step=float(cost.get("flops", 0.0)) * n, model_flops_per_step=job.model_flops,
        executed_flops_per_step=executed * n, hbm_bytes_per_chip=hbm,
        xla_hbm_bytes_per_chip=xla_bytes,
        collective_bytes={k: v["logical_bytes"] for k, v in summary.items()},
        collectives=summary, ici_bytes_per_chip=wire, est_step_s=step_s,
        est_mfu=job.model_flops / n / chip.peak_flops / step_s if step_s > 0 else 0.0,
        bound=bound, terms_s=terms, est_memory_gib=estimate_memory(job, n) / GIB,
        compile_s=compile_s, overrides=list(overrides), unknown_loops=len(unknown),
        measured_step_s=measured,
        measured_mfu=job.model_flops / n / chip.peak_flops / measured if measured else None,
        note=job.note,
    )  # fmt: skip


def _concrete(tree):
    """Arrays for abstract step arguments: zero state, ones in the batch (every token real,
    every question valid), a PRNG key."""
    import jax
    import numpy as np

    state, batch, rng = tree
    state = jax.tree.map(lambda s: jax.device_put(np.zeros(s.shape, s.dtype), s.sharding), state)
    batch = {k: jax.device_put(np.ones(s.shape, s.dtype), s.sharding) for k, s in batch.items()}
    return state, batch, jax.device_put(np.zeros(rng.shape, rng.dtype), rng.sharding)


def _measure(compiled, job: Job, repeats: int) -> float:
    """Median seconds of ``repeats`` runs of the compiled step (after one warm-up run)."""
    import jax

    state, batch, rng = _concrete(job.args)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, rng)
        jax.block_until_ready((state, metrics))
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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
    """A plan for a program the compiler refused as too large: its total from the error; no HLO
    to read, so no speed figures (None)."""
    nothing = dict.fromkeys(COLLECTIVES, 0)
    return Plan(
        topology=topology, chips=n, chip=chip.name, hbm_gib=chip.hbm_gib, argument_gib=0.0,
        output_gib=0.0, alias_gib=0.0, temp_gib=0.0, per_chip_gib=used / GIB, fits=False,
        params=job.param_count, xla_flops_per_step=None, model_flops_per_step=job.model_flops,
        executed_flops_per_step=None, hbm_bytes_per_chip=None, xla_hbm_bytes_per_chip=None,
        collective_bytes=nothing, collectives={}, ici_bytes_per_chip=None, est_step_s=None,
        est_mfu=None, bound="", terms_s={}, est_memory_gib=estimate_memory(job, n) / GIB,
        compile_s=compile_s, overrides=list(overrides),
        note="the TPU compiler refused the program: out of HBM (total from its error message)",
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# --fit


def candidate_overrides(config, n_chips: int) -> list[dict[str, Any]]:
    """Settings --fit may choose: GradCache chunk (powers of two dividing the per-chip
    questions, and off), remat (off, full, the dots-saveable policy), FSDP (off, on). The reader
    has no GradCache or FSDP: remat only."""
    levers = {f.name for f in dataclasses.fields(config)}  # those its trainer has
    remats = [{"remat": False}, {"remat": True}]
    if "remat_policy" in levers:
        remats = [{**r, "remat_policy": ""} for r in remats]
        remats.insert(1, {"remat": True, "remat_policy": FIT_REMAT_POLICY})
    per_chip = config.batch_size // n_chips
    chunks = [{}]
    if "grad_cache_chunk" in levers:
        chunks = [{"grad_cache_chunk": c} for c in [0] + [
            c for c in (2**k for k in range(20)) if c < per_chip and per_chip % c == 0]]  # fmt: skip
    fsdps = [{"fsdp": False}, {"fsdp": True}] if "fsdp" in levers else [{}]
    return [{**c, **f, **r} for f in fsdps for c in chunks for r in remats]


def _as_overrides(config, changes: dict[str, Any]) -> list[str]:
    """``key=value`` strings for the fields that differ from ``config``."""
    out = []
    for k, v in changes.items():
        if getattr(config, k) != v:
            out.append(f"{k}={str(v).lower() if isinstance(v, bool) else v}")
    return out


def _uses_no_more_memory(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Setting ``a`` needs no more memory than ``b`` by every lever: FSDP on <= off, full remat
    <= a remat policy <= no remat, a smaller GradCache chunk <= a larger one <= no GradCache."""

    def remat_rank(c):
        return 0 if c.get("remat") and not c.get("remat_policy") else (1 if c.get("remat") else 2)

    def chunk_rank(c):
        return c.get("grad_cache_chunk") or float("inf")

    return (
        (a.get("fsdp", False) or not b.get("fsdp", False))
        and remat_rank(a) <= remat_rank(b)
        and chunk_rank(a) <= chunk_rank(b)
    )


def argument_bytes(job: Job) -> float:
    """Bytes of the step's arguments on one chip (state shards, the local batch): a lower bound
    of what the program needs, exact before compiling."""
    import jax

    total = 0.0
    for x in jax.tree.leaves(job.args):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * x.dtype.itemsize
    return total


def cost_rank(config, changes: dict[str, Any], job: Job, chip: Chip, n_chips: int) -> tuple:
    """--fit's order: estimated step time, then no FSDP, larger GradCache chunks, fewer changes."""
    return (
        round(estimate_step_s(job, chip, n_chips), 6),
        changes.get("fsdp", False),
        -(changes.get("grad_cache_chunk") or 1 << 30),
        len(_as_overrides(config, changes)),
    )


def fit(
    config,
    chip: Chip,
    devices,
    topology: str,
    base_overrides: list[str],
    max_compiles: int = 4,
    log=None,
) -> tuple[Plan | None, list[dict]]:
    """The cheapest setting that fits. Candidates are ranked by estimated step time (then: no
    FSDP, larger GradCache chunks, fewer changes) and compiled in that order until one fits (at
    most ``max_compiles``). A candidate is skipped uncompiled only when it provably does not
    fit: its exact argument bytes exceed HBM, or a compiled setting that needs no more memory
    by every lever (:func:`_uses_no_more_memory`) did not fit. The analytic estimate only ranks.
    So the first compiled setting that fits is the cheapest fitting one (the ground-truth test
    in tests/test_plan.py compiles every candidate of a grid). Candidates that cannot be built
    are reported; if none can, the first reason is raised.
    Returns (the plan that fits or None, a log of the candidates tried)."""
    log = log or functools.partial(print, flush=True)
    n = len(devices)
    scored, errors = [], []
    for changes in candidate_overrides(config, n):
        cand = dataclasses.replace(config, **changes)
        try:
            job = build_job(cand, devices)
        except PlanError as e:
            errors.append({"overrides": _as_overrides(config, changes), "error": str(e)})
            continue
        scored.append((cost_rank(config, changes, job, chip, n), changes, cand, job))
    if not scored:
        raise PlanError(errors[0]["error"] if errors else "no candidate settings to try")
    scored.sort(key=lambda s: s[0])
    tried: list[dict] = list(errors)
    failed: list[dict] = []  # settings compiled that did not fit
    compiles = 0
    for _, changes, cand, job in scored:
        overrides = _as_overrides(config, changes)
        args = argument_bytes(job)
        why = ""
        if args > chip.hbm_gib * GIB:
            why = f"arguments alone {args / GIB:.2f} GiB/chip"
        else:
            worse = next((f for f in failed if _uses_no_more_memory(f, changes)), None)
            if worse is not None:
                why = "a setting needing no more memory did not fit: " + (
                    " ".join(_as_overrides(config, worse)) or "(as is)"
                )
        if why:
            tried.append({"overrides": overrides, "skipped": why})
            continue
        if compiles >= max_compiles:
            tried.append({"overrides": overrides, "not_compiled": f"--max-compiles {max_compiles}"})
            continue
        est = estimate_memory(job, n)
        log(f"compiling {' '.join(overrides) or '(config as is)'} "
            f"(estimated {est / GIB:.1f} GiB/chip)")  # fmt: skip
        plan = compile_plan(cand, chip, devices, topology, overrides)
        compiles += 1
        log(f"  -> {plan.per_chip_gib:.2f} GiB/chip: {'fits' if plan.fits else 'does not fit'} "
            f"(compiled in {plan.compile_s:.0f} s)")  # fmt: skip
        tried.append({"overrides": overrides, "est_gib": est / GIB, "per_chip_gib":
                      plan.per_chip_gib, "fits": plan.fits, "compile_s": plan.compile_s})  # fmt: skip
        if plan.fits:
            return plan, tried
        failed.append(changes)
    return None, tried


# ---------------------------------------------------------------------------------------------
# CLI


def format_plan(p: Plan) -> str:
    lines = [
        f"topology {p.topology}: {p.chips} x {p.chip} ({p.hbm_gib:.2f} GiB memory each); "
        f"{p.params / 1e6:.1f}M parameters",
        f"per chip: arguments {p.argument_gib:.2f} GiB + outputs {p.output_gib:.2f} - aliased "
        f"{p.alias_gib:.2f} + temporaries {p.temp_gib:.2f} = {p.per_chip_gib:.2f} GiB "
        f"(analytic estimate {p.est_memory_gib:.2f}) -> "
        + ("FITS" if p.fits else f"DOES NOT FIT ({p.per_chip_gib / p.hbm_gib:.2f}x memory)"),
    ]
    if p.est_step_s is not None:
        coll = ", ".join(
            f"{k} {v['count']}x {v['logical_bytes'] / GIB:.3f}" for k, v in p.collectives.items()
            if v["count"]
        ) or "none"  # fmt: skip
        terms = ", ".join(f"{k} {1e3 * v:.1f}" for k, v in p.terms_s.items())
        lines += [
            f"FLOPs per step: model {p.model_flops_per_step:.4g}, executed "
            f"{p.executed_flops_per_step:.4g} (every loop trip), XLA {p.xla_flops_per_step:.4g} "
            "(loop bodies once)",
            f"per chip per step: HBM {p.hbm_bytes_per_chip / GIB:.3f} GiB; collectives (GiB): "
            f"{coll}; interconnect {p.ici_bytes_per_chip / GIB:.3f} GiB",
            f"roofline: {p.est_step_s * 1e3:.1f} ms/step ({p.bound}-bound; ms: {terms}), "
            f"MFU {100 * p.est_mfu:.1f}% (compiled in {p.compile_s:.0f} s)",
        ]
    if p.measured_step_s is not None:
        lines.append(
            f"measured: {p.measured_step_s * 1e3:.1f} ms/step = "
            f"{p.measured_step_s / p.est_step_s:.2f} x the roofline; MFU {100 * p.measured_mfu:.1f}%"
        )
    if p.unknown_loops:
        lines.append(f"warning: {p.unknown_loops} loops of unknown trip count counted once")
    if p.note:
        lines.insert(0, p.note)
    return "\n".join(lines)


# Per-device figures of accelerators `--topology local` may find (dense bf16 peak FLOP/s, memory
# bytes/s, NVLink bytes/s, memory GiB): NVIDIA's H200 / H100 / A100 SXM datasheets.
GPUS = {
    "H200": (989e12, 4.8e12, 900e9, 141),
    "H100": (989e12, 3.35e12, 900e9, 80),
    "A100": (312e12, 2.0e12, 600e9, 80),
}


def _calibrate_cpu(devices) -> tuple[float, float]:
    """(FLOP/s, memory bytes/s) one local CPU device sustains while all run at once: a float32
    matmul and a large elementwise pass sharded over every device, best of 5."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = make_mesh(devices)
    n, k, m = len(devices), 512, 1 << 22
    a = jax.device_put(jnp.ones((n * k, k), jnp.float32), NamedSharding(mesh, P("data")))
    w = jax.device_put(jnp.ones((k, k), jnp.float32), NamedSharding(mesh, P()))
    v = jax.device_put(jnp.ones((n * m,), jnp.float32), NamedSharding(mesh, P("data")))
    mm, axpy = jax.jit(lambda a, w: a @ w), jax.jit(lambda v: v * 1.5 + 1.0)

    def best(f, *x):
        jax.block_until_ready(f(*x))
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            jax.block_until_ready(f(*x))
            times.append(time.perf_counter() - t0)
        return min(times)

    return 2.0 * k * k * k / best(mm, a, w), 2 * 4.0 * m / best(axpy, v)


def local_topology() -> tuple[Chip, list]:
    """(figures, devices) of this machine's own JAX devices: a known GPU's datasheet, or a CPU
    device's measured matmul rate and memory bandwidth (the interconnect is the memory)."""
    import jax

    devices = list(jax.devices())
    d = devices[0]
    kind = getattr(d, "device_kind", d.platform)
    if d.platform == "gpu":
        for name, (peak, bw, link, gib) in GPUS.items():
            if name in kind:
                return Chip(kind, gib, peak, bw, link, "NVIDIA datasheet"), devices
    peak, bw = _calibrate_cpu(devices)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB / len(devices)
    src = "measured: a sharded float32 matmul and an elementwise pass on these devices"
    return Chip(f"{d.platform} ({kind})", mem, peak, bw, bw, src), devices


def run(args) -> dict[str, Any]:
    """The planner behind the CLI; returns the JSON record."""
    local = args.topology == "local"
    if local and getattr(args, "measure", 3) < 1:
        raise PlanError(f"--measure {args.measure}: time at least 1 step")
    if not local and not libtpu_available():
        raise PlanError(f"compiling for TPU needs libtpu: {TPU_INSTALL_HINT}")
    config = load_any_config(args.config, args.set)
    chip, devices = local_topology() if local else tpu_topology(args.topology)
    if local:
        print(f"local devices: {len(devices)} x {chip.name}: {chip.peak_flops / 1e9:.1f} "
              f"GFLOP/s, {chip.hbm_bytes_s / 1e9:.1f} GB/s each ({chip.source})")  # fmt: skip
    if args.fit:
        plan, tried = fit(config, chip, devices, args.topology, list(args.set),
                          max_compiles=args.max_compiles)  # fmt: skip
        if plan is None:
            compiled = [t for t in tried if "per_chip_gib" in t]
            skipped = [t for t in tried if "skipped" in t]
            proven = bool(compiled) or (bool(skipped) and len(skipped) == len(tried))
            record = {"fits": False if proven else None, "overrides": None,
                      "hbm_gib": chip.hbm_gib, "tried": tried,
                      "per_chip_gib": min((t["per_chip_gib"] for t in compiled), default=None),
                      "xla_flops_per_step": None, "model_flops_per_step": None,
                      "est_step_s": None, "est_mfu": None}  # fmt: skip
            print(f"no setting fits within --max-compiles {args.max_compiles}; tried:\n"
                  + json.dumps(tried, indent=1))  # fmt: skip
            return record
        print(format_plan(plan))
        print("fits with: " + (" ".join(f"--set {o}" for o in plan.overrides) or "(as is)"))
        record = plan.to_dict()
        record["tried"] = tried
        return record
    measure = getattr(args, "measure", 3) if local else 0
    plan = compile_plan(config, chip, devices, args.topology, list(args.set), measure=measure)
    print(format_plan(plan))
    return plan.to_dict()
