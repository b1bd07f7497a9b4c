"""The probes of issue 19, items 5 and 6, one row each (as tests/test_error_contract.py does).

- Environment faults (item 5): a full disk (ENOSPC), a read-only file system (EROFS) or a
  refused permission (EACCES) met while a command writes its output is one line naming the
  output, exit 2; nothing partial (no temporary file or directory) is left and the previous
  artifact at that path is byte for byte intact. A training workdir held by another live run is
  refused, naming its pid; the lock of a dead one is taken over.
- Bad values (item 6): every numeric option is finite and in range, options that exclude each
  other are refused, an output with no records is refused, a tokenizer that is not the model's
  is refused, and Ctrl-C in encode / index / mine says what was kept: one line, exit 2 (130 for
  Ctrl-C). The Python API refuses the same mistakes with the same messages.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FOUR_PASSAGES, TWO_QUESTIONS

from dpr_jax.cli import main
from dpr_jax.data.formats import (
    BiencoderExample,
    write_biencoder,
    write_passages_tsv,
    write_qas_tsv,
)

PASSAGES, QUESTIONS = FOUR_PASSAGES, TWO_QUESTIONS


def _ok(argv):
    assert main([str(a) for a in argv]) == 0, argv


def _small_vocab_model(d: Path, tiny: Path) -> Path:
    """The tiny bi-encoder (vocab_size 30522) saved with a tokenizer of 8 tokens."""
    import transformers

    from dpr_jax.model_dir import load_model, save_model

    (d / "tok").mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "is", "in"]
    (d / "tok" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(d / "tok" / "vocab.txt")).save_pretrained(
        str(d / "tok")
    )
    _, config, params, _ = load_model(tiny)
    return save_model(d / "small_vocab", params, "biencoder", config, tokenizer=d / "tok")


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_biencoder_dir):
    """The inputs and artifacts the rows need, made by the commands themselves."""
    d = tmp_path_factory.mktemp("probes")
    write_passages_tsv(d / "passages.tsv", PASSAGES)
    write_qas_tsv(d / "qas.tsv", QUESTIONS)
    write_biencoder(d / "biencoder.json",
                    [BiencoderExample(q.question, q.answers, [PASSAGES[0]], [], []) for q in
                     QUESTIONS])  # fmt: skip
    (d / "no_positives.json").write_text(json.dumps([{"question": "q", "answers": ["a"],
                                                      "positive_ctxs": []}]))  # fmt: skip
    (d / "no_text.json").write_text(json.dumps([{"question": "q", "answers": ["a"],
                                                 "ctxs": [{"id": "p0", "score": 1.0}]}]))  # fmt: skip
    tiny = Path(tiny_biencoder_dir)
    _ok(["encode", "--model", tiny, "--passages", d / "passages.tsv", "--out", d / "emb",
         "--max-length", "16", "--bucket", "8"])  # fmt: skip
    _ok(["index", "--embeddings", d / "emb", "--backend", "exact", "--out", d / "index"])
    _ok(["retrieve", "--mode", "bm25", "--passages", d / "passages.tsv", "--questions",
         d / "qas.tsv", "--out", d / "results.json", "--k", "2"])  # fmt: skip
    _ok(["evaluate", "--results", d / "results.json", "--json", d / "metrics.json"])
    _small_vocab_model(d, tiny)
    return {"dir": d, "model": tiny, "emb": d / "emb", "index": d / "index",
            "passages": d / "passages.tsv", "qas": d / "qas.tsv", "results": d / "results.json",
            "metrics": d / "metrics.json", "biencoder": d / "biencoder.json", "empty_bi": d / "no_positives.json",
            "no_text": d / "no_text.json",
            "small_vocab": d / "small_vocab", "tiny_config": Path(__file__).parents[1]
            / "configs" / "tiny.py"}  # fmt: skip


def _fill(argv, a, tmp):
    return [str(x).format(tmp=tmp, **{k: str(v) for k, v in a.items()}) for x in argv]


def _one_line(capsys, rc, want_rc=2):
    """The error's one line: the last on stderr (after what the command said while it worked,
    such as progress bars), with no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == want_rc and "Traceback" not in err, err
    assert lines and lines[-1].startswith("dpr-jax "), err
    return lines[-1]


