"""scripts/reader_recipe.sh: the whole reader recipe from a SQuAD file to its summary table, run
small on CPU (10 real articles, a few steps of each training, MINILM a sentence-transformers
MiniLM directory whose BERT is tiny and random: the start of the retriever and of stage 1), a
finished step asked for with other options refused; with a stand-in python (fast): a step that
ends without its output stops the script, finished steps are skipped, a removed read is made
alone, a step whose inputs were made again is refused, one run at a time; a missing DATA or a
failed step is one line, exit 2.
(Resuming a stopped training: tests/test_reader_train.py.)"""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dpr_jax.reader.data import read_reader_examples

REPO = Path(__file__).resolve().parents[1]
STEPS = ("prepare", "convert", "retriever", "retrieval", "sample", "stage1", "read_s1_gold_all",
         "read_s1_retrieved", "stage2", "read_s2_retrieved", "read_s2_gold1000",
         "read_s2_paragraphs", "read_s2_gold_all")  # fmt: skip
TINY = {
    "RETRIEVER_SET": "--set num_steps=2 --set batch_size=8 --set max_dev_examples=8 "
    "--set checkpoint_every=0 --set progress=False",
    # one padded length a training (bucket=0): one compilation of its step, not one a length
    "S1_SET": "--set num_steps=2 --set batch_size=8 --set max_dev_examples=4 "
    "--set checkpoint_every=0 --set eval_every=0 --set progress=False --set bucket=0 "
    "--set length_groups=0",
    "S2_SET": "--set num_steps=2 --set batch_size=8 --set passages_per_question=2 "
    "--set max_dev_examples=4 --set eval_passages=2 --set checkpoint_every=0 "
    "--set progress=False --set bucket=0",
    "QUICKSTART_OPTS": "--quiet",
}


def _run(env, timeout=900):
    return subprocess.run(["bash", "scripts/reader_recipe.sh"], cwd=REPO, env=env, text=True,
                          capture_output=True, timeout=timeout)  # fmt: skip


def _tiny_minilm(minilm_dir: Path, out: Path) -> Path:
    """all-MiniLM-L6-v2's directory (tokenizer, sentence-transformers pooling and normalisation)
    with a tiny random BERT in place of its weights: the recipe's steps in seconds."""
    import transformers
    from conftest import TINY_BERT

    shutil.copytree(minilm_dir, out)
    transformers.BertModel(transformers.BertConfig(**TINY_BERT)).save_pretrained(out)
    pooling = json.loads((out / "1_Pooling/config.json").read_text())
    pooling["word_embedding_dimension"] = TINY_BERT["hidden_size"]
    (out / "1_Pooling/config.json").write_text(json.dumps(pooling))
    return out


