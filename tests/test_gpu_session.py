"""The tooling around ``scripts/gpu_session.sh`` (what one lent GPU runs): the reader comes back
as float16 shards under the transfer limit and is restored to the same model, the sampled
validation files hold exactly the questions ``dpr-jax read --sample`` draws, and the script itself
(unpacking xz inputs, time-limited steps, packing) runs end to end on CPU stand-ins."""

import importlib.util
import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from dpr_jax.io import OutputPathError, claim_results_folder
from dpr_jax.model_dir import load_model, save_model
from dpr_jax.models.bert import BertConfig
from dpr_jax.reader.data import read_reader_examples, sample_examples
from dpr_jax.reader.model import init_reader_params

REPO = Path(__file__).resolve().parents[1]
TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=512)  # fmt: skip


@pytest.fixture(scope="module")
def prep():
    spec = importlib.util.spec_from_file_location(
        "gpu_prep", REPO / "scripts/gpu_session_prepare.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_reader_round_trip_through_float16_shards(prep, tmp_path, minilm_dir, monkeypatch):
    cfg = BertConfig(**TINY_BERT)
    params = init_reader_params(cfg, jax.random.PRNGKey(0))
    save_model(tmp_path / "reader", params, "reader", cfg, minilm_dir, extra={"step": 7})
    limit = 300_000  # the word embeddings (30522 x 32 float16, 1.95 MB) must be split
    monkeypatch.setattr(prep, "SHARD_BYTES", limit)
    prep.pack_reader(tmp_path / "reader", tmp_path / "out")
    shards = sorted((tmp_path / "out").glob("reader_fp16_*.safetensors"))
    assert len(shards) > 6
    assert all(p.stat().st_size <= limit + 4096 for p in shards)  # + the safetensors header
    prep.restore_reader(tmp_path / "out", tmp_path / "restored", str(minilm_dir))
    _, cfg2, got, meta = load_model(tmp_path / "restored", "reader")
    assert cfg2 == cfg and meta["step"] == 7
    want, got = flatten_dict(params), flatten_dict(got)
    assert set(want) == set(got)
    for k, v in want.items():  # float16 rounding: half an ulp, relative 2^-11 (normal numbers)
        v = np.asarray(v, np.float32)
        np.testing.assert_allclose(got[k], v, rtol=2**-11, atol=6e-8, err_msg=str(k))
        assert got[k].dtype == np.float32


def test_gold_file_holds_the_sampled_questions(prep, tmp_path):
    """The gold-passage file holds the sampled retrieval questions, in their order (the
    end-to-end and gold-passage figures are then over the same questions)."""
    results = [{"question": f"q{i}", "answers": ["a"], "ctxs": []} for i in range(40)]
    gold = [{"question": f"q{i}", "answers": ["a"], "positive_ctxs": [{"title": "", "text": "a"}],
             "negative_ctxs": [], "hard_negative_ctxs": []} for i in range(40) if i % 9]  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(results))
    (tmp_path / "g.json").write_text(json.dumps(gold[::-1]))
    qs = prep.sample_rows(tmp_path / "r.json", 15, 0, tmp_path / "r.json.xz")
    prep.rows_of_questions(tmp_path / "g.json", qs, tmp_path / "g.json.xz")
    got = [r["question"] for r in json.loads(lzma.open(tmp_path / "g.json.xz").read())]
    assert got == [q for q in qs if int(q[1:]) % 9]