MODEL, IDX, PSG, QAS, RES = "{model}", "{index}", "{passages}", "{qas}", "{results}"
DENSE = ["--model", MODEL, "--index", IDX, "--passages", PSG, "--questions", QAS,
         "--out", "{tmp}/r.json"]  # fmt: skip
BM25 = ["--mode", "bm25", "--passages", PSG, "--questions", QAS, "--out", "{tmp}/r.json"]
ENCODE = ["encode", "--model", MODEL, "--passages", PSG, "--out", "{tmp}/emb"]
MINE = ["mine", "--model", MODEL, "--index", IDX, "--passages", PSG, "--out", "{tmp}/m.json"]
ASK = ["--retriever", MODEL, "--index", IDX, "--passages", PSG, "--reader", MODEL]
TRAIN = ["train", "--config", "{tiny_config}", "--workdir", "{tmp}/w"]

# item 6: (name, argv, what the one line must name)
OPTION_ROWS = [
    ("retrieve --alpha nan", ["retrieve", "--mode", "hybrid", *DENSE, "--alpha", "nan"],
     "--alpha"),
    ("retrieve --alpha inf", ["retrieve", "--mode", "hybrid", *DENSE, "--alpha", "inf"],
     "--alpha"),
    ("retrieve --alpha=-1", ["retrieve", "--mode", "hybrid", *DENSE, "--alpha=-1"], "--alpha"),
    ("retrieve --alpha without hybrid", ["retrieve", *BM25, "--alpha", "0.5"], "--alpha"),
    ("retrieve --fusion rrf --alpha", ["retrieve", "--mode", "hybrid", *DENSE, "--fusion", "rrf",
     "--alpha", "0.5"], "--alpha"),
    ("retrieve --bm25-index with dense", ["retrieve", *DENSE, "--bm25-index", "{tmp}/bm"],
     "--bm25-index"),
    ("retrieve --k 0", ["retrieve", *BM25, "--k", "0"], "--k"),
    ("retrieve --k abc", ["retrieve", *BM25, "--k", "abc"], "--k"),
    ("encode --bucket=-3", [*ENCODE, "--bucket=-3"], "--bucket"),
    ("encode --batch-size 0", [*ENCODE, "--batch-size", "0"], "--batch-size"),
    ("encode --chunk-size=-1", [*ENCODE, "--chunk-size=-1"], "--chunk-size"),
    ("encode --max-length 0", [*ENCODE, "--max-length", "0"], "--max-length"),
    ("encode --max-length beyond the positions", [*ENCODE, "--max-length", "4096"],
     "max_position_embeddings"),
    ("encode a tokenizer of 8 tokens for 30,522 words", ["encode", "--model", "{small_vocab}",
     "--passages", PSG, "--out", "{tmp}/emb"], "30,522 (vocab_size)"),
    ("read --sample=-3", ["read", "--model", MODEL, "--results", RES, "--sample=-3"],
     "--sample"),
    ("read --limit 0", ["read", "--model", MODEL, "--results", RES, "--limit", "0"], "--limit"),
    ("read --batch-size 0", ["read", "--model", MODEL, "--results", RES, "--batch-size", "0"],
     "--batch-size"),
    ("ask a question and --questions", ["ask", "a question", "--questions", QAS, *ASK],
     "--questions"),
    ("ask a question with --out", ["ask", "a question", "--out", "{tmp}/p.json", *ASK], "--out"),
    ("ask --k 0", ["ask", "a question", "--k", "0", *ASK], "--k"),
    ("mine --n 0", [*MINE, "--biencoder", "{biencoder}", "--n", "0"], "--n"),
    ("mine --seed=-1", [*MINE, "--biencoder", "{biencoder}", "--seed=-1"], "--seed"),
    ("mine --depth nan", [*MINE, "--biencoder", "{biencoder}", "--depth", "nan"], "--depth"),
    ("mine no usable records", [*MINE, "--biencoder", "{empty_bi}"], "no usable records"),
    ("convert-data no usable records", ["convert-data", "--biencoder", "{empty_bi}", "--out",
     "{tmp}/rec"], "no usable records"),
    ("evaluate ctxs without text or has_answer", ["evaluate", "--results", "{no_text}"],
     "neither 'text' nor 'has_answer'"),
    ("index --threads 0", ["index", "--embeddings", "{emb}", "--backend", "faiss-flat",
     "--threads", "0", "--out", "{tmp}/i"], "--threads"),
    ("index --target-recall nan", ["index", "--embeddings", "{emb}", "--backend", "faiss-hnsw",
     "--target-recall", "nan", "--tune-queries", "q.npy", "--out", "{tmp}/i"],
     "--target-recall"),
    ("prepare-squad --val-fraction 1.5", ["prepare-squad", "--squad", "x.json", "--out",
     "{tmp}/sq", "--val-fraction", "1.5"], "--val-fraction"),
    ("prepare-squad --words 0", ["prepare-squad", "--squad", "x.json", "--out", "{tmp}/sq",
     "--words", "0"], "--words"),
    ("quickstart --k 0", ["quickstart", "--workdir", "{tmp}/qs", "--k", "0"], "--k"),
    ("train --num-processes 0", [*TRAIN, "--num-processes", "0"], "--num-processes"),
    ("plan --max-compiles 0", ["plan", "--config", "{tiny_config}", "--max-compiles", "0"],
     "--max-compiles"),
]  # fmt: skip


