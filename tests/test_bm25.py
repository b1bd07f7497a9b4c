"""BM25 retrieval and hard-negative mining, and dense + sparse fusion (dpr_jax.hybrid).

References: a from-scratch numpy Lucene BM25, hand-built corpora, hand-computed fused scores.
"""

import math
import re

import numpy as np
import pytest

from dpr_jax.data.bm25 import BM25Retriever, bm25_hard_negatives
from dpr_jax.data.formats import Passage
from dpr_jax.evaluate import has_answer
from dpr_jax.hybrid import linear_fusion, rrf_fusion

CORPUS = [
    Passage(text="The cat sat on the mat in the kitchen.", title="Cats", id="p0"),
    Passage(text="Dogs bark loudly at night and chase cats.", title="Dogs", id="p1"),
    Passage(
        text="In 1858 the Virgin Mary appeared to Bernadette at Lourdes.", title="Lourdes", id="p2"
    ),
    Passage(text="Paris is the capital and largest city of France.", title="Paris", id="p3"),
    Passage(text="The Eiffel Tower was built in 1889 in Paris.", title="Eiffel Tower", id="p4"),
    Passage(
        text="Bernadette Soubirous was a miller's daughter from Lourdes.",
        title="Bernadette",
        id="p5",
    ),
]


def lucene_bm25(docs: list[list[str]], query: list[str], k1: float, b: float) -> np.ndarray:
    """Lucene's BM25, from its definition (no bm25s)."""
    n = len(docs)
    avgdl = sum(len(d) for d in docs) / n
    scores = np.zeros(n)
    for t in query:
        df = sum(t in d for d in docs)
        if df == 0:
            continue
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, d in enumerate(docs):
            tf = d.count(t)
            scores[i] += idf * tf / (tf + k1 * (1 - b + b * len(d) / avgdl))
    return scores


@pytest.fixture(scope="module")
def retriever():
    return BM25Retriever(CORPUS)


def test_top1_on_hand_made_corpus(retriever):
    queries = ["where did the virgin mary appear", "what is the capital of france",
               "when was the eiffel tower built", "cat on a mat", "who was bernadette soubirous"]  # fmt: skip
    scores, ids = retriever.search(queries, k=3)
    assert scores.shape == (5, 3) and scores.dtype == np.float32
    assert [row[0] for row in ids] == ["p2", "p3", "p4", "p0", "p5"]
    assert np.all(np.diff(scores, axis=1) <= 0)  # best first


@pytest.mark.parametrize("k1,b", [(0.9, 0.4), (1.5, 0.75)])
def test_scores_equal_lucene_bm25_definition(k1, b):
    r = BM25Retriever(CORPUS, k1=k1, b=b)
    docs = [re.findall(r"\w+", f"{p.title} {p.text}".lower()) for p in CORPUS]
    for q in ["bernadette lourdes 1858", "paris tower", "cats dogs night"]:
        ref = lucene_bm25(docs, re.findall(r"\w+", q.lower()), k1, b)
        scores, ids = r.search([q], k=len(CORPUS))
        got = dict(zip(ids[0], scores[0].tolist()))
        np.testing.assert_allclose([got[p.id] for p in CORPUS], ref, rtol=1e-5, atol=1e-6)


def test_k_is_clamped_and_input_checked(retriever):
    scores, ids = retriever.search(["paris"], k=100)
    assert scores.shape == (1, len(CORPUS)) and sorted(ids[0]) == sorted(p.id for p in CORPUS)
    with pytest.raises(TypeError):
        retriever.search("paris", k=1)
    with pytest.raises(ValueError, match="unique"):
        BM25Retriever([CORPUS[0], CORPUS[0]])


def test_save_load_round_trip(tmp_path, retriever):
    qs = ["bernadette lourdes", "eiffel tower paris", "dogs"]
    want = retriever.search(qs, k=4)
    retriever.save(tmp_path / "bm25")
    retriever.save(tmp_path / "bm25")  # overwriting an existing index works
    loaded = BM25Retriever.load(tmp_path / "bm25")
    got = loaded.search(qs, k=4)
    np.testing.assert_array_equal(got[0], want[0])
    assert got[1] == want[1]
    assert loaded.config == retriever.config
    with pytest.raises(FileNotFoundError, match="not a dpr-jax BM25 index"):
        BM25Retriever.load(tmp_path)


def test_mine_hard_negatives(retriever):
    questions = ["where did the virgin mary appear to bernadette", "the largest city of france"]
    answers = [["Lourdes"], ["Paris"]]
    rows, scores = bm25_hard_negatives(
        retriever, questions, answers, CORPUS, n=2, depth=6, exclude=[["p0"], []]
    )
    full_s, full_ids = retriever.search(questions, k=6)
    for i in range(2):
        negs = [CORPUS[r] for r in rows[i]]
        assert 0 < len(negs) <= 2
        assert all(not has_answer(answers[i], p.text) for p in negs)
        if i == 0:
            assert "p0" not in [p.id for p in negs]  # excluded
        # they are the best-ranked admissible passages, in BM25 order, with positive scores
        admissible = [
            pid for pid, s in zip(full_ids[i], full_s[i])
            if s > 0 and not has_answer(answers[i], CORPUS[int(pid[1])].text)
            and not (i == 0 and pid == "p0")
        ][:2]  # fmt: skip
        assert [p.id for p in negs] == admissible
        assert scores[i] == sorted(scores[i], reverse=True)
    # "Lourdes" appears in p2 and p5: neither may be a negative of question 0
    assert not {"p2", "p5"} & {CORPUS[r].id for r in rows[0]}


