"""Retrieval on corpora smaller than k: hybrid retrieval and FAISS IVF-PQ
(dpr_jax/search.py HybridRetriever, dpr_jax/index/faiss_index.py build parameters).

References are brute force: numpy inner products for the dense side, and the same fusion
computed at k = the corpus size.
"""

from __future__ import annotations

import numpy as np
import pytest

from dpr_jax.data.bm25 import BM25Retriever
from dpr_jax.data.formats import Passage, Question
from dpr_jax.errors import UserError
from dpr_jax.evaluate import results_for
from dpr_jax.index import build_index
from dpr_jax.search import HybridRetriever

PASSAGES = [
    Passage(text="the cat sat on the mat", title="Cats", id="a"),
    Passage(text="dogs bark at night", title="Dogs", id="b"),
    Passage(text="birds fly south in winter", title="Birds", id="c"),
]
QUESTIONS = [Question("where did the cat sit?", ["mat"]), Question("what do dogs do?", ["bark"])]
DIM = 8


class _StubDense:
    """A dense retriever with fixed question vectors over a real exact index."""

    def __init__(self, index, q_vecs):
        self.index, self.q_vecs = index, q_vecs

    def search(self, questions, k):
        return self.index.search(self.q_vecs[: len(questions)], k)


@pytest.fixture(scope="module")
def hybrid_parts():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((len(PASSAGES), DIM)).astype(np.float32)
    q = rng.standard_normal((len(QUESTIONS), DIM)).astype(np.float32)
    index = build_index("exact", emb, [p.id for p in PASSAGES])
    return _StubDense(index, q), BM25Retriever(PASSAGES), emb, q


@pytest.mark.parametrize("method", ["linear", "rrf"])
def test_hybrid_with_k_larger_than_the_corpus(hybrid_parts, method):
    dense, sparse, emb, q = hybrid_parts
    retriever = HybridRetriever(dense, sparse, method)
    scores, ids = retriever.search([x.question for x in QUESTIONS], k=10)
    assert np.asarray(scores).shape == (2, 3)  # clamped to the corpus
    assert all(sorted(row) == ["a", "b", "c"] for row in ids)
    ref_scores, ref_ids = retriever.search([x.question for x in QUESTIONS], k=3)
    assert [list(r) for r in ids] == [list(r) for r in ref_ids]
    np.testing.assert_array_equal(scores, ref_scores)
    # the dense order among the three agrees with brute force where BM25 has no opinion
    brute = [[PASSAGES[j].id for j in np.argsort(-(emb @ v))] for v in q]
    assert sorted(brute[0]) == sorted(ids[0])
    # the results file has every passage once per question, nothing padded
    passages = {p.id: p for p in PASSAGES}
    out = results_for(QUESTIONS, scores, ids, passages)
    assert [len(r["ctxs"]) for r in out] == [3, 3]
    assert [c["has_answer"] for c in out[0]["ctxs"] if c["id"] == "a"] == [True]


def test_results_skip_index_padding(hybrid_parts):
    passages = {p.id: p for p in PASSAGES}
    scores = np.array([[1.0, 0.5, -np.inf, -np.inf]], np.float32)
    out = results_for(QUESTIONS[:1], scores, [["a", "b", "", ""]], passages)
    assert [c["id"] for c in out[0]["ctxs"]] == ["a", "b"]
    with pytest.raises(UserError, match="'zz'"):  # an unknown real id is still an error
        results_for(QUESTIONS[:1], scores[:, :1], [["zz"]], passages)


# ---------------------------------------------------------------------------------------------
# FAISS IVF-PQ build parameters


