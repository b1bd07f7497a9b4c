"""Every command's happy path on a tiny corpus, through the one `dpr-jax` entry point, against
independent references: brute-force inner products, BM25 on its own, the fusion functions, DPR's
top-k accuracy and the reader's own predictions."""

import dataclasses
import json
import re
import shutil

import jax
import numpy as np
import pytest

from dpr_jax.cli import main
from dpr_jax.data.formats import Passage, Question, write_passages_tsv, write_qas_tsv

PASSAGES = [
    Passage(
        text="The Eiffel Tower is in Paris, the capital of France.", title="Eiffel Tower", id="p0"
    ),
    Passage(text="Mount Everest is the highest mountain on Earth.", title="Mount Everest", id="p1"),
    Passage(text="The Amazon is the largest rainforest in the world.", title="Amazon", id="p2"),
    Passage(text="Tokyo is the capital city of Japan.", title="Tokyo", id="p3"),
    Passage(text="The Nile is a long river in Africa that flows north.", title="Nile", id="p4"),
    Passage(text="Shakespeare wrote Hamlet and Macbeth.", title="Shakespeare", id="p5"),
    Passage(text="Water boils at 100 degrees Celsius at sea level.", title="Water", id="p6"),
    Passage(text="The Great Wall of China is very long.", title="Great Wall", id="p7"),
    Passage(text="Albert Einstein developed the theory of relativity.", title="Einstein", id="p8"),
    Passage(text="The Pacific is the largest ocean.", title="Pacific Ocean", id="p9"),
]
QUESTIONS = [
    Question("where is the eiffel tower", ["Paris"], "q0"),
    Question("what is the highest mountain", ["Mount Everest", "Everest"], "q1"),
    Question("who wrote hamlet", ["Shakespeare"], "q2"),
    Question("what is the capital of japan", ["Tokyo"], "q3"),
]
K = 5


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_biencoder_dir):
    """Passages, questions, embeddings and an exact index, made by the commands themselves."""
    d = tmp_path_factory.mktemp("corpus")
    write_passages_tsv(d / "passages.tsv", PASSAGES)
    write_qas_tsv(d / "qas.tsv", QUESTIONS)
    assert main(["encode", "--model", str(tiny_biencoder_dir), "--passages",
                 str(d / "passages.tsv"), "--out", str(d / "emb")]) == 0  # fmt: skip
    assert main(["index", "--embeddings", str(d / "emb"), "--backend", "exact",
                 "--out", str(d / "index")]) == 0  # fmt: skip
    return d


@pytest.fixture(scope="module")
def tiny_reader_dir(tmp_path_factory, minilm_dir):
    from conftest import TINY_BERT

    from dpr_jax.model_dir import save_model
    from dpr_jax.models.bert import BertConfig
    from dpr_jax.reader.model import init_reader_params

    cfg = BertConfig(**TINY_BERT)
    params = init_reader_params(cfg, jax.random.PRNGKey(1))
    out = tmp_path_factory.mktemp("tiny_reader") / "model"
    return save_model(out, params, "reader", cfg, tokenizer=minilm_dir)


def _retrieve(corpus, tiny_biencoder_dir, mode, name, *extra):
    out = corpus / f"{name}.json"
    argv = ["retrieve", "--mode", mode, "--passages", str(corpus / "passages.tsv"),
            "--questions", str(corpus / "qas.tsv"), "--out", str(out), "--k", str(K), *extra]  # fmt: skip
    if mode != "bm25":
        argv += ["--model", str(tiny_biencoder_dir), "--index", str(corpus / "index")]
    assert main(argv) == 0
    return json.loads(out.read_text()), json.loads(
        (corpus / f"{name}.json.config.json").read_text()
    )


def _dense_reference(corpus, tiny_biencoder_dir):
    from dpr_jax.embeddings import load_embeddings
    from dpr_jax.retriever.encode import TowerEncoder

    ids, emb = load_embeddings(corpus / "emb")
    q = TowerEncoder(tiny_biencoder_dir, "question").encode([x.question for x in QUESTIONS])
    scores = np.asarray(q, np.float32) @ np.asarray(emb, np.float32).T  # (Q, D) . (D, N) -> (Q, N)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    return [[str(ids[j]) for j in row] for row in order], np.take_along_axis(scores, order, 1)


