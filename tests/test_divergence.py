"""Divergence and damaged checkpoints never pass for success (dpr_jax/finite.py, the two loops).

* a huge learning rate stops ``dpr-jax train`` / ``train-reader`` with an error naming the step;
  every checkpoint left on disk is finite, the last one that trained finitely survives rotation
  (even with ``keep_checkpoints=1``) and resumes, and no model is exported;
* a checkpoint whose bytes were overwritten so that it still decodes, but to NaN, is refused
  with an error naming it, and nothing on disk changes;
* validation of a NaN model reports NaN, not "accuracy 1.0" (NaN compares false with everything,
  so "number of scores above the positive" is 0 for every question).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from multihost_worker import build_squad_biencoder

from dpr_jax.finite import (
    DivergenceError,
    check_step_metrics,
    nonfinite_leaves,
    rank_of_positive,
)
from dpr_jax.retriever.task import evaluate_model, load_config, train_and_evaluate
from dpr_jax.training.checkpoints import CheckpointError

REPO = Path(__file__).resolve().parents[1]
FIXTURE_ARTICLE = "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json"


def _steps(workdir: Path) -> list[int]:
    ckpts = workdir / "checkpoints"
    return (
        sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) if ckpts.is_dir() else []
    )


def _restore_state(workdir: Path, step: int) -> dict:
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def _all_finite(tree) -> bool:
    return all(
        np.isfinite(np.asarray(x)).all()
        for x in jax.tree.leaves(tree)
        if np.issubdtype(np.asarray(x).dtype, np.inexact)
    )


def _train_records(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "train"]


# ---------------------------------------------------------------------------------------------
# The guards themselves


def test_rank_of_positive_is_nan_for_non_finite_scores():
    scores = np.array(
        [
            [0.1, 0.9, 0.5],  # positive 0: two scores above -> rank 2
            [0.1, 0.9, 0.5],  # positive 1: top -> rank 0
            [np.nan, np.nan, np.nan],  # the naive count says rank 0 ("a hit")
            [0.3, np.inf, 0.2],
        ]
    )
    pos = np.array([0, 1, 0, 0])
    naive = (scores > scores[np.arange(4), pos][:, None]).sum(1)
    assert naive[2] == 0  # the bug this guards against
    rank = rank_of_positive(scores, pos)
    assert rank[:2].tolist() == [2.0, 0.0]
    assert np.isnan(rank[2]) and np.isnan(rank[3])


def test_nonfinite_leaves_and_step_metrics_name_the_culprit():
    tree = {"a": np.ones(3, np.float32), "b": {"c": np.array([1.0, np.nan]), "n": np.arange(3)}}
    assert nonfinite_leaves(tree) == ["b/c"]
    assert nonfinite_leaves(jax.tree.map(jax.numpy.asarray, tree)) == ["b/c"]
    assert nonfinite_leaves({"a": np.ones(2), "s": np.int32(3)}) == []
    ok = {"loss": 1.0, "grad_norm": 2.0}
    check_step_metrics([(1, ok), (2, ok)])
    with pytest.raises(DivergenceError, match=r"^step 3: the training grad_norm is inf \(loss 1\)"):
        check_step_metrics([(2, ok), (3, {"loss": 1.0, "grad_norm": math.inf}), (4, ok)])


# ---------------------------------------------------------------------------------------------
# dpr-jax train


@pytest.fixture(scope="module")
def tiny(data_dir, minilm_dir, tmp_path_factory):
    # configs/tiny.py (warm-up 2 steps) on the Notre Dame article's questions, batch 8
    out = tmp_path_factory.mktemp("squad_biencoder")
    train, _, _, _ = build_squad_biencoder(data_dir / FIXTURE_ARTICLE, out)
    return load_config(
        REPO / "configs" / "tiny.py",
        [f"train_path={train}", f"dev_path={train}", "max_dev_examples=16", "batch_size=8",
         "num_steps=8", "log_every=1", "checkpoint_every=1", "keep_checkpoints=1",
         "eval_at_start=false"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def diverged(tiny, tmp_path_factory):
    work = tmp_path_factory.mktemp("diverged")
    with pytest.raises(DivergenceError) as info:
        train_and_evaluate(dataclasses.replace(tiny, learning_rate=1e30), work)
    return work, str(info.value)


def test_huge_learning_rate_stops_naming_the_step(diverged):
    work, msg = diverged
    m = re.match(r"step (\d+): the training (loss|grad_norm) is (nan|inf)", msg)
    assert m, msg
    bad = int(m.group(1))
    # the steps before it were logged with finite values, the step itself never was
    records = _train_records(work)
    assert [r["step"] for r in records] == list(range(1, bad))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert not (work / "model").exists()  # nothing exported
    assert "no model was exported" in msg and "learning_rate (now 1e+30)" in msg


def test_diverged_run_keeps_the_last_checkpoint_that_trained_finitely(diverged, tiny):
    work, msg = diverged
    bad = int(re.match(r"step (\d+)", msg).group(1))
    steps = _steps(work)
    assert steps and max(steps) < bad
    for s in steps:  # nothing non-finite was ever saved
        assert _all_finite(_restore_state(work, s)), s
    # keep_checkpoints=1, yet the newest checkpoint whose next step was finite survives
    proven = bad - 2  # step bad-1 was computed from it and was finite
    assert proven in steps
    assert f"checkpoints/{proven}" in msg
    # it restores and trains finitely with a sane learning rate (after dropping the newer one
    # that leads to the non-finite step, as the message says)
    for s in steps:
        if s > proven:
            assert f"checkpoints/{s} leads to the non-finite step" in msg
            shutil.rmtree(work / "checkpoints" / str(s))
    out = train_and_evaluate(tiny, work)
    assert out["step"] == tiny.num_steps and math.isfinite(out["loss"])
    starts = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in starts if r["split"] == "start"][-1] == proven
    from dpr_jax.model_dir import load_model

    assert _all_finite(load_model(work)[2])


def _damage(step_dir: Path) -> None:
    """Make checkpoint ``step_dir`` decode to NaN in its largest parameter array, as bytes
    flipped on disk can (orbax stores the arrays compressed, so the damage is written through
    orbax itself: the file stays readable, the values are not)."""
    import orbax.checkpoint as ocp

    state_dir = step_dir / "state"
    state = ocp.StandardCheckpointer().restore(state_dir)
    flat = jax.tree_util.tree_flatten_with_path(state["params"])[0]
    path, big = max(flat, key=lambda kv: np.asarray(kv[1]).size)
    leaves = [np.full_like(np.asarray(x), np.nan) if p == path else x for p, x in flat]
    state["params"] = jax.tree.unflatten(jax.tree.structure(state["params"]), leaves)
    tmp = step_dir.parent / "damaged-tmp"
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp, state)
    checkpointer.wait_until_finished()
    shutil.rmtree(state_dir)
    tmp.rename(state_dir)


def test_checkpoint_with_damaged_values_is_refused(tiny, tmp_path):
    work = tmp_path / "flipped"
    train_and_evaluate(dataclasses.replace(tiny, stop_at_step=4, keep_checkpoints=2), work)
    assert _steps(work) == [3, 4]
    _damage(work / "checkpoints" / "4")
    # a finished checkpoint carries a manifest of checksums, which catches this damage first
    # (test below); without one (a run killed before sealing its last checkpoint), the
    # finiteness of the restored state is the check
    (work / "checkpoints" / "4" / "manifest.json").unlink()
    assert not _all_finite(_restore_state(work, 4))  # orbax reads it without complaint
    before = sorted(str(p.relative_to(work)) for p in (work / "checkpoints").rglob("*"))
    with pytest.raises(CheckpointError, match=r"checkpoints/4: the restored state is not finite"
                       r".*delete .*checkpoints/4 to resume from step 3"):  # fmt: skip
        train_and_evaluate(tiny, work)
    after = sorted(str(p.relative_to(work)) for p in (work / "checkpoints").rglob("*"))
    assert after == before and not (work / "model").exists()


def test_checkpoint_with_flipped_bytes_is_refused(tiny, tmp_path):
    """The damage of the issue's report: 64 bytes set to 0xFF in the middle of the largest file
    of the latest checkpoint (before the fix this restored to NaN, trained on, validated as
    "acc 1.0000" and exported). Whether the damaged file still decodes or not, it is refused."""
    work = tmp_path / "flipped_bytes"
    train_and_evaluate(dataclasses.replace(tiny, stop_at_step=4, keep_checkpoints=2), work)
    files = [p for p in (work / "checkpoints" / "4" / "state").rglob("*") if p.is_file()]
    big = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(big.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff" * 64
    big.write_bytes(bytes(data))
    with pytest.raises(
        CheckpointError, match=r"checkpoints/4: .*(not finite|truncated or corrupt)"
    ):
        train_and_evaluate(tiny, work)
    assert _steps(work) == [3, 4] and not (work / "model").exists()


def test_validation_of_a_nan_model_is_nan_not_perfect(
    tiny, tiny_biencoder_dir, tmp_path, monkeypatch
):
    from dpr_jax.io import IntegrityError
    from dpr_jax.model_dir import load_model, save_model
    from dpr_jax.retriever import task

    kind, cfg, params, _ = load_model(tiny_biencoder_dir)
    nan_params = jax.tree.map(lambda x: np.full_like(np.asarray(x), np.nan), params)
    nan_dir = save_model(tmp_path / "nan_model", nan_params, kind, cfg, tiny_biencoder_dir)
    with pytest.raises(IntegrityError, match="is not finite"):  # a model directory refuses it
        load_model(nan_dir)
    # past that check (parameters from elsewhere), validation still never reads as perfect
    config = dataclasses.replace(tiny, init_from=str(tiny_biencoder_dir), model=None, tokenizer="")
    healthy = task.initial_params
    monkeypatch.setattr(task, "initial_params", lambda *a: jax.tree.map(np.asarray, nan_params))
    m = evaluate_model(config)
    for k in ("loss", "accuracy", "rank", "pool_rank", "pool_top1", "pool_top5"):
        assert math.isnan(m[k]), (k, m[k])
    # the same model from a healthy init gives finite numbers (the evaluator works)
    with monkeypatch.context() as mp:
        mp.setattr(task, "initial_params", healthy)
        ok = evaluate_model(config)
    assert all(math.isfinite(ok[k]) for k in ("loss", "accuracy", "pool_top1"))
    with pytest.raises(DivergenceError, match=r"^step 0: the initial parameters are not finite"):
        train_and_evaluate(config, tmp_path / "from_nan")
    assert _steps(tmp_path / "from_nan") == []


# ---------------------------------------------------------------------------------------------
# dpr-jax train-reader


def test_reader_huge_learning_rate_stops_without_export(data_dir, minilm_dir, tmp_path):
    from dpr_jax.reader.task import load_config as reader_config
    from dpr_jax.reader.task import train_and_evaluate as train_reader

    cfg = dataclasses.replace(
        reader_config(REPO / "configs" / "reader_tiny.py"),
        max_train_examples=16, passages_per_question=2, max_length=96, num_steps=6,
        warmup_steps=0, learning_rate=1e30, dev_path="", log_every=3, checkpoint_every=1,
        keep_checkpoints=1,
    )  # fmt: skip
    work = tmp_path / "reader"
    with pytest.raises(DivergenceError) as info:
        train_reader(cfg, work)
    msg = str(info.value)
    m = re.match(r"step (\d+): (the training (loss|grad_norm) is|the state to checkpoint is)", msg)
    assert m, msg
    assert not (work / "model").exists()
    for s in _steps(work):
        assert s < int(m.group(1)) and _all_finite(_restore_state(work, s))
