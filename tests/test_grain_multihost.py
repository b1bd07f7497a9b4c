"""Two real processes (jax.distributed on 127.0.0.1, gloo, 2 CPU devices each) train on an
ArrayRecord directory through grain: each process reads only the records of its rows (counted in
the process), each checkpoint holds each process's grain iterator state, and a job SIGKILLed
after a checkpoint, run again with the same command, continues from those states and ends with
the uninterrupted job's losses and parameters bit for bit. Questions are bucketed (``bucket=8``),
so the processes agree on each batch's padded length through the loader's all-gather (a
disagreement fails to assemble the global batch)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from multihost_worker import build_squad_biencoder
from test_multihost_cli import _env, _free_port, _params, _records, _wait, sigkill_at

pytest.importorskip("array_record", reason="pip install 'dpr-jax[records]'")
pytest.importorskip("grain", reason="pip install 'dpr-jax[records]'")

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "multihost_worker.py"
FIXTURE_ARTICLE = "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json"
B = 8  # global batch: 4 rows per process
STEPS = 8
CHECKPOINT_EVERY = 2


def _launch(workdir: Path, records: Path, logs: Path, reads: Path | None = None) -> list:
    port = _free_port()
    procs = []
    for i in range(2):
        cmd = [sys.executable, str(WORKER), "--workdir", str(workdir), "--train", str(records),
               "--steps", str(STEPS), "--batch-size", str(B), "--set",
               f"checkpoint_every={CHECKPOINT_EVERY}", "--set", "bucket=8",
               "--coordinator", f"127.0.0.1:{port}",
               "--num-processes", "2", "--process-id", str(i)]  # fmt: skip
        if reads is not None:
            reads.mkdir(parents=True, exist_ok=True)
            cmd += ["--reads", str(reads)]
        log = open(logs / f"{workdir.name}.{i}.{time.monotonic_ns()}.log", "w")
        procs.append((subprocess.Popen(cmd, env=_env(2), stdout=log, stderr=log), log))
    return procs


def _own_keys(order, p: int, start_batch: int, stop_batch: int) -> list[int]:
    """Record keys of process p's rows [4p, 4p + 4) of global batches [start, stop)."""
    return [int(k) for b in range(start_batch, stop_batch)
            for k in order[b * B + 4 * p : b * B + 4 * p + 4]]  # fmt: skip


@pytest.mark.slow
def test_two_processes_read_their_records_and_resume_bit_identically(
    tmp_path, data_dir, minilm_dir
):
    from dpr_jax.cli import main as dpr_jax_main
    from dpr_jax.data.loader import READ_THREADS
    from dpr_jax.retriever.batching import BatchSpec, BiencoderBatches
    from dpr_jax.retriever.task import load_config, read_examples

    train, _, n_train, _ = build_squad_biencoder(data_dir / FIXTURE_ARTICLE, tmp_path / "data")
    records = tmp_path / "data" / "train.records"
    assert dpr_jax_main(["convert-data", "--biencoder", str(train), "--out", str(records)]) == 0
    # the run stays in epoch 0 (so the two processes' rows never share a record)
    assert n_train >= B * (STEPS + 2)

    full, killed = tmp_path / "full", tmp_path / "killed"
    procs = _launch(full, records, tmp_path, tmp_path / "reads_full")
    victims = _launch(killed, records, tmp_path)
    sigkill_at(killed / "checkpoints" / str(2 * CHECKPOINT_EVERY), victims, others=procs)
    assert not (killed / "result.json").exists(), "the job finished before it was killed"
    _wait(procs)
    saved = sorted(int(d.name) for d in (killed / "checkpoints").iterdir() if d.name.isdigit())
    resume_step = saved[-1]
    assert 2 * CHECKPOINT_EVERY <= resume_step < STEPS
    _wait(_launch(killed, records, tmp_path, tmp_path / "reads_resumed"))

    # every checkpoint holds both processes' grain states, at the checkpoint's step: process p
    # last read global sample (step * 4 - 1) * 2 + p
    for step in range(CHECKPOINT_EVERY, STEPS + 1, CHECKPOINT_EVERY):
        loader = full / "checkpoints" / str(step) / "loader"
        if not loader.exists():  # rotated away (keep_checkpoints)
            continue
        for p in range(2):
            state = json.loads((loader / f"process_{p}-of-2.json").read_text())
            assert state["last_seen_indices"] == {"0": (step * 4 - 1) * 2 + p}
            assert "shard_count=2" in state["sampler"]

    # the resumed job started at its checkpoint and ended where the uninterrupted one did
    starts = _records(killed, "start")
    assert [s["resumed"] for s in starts] == [False, True]
    assert starts[1]["step"] == resume_step
    want = {r["step"]: r["loss"] for r in _records(full, "train")}
    got = {r["step"]: r["loss"] for r in _records(killed, "train")}
    assert sorted(want) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in range(1, STEPS + 1))
    ref, res = _params(full, STEPS), _params(killed, STEPS)
    assert sorted(ref) == sorted(res)
    for k in ref:  # the same processes, devices and reductions: bit-identical
        np.testing.assert_array_equal(res[k], ref[k], err_msg=k)

    # each process read only the question records of its rows (the order the single-process
    # JSON path draws from the config's seed), never the other's
    seed = load_config(REPO / "configs" / "tiny.py").seed
    order = BiencoderBatches(read_examples(str(train)), None, BatchSpec(B, seed=seed)).order(0)
    ahead = 2 * 4 + READ_THREADS  # grain's read-ahead, in samples of this process
    full_reads = []
    for p in range(2):
        reads = json.loads((tmp_path / "reads_full" / f"reads.{p}.json").read_text())
        assert reads["process"] == p
        got_keys = reads["records.array_record"]
        own = _own_keys(order, p, 0, STEPS + 3)
        assert STEPS * 4 <= len(got_keys) <= STEPS * 4 + ahead
        assert sorted(got_keys) == sorted(own[: len(got_keys)])  # each once, in stream order
        full_reads.append(set(got_keys))
        # the resumed process read only its rows from the checkpoint's batch on
        resumed = json.loads((tmp_path / "reads_resumed" / f"reads.{p}.json").read_text())
        r_keys = resumed["records.array_record"]
        own_after = _own_keys(order, p, resume_step, STEPS + 3)
        assert (STEPS - resume_step) * 4 <= len(r_keys) <= (STEPS - resume_step) * 4 + ahead
        assert sorted(r_keys) == sorted(own_after[: len(r_keys)])
    assert not full_reads[0] & full_reads[1]