def test_retrieve_dense_equals_brute_force(corpus, tiny_biencoder_dir):
    results, config = _retrieve(corpus, tiny_biencoder_dir, "dense", "dense")
    want_ids, want_scores = _dense_reference(corpus, tiny_biencoder_dir)
    assert [[c["id"] for c in r["ctxs"]] for r in results] == want_ids
    got = np.array([[c["score"] for c in r["ctxs"]] for r in results])
    np.testing.assert_allclose(got, want_scores, rtol=1e-4, atol=1e-4)
    assert [r["question"] for r in results] == [q.question for q in QUESTIONS]
    assert config["mode"] == "dense" and config["k"] == K and config["questions_count"] == 4


def test_retrieve_bm25_and_hybrid_equal_their_parts(corpus, tiny_biencoder_dir):
    from dpr_jax.data.bm25 import BM25Retriever
    from dpr_jax.hybrid import linear_fusion

    bm25, _ = _retrieve(corpus, tiny_biencoder_dir, "bm25", "bm25")
    s_scores, s_ids = BM25Retriever(PASSAGES).search([q.question for q in QUESTIONS], K)
    assert [[c["id"] for c in r["ctxs"]] for r in bm25] == [[str(i) for i in row][:K]
                                                            for row in s_ids]  # fmt: skip
    assert bm25[0]["ctxs"][0]["id"] == "p0" and bm25[0]["ctxs"][0]["has_answer"]

    hybrid, config = _retrieve(corpus, tiny_biencoder_dir, "hybrid", "hybrid")
    dense_ids, dense_scores = _dense_reference(corpus, tiny_biencoder_dir)
    # the whole corpus from both sides (the corpus is smaller than the fusion depth)
    full_d = _dense_full(corpus, tiny_biencoder_dir)
    full_s = BM25Retriever(PASSAGES).search([q.question for q in QUESTIONS], len(PASSAGES))
    want = linear_fusion(*full_d, *full_s, k=K, alpha=1.0)
    assert [[c["id"] for c in r["ctxs"]] for r in hybrid] == [
        [str(i) for i in row] for row in want[1]
    ]
    assert config["fusion"] == "linear"


def _dense_full(corpus, tiny_biencoder_dir):
    from dpr_jax.embeddings import load_embeddings
    from dpr_jax.retriever.encode import TowerEncoder

    ids, emb = load_embeddings(corpus / "emb")
    q = TowerEncoder(tiny_biencoder_dir, "question").encode([x.question for x in QUESTIONS])
    scores = np.asarray(q, np.float32) @ np.asarray(emb, np.float32).T
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, 1), np.asarray(ids)[order]


def test_evaluate_prints_dpr_top_k(corpus, tiny_biencoder_dir, capsys):
    from dpr_jax.evaluate import top_k_accuracy

    results, _ = _retrieve(corpus, tiny_biencoder_dir, "bm25", "bm25_eval")
    capsys.readouterr()
    assert main(["evaluate", "--results", str(corpus / "bm25_eval.json"), "--ks", "1,5",
                 "--json", str(corpus / "metrics.json")]) == 0  # fmt: skip
    want = top_k_accuracy(results, (1, 5))
    got = json.loads((corpus / "metrics.json").read_text())
    assert got["questions"] == 4
    assert {int(k): v for k, v in got["top_k_accuracy"].items()} == want
    out = capsys.readouterr().out
    assert re.search(rf"top-1 +{100 * want[1]:.2f}%", out)
    assert re.search(rf"top-5 +{100 * want[5]:.2f}%", out)


def _assert_same_answer(a, b) -> None:
    """The same answer; its float scores to float32 rounding: a question read alone or in a
    batch runs other matrix shapes, whose sums some CPUs (AMX / oneDNN kernels) order apart."""
    assert dataclasses.replace(a, score=0.0, relevance_score=0.0) == dataclasses.replace(
        b, score=0.0, relevance_score=0.0
    )
    assert a.score == pytest.approx(b.score, rel=1e-5, abs=1e-5)
    assert a.relevance_score == pytest.approx(b.relevance_score, rel=1e-5, abs=1e-5)