def test_paragraph_file_holds_the_sampled_questions_with_their_paragraphs(prep, tmp_path):
    """``--squad``: the sampled questions of the validation articles, each read by ``read
    --format squad`` with its own whole paragraph first; other articles, unsampled questions and
    a repeated question are left out."""

    def qa(i, q):
        return {"id": str(i), "question": q, "answers": [{"text": "x", "answer_start": 0}]}

    squad = {"version": "1.1", "data": [
        {"title": "Train", "paragraphs": [{"context": "x train", "qas": [qa(0, "q0")]}]},
        {"title": "Dev", "paragraphs": [
            {"context": "x one", "qas": [qa(1, "q1"), qa(2, "q2"), qa(3, "q1")]},
            {"context": "x two", "qas": [qa(4, "q4"), qa(5, "q1")]}]}]}  # fmt: skip
    (tmp_path / "squad.json").write_text(json.dumps(squad))
    dst = tmp_path / "dev.paragraphs.json.xz"
    n = prep.squad_paragraphs(tmp_path / "squad.json", ["Dev"], ["q0", "q1", "q4", "q9"], dst)
    got = read_reader_examples(dst, "squad")
    assert n == 2 and [(e.question, e.passages[0].text) for e in got] == [
        ("q1", "x one"), ("q4", "x two")]  # fmt: skip


def test_sampled_files_hold_the_questions_read_samples(prep, tmp_path):
    rows = [{"question": f"q{i}", "answers": [f"a{i}"],
             "ctxs": [{"id": str(j), "title": "t", "text": f"text {i} {j}", "score": -j,
                       "has_answer": j == i % 7} for j in range(30)]} for i in range(57)]  # fmt: skip
    full = tmp_path / "results.json"
    full.write_text(json.dumps(rows))
    prep.sample_rows(full, 20, 3, tmp_path / "sub.json.xz", top=5)
    sub = tmp_path / "sub.json"
    sub.write_bytes(lzma.open(tmp_path / "sub.json.xz").read())
    want = sample_examples(read_reader_examples(full), 20, 3)
    got = read_reader_examples(sub)
    assert [e.question for e in got] == [e.question for e in want]
    assert all(len(e.passages) == 5 for e in got)
    assert [p.text for p in got[4].passages] == [p.text for p in want[4].passages[:5]]


@pytest.mark.slow
def test_session_script_runs_its_steps_on_cpu(tmp_path):
    """The script's own machinery on CPU stand-ins: xz inputs unpacked, the chosen steps run (the
    ANN rows with ``--accel-force-cpu``; a stage that fails is logged and the next runs), the
    results packed into $OUT within its file-count limit; with the budget spent every step is
    refused and the packing still runs."""
    pytest.importorskip("faiss")
    data = tmp_path / "gpu" / "data"
    data.mkdir(parents=True)
    for name in ("train.biencoder.json", "dev.biencoder.json", "dev.results.json"):
        with lzma.open(data / f"{name}.xz", "wb") as f:
            f.write(b"[]")
    (data / "dev.passages.tsv").write_text("id\ttext\ttitle\n")
    out = tmp_path / "out"
    env = {**os.environ, "GPU_DATA": str(tmp_path / "gpu"), "OUT": str(out), "PYTHON": sys.executable,
           "GPU_WORK": str(tmp_path / "work"), "JAX_PLATFORMS": "cpu", "GPU_STEPS": "ann recipe mfu",
           "GPU_ANN": "--n 3000 --dim 8 --accel-force-cpu --bootstrap 10 --repeats 1",
           "GPU_BUDGET": "400", "GPU_STAGE1_SET": "--set num_epochs=2.0",
           "GPU_MFU": "--tiny --steps 1 --rounds 1 --dtype float32"}  # fmt: skip
    res = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=REPO, env=env, text=True,
                         capture_output=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr
    log = (out / "steps.log").read_text()
    for name in ("train.biencoder.json", "dev.biencoder.json", "dev.results.json"):
        assert (tmp_path / "work" / "data" / name).read_text() == "[]"
    assert "stage1: exit" in log  # run, and failed on the empty training file
    (start,) = [line for line in log.splitlines() if "stage1: start" in line]
    assert start.endswith("--set num_epochs=2.0")  # stage 1's own settings, after the common ones
    assert "num_epochs" not in next(line for line in log.splitlines() if "stage2: start" in line)
    assert "ann_accel: exit 0" in log and "levers" not in log
    assert sorted(p.name for p in out.iterdir()) == ["results.tgz", "steps.log"]
    listing = subprocess.run(["tar", "tzf", str(out / "results.tgz")], capture_output=True,
                             text=True, check=True).stdout.split()  # fmt: skip
    assert "accel_1m/table.md" in listing and "logs/stage1.log" in listing
    assert "train_mfu: exit 0" in log and "eval/train_mfu.json" in listing
    # a spent budget: every step refused, the packing still done
    res = subprocess.run(["bash", "scripts/gpu_session.sh"], cwd=REPO, text=True, timeout=300,
                         env={**env, "OUT": str(tmp_path / "out2"), "GPU_BUDGET": "1"},
                         capture_output=True)  # fmt: skip
    assert res.returncode == 0, res.stderr
    log = (tmp_path / "out2" / "steps.log").read_text()
    assert "stage1: skipped, the budget is spent" in log and "ann_accel: skipped" in log
    assert "train_mfu: skipped" in log
    assert (tmp_path / "out2" / "results.tgz").exists()