@pytest.mark.parametrize("n", [2, 3, 5, 20, 300])
def test_ivfpq_adapts_to_small_corpora(n):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(n)
    emb = rng.standard_normal((n, 16)).astype(np.float32)
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    ids = [f"p{i}" for i in range(n)]
    index = build_index("faiss-ivfpq", emb, ids)
    o = index.options
    assert 2 ** o["nbits"] <= n and o["nlist"] <= n
    assert o["nbits"] == min(8, int(np.log2(n)))
    k = min(n, 5)
    scores, got = index.search(queries, 10)
    assert np.asarray(scores).shape == (4, min(n, 10)) and np.isfinite(scores).all()
    # one probed list and exact refinement: the true top-k by brute force
    if o["nlist"] == 1:
        brute = np.argsort(-(queries @ emb.T), axis=1)[:, :k]
        assert [list(r[:k]) for r in got] == [[ids[j] for j in row] for row in brute]


def test_ivfpq_says_what_minimum_it_needs():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((20, 16)).astype(np.float32)
    ids = [f"p{i}" for i in range(20)]
    with pytest.raises(
        ValueError, match=r"1 training vectors are too few: IVF-PQ needs at least 2"
    ):
        build_index("faiss-ivfpq", emb[:1], ids[:1])
    with pytest.raises(ValueError, match=r"needs at least 16 with fast_scan"):
        build_index("faiss-ivfpq", emb[:8], ids[:8], fast_scan=True)
    with pytest.raises(ValueError, match=r"nbits=8 trains 256 centroids .* use nbits <= 4"):
        build_index("faiss-ivfpq", emb, ids, nbits=8)
    with pytest.raises(ValueError, match=r"nlist=50 needs at least 50 .* use nlist <= 20"):
        build_index("faiss-ivfpq", emb, ids, nlist=50)
    fast = build_index("faiss-ivfpq", emb, ids, fast_scan=True)
    assert fast.options["nbits"] == 4


# ---------------------------------------------------------------------------------------------
# every backend: exactly min(k, n) distinct passages (issue 19, item 4)

# backend, options (beyond one thread): each backend at its defaults, and ScaNN's tree + AH
# (whose default below 20k vectors is brute force)
BACKENDS = [
    ("exact", {}),
    ("scann-bf", {}),
    ("faiss-flat", {}),
    ("faiss-hnsw", {}),
    ("faiss-ivfpq", {}),
    ("faiss-ivfpq", {"refine": False}),
    ("scann", {}),
    ("scann", {"scoring": "ah", "num_leaves": 10, "min_partition_size": 1}),
]
EXACT = {"exact", "scann-bf", "faiss-flat"}


def _corpus(kind: str, n: int = 106, d: int = 32):
    """106 Gaussian vectors (a small corpus: IVF-PQ had 2 lists, 1 probed: 48-58 of k=100), or
    106 near-identical ones (k-means leaves most lists empty: 0 passages for most questions)."""
    rng = np.random.default_rng(7)
    queries = rng.standard_normal((21, d)).astype(np.float32)
    if kind == "gaussian":
        return rng.standard_normal((n, d)).astype(np.float32), queries
    base = rng.standard_normal(d)
    return (base + 1e-4 * rng.standard_normal((n, d))).astype(np.float32), queries


@pytest.mark.parametrize("corpus", ["gaussian", "near_identical"])
@pytest.mark.parametrize(("backend", "options"), BACKENDS, ids=lambda x: str(x) if x else "")
def test_every_backend_returns_min_k_n_distinct_passages(backend, options, corpus):
    if backend != "exact":
        pytest.importorskip("faiss" if backend.startswith("faiss") else "scann")
    from dpr_jax.index import index_class

    emb, queries = _corpus(corpus)
    ids = np.array([f"p{i}" for i in range(len(emb))])
    cls = index_class(backend)
    extra = {"num_threads": 1} if "num_threads" in cls.DEFAULTS else {}
    index = build_index(backend, emb, ids, **extra, **options)
    ref = queries.astype(np.float64) @ emb.astype(np.float64).T  # (Q, D) . (D, N) -> (Q, N)
    for k in (100, 500):
        want = min(k, len(emb))
        scores, got = index.search(queries, k)
        assert got.shape == scores.shape == (len(queries), want)
        assert all(len(set(row)) == want and "" not in row for row in got.tolist())
        assert np.isfinite(scores).all() and (np.diff(scores, axis=1) <= 1e-5).all()
        if options.get("refine", True):  # true inner products (else PQ's approximate ones)
            rows = np.vectorize(lambda s: int(s[1:]))(got)
            np.testing.assert_allclose(scores, np.take_along_axis(ref, rows, 1), atol=1e-3)
        if backend in EXACT:  # brute force, score for score
            np.testing.assert_allclose(scores, -np.sort(-ref, axis=1)[:, :want], atol=1e-4)
            if corpus == "gaussian":
                np.testing.assert_array_equal(got, ids[np.argsort(-ref, axis=1)[:, :want]])


