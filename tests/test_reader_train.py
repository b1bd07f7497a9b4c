"""The reader trains on real SQuAD (official Notre Dame article), resumes exactly, refuses bad input.

One reference run of a tiny random reader (configs/reader_tiny.py: 2 layers, hidden 32, the
MiniLM tokenizer) on the article's first 24 questions, data parallel over the 8 fake CPU devices:
the gold paragraph is the positive, another paragraph of the article the negative. Seeds are
fixed and the computation is deterministic on CPU; the bounds leave wide margins (measured: EM
0% -> 67%, loss 9.3 -> 2.6).
"""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from dpr_jax.cli import main
from dpr_jax.cli.train_reader import cli_main
from dpr_jax.reader.data import read_reader_examples, sample_examples
from dpr_jax.reader.task import load_config, train_and_evaluate
from dpr_jax.training.config import apply_overrides

REPO_CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "reader_tiny.py")
STEPS = 40


def _config(fixture, **changes):
    cfg = load_config(REPO_CONFIG)
    base = dict(
        train_path=str(fixture), dev_path=str(fixture), max_train_examples=24,
        max_dev_examples=24, passages_per_question=2, max_length=160, max_question_length=24,
        learning_rate=5e-3, num_steps=STEPS, warmup_steps=0, dropout=0.0, checkpoint_every=0,
        log_every=10, eval_passages=2, eval_top_k=(1, 2), eval_at_start=True,
    )  # fmt: skip
    return dataclasses.replace(cfg, **{**base, **changes})


@pytest.fixture(scope="module")
def fixture_path(data_dir):
    return data_dir / "fixtures" / "squad-train-v1.1.University_of_Notre_Dame.official.json"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fixture_path, minilm_dir):
    workdir = tmp_path_factory.mktemp("reader_ref")
    result = train_and_evaluate(_config(fixture_path), workdir)
    return workdir, result


def _log(workdir, split):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == split]


def test_reader_learns_squad_spans(reference, fixture_path):
    from dpr_jax.reader.data import read_reader_examples
    from dpr_jax.reader.span import ReaderPredictor, evaluate_predictions

    workdir, result = reference
    dev = _log(workdir, "dev")
    train = _log(workdir, "train")
    assert [d["step"] for d in dev] == [0, STEPS]
    # Exact match of the answer read from the gold paragraph, on the training questions.
    assert dev[0]["em@1"] <= 0.05
    assert dev[-1]["em@1"] >= 0.4, dev[-1]
    # Loss (selection + span MML) over the last 10 steps vs the first 10.
    assert train[-1]["loss"] < 0.45 * train[0]["loss"], (train[0]["loss"], train[-1]["loss"])
    assert train[-1]["select_acc"] >= 0.8
    assert result["step"] == STEPS

    # The exported model directory reads the same answers (predictor built from disk).
    ex = read_reader_examples(fixture_path, "squad", max_negatives=50, seed=0)
    ex = sample_examples(ex, 24, _config(fixture_path).seed)  # the training run's dev sample
    pred = ReaderPredictor.from_dir(workdir / "model", batch_size=32)
    assert pred.input_config.max_length == 160
    preds = pred.predict([e.question for e in ex], [list(e.passages[:2]) for e in ex], (1, 2),
                         [e.answers for e in ex])  # fmt: skip
    assert evaluate_predictions(preds)[1]["em"] == pytest.approx(dev[-1]["em@1"])
    for p in preds:  # every answer is a substring of its passage, at the stated offsets
        a = p.predictions[2]
        assert a.passage[a.start_char : a.end_char] == a.text