@pytest.mark.slow
def test_recipe_end_to_end_small(data_dir, minilm_dir, tmp_path):
    squad = json.loads((data_dir / "squad/train-v1.1.json").read_text())
    small = {"version": squad["version"],
             "data": [{**a, "paragraphs": a["paragraphs"][:2]} for a in squad["data"][:10]]}  # fmt: skip
    data = tmp_path / "data"
    (data / "squad").mkdir(parents=True)
    (data / "squad/train-v1.1.json").write_text(json.dumps(small))
    run = tmp_path / "run"
    env = {**os.environ, "DATA": str(data), "RUN": str(run), "PYTHON": sys.executable,
           "JAX_PLATFORMS": "cpu", "MINILM": str(_tiny_minilm(minilm_dir, tmp_path / "minilm")),
           **TINY}  # fmt: skip
    res = _run(env)
    assert res.returncode == 0, res.stderr[-3000:]
    log = (run / "recipe.log").read_text()
    for name in STEPS:
        assert re.search(rf"\] {name}: done in \d+ s$", log, re.M), (name, log)
    done = [re.search(rf"\] {name}: done in", log).start() for name in STEPS]
    assert done == sorted(done)  # in this order: stage 1's reads before stage 2 trains
    assert not (run / "squad.partial").exists()
    assert sorted(p.name for p in (run / "data").iterdir()) == [
        "dev.biencoder.json.xz",
        "dev.paragraphs.json.xz",
        "dev.results.json.xz",
        "gpu_session_prepare.json",
    ]  # --eval-only
    converted = json.loads((run / "minilm_st/dpr_jax_model.json").read_text())
    assert converted["converted_from"]["source"] == env["MINILM"]
    assert converted["converted_from"]["sentence_transformers"]["pooling"] == "mean"
    assert converted["model"]["bert"]["hidden_size"] == 32  # tiny
    assert (run / "steps/convert.command").read_text().split() == [
        "python", "-m", "dpr_jax.cli", "convert", "--from-hf", env["MINILM"], "--out",
        "$RUN/minilm_st"]  # fmt: skip
    # each training's own settings reached it alone, and stage 2 started from stage 1's model
    ret = json.loads((run / "retriever/config.json").read_text())
    assert ret["config"]["num_steps"] == 2  # RETRIEVER_SET (the config says 150)
    s1 = json.loads((run / "reader-s1/config.json").read_text())
    assert s1["config"]["num_steps"] == 2  # S1_SET
    assert s1["config"]["warmup_fraction"] == 0.1  # the stage-1 config (stage 2's is 0.05)
    assert s1["config"]["passages_per_question"] == 1  # S2_SET's 2 did not reach stage 1
    # stage 1 starts from MINILM too (the config's "minilm" is the offline package's)
    assert s1["resolved"]["init"]["init_from"] == env["MINILM"] == s1["config"]["init_from"]
    s2 = json.loads((run / "reader-s2/config.json").read_text())
    assert s2["config"]["num_steps"] == 2 and s2["config"]["passages_per_question"] == 2
    assert s2["resolved"]["init"] == {"init_from": f"{run}/reader-s1/model", "kind": "reader",
                                      "tokenizer": f"{run}/reader-s1/model"}  # fmt: skip
    # the table: every read's metrics, one row per k in order, as `read` computed them
    summary = (run / "eval/summary.md").read_text()
    rows = [r for r in summary.splitlines() if r.startswith("| stage")]
    assert len(rows) == 3 + 5  # stage 2 retrieved k = 1, 5, 20; four gold / paragraph reads;
    # stage 1's retrieved top passage last
    assert rows[-1].startswith("| stage 1, the sampled questions' retrieved top passage")  # k = 1
    assert [r.split(" | ")[1] for r in rows[:3]] == ["1", "5", "20"]
    held_out = read_reader_examples(run / "squad/dev.biencoder.json", "biencoder")
    for name, k in (("s2_retrieved", "20"), ("s1_gold_all", "1")):
        m = json.loads((run / f"eval/{name}.json.config.json").read_text())["metrics"][k]
        row = next(r for r in rows if f"| {k} | {m['questions']:,} | {100 * m['em']:.1f} |" in r)
        assert f"| {100 * m['f1']:.1f} |" in row
    gold = json.loads((run / "eval/s1_gold_all.json.config.json").read_text())["metrics"]["1"]
    assert gold["questions"] == len(held_out) > 0
    # a finished step asked for with other options: refused, one line, and nothing run (the
    # steps' skipping and re-making: the fast test below, with a stand-in python)
    before = (run / "recipe.log").read_text()
    res = _run({**env, "S2_SET": TINY["S2_SET"] + " --set seed=1"}, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"reader_recipe.sh: step stage2: {run}/reader-s2 was made by ")
    assert "--set seed=1. Run with the same options, or remove" in res.stderr
    res = _run(
        {**env, "S2_SET": TINY["S2_SET"] + " --set seed=1", "RETRIEVER_SET": ""}, timeout=120
    )
    assert res.returncode == 2 and f"step retriever: {run}/retriever was made by" in res.stderr
    assert ": start:" not in (run / "recipe.log").read_text()[len(before) :]


