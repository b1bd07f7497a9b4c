"""Multi-process training through the real command line, to the exported model directory.

``dpr-jax train --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I`` (two local
processes, 2 CPU devices each, gloo collectives) must train as one process with 4 devices on the
same global batches: every process builds only its rows of each batch (process_slice), the loss
gathers passages across processes, the validation gathers the encoded dev set; the per-step
losses, the dev metrics and the exported parameters agree (float32; reductions across processes
may add in another order, hence a tight tolerance rather than bit equality). Questions are
bucketed (``bucket=8``), so the processes must agree on each batch's padded length.

A job reading an ArrayRecord directory through grain, whose processes are all SIGKILLed mid-run,
run again with the same command, ends with exactly the parameters of the uninterrupted JSON job
(the same batches; it resumes from the last checkpoint, which holds each process's grain
iterator state), and after the resume each process read only the records of its own rows (a
fresh start's reads: tests/test_grain_loader.py's shards, simulated in one process).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from multihost_worker import build_squad_biencoder

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
FIXTURE_ARTICLE = "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json"
STEPS = 8
CHECKPOINT_EVERY = 2
TIMEOUT = 900
INVARIANT = "ctx_encoder/bert_model/encoder_layer_1/output_LayerNorm/bias"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # no shared compilation cache (conftest.py's): a process finding its step compiled reaches
    # the first collective while the other still compiles, past gloo's 30 s to set it up
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _train_cmd(workdir: Path, train: Path, dev: Path | str = "") -> list[str]:
    sets = [
        f"train_path={train}",
        f"dev_path={dev}",  # validated at the end only
        "max_dev_examples=24",
        "eval_at_start=false",
        "batch_size=8",
        "bucket=8",  # the processes agree on each batch's padded length (the loader's gather)
        f"num_steps={STEPS}",
        "log_every=1",
        f"checkpoint_every={CHECKPOINT_EVERY}",
        "dropout=0",  # dropout's device-count independence is test_train_step.py's job
    ]
    cmd = [sys.executable, "-m", "dpr_jax.cli", "train", "--config", str(REPO / "configs/tiny.py")]
    cmd += ["--workdir", str(workdir)]
    for s in sets:
        cmd += ["--set", s]
    return cmd


def _launch(
    workdir: Path, data: tuple, processes: int, devices: int, logs: Path, reads: Path | None = None
) -> list:
    """Start one job: ``processes`` processes of ``devices`` CPU devices each; ``data``: the
    (training, dev) files; ``reads``: each process counts the records it reads (WORKER)."""
    port = _free_port()
    procs = []
    for i in range(processes):
        cmd = _train_cmd(workdir, *data)
        if reads is not None:  # python -m dpr_jax.cli ... -> python WORKER --reads DIR ...
            cmd = [sys.executable, str(WORKER), "--reads", str(reads), *cmd[3:]]
        if processes > 1:
            cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(processes)]
            cmd += ["--process-id", str(i)]
        log = open(logs / f"{workdir.name}.{i}.{time.monotonic_ns()}.log", "w")
        procs.append((subprocess.Popen(cmd, env=_env(devices), stdout=log, stderr=log), log))
    return procs


def _wait(procs: list) -> None:
    try:
        for p, _ in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"training processes did not finish in {TIMEOUT}s")
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    for p, log in procs:
        assert p.returncode == 0, Path(log.name).read_text()[-3000:]


def sigkill_at(target: Path, procs: list, others: list = ()) -> None:
    """SIGKILL the processes of one job (``_launch``'s) at once as soon as ``target`` exists
    (bounded wait; ``others``, jobs running beside it, are killed too if it never comes)."""
    deadline = time.monotonic() + TIMEOUT
    while not target.exists():
        if time.monotonic() > deadline or any(p.poll() is not None for p, _ in procs):
            for p, _ in [*procs, *others]:
                p.kill()
            pytest.fail(f"the job ended or stalled before {target} was written")
        time.sleep(0.02)
    for p, _ in procs:
        p.send_signal(signal.SIGKILL)
    for p, log in procs:
        p.wait()
        log.close()
        assert p.returncode == -signal.SIGKILL


def _records(workdir: Path, split: str) -> list[dict]:
    recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["split"] == split]


def _model_params(workdir: Path) -> dict[str, np.ndarray]:
    from flax.traverse_util import flatten_dict

    from dpr_jax.model_dir import load_model

    kind, _, params, meta = load_model(workdir / "model", "biencoder")
    assert meta["step"] == STEPS
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(params).items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir, minilm_dir):
    """The training data, and two uninterrupted jobs run side by side: one process with 4
    devices, two processes with 2 devices each."""
    tmp = tmp_path_factory.mktemp("multihost_cli")
    train, dev, n_train, _ = build_squad_biencoder(data_dir / FIXTURE_ARTICLE, tmp / "data")
    assert n_train >= 8 * STEPS // 2
    one, two = tmp / "one", tmp / "two"
    procs = _launch(one, (train, dev), 1, 4, tmp) + _launch(two, (train, dev), 2, 2, tmp)
    _wait(procs)
    return tmp, (train, dev), one, two


@pytest.mark.slow
def test_two_process_cli_exports_the_single_process_model(runs):
    _, _, one, two = runs
    cfg1 = json.loads((one / "config.json").read_text())["resolved"]
    cfg2 = json.loads((two / "config.json").read_text())["resolved"]
    assert (cfg1["devices"], cfg1["processes"]) == (4, 1)
    assert (cfg2["devices"], cfg2["processes"]) == (4, 2)
    p1, p2 = _model_params(one), _model_params(two)
    assert sorted(p1) == sorted(p2)
    train1, train2 = _records(one, "train"), _records(two, "train")
    assert len(train1) == len(train2) == STEPS
    assert all(r["grad_norm"] > 0 for r in train1) and all(r["lr"] > 0 for r in train1[1:])
    np.testing.assert_allclose([r["loss"] for r in train2], [r["loss"] for r in train1], rtol=1e-5)
    (dev1,), (dev2,) = _records(one, "dev"), _records(two, "dev")  # at the end only
    assert dev1["step"] == dev2["step"] == STEPS
    for k in ("loss", "accuracy", "rank", "pool_rank", "pool_top1"):
        np.testing.assert_allclose(dev2[k], dev1[k], rtol=1e-5, err_msg=k)
    assert dev1["questions"] == dev2["questions"] == 24
    lr_sum = sum(r["lr"] for r in train1)
    # With mean pooling, the passage tower's last LayerNorm bias (INVARIANT) shifts every
    # passage vector by the same c, adding q.c to all of a question's scores: the softmax
    # ignores it, so its gradient is mathematically 0 and numerically rounding noise, which
    # Adam's g / sqrt(v) turns into steps of +-lr whose signs depend on the order of reductions.
    # Elsewhere the runs agree to float32 rounding, magnified at most to a fraction of the
    # summed Adam step sizes on parameters with tiny gradients (measured: <= 0.16%, a few
    # embedding rows); a wrong batch row, label offset or missing gradient would move
    # parameters by whole steps.
    moved = 0
    for k in p1:
        if k == INVARIANT:
            assert np.abs(p2[k] - p1[k]).max() <= 2 * lr_sum
            continue
        np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=0.005 * lr_sum, err_msg=k)
        moved += 1
    assert moved == len(p1) - 1


def _own_keys(order, p: int, start_batch: int, stop_batch: int) -> list[int]:
    """Record keys of process p's rows [4p, 4p + 4) of global batches [start, stop) of 8."""
    return [int(k) for b in range(start_batch, stop_batch)
            for k in order[b * 8 + 4 * p : b * 8 + 4 * p + 4]]  # fmt: skip


@pytest.mark.slow
def test_sigkill_a_grain_job_then_rerun_equals_uninterrupted(runs):
    pytest.importorskip("array_record", reason="pip install 'dpr-jax[records]'")
    pytest.importorskip("grain", reason="pip install 'dpr-jax[records]'")
    from dpr_jax.cli import main as dpr_jax_main
    from dpr_jax.data.loader import READ_THREADS
    from dpr_jax.retriever.batching import BatchSpec, BiencoderBatches
    from dpr_jax.retriever.task import load_config, read_examples

    tmp, (train, dev), _, two = runs
    records = tmp / "data" / "train.records"
    assert dpr_jax_main(["convert-data", "--biencoder", str(train), "--out", str(records)]) == 0
    killed, reads = tmp / "killed", tmp / "reads"
    procs = _launch(killed, (records, dev), 2, 2, tmp, reads)
    # Wait (bounded) for a checkpoint past the first, then SIGKILL both processes at once.
    sigkill_at(killed / "checkpoints" / str(2 * CHECKPOINT_EVERY), procs)
    assert not (killed / "model").exists(), "the job finished before it was killed"
    assert not reads.exists()  # written when the command returns
    steps = sorted(int(d.name) for d in (killed / "checkpoints").iterdir() if d.name.isdigit())
    assert steps and 2 * CHECKPOINT_EVERY <= steps[-1] < STEPS
    resume_step = steps[-1]

    _wait(_launch(killed, (records, dev), 2, 2, tmp, reads))
    starts = _records(killed, "start")
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["step"] == resume_step
    # the resumed job ended with the uninterrupted JSON job's losses and parameters: the same
    # batches, processes, devices and reductions, bit for bit
    want = {r["step"]: r["loss"] for r in _records(two, "train")}
    got = {r["step"]: r["loss"] for r in _records(killed, "train")}
    assert sorted(want) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in range(1, STEPS + 1))
    ref, res = _model_params(two), _model_params(killed)
    assert sorted(ref) == sorted(res)
    for k in ref:
        np.testing.assert_array_equal(res[k], ref[k], err_msg=k)

    # every checkpoint kept holds both processes' grain states at its step: process p last
    # read global sample (step * 4 - 1) * 2 + p
    kept = [s for s in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY)
            if (killed / "checkpoints" / str(s) / "loader").exists()]  # fmt: skip
    assert STEPS in kept
    for step in kept:
        loader = killed / "checkpoints" / str(step) / "loader"
        for p in range(2):
            state = json.loads((loader / f"process_{p}-of-2.json").read_text())
            assert state["last_seen_indices"] == {"0": (step * 4 - 1) * 2 + p}
            assert "shard_count=2" in state["sampler"]

    # after the resume each process read only the question records of its rows (in the order
    # the JSON path draws from the config's seed), from the checkpoint's batch on
    seed = load_config(REPO / "configs" / "tiny.py").seed
    order = BiencoderBatches(read_examples(str(train)), None, BatchSpec(8, seed=seed)).order(0)
    assert len(order) >= 8 * (STEPS + 2)  # the run stays in epoch 0
    ahead = 2 * 4 + READ_THREADS  # grain's read-ahead, in samples of this process
    seen = []
    for p in range(2):
        got_reads = json.loads((reads / f"reads.{p}.json").read_text())
        assert got_reads["process"] == p
        keys = got_reads["records.array_record"]
        own = _own_keys(order, p, resume_step, STEPS + 3)
        assert (STEPS - resume_step) * 4 <= len(keys) <= (STEPS - resume_step) * 4 + ahead
        assert sorted(keys) == sorted(own[: len(keys)])  # each once, in stream order
        seen.append(set(keys))
    assert not seen[0] & seen[1]