def test_ivfpq_defaults_give_kmeans_faiss_minimum_per_list():
    """Large corpora: the default training sample grows with nlist so that k-means has FAISS's
    own minimum of training vectors per list (ClusteringParameters.min_points_per_centroid,
    below which FAISS warns); up to 1.6M vectors it stays 250,000."""
    faiss = pytest.importorskip("faiss")
    from dpr_jax.index.faiss_index import FaissIVFPQIndex

    least = faiss.ClusteringParameters().min_points_per_centroid
    for n, lists, sample in [(1_000_000, 4000, 250_000), (10_000_000, 12_649, 493_311),
                             (100_000_000, 40_000, 1_560_000)]:  # fmt: skip
        ix = FaissIVFPQIndex()
        ix._resolve(n, 384)
        assert (ix.options["nlist"], ix.options["training_sample_size"]) == (lists, sample)
        assert sample >= least * lists
    ix = FaissIVFPQIndex(nlist=20_000)  # an explicit nlist: the sample follows it
    ix._resolve(10_000_000, 384)
    assert ix.options["training_sample_size"] == least * 20_000
    ix = FaissIVFPQIndex(training_sample_size=100_000, nlist=5_000)  # explicit: kept
    ix._resolve(10_000_000, 384)
    assert ix.options["training_sample_size"] == 100_000


def test_scann_default_sample_is_autopilots_per_leaf():
    """ScaNN's tree trains k-means on as many vectors a leaf as ScaNN's own autopilot() does
    (read from ``suggest_autopilot``'s config, not copied: 200 a leaf), at least 250,000 and at
    most n; an explicit sample is kept. Fewer a leaf gave poor leaves at 10M (README)."""
    import re

    sp = pytest.importorskip("scann").scann_ops_pybind
    from dpr_jax.index.scann_index import ScannIndex

    b = sp.builder(np.zeros((1, 384), np.float32), 10, "dot_product").autopilot()
    config = super(type(b), b).create_config()
    for n in (1_000_000, 10_000_000, 21_015_324):
        text = sp.scann_pybind.ScannNumpy.suggest_autopilot(config, n, 384)
        leaves = int(re.search(r"num_children:\s*(\d+)", text).group(1))
        tree = text[text.index("partitioning {") : text.index("hash {")]  # not AH's sample
        sample = int(re.search(r"expected_sample_size:\s*(\d+)", tree).group(1))
        ix = ScannIndex(num_leaves=leaves)
        ix._resolve(n)
        assert ix.options["training_sample_size"] == min(n, max(250_000, sample))
        ix = ScannIndex()  # the default leaves, sqrt(n)
        ix._resolve(n)
        per_leaf = sample / leaves
        assert ix.options["training_sample_size"] == max(
            250_000, per_leaf * ix.options["num_leaves"]
        )
    ix = ScannIndex(training_sample_size=100_000)
    ix._resolve(10_000_000)
    assert ix.options["training_sample_size"] == 100_000
    ix = ScannIndex()
    ix._resolve(300_000)  # 548 leaves: 109,600 < 250,000 <= n
    assert ix.options["training_sample_size"] == 250_000