def _run_prepare(*args):
    return subprocess.run([sys.executable, "scripts/gpu_session_prepare.py", *map(str, args)],
                          cwd=REPO, text=True, capture_output=True, timeout=300)  # fmt: skip


def test_prepare_replaces_only_what_it_wrote(prep, tmp_path, minilm_dir):
    """Each mode's ``--out`` is refused (one line, exit 2, before any work, nothing touched) when
    it holds what the script did not write or is an input; what the same mode wrote is
    replaced: ``--eval-only`` writes its three files in ``--out`` itself, a second packing of a
    reader removes the first's shards."""
    sq = tmp_path / "squad"
    sq.mkdir()
    gold = [{"question": f"q{i}", "answers": ["a"], "positive_ctxs": [{"title": "", "text": "a"}],
             "negative_ctxs": [], "hard_negative_ctxs": []} for i in range(6)]  # fmt: skip
    (sq / "dev.biencoder.json").write_text(json.dumps(gold))
    results = tmp_path / "results.json"
    results.write_text(json.dumps([{"question": f"q{i}", "answers": ["a"], "ctxs": []}
                                   for i in range(6)]))  # fmt: skip
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for out in (other, sq / "sub", results):
        res = _run_prepare("--squad-dpr", sq, "--results", results, "--out", out, "--eval-only")
        assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert res.stderr.startswith("gpu_session_prepare: --out ")
    assert sorted(os.listdir(other)) == ["notes.txt"] and not (sq / "sub").exists()
    out = tmp_path / "eval"
    for n in (3, 4):  # the second run replaces the first's files
        res = _run_prepare("--squad-dpr", sq, "--results", results, "--out", out, "--eval-only",
                           "--sample", n)  # fmt: skip
        assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(out)) == [
        "dev.biencoder.json.xz", "dev.results.json.xz", "gpu_session_prepare.json"]  # fmt: skip
    assert len(json.loads(lzma.open(out / "dev.results.json.xz").read())) == 4
    res = _run_prepare("--squad-dpr", sq, "--results", results, "--out", out)  # the other layout
    assert res.returncode == 2 and "with --eval-only (see" in res.stderr, res.stderr
    with pytest.raises(OutputPathError, match="holds the results of scripts/gpu_session_prep"):
        claim_results_folder(out, "scripts/bench_ann.py")  # a benchmark's claim is refused too
    bench = claim_results_folder(tmp_path / "bench", "scripts/bench_ann.py")
    res = _run_prepare("--squad-dpr", sq, "--results", results, "--out", bench, "--eval-only")
    assert res.returncode == 2 and "holds the results of scripts/bench_ann.py" in res.stderr
    legacy = tmp_path / "legacy"  # written before the record said "written_by"
    legacy.mkdir()
    (legacy / "gpu_session_prepare.json").write_text(
        json.dumps({"created_by": "scripts/gpu_session_prepare.py", "eval_only": True})
    )
    res = _run_prepare("--squad-dpr", sq, "--results", results, "--out", legacy, "--eval-only")
    assert res.returncode == 0, res.stderr
    record = json.loads((legacy / "gpu_session_prepare.json").read_text())
    assert record["written_by"] == "scripts/gpu_session_prepare.py" and record["sample"] == 1000

    cfg = BertConfig(**TINY_BERT)
    save_model(tmp_path / "reader", init_reader_params(cfg, jax.random.PRNGKey(0)), "reader",
               cfg, minilm_dir)  # fmt: skip
    res = _run_prepare("--pack-reader", tmp_path / "reader", "--out", other)
    assert res.returncode == 2 and "non-empty directory" in res.stderr, res.stderr
    res = _run_prepare("--restore-reader", tmp_path / "reader", "--out", other, "--tokenizer",
                       minilm_dir)  # fmt: skip
    assert res.returncode == 2 and "non-empty directory" in res.stderr, res.stderr
    assert sorted(os.listdir(other)) == ["notes.txt"]
    shards = tmp_path / "shards"
    prep.SHARD_BYTES, limit = 300_000, prep.SHARD_BYTES
    try:
        prep.main(["--pack-reader", str(tmp_path / "reader"), "--out", str(shards)])
        many = len(list(shards.glob("reader_fp16_*")))
        prep.SHARD_BYTES = limit
        prep.main(["--pack-reader", str(tmp_path / "reader"), "--out", str(shards)])
    finally:
        prep.SHARD_BYTES = limit
    assert many > 2 and sorted(os.listdir(shards)) == ["reader_fp16_0.safetensors",
                                                       "reader_meta.json"]  # fmt: skip
    prep.main(["--restore-reader", str(shards), "--out", str(tmp_path / "restored"),
               "--tokenizer", str(minilm_dir)])  # fmt: skip
    assert load_model(tmp_path / "restored", "reader")[1] == cfg