@pytest.mark.parametrize("row", OPTION_ROWS, ids=[r[0] for r in OPTION_ROWS])
def test_bad_values_are_one_line_exit_2_and_nothing_written(art, row, tmp_path, capsys,
                                                             monkeypatch):  # fmt: skip
    monkeypatch.delenv("DPR_JAX_DEBUG", raising=False)
    _, argv, names = row
    argv = _fill(argv, art, tmp_path)
    capsys.readouterr()
    line = _one_line(capsys, main(argv))
    assert line.startswith(f"dpr-jax {argv[0]}: ") and names in line, line
    assert sorted(tmp_path.iterdir()) == []  # no output, nor anything half-made


# -- item 5: environment faults -------------------------------------------------------------------


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _fault(monkeypatch, kind: str, after: int = 0):
    """Make the (``after``+1)-th fsync (a full disk shows at the latest there) or os.replace
    (a read-only file system, a refused permission) fail like the real fault does."""
    if kind == "ENOSPC":
        name, err = "fsync", OSError(errno.ENOSPC, "No space left on device")
    elif kind == "EROFS":
        name, err = "replace", OSError(errno.EROFS, "Read-only file system")
    else:
        name, err = "replace", PermissionError(errno.EACCES, "Permission denied")
    _fail_after(monkeypatch, os, name, after, err)


def _fail_after(monkeypatch, owner, name: str, after: int, exc: BaseException) -> None:
    """``owner.name`` works ``after`` times, then raises ``exc`` at every call."""
    real, calls = getattr(owner, name), {"n": 0}

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc
        return real(*a, **k)

    monkeypatch.setattr(owner, name, failing)


# (name, argv, fault, fsyncs that succeed first, the output (copied from an artifact of `art`
# first, when given: the previous artifact that must stay intact), what the line must name)
FAULT_ROWS = [
    ("retrieve ENOSPC", ["retrieve", *BM25[:-1], "{tmp}/out"], "ENOSPC", 0, "results",
     "no space left"),
    ("retrieve EROFS", ["retrieve", *BM25[:-1], "{tmp}/out"], "EROFS", 0, "results",
     "read-only file system"),
    ("retrieve EACCES", ["retrieve", *BM25[:-1], "{tmp}/out"], "EACCES", 0, "results",
     "permission denied"),
    ("evaluate --json ENOSPC", ["evaluate", "--results", RES, "--json", "{tmp}/out"], "ENOSPC",
     0, "metrics", "no space left"),
    ("index ENOSPC", ["index", "--embeddings", "{emb}", "--backend", "exact", "--out",
     "{tmp}/out"], "ENOSPC", 0, "index", "no space left"),
    ("index EROFS", ["index", "--embeddings", "{emb}", "--backend", "exact", "--out",
     "{tmp}/out"], "EROFS", 0, "index", "read-only file system"),
    ("encode ENOSPC in a chunk", [*ENCODE[:-1], "{tmp}/out", "--chunk-size", "2"], "ENOSPC", 5,
     None, "1 of 2 chunks of shard 0/1 are finished and kept"),
    ("encode --questions ENOSPC", ["encode", "--model", MODEL, "--questions", QAS, "--out",
     "{tmp}/out"], "ENOSPC", 0, None, "no space left"),
    ("mine ENOSPC", [*MINE[:-1], "{tmp}/out", "--biencoder", "{biencoder}"], "ENOSPC", 0,
     None, "no space left"),
]  # fmt: skip