def test_reader_run_writes_tensorboard_events_and_curves(reference):
    """`train-reader` goes through the same loop: its train and dev figures are TensorBoard
    scalars too (equality with metrics.jsonl is tested on the retriever, tests/test_train.py)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = reference
    acc = EventAccumulator(str(workdir / "tensorboard"))
    acc.Reload()
    dev = _log(workdir, "dev")[-1]
    assert [e.value for e in acc.Scalars("dev/em@1")][-1] == pytest.approx(dev["em@1"], rel=1e-6)
    assert {"train/loss", "train/lr", "train/questions_per_s"} <= set(acc.Tags()["scalars"])
    assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_read_command_reads_the_same_answers(reference, fixture_path, tmp_path, capsys):
    """`dpr-jax read` on the training run's dev sample: EM@1 as validated, predictions JSON."""
    from dpr_jax.cli import main

    workdir, _ = reference
    dev = _log(workdir, "dev")
    out = tmp_path / "pred.json"
    argv = ["read", "--model", str(workdir), "--results", str(fixture_path), "--format", "squad",
            "--sample", "24", "--seed", str(_config(fixture_path).seed), "--top-k", "1,2",
            "--out", str(out), "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["1"]["questions"] == 24
    assert metrics["1"]["em"] == pytest.approx(dev[-1]["em@1"])
    assert len(json.loads(out.read_text())) == 24
    most = max(len(e.passages) for e in read_reader_examples(fixture_path, "squad")[:2])
    assert main([*argv[:7], "--limit", "2", "--top-k", "1000", "--no-progress"]) == 0
    assert f"(2 questions; k > the {most} passages a question has at most)" in (
        capsys.readouterr().out
    )

    # --dtype bfloat16 (on this CPU: float32 activations, bfloat16 products accumulated in
    # float32) reads the same answers as float32, to within rounding of near-tied spans
    out16 = tmp_path / "pred16.json"
    assert main([*argv[:-3], "--out", str(out16), "--no-progress", "--dtype", "bfloat16"]) == 0
    capsys.readouterr()
    f32, b16 = (json.loads(p.read_text()) for p in (out, out16))
    assert json.loads(Path(f"{out16}.config.json").read_text())["dtype"] == "bfloat16"
    same = sum(
        a["predictions"][-1]["prediction"]["text"] == b["predictions"][-1]["prediction"]["text"]
        for a, b in zip(f32, b16)
    )
    assert same >= 23, same


def test_resume_gives_identical_params(reference, tmp_path, fixture_path):
    from dpr_jax.model_dir import load_model

    ref_dir, _ = reference
    cfg = _config(fixture_path, dev_path="", eval_at_start=False)
    workdir = tmp_path / "run"
    first = train_and_evaluate(dataclasses.replace(cfg, stop_at_step=STEPS // 2 + 3), workdir)
    assert first["step"] == STEPS // 2 + 3
    assert not (workdir / "model").exists()
    train_and_evaluate(cfg, workdir)  # resumes from the checkpoint and finishes
    starts = _log(workdir, "start")
    assert [s["resumed"] for s in starts] == [False, True]
    assert starts[1]["step"] == STEPS // 2 + 3
    _, _, got, meta = load_model(workdir / "model", "reader")
    _, _, want, _ = load_model(ref_dir / "model", "reader")
    assert meta["step"] == STEPS and meta["reader_input"]["max_length"] == 160
    got, want = flatten_dict(got), flatten_dict(want)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg="/".join(k))

    # A checkpoint of another data configuration is refused, naming the field.
    from dpr_jax.training.checkpoints import CheckpointError

    with pytest.raises(CheckpointError, match="passages_per_question"):
        train_and_evaluate(dataclasses.replace(cfg, passages_per_question=3), workdir)


def test_bad_inputs(minilm_dir, tmp_path, fixture_path, capsys):
    from dpr_jax.data.formats import Passage
    from dpr_jax.reader.data import (
        ReaderExample,
        ReaderInputConfig,
        ReaderTokenizer,
        ReaderTrainData,
    )

    tok = ReaderTokenizer(minilm_dir, ReaderInputConfig(48, 8))
    text = "The Grotto is a Marian place of prayer and reflection near the Basilica."
    long_q = "What " + "very " * 100 + "long question is this?"
    examples = [
        # empty positive text: no span, so the question is skipped and counted
        ReaderExample("q1", ("Grotto",), (Passage("", "T", has_answer=True),)),
        # a question longer than max_length: cut to max_question_length, passage intact
        ReaderExample(long_q, ("a Marian place of prayer",),
                      (Passage(text, "Grotto", has_answer=True),
                       Passage("", "empty negative", has_answer=False))),
    ]  # fmt: skip
    data = ReaderTrainData(examples, tok, passages_per_question=2)
    assert data.stats["kept"] == 1 and data.stats["skipped_no_positive"] == 1
    b = data.batch(0, 1)
    ids = b["input_ids"][0, 0]
    sep = np.flatnonzero(ids == tok.sep_id)
    assert sep[0] == 1 + 8  # [CLS] + 8 question pieces
    s, e = int(b["start_positions"][0, 0]), int(b["end_positions"][0, 0])
    assert tok.tok.decode(ids[s : e + 1].tolist()) == "a marian place of prayer"
    # the empty negative is [CLS] q [SEP] title [SEP]: scored, no text tokens
    (q_ids,) = tok.question_ids([long_q])
    (pt,) = tok.passage_tokens([examples[1].passages[1]])
    seq = tok.sequence(q_ids, pt)
    assert seq.text_len == 0 and b["attention_mask"][0, 1].sum() == len(seq.ids)
    assert b["passage_mask"][0].tolist() == [1, 1]

    with pytest.raises(ValueError, match="fewer than one batch"):
        ReaderTrainData(examples, tok, 2).batches_per_epoch(4)

    cfg = _config(fixture_path)
    with pytest.raises(ValueError, match="no such config field"):
        apply_overrides(cfg, ["passages=3"])
    with pytest.raises(ValueError, match=r"--set INIT_FROM: no such config field") as info:
        apply_overrides(cfg, ["INIT_FROM=x"])  # a class constant, not a field
    assert "INIT_FROM" not in str(info.value).split("fields: ")[1]
    with pytest.raises(ValueError, match="not an integer"):
        apply_overrides(cfg, ["batch_size=eight"])
    assert apply_overrides(cfg, ["eval_top_k=1,5,20"]).eval_top_k == (1, 5, 20)
    with pytest.raises(ValueError, match="not a multiple of the 8 devices"):
        train_and_evaluate(dataclasses.replace(cfg, batch_size=4), tmp_path / "bs")
    with pytest.raises(ValueError, match="max_question_length"):
        dataclasses.replace(cfg, max_length=20)

    minilm_cfg = load_config(Path(REPO_CONFIG).with_name("reader_squad_minilm.py"))
    assert minilm_cfg.init_from == "minilm" and minilm_cfg.data_format == "biencoder"

    # CLI: config errors exit with 2 and a message; --print-config shows the --train override.
    assert (
        main(
            ["train-reader", "--config", REPO_CONFIG, "--workdir", str(tmp_path), "--set", "nope=1"]
        )
        == 2
    )
    assert "no such config field" in capsys.readouterr().err
    assert cli_main(["--config", REPO_CONFIG, "--workdir", str(tmp_path), "--train", "X.json",
                     "--print-config"]) == 0  # fmt: skip
    assert json.loads(capsys.readouterr().out)["train_path"] == "X.json"


def test_init_from_biencoder_passage_tower(tiny_biencoder_dir, fixture_path):
    from dpr_jax.model_dir import load_model
    from dpr_jax.reader.task import build_reader

    cfg = _config(fixture_path, init_from=str(tiny_biencoder_dir), model=None, tokenizer="")
    bert_cfg, params, tokenizer, info = build_reader(cfg, jax.random.PRNGKey(0))
    _, enc_cfg, bi, _ = load_model(tiny_biencoder_dir, "biencoder")
    assert info["tower"] == "ctx_encoder" and bert_cfg.hidden_size == enc_cfg.bert.hidden_size
    want = flatten_dict(bi["ctx_encoder"]["bert_model"])
    got = flatten_dict(params["encoder"]["bert_model"])
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    assert params["qa_outputs"]["kernel"].shape == (bert_cfg.hidden_size, 2)
    assert params["qa_classifier"]["kernel"].shape == (bert_cfg.hidden_size, 1)
    assert tokenizer.path == str(tiny_biencoder_dir)

    with pytest.raises(FileNotFoundError, match="no such model directory"):
        build_reader(dataclasses.replace(cfg, init_from=str(fixture_path.parent / "nope")),
                     jax.random.PRNGKey(0))  # fmt: skip
