"""Long phases report progress on stderr (never stdout), and ``--quiet`` silences it (issue 20).

Runs `retrieve`, `index` (with tuning) and `ask` on the tiny corpus of tests/test_commands.py
through the one `dpr-jax` entry point; the searching bar is forced by a small search chunk, and
its results must equal the quiet run's."""

import json

import numpy as np
from test_commands import QUESTIONS, corpus, tiny_reader_dir  # noqa: F401 (fixtures)

from dpr_jax.cli import main
from dpr_jax.search import DenseRetriever


def _run(capsys, argv):
    capsys.readouterr()
    assert main(argv) == 0
    return capsys.readouterr()


def test_retrieve_progress_and_quiet(corpus, tiny_biencoder_dir, capsys, monkeypatch):  # noqa: F811
    monkeypatch.setattr(DenseRetriever, "SEARCH_CHUNK", 2)  # 4 questions: two search calls
    argv = ["retrieve", "--passages", str(corpus / "passages.tsv"), "--questions",
            str(corpus / "qas.tsv"), "--model", str(tiny_biencoder_dir), "--index",
            str(corpus / "index"), "--k", "3"]  # fmt: skip
    loud = _run(capsys, [*argv, "--out", str(corpus / "p_loud.json")])
    for bar in ("encode questions", "search"):
        assert f"{bar}: 100%" in loud.err and "q/s" in loud.err, loud.err
    assert "encode questions" not in loud.out and "q/s" not in loud.out
    quiet = _run(capsys, [*argv, "--out", str(corpus / "p_quiet.json"), "--quiet"])
    assert "%|" not in quiet.err and "encode questions" not in quiet.err, quiet.err
    assert "4 questions, dense retrieval" in quiet.err  # the summary stays
    a, b = (json.loads((corpus / f"p_{n}.json").read_text()) for n in ("loud", "quiet"))
    assert [[c["id"] for c in r["ctxs"]] for r in a] == [[c["id"] for c in r["ctxs"]] for r in b]
    np.testing.assert_allclose([[c["score"] for c in r["ctxs"]] for r in a],
                               [[c["score"] for c in r["ctxs"]] for r in b], rtol=1e-6)  # fmt: skip


def test_index_build_and_tuning_progress_and_quiet(corpus, tmp_path, capsys):  # noqa: F811
    from dpr_jax.embeddings import load_embeddings

    _, emb = load_embeddings(corpus / "emb")
    np.save(tmp_path / "q.npy", np.asarray(emb, np.float32))  # the passages as tuning queries
    argv = ["index", "--embeddings", str(corpus / "emb"), "--backend", "faiss-hnsw",
            "--threads", "1", "--option", "M=8", "--target-recall", "0.5",
            "--tune-queries", str(tmp_path / "q.npy"), "--tune-k", "3"]  # fmt: skip
    loud = _run(capsys, [*argv, "--out", str(tmp_path / "loud")])
    for line in ("load embeddings", "building faiss-hnsw index of 10 vectors", "built in",
                 "tune: trial 1:", "tune: timing 1 candidate(s)", "tune: timed"):  # fmt: skip
        assert line in loud.err, loud.err
    assert loud.out == ""
    quiet = _run(capsys, [*argv, "--out", str(tmp_path / "quiet"), "--quiet"])
    for line in ("load embeddings", "building", "tune:"):
        assert line not in quiet.err, quiet.err
    assert "tuned for recall@3" in quiet.err and "built faiss-hnsw index" in quiet.err


def test_ask_batch_progress_and_quiet(corpus, tiny_biencoder_dir, tiny_reader_dir, capsys):  # noqa: F811
    argv = ["ask", "--questions", str(corpus / "qas.tsv"), "--retriever", str(tiny_biencoder_dir),
            "--index", str(corpus / "index"), "--passages", str(corpus / "passages.tsv"),
            "--reader", str(tiny_reader_dir), "--k", "3"]  # fmt: skip
    loud = _run(capsys, argv)
    assert "encode questions: 100%" in loud.err and "reader: 100%" in loud.err, loud.err
    assert "%|" not in loud.out
    quiet = _run(capsys, [*argv, "--quiet"])
    assert "%|" not in quiet.err and f"{len(QUESTIONS)} questions: EM" in quiet.err, quiet.err
