"""``dpr-jax plan`` on the tiny bi-encoder for a TPU v5e 2x2 slice (4 chips), compiled by libtpu
on this CPU host: the JSON record, memory growing with the batch, the model-FLOP formula against
a hand count, a batch too large for 15.75 GiB a chip; --fit against ground truth (every
candidate compiled), --fit's one-line error when nothing can be built; FSDP reduce-scattering
the gradient (inside GradCache's loop); the plan following a change to the trainer's step; the
reader's plan; README's plan commands starting on a machine without weights; and
``--topology local``, which runs the step and compares it with the roofline (no libtpu needed).

Needs libtpu (``pip install 'dpr-jax[tpu]'``, as CI does); no TPU. Skips only without libtpu.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from dpr_jax import plan, step_costs
from dpr_jax.cli import main
from dpr_jax.trainers import load_any_config

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
TOPOLOGY = "v5e:2x2"
KEYS = ("fits", "per_chip_gib", "hbm_gib", "xla_flops_per_step", "model_flops_per_step",
        "est_step_s", "est_mfu", "overrides")  # fmt: skip
# Too big by its parameters, cheap to compile: a 16M-token vocabulary makes the tiny pair
# 1.0e9 parameters, ~17 bytes each replicated (weights, AdamW moments, gradients) > 15.75 GiB of
# v5e HBM; FSDP over the 4 chips shards the weights and moments.
BIG_VOCAB = {"bert": {"vocab_size": 16_000_000, "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 4, "intermediate_size": 37,
                      "max_position_embeddings": 512}, "pooling": "mean"}  # fmt: skip
TOO_BIG = [f"model={json.dumps(BIG_VOCAB)}"]


@pytest.fixture(scope="module", autouse=True)
def _no_compilation_cache():
    """conftest.py's shared XLA cache off here: an executable for abstract TPU devices is written
    to it and cannot be read back (no client to load it; a warning and a second compile)."""
    import jax
    from jax._src import compilation_cache  # its "cache used" is decided once a process

    was = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    yield
    jax.config.update("jax_enable_compilation_cache", was)
    compilation_cache.reset_cache()


needs_libtpu = pytest.mark.skipif(
    not plan.libtpu_available(),
    reason="libtpu is not importable: pip install 'dpr-jax[tpu]' to compile for TPU",
)


def _plan(tmp_path: Path, name: str, sets: list[str], fit: bool = False) -> dict:
    out = tmp_path / f"{name}.json"
    argv = ["--config", TINY, "--topology", TOPOLOGY, "--json", str(out)]
    for s in sets:
        argv += ["--set", s]
    if fit:
        argv.append("--fit")
    assert main(["plan", *argv]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _plan(tmp_path_factory.mktemp("plan"), "small", [])


@pytest.fixture(scope="module")
def too_big(tmp_path_factory):
    return _plan(tmp_path_factory.mktemp("plan"), "big", TOO_BIG)


@needs_libtpu
def test_tiny_plan_fits_and_reports(small):
    assert all(k in small for k in KEYS)
    assert small["fits"] is True
    assert small["hbm_gib"] == 15.75 and small["chips"] == 4
    assert 0 < small["per_chip_gib"] < 1
    assert small["xla_flops_per_step"] > 0 and 0 < small["est_mfu"] <= 1
    assert small["overrides"] == []
    # the gradient all-reduce moves at least the float32 gradient of every parameter
    assert small["collective_bytes"]["all-reduce"] >= 4 * small["params"]


@needs_libtpu
def test_model_flops_hand_count(small):
    """configs/tiny.py: H=32, I=37, 2 layers, B=4 questions of 16 tokens, G=2 passages of 48."""
    h, i, layers = 32, 37, 2
    q_tok, p_tok = 4 * 16, 8 * 48
    matmul = 2 * (4 * h * h + 2 * h * i) * (q_tok + p_tok) * layers  # weight matmuls
    attention = layers * 4 * h * (4 * 16**2 + 8 * 48**2)  # QK^T and PV per sequence
    scores = 2 * 4 * 8 * h  # (4, 32) . (32, 8)
    assert small["model_flops_per_step"] == 3 * (matmul + attention + scores) == 49_698_816


@needs_libtpu
def test_memory_grows_with_batch_and_too_big_does_not_fit(small, too_big):
    # (XLA:TPU may refuse the big program outright: then the total comes from its error)
    assert too_big["per_chip_gib"] > 10 * small["per_chip_gib"]
    assert too_big["fits"] is False and too_big["per_chip_gib"] > too_big["hbm_gib"]


@needs_libtpu
def test_bad_topology_is_one_line(capsys):
    assert main(["plan", "--config", TINY, "--topology", "v9x:2x2"]) == 2
    err = capsys.readouterr().err
    assert "v5e:4x4" in err and len(err.strip().splitlines()) == 1


def test_out_of_memory_compile_error_is_read():
    msg = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory "
           "space hbm. Used 34.60G of 15.75G hbm. Exceeded hbm capacity by 18.85G.")  # fmt: skip
    assert plan._oom_used_bytes(msg) == pytest.approx(34.60 * 2**30)
    assert plan._oom_used_bytes("INTERNAL: something else") is None
    msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (20.93G) exceeds available HBM (15.75G).")  # fmt: skip
    assert plan._oom_used_bytes(msg) == pytest.approx(20.93 * 2**30)


def test_collective_bytes_of_hlo_text():
    hlo = """HloModule m

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %ag = bf16[64,128]{1,0} all-gather(bf16[16,128]{1,0} %x), dimensions={0}
  ROOT %t = (s32[], f32[8,128]) tuple(%i, %y)
}

