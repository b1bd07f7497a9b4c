"""Multi-process training through the real command line, to the exported model directory.

``dpr-jax train --coordinator 127.0.0.1:PORT --num-processes 2 --process-id I`` (two local
processes, 2 CPU devices each, gloo collectives) must train as one process with 4 devices on the
same global batches: every process builds only its rows of each batch (process_slice), the loss
gathers passages across processes, the validation gathers the encoded dev set; the per-step
losses, the dev metrics and the exported parameters agree (float32; reductions across processes
may add in another order, hence a tight tolerance rather than bit equality). A job whose
processes are all SIGKILLed mid-run must, run again with the same command, end with exactly the
parameters of the uninterrupted job (it resumes from the last checkpoint at its data position).
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


def _launch(workdir: Path, data: tuple, processes: int, devices: int, logs: Path) -> list:
    """Start one job: ``processes`` processes of ``devices`` CPU devices each; ``data``: the
    (training, dev) files."""
    port = _free_port()
    procs = []
    for i in range(processes):
        cmd = _train_cmd(workdir, *data)
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


def _params(workdir: Path, steps: int) -> dict[str, np.ndarray]:
    """The parameters of checkpoint ``steps`` (on this process's first device)."""
    import jax
    import orbax.checkpoint as ocp
    from flax.traverse_util import flatten_dict

    path = (workdir / "checkpoints" / str(steps) / "state").absolute()
    ckptr = ocp.StandardCheckpointer()
    # saved on 4 devices: restore onto this process's first device
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
        ckptr.metadata(path).item_metadata,
    )
    state = ckptr.restore(path, target)
    assert int(state["step"]) == steps
    return {"/".join(k): np.asarray(v) for k, v in flatten_dict(state["params"]).items()}


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


@pytest.mark.slow
def test_sigkill_both_processes_then_rerun_equals_uninterrupted(runs):
    tmp, data, _, two = runs
    killed = tmp / "killed"
    procs = _launch(killed, data, 2, 2, tmp)
    # Wait (bounded) for a checkpoint past the first, then SIGKILL both processes at once.
    sigkill_at(killed / "checkpoints" / str(2 * CHECKPOINT_EVERY), procs)
    assert not (killed / "model").exists(), "the job finished before it was killed"
    steps = sorted(int(d.name) for d in (killed / "checkpoints").iterdir() if d.name.isdigit())
    assert steps and steps[-1] < STEPS

    _wait(_launch(killed, data, 2, 2, tmp))
    recs = [json.loads(x) for x in (killed / "metrics.jsonl").read_text().splitlines()]
    resumed = [r for r in recs if r["split"] == "start" and r["resumed"]]
    assert len(resumed) == 1 and CHECKPOINT_EVERY * 2 <= resumed[0]["step"] < STEPS
    ref, got = _model_params(two), _model_params(killed)
    assert sorted(ref) == sorted(got)
    for k in ref:  # the same processes, devices and reductions: bit-identical
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


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
