"""Multi-process training equals single-process training (jax.distributed on 127.0.0.1).

Two processes with 2 CPU devices each (gloo collectives) and one process with 4 devices train the
tiny config for a few steps on the same global batches: every process builds only its rows of
each batch (process_slice), the loss gathers passages across processes, and the evaluation
gathers the encoded dev set. The per-step training losses, the dev metrics and the final
parameters must agree (float32; reductions across processes may add in another order, hence a
tight tolerance rather than bit equality).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multihost_worker import build_squad_biencoder

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
FIXTURE_ARTICLE = "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json"
STEPS = 3
TIMEOUT = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _params(workdir: Path, steps: int = STEPS) -> dict[str, np.ndarray]:
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


def _losses(workdir: Path) -> list[float]:
    recs = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path, data_dir, minilm_dir):
    train, dev, _, _ = build_squad_biencoder(data_dir / FIXTURE_ARTICLE, tmp_path / "data")
    common = ["--train", str(train), "--dev", str(dev), "--steps", str(STEPS), "--batch-size", "8"]
    port = _free_port()
    one, two = tmp_path / "one", tmp_path / "two"
    cmds = [
        ([sys.executable, str(WORKER), "--workdir", str(one), *common], 4),
    ] + [
        (
            [
                sys.executable,
                str(WORKER),
                "--workdir",
                str(two),
                *common,
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ],
            2,
        )  # fmt: skip
        for i in range(2)
    ]
    procs = []
    try:
        for cmd, devices in cmds:
            log = open(tmp_path / f"log{len(procs)}.txt", "w")
            procs.append(subprocess.Popen(cmd, env=_env(devices), stdout=log, stderr=log))
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-host workers did not finish in {TIMEOUT}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = [(tmp_path / f"log{i}.txt").read_text() for i in range(3)]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]

    r1 = json.loads((one / "result.json").read_text())
    r2 = json.loads((two / "result.json").read_text())
    assert (r1["devices"], r1["processes"]) == (4, 1)
    assert (r2["devices"], r2["processes"]) == (4, 2)
    l1, l2 = _losses(one), _losses(two)
    assert len(l1) == len(l2) == STEPS
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    for k in ("loss", "accuracy", "rank", "pool_rank", "pool_top1"):
        np.testing.assert_allclose(r2["metrics"][k], r1["metrics"][k], rtol=1e-5, err_msg=k)
    assert r1["metrics"]["questions"] == r2["metrics"]["questions"] == 24
    p1, p2 = _params(one), _params(two)
    assert sorted(p1) == sorted(p2)
    recs = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    lr_sum = sum(r["lr"] for r in recs if r["split"] == "train")
    # With mean pooling, the passage tower's last LayerNorm bias shifts every passage vector by
    # the same c, adding q.c to all of a question's scores: the softmax ignores it, so its
    # gradient is mathematically 0 and numerically rounding noise, which Adam's g / sqrt(v)
    # turns into steps of +-lr whose signs depend on the order of reductions. Elsewhere the
    # runs agree to 0.5% of the summed Adam step sizes (measured: <= 7.2e-6 = 0.16%, on a few
    # embedding rows with tiny gradients, which Adam's normalisation also magnifies); a wrong
    # batch, label offset or missing gradient would move parameters by whole steps.
    invariant = "ctx_encoder/bert_model/encoder_layer_1/output_LayerNorm/bias"
    for k in p1:
        if k == invariant:
            assert np.abs(p2[k] - p1[k]).max() <= 2 * lr_sum
        else:
            np.testing.assert_allclose(p2[k], p1[k], rtol=1e-5, atol=0.005 * lr_sum, err_msg=k)
    # the parameters did move: steps 2 and 3 had a learning rate and a gradient (step 1's
    # warmup learning rate is 0), so the comparison is not between two initialisations
    moved = [r for r in recs if r["split"] == "train" and r["step"] >= 2]
    assert all(r["lr"] > 0 and r["grad_norm"] > 0 for r in moved) and len(moved) == 2