def test_pipeline_and_ask(corpus, tiny_biencoder_dir, tiny_reader_dir, capsys):
    from dpr_jax import QAPipeline

    pipe = QAPipeline.from_dirs(tiny_biencoder_dir, corpus / "index", corpus / "passages.tsv",
                                tiny_reader_dir, n_passages=3)  # fmt: skip
    dense_ids, _ = _dense_reference(corpus, tiny_biencoder_dir)
    answers = pipe.answer([q.question for q in QUESTIONS])
    by_id = {p.id: p for p in PASSAGES}
    for a, top in zip(answers, dense_ids):
        assert a.passage_id in top[:3] and a.retrieved == 3
        assert a.text in by_id[a.passage_id].text  # an extractive span of its passage
    single = pipe.answer(QUESTIONS[0].question)
    _assert_same_answer(single, answers[0])
    # passages as a list (keyed by their ids): the same answers; mistakes are named
    as_list = QAPipeline(pipe.retriever, list(pipe.passages.values()), pipe.reader, n_passages=3)
    _assert_same_answer(as_list.answer(QUESTIONS[0].question), answers[0])
    for bad in ({"n_passages": 0}, {"n_passages": 2.5}, {"batch_size": 0}):
        with pytest.raises(ValueError, match=f"QAPipeline: {next(iter(bad))} must be a whole"):
            QAPipeline(pipe.retriever, pipe.passages, pipe.reader, **bad)
    some = dict(list(pipe.passages.items())[:1])  # another corpus than the index's
    with pytest.raises(ValueError, match=r"is not among the pipeline's 1 passages: the retriever"):
        QAPipeline(pipe.retriever, some, pipe.reader, n_passages=3).answer(QUESTIONS[0].question)

    capsys.readouterr()
    common = ["--retriever", str(tiny_biencoder_dir), "--index", str(corpus / "index"),
              "--passages", str(corpus / "passages.tsv"), "--reader", str(tiny_reader_dir),
              "--k", "3"]  # fmt: skip
    assert main(["ask", QUESTIONS[0].question, *common]) == 0
    assert capsys.readouterr().out.startswith(answers[0].text)
    assert main(["ask", QUESTIONS[0].question, *common, "--k", "1000"]) == 0  # more than there are
    err = capsys.readouterr().err
    assert f"--k 1000 > the index's {len(PASSAGES)} passages: the reader reads all" in err
    preds = corpus / "preds.json"
    assert main(["ask", "--questions", str(corpus / "qas.tsv"), "--out", str(preds), *common]) == 0
    written = json.loads(preds.read_text())
    assert [r["question"] for r in written] == [q.question for q in QUESTIONS]


@pytest.mark.slow
def test_quickstart_on_one_article(data_dir, tmp_path, tiny_biencoder_dir, tiny_reader_dir):
    work = tmp_path / "qs"
    assert main(["quickstart", "--data", str(data_dir), "--workdir", str(work),
                 "--retriever", str(tiny_biencoder_dir), "--reader", str(tiny_reader_dir),
                 "--max-articles", "1", "--max-questions", "6", "--k", "20",
                 "--examples", "1"]) == 0  # fmt: skip
    rows = json.loads((work / "retrieval_metrics.json").read_text())
    assert [r["name"].split(" ")[0] for r in rows] == ["bm25", "dense", "hybrid", "hybrid"]
    assert all(0.0 <= r["acc"]["1"] <= r["acc"]["20"] <= 1.0 for r in rows)
    reader = json.loads((work / "reader_metrics.json").read_text())
    assert reader["questions"] == 6 and 0.0 <= reader["em"] <= reader["f1"] + 1e-9 <= 1.0 + 1e-9
    from dpr_jax.cli.quickstart import _check_workdir

    _check_workdir(work)  # what it made is its own: a rerun reuses it


