"""Exact search sharded over two processes' devices (jax.distributed on 127.0.0.1, gloo) equals
numpy brute force, ties to the lower row included, on every process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_multihost_cli import _env, _free_port

WORKER = Path(__file__).resolve().parent / "exact_multihost_worker.py"
TIMEOUT = 300


@pytest.mark.slow
def test_two_processes_search_one_sharded_corpus(tmp_path):
    env = _env(2)
    port = _free_port()
    procs = []
    try:
        for i in range(2):
            cmd = [sys.executable, str(WORKER), "--out", str(tmp_path), "--coordinator",
                   f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)]  # fmt: skip
            log = open(tmp_path / f"log{i}.txt", "w")
            procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=log))
        for p in procs:
            p.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"multi-host workers did not finish in {TIMEOUT}s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, (tmp_path / f"log{i}.txt").read_text()[-3000:]

    rng = np.random.default_rng(5)  # the worker's data
    emb = rng.integers(-3, 4, size=(203, 8)).astype(np.float64)
    queries = rng.integers(-2, 3, size=(11, 8)).astype(np.float64)
    s = queries @ emb.T  # (Q, D) . (D, N) -> (Q, N)
    rows = np.argsort(-s, axis=1, kind="stable")[:, :7]
    for i in range(2):
        r = json.loads((tmp_path / f"result{i}.json").read_text())
        assert (r["devices"], r["local_devices"], r["processes"]) == (4, 2, 2)
        assert not r["fully_addressable"]  # the corpus really spans both processes
        np.testing.assert_array_equal(np.array(r["ids"]), rows.astype(str))
        np.testing.assert_array_equal(r["scores"], np.take_along_axis(s, rows, axis=1))
        assert r["embeddings_roundtrip"]