# ---------------------------------------------------------------------------------------------
# Hybrid fusion, hand-computed
#   dense:  a 3, b 2, c 1        sparse: b 10, d 4

DENSE = (np.array([[3.0, 2.0, 1.0]]), [["a", "b", "c"]])
SPARSE = (np.array([[10.0, 4.0]]), [["b", "d"]])


def test_linear_fusion_pyserini_normalization():
    # dense: min 1, max 3 -> (s - 2) / 2: a .5, b 0, c -.5, d (missing: min 1) -.5
    # sparse: min 4, max 10 -> (s - 7) / 6: b .5, d -.5, a and c (missing: min 4) -.5
    s, ids = linear_fusion(*DENSE, *SPARSE, k=4, alpha=1.0)
    assert ids == [["b", "a", "c", "d"]]  # c, d tie at -1: c ranks higher in the dense list
    np.testing.assert_allclose(s, [[0.5, 0.0, -1.0, -1.0]])
    s, ids = linear_fusion(*DENSE, *SPARSE, k=2, alpha=2.0)
    assert ids == [["b", "a"]]
    np.testing.assert_allclose(s, [[1.0, -0.5]])


def test_linear_fusion_minmax_and_raw():
    # minmax: dense a 1, b .5, c 0, d 0; sparse b 1, d 0, a 0, c 0; alpha .5
    s, ids = linear_fusion(*DENSE, *SPARSE, k=4, alpha=0.5, normalization="minmax")
    assert ids == [["a", "b", "c", "d"]]  # a = b = 1.0: a ranks higher in the dense list
    np.testing.assert_allclose(s, [[1.0, 1.0, 0.0, 0.0]])
    s, ids = linear_fusion(*DENSE, *SPARSE, k=4, alpha=0.6, normalization="minmax")
    assert ids == [["b", "a", "c", "d"]]
    np.testing.assert_allclose(s, [[1.1, 1.0, 0.0, 0.0]])
    # raw (DPR's BM25 + lambda * sim): sparse + 1.1 * dense, missing -> list minimum
    s, ids = linear_fusion(*DENSE, *SPARSE, k=4, alpha=1.1, normalization="none",
                           weight_on_dense=True)  # fmt: skip
    # a: 4 + 3.3 = 7.3, b: 10 + 2.2 = 12.2, c: 4 + 1.1 = 5.1, d: 4 + 1.1 = 5.1
    assert ids == [["b", "a", "c", "d"]]
    np.testing.assert_allclose(s, [[12.2, 7.3, 5.1, 5.1]], rtol=1e-6)


def test_linear_fusion_tie_breaks_by_dense_rank():
    s, ids = linear_fusion(np.array([[2.0, 1.0]]), [["x", "y"]], np.array([[1.0, 2.0]]),
                           [["x", "y"]], k=2, normalization="minmax")  # fmt: skip
    np.testing.assert_allclose(s, [[1.0, 1.0]])
    assert ids == [["x", "y"]]


def test_rrf_fusion_hand_computed():
    s, ids = rrf_fusion(*DENSE, *SPARSE, k=4)
    # a 1/61, b 1/62 + 1/61, c 1/63, d 1/62
    assert ids == [["b", "a", "d", "c"]]
    np.testing.assert_allclose(s, [[1 / 62 + 1 / 61, 1 / 61, 1 / 62, 1 / 63]], rtol=1e-6)
    s, ids = rrf_fusion(*DENSE, *SPARSE, k=2, rrf_k=0)
    np.testing.assert_allclose(s, [[1 / 2 + 1, 1.0]])


def test_fusion_ignores_padding_and_pads_short_rows():
    dense = (np.array([[3.0, -np.inf], [1.0, 0.5]]), np.array([["a", ""], ["x", "y"]]))
    sparse = (np.array([[2.0, 1.0], [5.0, 4.0]]), [["a", "b"], ["y", "z"]])
    s, ids = rrf_fusion(*dense, *sparse, k=4)
    assert ids[0] == ["a", "b", "", ""] and np.isneginf(s[0, 2:]).all()
    assert ids[1][:3] == ["y", "x", "z"]
    s, ids = linear_fusion(*dense, *sparse, k=3)
    assert ids[0] == ["a", "b", ""]
    with pytest.raises(ValueError, match="normalization"):
        linear_fusion(*dense, *sparse, normalization="zscore")
    with pytest.raises(ValueError, match="queries"):
        rrf_fusion(*dense, np.array([[1.0]]), [["a"]])