def test_recipe_refuses_missing_data_and_stops_at_a_failed_step(tmp_path):
    env = {**os.environ, "RUN": str(tmp_path / "run")}
    env.pop("DPR_JAX_DATA", None)
    res = _run({**env, "DATA": ""}, timeout=60)
    assert res.returncode == 2 and res.stderr.strip() == (
        "reader_recipe.sh: DATA is not set (a folder with squad/train-v1.1.json; or DPR_JAX_DATA)"
    )
    res = _run({**env, "DATA": str(tmp_path / "nowhere")}, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        f"reader_recipe.sh: {tmp_path}/nowhere/squad/train-v1.1.json: no such file "
        "(DATA must name a folder with squad/train-v1.1.json)"
    )
    assert not (tmp_path / "run").exists()
    # RUN: a folder of other files (DATA itself here) or a file is refused before anything runs
    (tmp_path / "data/squad").mkdir(parents=True)
    (tmp_path / "data/squad/train-v1.1.json").write_text('{"data": [')
    for run, says in ((tmp_path / "data", "is a non-empty folder that is no recipe run"),
                      (tmp_path / "data/squad/train-v1.1.json", "is a file, not a folder")):  # fmt: skip
        res = _run({**env, "DATA": str(tmp_path / "data"), "RUN": str(run)}, timeout=60)
        assert res.returncode == 2 and res.stderr.strip() == (
            f"reader_recipe.sh: RUN {run} {says}" + (
                "; choose a new folder" if "file" in says
                else " (no recipe.log); choose a new or empty folder")), res.stderr  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "data").rglob("*")) == ["squad", "train-v1.1.json"]
    # a step that fails (a malformed SQuAD file): its own one-line error, the script stops there
    # with its exit status and says so in the log; started from elsewhere with a relative RUN
    res = subprocess.run(["bash", str(REPO / "scripts/reader_recipe.sh")], cwd=tmp_path,
                         env={**env, "DATA": "data", "RUN": "rel"}, text=True,
                         capture_output=True, timeout=120)  # fmt: skip
    assert res.returncode == 2, res.stderr
    assert "train-v1.1.json" in res.stderr and "Traceback" not in res.stderr
    log = (tmp_path / "rel/recipe.log").read_text()
    assert "prepare: failed (exit 2); fix the cause and re-run" in log and "convert" not in log


STUB = '''#!{python}
"""A stand-in for python: each dpr-jax command the recipe runs writes its step's marker only."""
import json, os, sys
from pathlib import Path

a = sys.argv[1:]
if a[0] == "-":  # the summary's own python
    os.execv({python!r}, [{python!r}, *a])
opt = lambda name: Path(a[a.index(name) + 1])
with open(os.environ["STUB_LOG"], "a") as f:
    f.write((a[2] if a[0] == "-m" else a[0]) + "\\n")
def mark(p, text="{{}}"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
cmd = a[2] if a[0] == "-m" else "prepare"
if cmd == os.environ.get("STUB_NO_MARKER"):  # ends well but without its output
    sys.exit(0)
if cmd in ("prepare-squad",):
    mark(opt("--out") / "config.json")
elif cmd == "convert":
    mark(opt("--out") / "manifest.json")
elif cmd in ("train", "train-reader"):
    mark(opt("--workdir") / "model/manifest.json")
elif cmd == "quickstart":
    mark(opt("--workdir") / "fixed/retrieval_metrics.json")
elif cmd == "read":
    m = {{k: {{"questions": 10, "em": 0.5, "f1": 0.6}} for k in str(opt("--ks")).split(",")}}
    mark(Path(str(opt("--out")) + ".config.json"), json.dumps({{"metrics": m}}))
else:  # scripts/gpu_session_prepare.py
    mark(opt("--out") / "dev.paragraphs.json.xz")
'''