%cond (p: (s32[], f32[8,128])) -> pred[] {
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %ars = f32[1024]{0} all-reduce-start(f32[1024]{0} %a), to_apply=%add
  %ard = f32[1024]{0} all-reduce-done(f32[1024]{0} %ars)
  %rs = f32[256]{0} reduce-scatter(f32[1024]{0} %ard), dimensions={0}
  %w = (s32[], f32[8,128]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %cp = f32[1024]{0} collective-permute(f32[1024]{0} %ard), source_target_pairs={{0,1}}
}
"""
    # (XLA:GPU's form: loops carry known_trip_count; tests/test_step_costs.py reads real TPU HLO)
    summary = step_costs.collective_summary(
        step_costs.collectives(step_costs.HloModule.parse(hlo), 4)
    )
    got = {k: v["logical_bytes"] for k, v in summary.items()}
    assert got == {
        "all-gather": 3 * 64 * 128 * 2,  # inside a 3-trip loop
        "all-reduce": 1024 * 4,  # the async pair once
        "reduce-scatter": 1024 * 4,  # the full array reduced (4 x its f32[256] result)
        "all-to-all": 0,
        "collective-permute": 1024 * 4,
    }


# -- issue 24: FSDP shards the step, --fit's ground truth, the trainer's own step, local runs --
MID = {"bert": {"vocab_size": 1024, "hidden_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "intermediate_size": 512,
                "max_position_embeddings": 64}, "pooling": "cls"}  # fmt: skip
MID_SETS = [f"model={json.dumps(MID)}", "batch_size=8", "q_max_len=8", "p_max_len=16"]


@needs_libtpu
def test_fsdp_reduce_scatters_the_gradient(tmp_path):
    """Every kernel of this model has >= 2**16 elements and a dimension divisible by 4: with FSDP
    its gradient is reduce-scattered layer by layer (no all-reduce of the whole gradient), and
    the compiled step holds less than the replicated one."""
    plain = _plan(tmp_path, "plain", MID_SETS)
    fsdp = _plan(tmp_path, "fsdp", MID_SETS + ["fsdp=true"])
    grads = 4 * plain["params"]
    assert plain["collective_bytes"]["all-reduce"] >= grads
    assert plain["collective_bytes"]["reduce-scatter"] < grads / 10
    assert fsdp["collective_bytes"]["reduce-scatter"] >= grads / 2
    assert fsdp["collective_bytes"]["all-reduce"] < grads / 2
    assert fsdp["collective_bytes"]["all-gather"] >= grads / 2  # the layers, gathered
    assert fsdp["argument_gib"] < plain["argument_gib"] / 2
    # with GradCache each chunk's gradient is reduce-scattered inside the loop (XLA would
    # otherwise sink the reductions out of it and keep whole gradients across the chunks)
    gc = _plan(tmp_path, "gc", MID_SETS + ["fsdp=true", "grad_cache_chunk=1"])

    def reductions(r):
        return r["collectives"]["reduce-scatter"]["count"] + r["collectives"]["all-reduce"]["count"]

    assert reductions(gc) >= 2 * reductions(fsdp)


@needs_libtpu
def test_fit_returns_the_cheapest_fitting_setting(tmp_path, too_big, monkeypatch):
    """Ground truth: every candidate of the grid in --fit's own order until the first that fits
    when compiled; that is what --fit must return (it may skip only settings that provably do
    not fit). A candidate --fit compiled itself is not compiled twice (its result is recorded
    as --fit gets it); every candidate it skipped is compiled here."""
    compiled = {}
    real = plan.compile_plan

    def recorded(cand, chip, devices, topology, overrides, **kw):
        p = real(cand, chip, devices, topology, overrides, **kw)
        compiled[tuple(overrides)] = p.fits
        return p

    monkeypatch.setattr(plan, "compile_plan", recorded)
    found = _plan(tmp_path, "fit", TOO_BIG, fit=True)
    monkeypatch.setattr(plan, "compile_plan", real)
    assert compiled and tuple(found["overrides"]) in compiled
    config = load_any_config(TINY, TOO_BIG)
    chip, devices = plan.tpu_topology(TOPOLOGY)
    order = sorted(
        plan.candidate_overrides(config, 4),
        key=lambda c: plan.cost_rank(
            config, c, plan.build_job(dataclasses.replace(config, **c), devices), chip, 4
        ),
    )
    truth = None
    for c in order:
        overrides = plan._as_overrides(config, c)
        fits = compiled.get(tuple(overrides))
        if fits is None:  # skipped by --fit: compiled here
            cand = dataclasses.replace(config, **c)
            fits = real(cand, chip, devices, TOPOLOGY, overrides).fits
        if fits:
            truth = overrides
            break
    assert truth is not None and found["overrides"] == truth
    assert found["fits"] is True and set(o.split("=")[0] for o in found["overrides"]) <= {
        "grad_cache_chunk", "remat", "remat_policy", "fsdp",
    }  # fmt: skip
    again = _plan(tmp_path, "again", TOO_BIG + found["overrides"])  # compiled afresh
    assert again["fits"] is True
    assert again["per_chip_gib"] == pytest.approx(found["per_chip_gib"])
    assert again["per_chip_gib"] < too_big["per_chip_gib"]


@needs_libtpu
def test_fit_reports_why_nothing_could_be_built(tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["plan", "--config", TINY, "--topology", TOPOLOGY, "--set", "batch_size=6", "--fit",
               "--json", str(out)])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "batch_size = 6 is not a multiple of the 4 chips" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


@needs_libtpu
def test_plan_is_the_trainers_step(tmp_path, monkeypatch):
    """A change to the step the trainer builds (here: GradCache forced on inside the trainer's
    builder, one extra forward pass) shows in the plan: the planner builds through
    dpr_jax.retriever.task.build_train_step, not a copy of it."""
    from dpr_jax.retriever import task

    before = _plan(tmp_path, "before", [])["executed_flops_per_step"]
    original = task.make_train_step

    def with_grad_cache(model, tx, mesh, loss_cfg, chunk=None, **kw):
        return original(model, tx, mesh, loss_cfg, 1, **kw)

    monkeypatch.setattr(task, "make_train_step", with_grad_cache)
    after = _plan(tmp_path, "after", [])["executed_flops_per_step"]
    assert after == pytest.approx(before * 4 / 3, rel=0.05)


def test_local_plan_runs_the_step(tmp_path):
    """``--topology local`` compiles for this machine's devices, runs the step and reports the
    measured time beside the roofline's (one CPU device, a compute-bound model): the cost
    reading and roofline machinery end to end."""
    import os
    import subprocess
    import sys

    out = tmp_path / "local.json"
    sets = [f"model={json.dumps({**MID, 'bert': {**MID['bert'], 'hidden_size': 256, 'intermediate_size': 1024, 'max_position_embeddings': 128}})}",
            "batch_size=32", "q_max_len=32", "p_max_len=64"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "dpr_jax.cli", "plan", "--config", TINY, "--topology", "local",
           "--json", str(out), "--measure", "2"] + [a for s in sets for a in ("--set", s)]  # fmt: skip
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    p = json.loads(out.read_text())
    assert p["chips"] == 1 and p["measured_step_s"] > 0
    assert p["executed_flops_per_step"] == pytest.approx(p["model_flops_per_step"], rel=0.01)
    assert 0.3 < p["measured_step_s"] / p["est_step_s"] < 10, p


@needs_libtpu
def test_readme_plan_commands_start_without_weights(monkeypatch):
    """Every `dpr-jax plan` command of README builds its step on abstract devices (no compile)
    on a machine without the converted weights or the MiniLM package."""
    import shlex

    from dpr_jax.training import config as training_config

    def no_minilm():
        raise AssertionError("planning must not need the MiniLM package")

    monkeypatch.setattr(training_config, "minilm_path", no_minilm)
    monkeypatch.setenv("DPR_JAX_BERT_BASE", "/nonexistent/bert-base-biencoder")
    cmds = [line.split("#")[0].replace("[--json plan.json]", "").strip()
            for line in (REPO / "README.md").read_text().splitlines()
            if line.startswith("dpr-jax plan ")]  # fmt: skip
    assert len(cmds) >= 2
    for cmd in cmds:
        argv = shlex.split(cmd)[2:]
        opts = {argv[i]: argv[i + 1] for i in range(len(argv) - 1) if argv[i].startswith("--")}
        sets = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--set"]
        config = load_any_config(str(REPO / opts["--config"]), sets)
        _, devices = plan.tpu_topology(opts["--topology"])
        assert plan.build_job(config, devices).param_count > 0, cmd
    for name in ("bert_1b_pair.py", "reader_dpr_bert_base.py", "reader_squad_minilm.py"):
        config = load_any_config(str(REPO / "configs" / name), [])
        _, devices = plan.tpu_topology("v5e:2x2")
        assert plan.build_job(config, devices).param_count > 0, name


@needs_libtpu
def test_reader_plan(tmp_path):
    """The reader's step (DPR's span + relevance loss) plans too: it fits, every parameter's
    gradient is all-reduced, and the traced step runs the model's matmuls."""
    out = tmp_path / "reader.json"
    assert main(["plan", "--config", str(REPO / "configs" / "reader_tiny.py"), "--topology",
                 TOPOLOGY, "--set", "batch_size=4", "--json", str(out)]) == 0  # fmt: skip
    r = json.loads(out.read_text())
    assert r["fits"] and r["collective_bytes"]["all-reduce"] >= 4 * r["params"]
    # the reader's step is jitted over the global batch (no shard_map): each chip runs 1/4
    assert r["model_flops_per_step"] <= r["executed_flops_per_step"]
    assert r["executed_flops_per_step"] < 1.5 * r["model_flops_per_step"]


def test_reader_plan_says_its_step_is_the_longest():
    """A length-bucketed reader config plans its step at max_length (the batch_shapes), the
    longest a step can be: the plan says so, and says nothing of it without bucketing."""
    from dpr_jax.trainers import trainer_for

    reader = str(REPO / "configs" / "reader_tiny.py")
    config = load_any_config(reader, [])
    _, note = trainer_for(config).architecture(config, True)
    assert config.bucket == 32 and "the step at max_length 192, the longest" in note
    assert trainer_for(config).batch_shapes(config)["input_ids"][0][-1] == 192
    unbucketed = load_any_config(reader, ["bucket=0"])
    assert "longest" not in trainer_for(unbucketed).architecture(unbucketed, True)[1]
    # a missing init_from keeps its own note beside it
    missing = load_any_config(reader, ["init_from=/nonexistent/model"])
    assert missing.model
    joined = trainer_for(missing).architecture(missing, True)[1]
    assert joined.startswith("init_from /nonexistent/model not found") and "longest" in joined


def test_local_measure_must_be_positive(capsys):
    assert main(["plan", "--config", TINY, "--topology", "local", "--measure", "0"]) == 2
    err = capsys.readouterr().err
    assert "argument --measure: expected an integer >= 1, got '0'" in err