@pytest.mark.slow
def test_gather_to_host_of_arrays_sharded_over_two_processes(tmp_path):
    """What the export gathers when parameters are sharded over the devices of several hosts
    (FSDP): every process receives every array whole."""
    from multihost_gather_worker import expected

    worker = Path(__file__).resolve().parent / "multihost_gather_worker.py"
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, str(worker), str(tmp_path / f"got{i}.npz")]
        cmd += [
            "--coordinator",
            f"127.0.0.1:{port}",
            "--num-processes",
            "2",
            "--process-id",
            str(i),
        ]
        log = open(tmp_path / f"gather{i}.log", "w")
        procs.append((subprocess.Popen(cmd, env=_env(2), stdout=log, stderr=log), log))
    _wait(procs)
    want = expected()
    for i in range(2):
        got = np.load(tmp_path / f"got{i}.npz")
        assert sorted(got.files) == sorted(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"process {i}: {k}")


@pytest.mark.parametrize(
    "given,said,missing",
    [(["--num-processes", "2"], "coordinator_address should be defined",
      "--coordinator, --process-id"),
     (["--coordinator", "127.0.0.1:1"], "Number of processes must be defined",
      "--num-processes, --process-id")],
)  # fmt: skip
def test_a_partial_multi_process_command_names_what_is_missing(tmp_path, given, said, missing):
    """Without a cluster for jax.distributed to read (SLURM, a TPU pod), a multi-process command
    that leaves some of the three options out is one line naming them, not a traceback, and
    leaves no workdir."""
    workdir = tmp_path / "w"
    cmd = [*_train_cmd(workdir, tmp_path / "train.json"), *given]
    env = {k: v for k, v in _env(1).items() if not k.startswith(("SLURM_", "TPU_", "OMPI_"))}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        f"dpr-jax train: multi-process run: {said} (jax.distributed found no cluster to read it "
        f"from); give {missing}"
    ]
    assert not workdir.exists()
