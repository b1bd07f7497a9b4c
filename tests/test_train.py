"""The bi-encoder training task (dpr_jax/retriever/task.py, through dpr_jax/training/loop.py) and its
batches (dpr_jax/retriever/batching.py).

One module-scoped fixture trains the tiny config on a small real SQuAD biencoder set (the Notre
Dame fixture article: 220 train / 49 dev questions, one lexical hard negative each) three ways:

* ``full``: 30 steps without interruption;
* ``resumed``: the same config stopped at step 17 (past the end of epoch 0, which has
  220 // 16 = 13 batches), then resumed to step 30 in a fresh call;
* a copy of ``resumed``'s work directory at step 17, for the corruption tests.

Compiled steps are shared between the calls (same shapes and optimizer), so the module costs one
compilation of the train step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import struct
from pathlib import Path

import jax
import numpy as np
import pytest
from multihost_worker import build_squad_biencoder

from dpr_jax.cli import main
from dpr_jax.cli.train import cli_main
from dpr_jax.data.formats import BiencoderExample, Passage
from dpr_jax.model_dir import load_model
from dpr_jax.retriever.batching import BatchSpec, BiencoderBatches, DataPosition
from dpr_jax.retriever.task import TrainConfig, load_config, train_and_evaluate
from dpr_jax.training.checkpoints import CheckpointError
from dpr_jax.training.config import apply_overrides
from dpr_jax.training.optimizer import dpr_schedule, make_optimizer

REPO = Path(__file__).resolve().parents[1]
FIXTURE_ARTICLE = "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json"
STEPS, STOP = 30, 17


def _records(workdir: Path, split: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.fixture(scope="module")
def squad_sets(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("squad_biencoder")
    return build_squad_biencoder(data_dir / FIXTURE_ARTICLE, out)


@pytest.fixture(scope="module")
def base_config(squad_sets, minilm_dir) -> TrainConfig:
    train, dev, n_train, _ = squad_sets
    assert n_train == 220
    return load_config(
        REPO / "configs" / "tiny.py",
        [
            f"train_path={train}",
            # "Dev" = the first 48 *training* questions, evaluated without dropout: the loss the
            # optimizer minimises, measured before and after (49 truly held-out questions of one
            # article are too few for a 2-layer random model to generalise to in 30 steps).
            f"dev_path={train}",
            "max_dev_examples=48",
            "batch_size=16",
            f"num_steps={STEPS}",
            "log_every=1",
            "checkpoint_every=12",
            "keep_checkpoints=2",
        ],
    )


@pytest.fixture(scope="module")
def runs(base_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("train_runs")
    full, resumed, snap = root / "full", root / "resumed", root / "snapshot"
    out_full = train_and_evaluate(base_config, full)
    out_stop = train_and_evaluate(dataclasses.replace(base_config, stop_at_step=STOP), resumed)
    shutil.copytree(resumed, snap)
    out_resumed = train_and_evaluate(base_config, resumed)
    return {
        "full": full,
        "resumed": resumed,
        "snapshot": snap,
        "out_full": out_full,
        "out_stop": out_stop,
        "out_resumed": out_resumed,
        "root": root,
    }


# ---------------------------------------------------------------------------------------------
# Resume, export, learning


def test_interrupted_and_resumed_run_equals_uninterrupted(runs):
    assert runs["out_stop"]["step"] == STOP
    assert not (runs["snapshot"] / "model").exists()  # stopped runs do not export
    starts = _records(runs["resumed"], "start")
    assert starts[0] == {**starts[0], "step": 0, "resumed": False}
    # 13 batches per epoch: step 17 resumes at batch 4 of epoch 1.
    assert starts[1]["step"] == STOP and starts[1]["resumed"] is True
    assert starts[1]["position"] == {"epoch": 1, "batch": STOP - 13}
    _, _, p_full, _ = load_model(runs["full"])
    _, _, p_res, _ = load_model(runs["resumed"])
    a, b = _leaves(p_full), _leaves(p_res)
    assert len(a) == len(b)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    # the same losses step by step (same batches, same dropout keys)
    loss = lambda w: {r["step"]: r["loss"] for r in _records(w, "train")}
    full, res = loss(runs["full"]), loss(runs["resumed"])
    assert sorted(full) == sorted(res) == list(range(1, STEPS + 1))
    assert full == res


def test_ctrl_c_checkpoints_the_last_step_and_resumes_exactly(
    runs, base_config, tmp_path, monkeypatch
):
    work = tmp_path / "interrupted"
    real_iterate = BiencoderBatches.iterate

    def iterate(self, start=None):
        for k, item in enumerate(real_iterate(self, start or DataPosition())):
            if k == 5:  # Ctrl-C while fetching the 6th batch: 5 steps are done
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(BiencoderBatches, "iterate", iterate)
    with pytest.raises(KeyboardInterrupt):
        train_and_evaluate(dataclasses.replace(base_config, eval_at_start=False), work)
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["5"]
    monkeypatch.setattr(BiencoderBatches, "iterate", real_iterate)
    train_and_evaluate(base_config, work)
    _, _, p_full, _ = load_model(runs["full"])
    _, _, p_work, _ = load_model(work)
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(p_full), _leaves(p_work)))


def test_training_drives_the_loss_down(runs):
    dev = _records(runs["full"], "dev")
    before, after = dev[0], dev[-1]
    assert before["step"] == 0 and after["step"] == STEPS
    # 16 questions x 2 passages = 32 candidates: chance level is ln(32) = 3.47
    assert abs(before["loss"] - math.log(32)) < 0.3
    # measured (30 steps, seed 0): loss 3.49 -> 2.94, in-batch rank 15.5 -> 8.0, rank among
    # the 25 distinct passages 13.1 -> 5.3, top-1 among them 0.02 -> 0.31
    assert after["loss"] < before["loss"] - 0.3, (before["loss"], after["loss"])
    assert after["rank"] < 0.7 * before["rank"]
    assert after["pool_rank"] < 0.6 * before["pool_rank"]
    assert after["pool_top1"] > before["pool_top1"] + 0.15
    train = _records(runs["full"], "train")
    assert np.mean([r["loss"] for r in train[-5:]]) < np.mean([r["loss"] for r in train[:5]])


def test_exported_model_and_config(runs, base_config):
    kind, cfg, params, meta = load_model(runs["full"])  # a workdir resolves to WORKDIR/model
    assert kind == "biencoder"
    assert cfg.bert.hidden_size == 32 and cfg.pooling == "mean" and not cfg.shared
    assert meta["step"] == STEPS
    assert meta["train_config"] == json.loads(json.dumps(base_config.to_dict()))
    resolved = json.loads((runs["full"] / "config.json").read_text())
    assert resolved["config"]["batch_size"] == 16
    assert resolved["resolved"]["steps_per_epoch"] == 13
    assert resolved["resolved"]["total_steps"] == STEPS
    assert resolved["resolved"]["devices"] == jax.device_count()
    assert sorted(params) == ["ctx_encoder", "question_encoder"]
    ckpts = runs["full"] / "checkpoints"
    steps = sorted(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    assert steps == [24, 30]  # every 12 steps and the last; keep 2
    # the exported parameters are those of the last checkpoint
    import orbax.checkpoint as ocp

    state = ocp.StandardCheckpointer().restore((ckpts / str(STEPS) / "state").absolute())
    assert int(state["step"]) == STEPS
    a, b = _leaves(params), _leaves(state["params"])
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)


# ---------------------------------------------------------------------------------------------
# Training curves: TensorBoard events, curves.png, `dpr-jax plot`

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _tensorboard_scalars(run: Path) -> dict[tuple[str, int], float]:
    """Every scalar of ``run/tensorboard`` as TensorBoard itself loads the directory (its record
    reader checks both CRCs of every record)."""
    from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={SCALARS: 0})
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_tensorboard_scalars_equal_metrics_jsonl(runs):
    for name in ("snapshot", "resumed", "full"):
        expected = {
            (f"{r['split']}/{k}", r["step"]): float(np.float32(v))  # TensorBoard keeps float32
            for split in ("train", "dev")
            for r in _records(runs[name], split)
            for k, v in r.items()
            if k not in ("time", "split", "step")
        }
        got = _tensorboard_scalars(runs[name])
        assert sorted(got) == sorted(expected), name
        np.testing.assert_array_equal([got[k] for k in sorted(got)],
                                      [expected[k] for k in sorted(got)])  # fmt: skip
    tags = {tag for tag, _ in got}
    assert {"train/loss", "train/accuracy", "train/lr", "train/examples_per_s",
            "dev/loss", "dev/accuracy"} <= tags  # fmt: skip
    assert {step for tag, step in got if tag == "train/loss"} == set(range(1, STEPS + 1))
    # the resumed run added a file and left the first one as it was at step 17
    first = sorted((runs["snapshot"] / "tensorboard").iterdir())
    files = sorted((runs["resumed"] / "tensorboard").iterdir())
    assert len(first) == 1 and len(files) == 2
    assert files[0].name == first[0].name and files[0].read_bytes() == first[0].read_bytes()


def test_curves_png_and_plot_command_overlay_two_runs(runs, tmp_path, capsys):
    from dpr_jax.training.curves import curves_figure

    for name in ("full", "snapshot"):  # drawn at the end of a finished or stopped run
        assert (runs[name] / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    out = tmp_path / "plots" / "full_vs_resumed.png"
    argv = ["plot", str(runs["full"]), str(runs["resumed"]), "--out", str(out)]
    assert main([*argv, "--metric", "train/loss,accuracy"]) == 0
    assert str(out) in capsys.readouterr().err
    data = out.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    # three subplots side by side at 100 dpi: 3 x 4.8 in by 3.4 in (the IHDR chunk)
    assert struct.unpack(">II", data[16:24]) == (1440, 340)

    fig = curves_figure([runs["full"], runs["resumed"]], ["train/loss", "accuracy"])
    axes = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in axes] == ["train/loss", "train/accuracy", "dev/accuracy"]
    for ax in axes:
        assert [line.get_label() for line in ax.get_lines()] == ["full", "resumed"]
    full_loss = axes[0].get_lines()[0]
    records = _records(runs["full"], "train")
    assert list(full_loss.get_xdata()) == [r["step"] for r in records]
    assert list(full_loss.get_ydata()) == [r["loss"] for r in records]
    dev_steps = list(axes[2].get_lines()[1].get_xdata())  # resumed: the dev evaluations
    assert dev_steps == [r["step"] for r in _records(runs["resumed"], "dev")]


def test_truncated_checkpoint_is_refused(runs, base_config, tmp_path):
    work = tmp_path / "truncated"
    shutil.copytree(runs["snapshot"], work)
    state_dir = work / "checkpoints" / str(STOP) / "state"
    files = sorted(p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=rf"checkpoints/{STOP}.*(truncated|corrupt)"):
        train_and_evaluate(base_config, work)

    work2 = tmp_path / "deleted"
    shutil.copytree(runs["snapshot"], work2)
    shutil.rmtree(work2 / "checkpoints" / str(STOP) / "state")
    with pytest.raises(CheckpointError, match=rf"checkpoints/{STOP}"):
        train_and_evaluate(base_config, work2)


def test_checkpoint_of_another_config_is_refused(runs, base_config, tmp_path):
    work = tmp_path / "foreign"
    shutil.copytree(runs["snapshot"], work)
    bigger = dict(base_config.model, bert=dict(base_config.model["bert"], hidden_size=48))
    with pytest.raises(CheckpointError, match=r"model\.bert\.hidden_size is 32 there, 48 here"):
        train_and_evaluate(dataclasses.replace(base_config, model=bigger), work)
    with pytest.raises(CheckpointError, match=r"batch_size is 16 there, 8 here"):
        train_and_evaluate(dataclasses.replace(base_config, batch_size=8), work)


def test_cli_trains_with_overrides(runs, base_config, tmp_path, capsys):
    work = tmp_path / "cli"
    sets = [f"{k}={v}" for k, v in base_config.to_dict().items() if k != "model"]
    sets = [s for s in sets if not s.startswith(("stop_at_step=", "export="))]
    argv = ["--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(work)]
    for s in sets + ["stop_at_step=2", "eval_at_start=false"]:
        argv += ["--set", s]
    assert cli_main(argv) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 2
    # same config, same first two steps as the uninterrupted run
    full = {r["step"]: r["loss"] for r in _records(runs["full"], "train")}
    cli = {r["step"]: r["loss"] for r in _records(work, "train")}
    assert cli == {1: full[1], 2: full[2]}
    bad = ["--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(work)]
    assert main(["train", *bad, "--set", "no_such_field=1"]) == 2
    assert "no_such_field" in capsys.readouterr().err
    assert main(["train", *bad, "--set", "batch_size=many"]) == 2
    assert "not an integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Config, optimizer


def test_overrides_are_typed():
    cfg = TrainConfig(init_from="x")
    new = apply_overrides(cfg, ["batch_size=32", "learning_rate=1e-4", "in_batch=false",
                                "dev_path=", "model={\"bert\": {}}"])  # fmt: skip
    assert (new.batch_size, new.learning_rate, new.in_batch, new.dev_path) == (32, 1e-4, False, "")
    assert new.model == {"bert": {}}
    with pytest.raises(ValueError, match="learning_rate.*must be > 0"):
        apply_overrides(cfg, ["learning_rate=0"])
    with pytest.raises(ValueError, match="not a boolean"):
        apply_overrides(cfg, ["in_batch=maybe"])


def test_dpr_learning_rate_schedule():
    # DPR's get_schedule_linear: step/warmup, then max(1e-7, (total-step)/(total-warmup))
    sched = dpr_schedule(2e-5, 10, 110)
    expect = {0: 0.0, 5: 1e-5, 10: 2e-5, 60: 1e-5, 109: 2e-5 / 100, 110: 2e-5 * 1e-7}
    for step, lr in expect.items():
        assert float(sched(step)) == pytest.approx(lr, rel=1e-5, abs=1e-14), step


def test_weight_decay_spares_biases_and_layernorm():
    import optax

    cfg = TrainConfig(init_from="x", weight_decay=0.5, max_grad_norm=0, learning_rate=0.1)
    tx, _ = make_optimizer(cfg, total_steps=10, warmup_steps=0)
    params = {
        "dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.ones(2, np.float32)},
        "LayerNorm": {"scale": np.ones(2, np.float32), "bias": np.ones(2, np.float32)},
        "emb": {"embedding": np.ones((3, 2), np.float32)},
    }
    grads = jax.tree.map(np.zeros_like, params)

    @jax.jit
    def step(params, grads):
        updates, _ = tx.update(grads, tx.init(params), params)
        return optax.apply_updates(params, updates)

    new = step(params, grads)
    # zero gradient: only decoupled weight decay moves a parameter: p - lr * wd * p = 0.95
    np.testing.assert_allclose(new["dense"]["kernel"], 0.95)
    np.testing.assert_allclose(new["emb"]["embedding"], 0.95)
    np.testing.assert_allclose(new["dense"]["bias"], 1.0)
    np.testing.assert_allclose(new["LayerNorm"]["scale"], 1.0)


# ---------------------------------------------------------------------------------------------
# Batches


class _FakeTokenizer:
    """Maps every text to a fixed-length id row whose first id identifies the text."""

    def __init__(self):
        self.ids: dict[str, int] = {}

    def _id(self, s: str) -> int:
        return self.ids.setdefault(s, len(self.ids) + 1)

    def questions(self, qs, max_length, bucket=None):
        t = max_length if not bucket else min(max_length, bucket * 2)
        ids = np.zeros((len(qs), t), np.int32)
        ids[:, 0] = [self._id(q) for q in qs]
        return ids, (ids > 0).astype(np.int32)

    def passages(self, titles, texts, max_length, bucket=None):
        return self.questions([f"{a}|{b}" for a, b in zip(titles, texts)], max_length, bucket)


def _examples(n: int, n_hard: int = 3) -> list[BiencoderExample]:
    out = []
    for i in range(n):
        hard = [Passage(f"hard {i}.{j}", f"t{i}") for j in range(n_hard)]
        neg = [Passage(f"neg {i}.{j}", f"t{i}") for j in range(2)]
        out.append(BiencoderExample(f"q{i}", ["a"], [Passage(f"pos {i}", f"t{i}")], neg, hard))
    return out


def test_batches_layout_and_determinism():
    tok = _FakeTokenizer()
    exs = _examples(21)
    spec = BatchSpec(batch_size=4, n_hard=2, q_max_len=8, p_max_len=8, seed=3)
    stream = BiencoderBatches(exs, tok, spec)
    assert stream.batches_per_epoch == 5  # 21 // 4: the last incomplete batch is dropped
    seen = []
    for b in range(5):
        idx = stream.global_indices(0, b)
        batch = stream.batch(0, b)
        assert batch["q_ids"].shape == (4, 8) and batch["p_ids"].shape == (12, 8)
        assert batch["valid"].tolist() == [1.0] * 4
        for row, i in enumerate(idx):
            q, group = stream.question_group(0, b, row)
            assert q == f"q{i}" and batch["q_ids"][row, 0] == tok.ids[q]
            assert group[0] == Passage(
                text=f"pos {i}", title=f"t{i}"
            )  # positive first: passage row*G
            assert {p.text for p in group[1:]} <= {f"hard {i}.{j}" for j in range(3)}
            assert len({p.text for p in group[1:]}) == 2
            assert [tok.ids[f"{p.title}|{p.text}"] for p in group] == list(
                batch["p_ids"][row * 3 : row * 3 + 3, 0]
            )
        seen += idx
    assert len(set(seen)) == 20  # one epoch: no example twice
    # epochs reshuffle; a second stream (another process, a resumed run) gives the same batches
    assert stream.order(0).tolist() != stream.order(1).tolist()
    again = BiencoderBatches(exs, tok, spec)
    for e, b in [(0, 0), (1, 3), (7, 4)]:
        x, y = stream.batch(e, b), again.batch(e, b)
        assert all(np.array_equal(x[k], y[k]) for k in x)
    # hard negatives are shuffled per (epoch, position): over epochs every one gets used
    used = set()
    for e in range(12):
        for b in range(5):
            for row, i in enumerate(stream.global_indices(e, b)):
                if i == 0:
                    used |= {p.text for p in stream.question_group(e, b, row)[1][1:]}
    assert used == {"hard 0.0", "hard 0.1", "hard 0.2"}


def test_batches_resume_position_and_process_rows():
    tok = _FakeTokenizer()
    exs = _examples(10)
    spec = BatchSpec(batch_size=4, n_hard=1, q_max_len=8, p_max_len=8)
    stream = BiencoderBatches(exs, tok, spec)
    it = stream.iterate()
    first = [next(it) for _ in range(5)]
    assert [p for p, _ in first] == [DataPosition(0, 1), DataPosition(1, 0), DataPosition(1, 1),
                                     DataPosition(2, 0), DataPosition(2, 1)]  # fmt: skip
    resumed = stream.iterate(first[1][0])  # continue after the second batch
    for (_, want), (_, got) in zip(first[2:], [next(resumed) for _ in range(3)]):
        assert all(np.array_equal(want[k], got[k]) for k in want)
    # two "processes" build rows [0, 2) and [2, 4): together the full batch, whole groups
    for bucket in (None, 4):
        s = dataclasses.replace(spec, bucket=bucket)
        full = BiencoderBatches(exs, tok, s).batch(1, 1)
        lo = BiencoderBatches(exs, tok, s, rows=(0, 2)).batch(1, 1)
        hi = BiencoderBatches(exs, tok, s, rows=(2, 4)).batch(1, 1)
        for k in full:
            assert np.array_equal(np.concatenate([lo[k], hi[k]]), full[k]), (bucket, k)
        assert lo["p_ids"].shape[0] == 4  # 2 questions x G = 2


def test_batches_fallbacks_and_eval_padding():
    tok = _FakeTokenizer()
    exs = [
        BiencoderExample("q0", [], [Passage("pos 0", "t")], [Passage("neg 0", "t")], []),
        BiencoderExample("q1", [], [Passage("pos 1", "t")], [], []),
        BiencoderExample("q2", [], [Passage("pos 2", "t")], [], [Passage("hard 2", "t")]),
    ]
    spec = BatchSpec(batch_size=2, n_hard=2, q_max_len=8, p_max_len=8)
    stream = BiencoderBatches(exs, tok, spec, train=False)
    assert stream.batches_per_epoch == 2  # evaluation keeps the last, padded batch
    g0 = stream.question_group(0, 0, 0)[1]
    assert [p.text for p in g0[:2]] == ["pos 0", "neg 0"]  # negative_ctxs when no hard ones
    assert g0[2].text in {"pos 1", "pos 2"}  # then random corpus passages, never its positive
    g1 = stream.question_group(0, 0, 1)[1]
    assert g1[0].text == "pos 1" and all(p.text != "pos 1" for p in g1[1:])
    last = stream.batch(0, 1)
    assert last["valid"].tolist() == [1.0, 0.0] and last["p_ids"].shape[0] == 6
    with pytest.raises(ValueError, match="fewer than one batch"):
        BiencoderBatches(exs, tok, dataclasses.replace(spec, batch_size=4))