def test_prepare_keeps_a_copy_only_of_the_same_input(prep, tmp_path, minilm_dir):
    """The large copies (dev passages, training file) are kept from a finished run on the same
    prepare-squad folder; a run on another folder writes its own even when the kept copy is
    newer than its files."""
    folders = []
    for name in ("a", "b"):
        sq = tmp_path / name
        sq.mkdir()
        gold = [{"question": f"q{i}", "answers": ["a"], "negative_ctxs": [],
                 "positive_ctxs": [{"title": name, "text": "a"}], "hard_negative_ctxs": []}
                for i in range(4)]  # fmt: skip
        (sq / "dev.biencoder.json").write_text(json.dumps(gold))
        (sq / "train.biencoder.json").write_text(json.dumps(gold))
        (sq / "dev.passages.tsv").write_text(f"id\ttext\ttitle\n1\ta\t{name}\n")
        (sq / "results.json").write_text(json.dumps([{"question": f"q{i}", "answers": ["a"],
                                                      "ctxs": []} for i in range(4)]))  # fmt: skip
        os.utime(sq / "dev.passages.tsv", (1e9, 1e9))  # older than any copy
        folders.append(sq)
    out = tmp_path / "out"
    passages = out / "data/dev.passages.tsv.xz"
    for sq, want in ((folders[0], "a"), (folders[0], "a"), (folders[1], "b")):
        before = passages.stat().st_mtime_ns if passages.exists() else None
        prep.main(["--squad-dpr", str(sq), "--results", str(sq / "results.json"),
                   "--out", str(out), "--sample", "2"])  # fmt: skip
        assert lzma.open(passages).read().decode().endswith(f"\ta\t{want}\n")
        if sq == folders[0] and before is not None:
            assert passages.stat().st_mtime_ns == before  # kept: the same input
    record = json.loads((out / "gpu_session_prepare.json").read_text())
    assert record["squad_dpr"] == str(folders[1].resolve()) and record["eval_only"] is False