def test_quickstart_writes_nothing_among_other_files_or_before_its_data_is_read(
    data_dir, tmp_path, tiny_biencoder_dir, capsys
):
    """A workdir of other files is refused before any work; data that cannot be read is refused
    before the workdir is made (no converted model left behind)."""
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    (other / "passages.tsv").write_text("id\ttext\ttitle\n")  # a name quickstart also uses
    assert main(["quickstart", "--data", str(data_dir), "--workdir", str(other)]) == 2
    err = capsys.readouterr().err
    assert f"--workdir {other}: holds 'notes.txt', which quickstart does not make" in err
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt", "passages.tsv"]
    assert (other / "passages.tsv").read_text() == "id\ttext\ttitle\n"
    inside = tmp_path / "model" / "qs"  # a model's folder is no place for a workdir
    shutil.copytree(tiny_biencoder_dir, tmp_path / "model")
    assert main(["quickstart", "--data", str(data_dir), "--workdir", str(inside)]) == 2
    assert "lies inside the model directory" in capsys.readouterr().err and not inside.exists()
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [')
    work = tmp_path / "new" / "qs"
    assert main(["quickstart", "--data", str(bad), "--workdir", str(work)]) == 2
    assert "bad.json, line 1: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


def _mock_tfds(tfds, questions, answers_key):
    """tfds' mock_data serving ``questions`` as the examples of any split (bytes, as real
    ArrayRecord sources give them)."""
    examples = [{"question": q.question.encode(),
                 answers_key: np.array([a.encode() for a in q.answers], dtype=object)}
                for q in questions]  # fmt: skip
    return tfds.testing.mock_data(as_data_source_fn=lambda self, split, **kw: examples)


def test_retrieve_and_ask_read_tfds_questions(corpus, tiny_biencoder_dir, tiny_reader_dir):
    """`--questions tfds:<name>/<split>`: tfds' data source, DPR's answers, the same retrieval."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="pip install 'dpr-jax[tfds]'")
    spec = "tfds:natural_questions_open/validation"
    out = corpus / "tfds.json"
    with _mock_tfds(tfds, QUESTIONS, "answer"):
        assert main(["retrieve", "--questions", spec, "--passages", str(corpus / "passages.tsv"),
                     "--model", str(tiny_biencoder_dir), "--index", str(corpus / "index"),
                     "--out", str(out), "--k", str(K)]) == 0  # fmt: skip
    results = json.loads(out.read_text())
    assert [(r["question"], r["answers"]) for r in results] == [
        (q.question, q.answers) for q in QUESTIONS
    ]
    assert [[c["id"] for c in r["ctxs"]] for r in results] == _dense_reference(
        corpus, tiny_biencoder_dir
    )[0]
    assert json.loads((corpus / "tfds.json.config.json").read_text())["questions"] == spec

    preds = corpus / "tfds_preds.json"
    with _mock_tfds(tfds, QUESTIONS[:2], "answers"):
        assert main(["ask", "--questions", "tfds:web_questions/test", "--out", str(preds),
                     "--retriever", str(tiny_biencoder_dir), "--index", str(corpus / "index"),
                     "--passages", str(corpus / "passages.tsv"), "--reader", str(tiny_reader_dir),
                     "--k", "3"]) == 0  # fmt: skip
    written = json.loads(preds.read_text())
    assert [(r["question"], r["gold_answers"]) for r in written] == [
        (q.question, q.answers) for q in QUESTIONS[:2]
    ]


@pytest.mark.parametrize(
    "spec,says",
    [
        ("tfds:natural_questions_open/dev", "unknown split 'dev' of natural_questions_open"),
        ("tfds:squad/validation", "unknown tfds dataset 'squad'"),
        ("tfds:trivia_qa/validation", "trivia_qa needs a config"),
        ("tfds:web_questions", "expected tfds:<name>/<split>"),
        ("tfds:natural_questions_open/validation", "pip install 'dpr-jax[tfds]'"),
    ],
)
def test_bad_tfds_questions_are_one_line_exit_2(spec, says, monkeypatch, capsys, tmp_path):
    import sys

    if "dpr-jax[tfds]" in says:  # tensorflow-datasets not installed
        monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    for argv in (["retrieve", "--passages", "p.tsv", "--out", str(tmp_path / "r.json")],
                 ["ask", "--retriever", "m", "--index", "i", "--passages", "p", "--reader", "r"],
                 ["encode", "--model", "m", "--out", str(tmp_path / "q.npy")]):  # fmt: skip
        capsys.readouterr()
        assert main([*argv, "--questions", spec]) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and spec in err and says in err, err


def test_build_index_over_embeddings_dirs_records_provenance(corpus):
    """The library's builder records what `dpr-jax index` records, so the Python API's indexes
    are checked (and warned about) like the command's."""
    from dpr_jax import build_index, load_index
    from dpr_jax.embeddings import load_embeddings
    from dpr_jax.errors import UserError

    built = build_index("exact", corpus / "emb")
    cli = load_index(corpus / "index").meta
    assert built.meta == {k: v for k, v in cli.items() if k in built.meta}
    assert built.meta["model_fingerprint"] and built.meta["passages"][0]["fingerprint"]
    ids, emb = load_embeddings(corpus / "emb")
    np.testing.assert_array_equal(built.ids, ids)
    with pytest.raises(UserError, match="give no ids"):
        build_index("exact", [corpus / "emb"], ids)
    with pytest.raises(UserError, match="give the ids"):
        build_index("exact", emb)