@pytest.mark.parametrize("row", FAULT_ROWS, ids=[r[0] for r in FAULT_ROWS])
def test_environment_faults_are_one_line_and_leave_the_previous_artifact(
    art, row, tmp_path, capsys, monkeypatch
):
    import shutil

    monkeypatch.delenv("DPR_JAX_DEBUG", raising=False)
    _, argv, kind, after, previous, says = row
    out = tmp_path / "out"
    if previous is not None:
        src = art[previous]
        (shutil.copytree if src.is_dir() else shutil.copy)(src, out)
        before = _digest(out)
    listing = sorted(p.name for p in tmp_path.iterdir())
    argv = _fill(argv, art, tmp_path)
    _fault(monkeypatch, kind, after)
    capsys.readouterr()
    line = _one_line(capsys, main(argv))
    monkeypatch.undo()
    assert str(out) in line and says in line, line
    if previous is not None:
        assert _digest(out) == before and "is intact" in line, line
        assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no temporary left
    elif kind == "ENOSPC" and argv[0] == "encode" and out.is_dir():  # resumable: chunks kept
        assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_a_real_read_only_directory(art, tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        rc = main(_fill(["retrieve", *BM25[:-1], str(ro / "r.json")], art, tmp_path))
        assert str(ro / "r.json") in _one_line(capsys, rc)
        assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o755)