def test_recipe_refuses_a_step_whose_inputs_were_made_again(tmp_path):
    """Each step records when the steps it reads finished: after a step is made again (its
    output removed), a finished or started step that read its earlier output is refused (one
    line, exit 2, nothing run after it); steps that do not read it are skipped as before."""
    (tmp_path / "data/squad").mkdir(parents=True)
    (tmp_path / "data/squad/train-v1.1.json").write_text("{}")
    stub = tmp_path / "python"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    run, log = tmp_path / "run", tmp_path / "stub.log"
    env = {**os.environ, "DATA": str(tmp_path / "data"), "RUN": str(run), "PYTHON": str(stub),
           "STUB_LOG": str(log)}  # fmt: skip
    env.pop("MINILM", None)  # the default: "minilm", the offline package (test_convert.py's)
    # a command that exits 0 without its step's marker (a training told to stop early) stops
    # the script there, saying so
    res = _run({**env, "STUB_NO_MARKER": "train-reader"}, timeout=120)
    assert res.returncode == 1, res.stderr
    first = (run / "recipe.log").read_text()
    assert f"stage1: exit 0 without {run}/reader-s1/model/manifest.json" in first
    assert "stage1: failed (exit 1)" in first and "stage2" not in first
    log.write_text("")
    res = _run(env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert log.read_text().split() == ["train-reader", *(["read"] * 2), "train-reader",
                                       *(["read"] * 4)]  # fmt: skip
    again = (run / "recipe.log").read_text()[len(first) :]
    # MINILM's default: the offline package's directory, as convert reads it
    assert (run / "steps/convert.command").read_text().split() == [
        "python", "-m", "dpr_jax.cli", "convert", "--from-hf", "minilm", "--out", "$RUN/minilm_st",
    ]  # fmt: skip
    assert "init_from" not in (run / "steps/stage1.command").read_text()  # the config's "minilm"
    for name in STEPS[:5]:
        assert f"] {name}: done before (" in again, name
    # run again: every step skipped, nothing run; a read whose output was removed made alone
    (run / "eval/s2_paragraphs.json.config.json").unlink()
    log.write_text("")
    res = _run(env, timeout=120)
    assert res.returncode == 0 and log.read_text() == "read\n", res.stderr
    log.write_text("")
    if shutil.which("flock"):  # a second run in the same RUN at once: refused, nothing run
        with open(run / "recipe.lock", "a") as held:
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            res = _run(env, timeout=60)
        assert res.returncode == 2 and res.stderr == (
            f"reader_recipe.sh: RUN {run} is in use by another run of the recipe (it holds "
            f"{run}/recipe.lock); wait for it to end, or stop it\n"
        )
        assert log.read_text() == ""
    assert (run / "steps/stage2.after").read_text().split()[::2] == ["prepare", "sample", "stage1"]
    assert (run / "steps/convert.after").read_text() == "\n"  # reads no step
    # the sampled questions made again: the stage-1 read of them is refused, stage 1 is not
    for p in sorted((run / "data").rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    (run / "data").rmdir()
    log.write_text("")
    res = _run(env, timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stderr.startswith(f"reader_recipe.sh: step read_s1_retrieved: {run}/eval/s1_retr")
    assert "came from an earlier output of step sample, made again since" in res.stderr
    assert log.read_text().split("\n")[:-1] == ["scripts/gpu_session_prepare.py"]
    text = (run / "recipe.log").read_text()
    assert "stage1: done before" in text and "read_s1_gold_all: done before" in text.split(
        "sample: done in")[-1]  # fmt: skip
    # removed as told (that read and the later steps' outputs): made again; the rest skipped
    shutil.rmtree(run / "reader-s2")
    for p in (run / "eval").glob("s[12]_*.json*"):
        if not p.name.startswith("s1_gold_all"):
            p.unlink()
    log.write_text("")
    res = _run(env, timeout=120)
    assert res.returncode == 0, res.stderr
    assert [line.split()[0] for line in log.read_text().splitlines()] == [
        "read", "train-reader", "read", "read", "read", "read"]  # fmt: skip
    # a started (unfinished) step is refused too: stage 1 restarted, its input made again
    shutil.rmtree(run / "reader-s1/model")
    shutil.rmtree(run / "squad")
    res = _run(env, timeout=120)
    assert res.returncode == 2 and "step retriever: " in res.stderr  # the first reader of it