HOLD = """
import sys, time
from dpr_jax.io import workdir_lock
with workdir_lock(sys.argv[1], "training workdir"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("command,config", [("train", "tiny.py"),
                                            ("train-reader", "reader_tiny.py")])  # fmt: skip
def test_a_workdir_in_use_is_refused_naming_the_holder(command, config, tmp_path, capsys):
    work = tmp_path / "w"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(work)], stdout=subprocess.PIPE,
                              text=True, env=env)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        cfg = Path(__file__).parents[1] / "configs" / config
        capsys.readouterr()
        line = _one_line(capsys, main([command, "--config", str(cfg), "--workdir", str(work)]))
        assert f"pid {holder.pid}" in line and str(work) in line, line
        assert sorted(p.name for p in work.iterdir()) == ["dpr_jax.lock"]  # nothing touched
    finally:
        holder.kill()
        holder.wait()


def test_the_lock_of_a_dead_run_is_taken_over(tmp_path):
    from dpr_jax.io import LOCK, DirectoryBusyError, workdir_lock

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK).write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    with workdir_lock(tmp_path, "training workdir"):
        assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
        with pytest.raises(DirectoryBusyError, match=f"pid {os.getpid()}"):
            with workdir_lock(tmp_path, "training workdir"):
                pass
    with workdir_lock(tmp_path):  # released at the end of the block
        pass


# -- Ctrl-C says what was kept --------------------------------------------------------------------

INTERRUPT_ROWS = [
    ("encode", [*ENCODE[:-1], "{tmp}/out", "--chunk-size", "2"],
     "dpr_jax.retriever.encode.TowerEncoder.encode", 1,
     "1 of 2 chunks of shard 0/1 are finished and kept in"),
    ("index", ["index", "--embeddings", "{emb}", "--backend", "exact", "--out", "{tmp}/out"],
     "dpr_jax.index.exact.ExactIndex._build", 0, "no index was written"),
    ("mine", [*MINE[:-1], "{tmp}/out", "--biencoder", "{biencoder}", "--chunk-size", "1"],
     "dpr_jax.search.DenseRetriever.search", 1, "1 of 2 chunks are finished and kept in"),
]  # fmt: skip


@pytest.mark.parametrize("row", INTERRUPT_ROWS, ids=[r[0] for r in INTERRUPT_ROWS])
def test_ctrl_c_says_what_was_kept(art, row, tmp_path, capsys, monkeypatch):
    import importlib

    _, argv, target, after, says = row
    module, cls, fn = target.rsplit(".", 2)
    owner = getattr(importlib.import_module(module), cls)
    _fail_after(monkeypatch, owner, fn, after, KeyboardInterrupt())
    capsys.readouterr()
    line = _one_line(capsys, main(_fill(argv, art, tmp_path)), want_rc=130)
    assert "interrupted; " in line and says in line, line


# -- the same checks in the Python API ------------------------------------------------------------


def _dense(a):
    from dpr_jax.search import DenseRetriever

    return DenseRetriever(a["model"], a["index"])


def _bm25(a):
    from dpr_jax.data.bm25 import BM25Retriever

    return BM25Retriever(PASSAGES)


def _exact(a, ids=("a", "b", "c")):
    from dpr_jax.index import build_index

    return build_index("exact", np.eye(3, dtype=np.float32), list(ids))


def _hybrid(a, **kw):
    from dpr_jax.search import HybridRetriever

    return HybridRetriever(_dense(a), _bm25(a), **kw)


def _encode_corpus(a, passages, **kw):
    from dpr_jax.retriever.encode import encode_corpus

    return encode_corpus(a["model"], passages, a["dir"] / "api_emb", show_progress=False, **kw)


def _tower(a, **kw):
    from dpr_jax.retriever.encode import TowerEncoder

    return TowerEncoder(a["model"], "passage", **kw)


def _mine_empty(a):
    from dpr_jax.mine import mine_hard_negatives

    return mine_hard_negatives(a["model"], a["index"], a["passages"], a["empty_bi"],
                               a["dir"] / "api_mined.json", progress=False)  # fmt: skip


# (name, call, exception type, message)
API_ROWS = [
    ("DenseRetriever.search(one string)", lambda a: _dense(a).search("one string", 2), TypeError,
     "got one string"),
    ("DenseRetriever.search([None])", lambda a: _dense(a).search([None], 2), TypeError,
     r"questions\[0\]: expected a question string, got NoneType"),
    ("DenseRetriever.search([''])", lambda a: _dense(a).search([""], 2), ValueError,
     "empty question"),
    ("BM25Retriever.search(one string)", lambda a: _bm25(a).search("paris", 2), TypeError,
     "got one string"),
    ("HybridRetriever.search(one string)", lambda a: _hybrid(a).search("paris", 2), TypeError,
     "got one string"),
    ("HybridRetriever(alpha=nan)", lambda a: _hybrid(a, alpha=float("nan")), ValueError,
     "alpha must be a finite number >= 0, got nan"),
    ("build_index with duplicate ids", lambda a: _exact(a, ("a", "b", "a")), ValueError,
     r"'a' appears 2 times \(rows 0 and 2\)"),
    ("Index.search(NaN query)", lambda a: _exact(a).search(np.full((1, 3), np.nan, np.float32),
     1), ValueError, "row 0 is not finite"),
    ("encode_corpus(model, ['text'], out)", lambda a: _encode_corpus(a, ["text"]), TypeError,
     r"passages\[0\]: expected a passage"),
    ("encode_corpus(bucket=-3)", lambda a: _encode_corpus(a, PASSAGES, bucket=-3), ValueError,
     "bucket must be an integer >= 1"),
    ("TowerEncoder(batch_size=0)", lambda a: _tower(a, batch_size=0), ValueError,
     "batch_size must be an integer >= 1"),
    ("TowerEncoder(max_length=4096)", lambda a: _tower(a, max_length=4096), ValueError,
     "max_position_embeddings"),
    ("mine_hard_negatives(no usable records)", _mine_empty, ValueError, "no usable records"),
]  # fmt: skip


@pytest.mark.parametrize("row", API_ROWS, ids=[r[0] for r in API_ROWS])
def test_the_api_refuses_the_same_mistakes(art, row):
    from dpr_jax.errors import UserError

    _, call, exc, match = row
    with pytest.raises(exc, match=match) as e:
        call(art)
    assert isinstance(e.value, UserError)  # the command line's one line, exit 2
    assert not (art["dir"] / "api_emb").exists() and not (art["dir"] / "api_mined.json").exists()


def test_a_long_field_is_read_not_blamed_on_a_quote(tmp_path):
    """A passage of 200,000 characters (over the csv module's default field limit, whose error
    read as an unclosed quote) is read whole."""
    from dpr_jax.data.formats import read_passages_tsv

    text = "word " * 40_000
    (tmp_path / "long.tsv").write_text(f"id\ttext\ttitle\np0\t{text}\tLong\np1\tshort\tS\n")
    got = read_passages_tsv(tmp_path / "long.tsv")
    assert [p.id for p in got] == ["p0", "p1"] and got[0].text == text
