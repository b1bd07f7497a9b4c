"""Search knobs tuned to a recall target (dpr_jax.index.tune): the tuned setting reaches the
target on held-out queries, is saved, and is applied after reload; the choice logic on a fake
index with a fake clock (no timed assertions)."""

import json

import numpy as np
import pytest

from dpr_jax.cli import main
from dpr_jax.cli.index import cli_main
from dpr_jax.embeddings import EmbeddingWriter
from dpr_jax.index import build_index, load_index
from dpr_jax.index.base import INDEX_CONFIG, MANIFEST, Index
from dpr_jax.index.tune import TuneError, exact_neighbours, ladder, recall_at_k, tune

pytest.importorskip("faiss", reason="pip install 'dpr-jax[faiss]'")
pytest.importorskip("scann", reason="pip install 'dpr-jax[scann]'")

# The tuned setting just reaches the target on the tuning queries; on other queries its recall
# varies by sampling error (~0.01 for 300 queries x 10 neighbours at recall 0.9): allow 0.03.
SLACK = 0.03


def brute_force_rows(queries, emb, k):
    s = queries.astype(np.float64) @ emb.astype(np.float64).T  # (Q, D) . (D, N) -> (Q, N)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


@pytest.fixture(scope="module")
def corpus():
    """Unit vectors around 300 random centres in 32 dims, overlapping (noise 0.35), and two
    independent query sets drawn the same way: one to tune on, one held out."""
    rng = np.random.default_rng(7)
    d = 32
    centres = rng.standard_normal((300, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m, noise):
        x = centres[rng.integers(len(centres), size=m)] + noise * rng.standard_normal((m, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    emb = draw(20000, 0.35)
    ids = np.array([f"c{i}" for i in range(len(emb))])
    tune_q, held_q = draw(300, 0.4), draw(300, 0.4)
    return emb, ids, tune_q, held_q, ids[brute_force_rows(held_q, emb, 10)]


BACKENDS = {
    "scann": {"num_leaves": 141, "scoring": "ah", "num_threads": 1},
    "faiss-hnsw": {"M": 16, "ef_construction": 40, "num_threads": 1},
    "faiss-ivfpq": {"num_threads": 1},
}


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_tuned_setting_reaches_the_target_on_held_out_queries(backend, corpus, tmp_path):
    emb, ids, tune_q, held_q, held_true = corpus
    target = 0.9
    index = build_index(backend, emb, ids, **BACKENDS[backend])
    tuned = tune(index, emb, tune_q, target, k=10)
    params = tuned["params"]
    assert set(params) == {name for name, _ in index.tune_space(10)}
    assert tuned["k"] == 10 and tuned["target_recall"] == target and tuned["qps"] > 0
    # the recorded recall is the tuning queries' recall at params (recomputed independently)
    tune_true = ids[brute_force_rows(tune_q, emb, 10)]
    recall_tune = recall_at_k(index.search(tune_q, 10, **params)[1], tune_true)
    assert recall_tune == pytest.approx(tuned["recall"]) and recall_tune >= target
    # ... and the setting generalises to queries it never saw
    held = recall_at_k(index.search(held_q, 10, **params)[1], held_true)
    assert held >= target - SLACK, f"{backend} {params}: held-out recall {held:.3f}"
    # cheaper than the most expensive setting, and the most expensive one was not needed
    space = index.tune_space(10)
    assert any(params[name] < values[-1] for name, values in space)
    # minimal: one step less of the last knob misses the target on the tuning queries
    name, values = space[-1]
    i = values.index(params[name])
    if i > 0:
        lower = {**params, name: values[i - 1]}
        assert recall_at_k(index.search(tune_q, 10, **lower)[1], tune_true) < target
    # searches now use the tuned setting by default; a per-call override still wins
    default = index.search(held_q, 10)
    np.testing.assert_array_equal(default[1], index.search(held_q, 10, **params)[1])
    # recorded in index_config.json and applied after reload
    index.save(tmp_path / "ix")
    saved = json.loads((tmp_path / "ix" / INDEX_CONFIG).read_text())["tuned"]
    assert saved["params"] == params and saved["recall"] == tuned["recall"]
    again = load_index(tmp_path / "ix")
    assert again.tuned == saved
    np.testing.assert_array_equal(again.search(held_q, 10)[1], default[1])


class FakeIndex(Index):
    """Returns the exact top-k for a fraction r(a, b) of the queries and the k worst passages for
    the rest (recall 0: a full list of wrong passages, as every backend returns k), and
    advances a fake clock by cost(a, b) per search."""

    backend = "fake"
    DEFAULTS = {}
    SEARCH_PARAMS = ("a", "b")
    clock = [0.0]

    def tune_space(self, k):
        return [("a", [1, 2, 3, 4, 5, 6]), ("b", [1, 2, 4, 8, 16])]

    def _build(self, emb):
        self.emb = emb

    def _search(self, queries, k, a=1, b=1):
        FakeIndex.clock[0] += {1: 1.0, 2: 2.0, 3: 2.5, 4: 9.0, 5: 9.5, 6: 10.0}[a] + 0.3 * b
        good = int(round(len(queries) * min(1.0, 0.12 * a + 0.08 * np.log2(2 * b))))
        rows = exact_neighbours(self.emb, queries, k)
        rows[good:] = exact_neighbours(self.emb, -queries[good:], k)  # the worst for the others
        return np.zeros(rows.shape, np.float32), rows

    def _save_files(self, directory):
        pass

    def _load_files(self, directory):
        pass


def test_choice_is_the_fastest_setting_that_reaches_the_target():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((500, 8)).astype(np.float32)
    queries = rng.standard_normal((100, 8)).astype(np.float32)
    index = FakeIndex().build(emb, np.arange(500))

    tuned = tune(index, emb, queries, 0.7, k=5, repeats=1, clock=lambda: FakeIndex.clock[0])
    # r(a, b) = 0.12 a + 0.08 log2(2 b) >= 0.7 first at: a=1 b=16 (0.52 no), a=2 b=16 (0.64 no),
    # a=3 b=8 (0.68 no) b=16 (0.76), a=4 b=4 (0.72), a=5 b=2 (0.76), a=6 b=1 (0.80)
    cands = {(c["params"]["a"], c["params"]["b"]): c["qps"] for c in tuned["candidates"]}
    assert set(cands) == {(3, 16), (4, 4), (5, 2), (6, 1)}
    # cost 2.5 + 0.3 * 16 = 7.3 beats 9 + 1.2, 9.5 + 0.6, 10 + 0.3
    assert tuned["params"] == {"a": 3, "b": 16}
    assert tuned["qps"] == pytest.approx(100 / 7.3, rel=1e-3)
    assert tuned["recall"] == pytest.approx(0.76)
    assert index.tuned is tuned


def test_candidates_are_timed_in_rounds():
    """A spell of load over the first two timed searches (each 3x its cost): timed one after
    another, both runs of the fastest candidate would fall in it and tune would pick (4, 4);
    timed in rounds, every candidate runs once before any runs again, and the pick stands."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((500, 8)).astype(np.float32)
    queries = rng.standard_normal((100, 8)).astype(np.float32)
    index = FakeIndex().build(emb, np.arange(500))
    real, calls, slow = index._search, [], set()

    def search(q, k, **p):
        i, before = len(calls), FakeIndex.clock[0]
        calls.append((p["a"], p["b"]))
        out = real(q, k, **p)
        if i in slow:
            FakeIndex.clock[0] += 2 * (FakeIndex.clock[0] - before)
        return out

    index._search = search

    def run():
        return tune(index, emb, queries, 0.7, k=5, repeats=2, clock=lambda: FakeIndex.clock[0])

    quiet = run()
    first_timed = len(calls) - 2 * len(quiet["candidates"])  # recall searches come first
    calls.clear()
    slow.update({first_timed, first_timed + 1})
    loaded = run()
    order = [(c["params"]["a"], c["params"]["b"]) for c in quiet["candidates"]]
    assert calls[first_timed:] == order + order
    assert loaded["params"] == quiet["params"] == {"a": 3, "b": 16}


def test_cache_measures_and_times_each_setting_once():
    """Several targets with one cache: the same candidates and choices as tuning each target
    alone, while no setting is searched twice (its recall) or timed twice (its speed)."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((500, 8)).astype(np.float32)
    queries = rng.standard_normal((100, 8)).astype(np.float32)
    index = FakeIndex().build(emb, np.arange(500))
    searches = []
    real = index._search
    index._search = lambda q, k, **p: searches.append(tuple(sorted(p.items()))) or real(q, k, **p)

    def run(target, cache):
        return tune(index, emb, queries, target, k=5, repeats=1,
                    clock=lambda: FakeIndex.clock[0], cache=cache)  # fmt: skip

    alone = {t: run(t, None) for t in (0.7, 0.75)}
    n_alone = len(searches)
    searches.clear()
    cache = {}
    shared = {t: run(t, cache) for t in (0.7, 0.75)}
    for t in alone:
        assert shared[t]["params"] == alone[t]["params"]
        assert [c["params"] for c in shared[t]["candidates"]] == [
            c["params"] for c in alone[t]["candidates"]]  # fmt: skip
    # each distinct setting searched once for its recall and once more if timed
    timed = {tuple(sorted(c["params"].items())) for t in shared for c in shared[t]["candidates"]}
    assert len(searches) == len(set(searches)) + len(timed) < n_alone


def test_unreachable_target_and_exact_backends_are_refused(corpus):
    emb, ids, tune_q, _, _ = corpus
    index = build_index("faiss-hnsw", emb[:2000], ids[:2000], M=4, num_threads=1)
    with pytest.raises(TuneError, match="not reached.*the best was"):
        tune(index, emb[:2000], tune_q, 1.0, k=10)  # ... unless M=4 happens to be perfect
    assert index.tuned is None
    exact = build_index("exact", emb[:100], ids[:100])
    with pytest.raises(TuneError, match="no search knob"):
        tune(exact, emb[:100], tune_q, 0.9)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        tune(index, emb[:2000], tune_q, 1.5)


def test_ladder():
    assert ladder(1, 10) == [1, 2, 3, 5, 8, 10]
    assert ladder(10, 100, ratio=2) == [10, 20, 40, 100]
    assert ladder(10, 10) == [10]
    assert ladder(3, 5, ratio=2) == [3, 5]


def test_a_bad_tuned_field_is_refused_on_load(corpus, tmp_path):
    emb, ids, _, _, _ = corpus
    index = build_index("faiss-hnsw", emb[:500], ids[:500], M=8, num_threads=1)
    index.tuned = {"params": {"nprobe": 3}}
    index.save(tmp_path / "ix")
    with pytest.raises(ValueError, match=r"index_config.json: 'tuned' must hold"):
        load_index(tmp_path / "ix")


def test_cli_tunes_records_and_refuses_bad_input(corpus, tmp_path, capsys):
    emb, ids, tune_q, held_q, held_true = corpus
    emb_dir = tmp_path / "emb"
    w = EmbeddingWriter(emb_dir, config={"model": "tiny", "dim": 32, "dtype": "float32"})
    w.write_chunk(0, ids, emb)
    np.save(tmp_path / "q.npy", tune_q)
    base = ["--embeddings", str(emb_dir), "--backend", "faiss-hnsw", "--threads", "1",
            "--option", "M=16"]  # fmt: skip
    out = tmp_path / "ix"
    argv = base + ["--out", str(out), "--target-recall", "0.95",
                   "--tune-queries", str(tmp_path / "q.npy"), "--tune-k", "10"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "tuned for recall@10 >= 0.95 on 300 queries" in capsys.readouterr().err
    index = load_index(out)
    assert index.tuned["target_recall"] == 0.95 and index.tuned["recall"] >= 0.95
    assert set(index.tuned["params"]) == {"ef_search"}
    assert recall_at_k(index.search(held_q, 10)[1], held_true) >= 0.95 - SLACK

    with pytest.raises(FileNotFoundError, match="missing.npy: --tune-queries file not found"):
        cli_main(base + ["--out", str(tmp_path / "x"), "--target-recall", "0.9",
                         "--tune-queries", str(tmp_path / "missing.npy")])  # fmt: skip
    np.save(tmp_path / "bad.npy", tune_q[:, :5])
    with pytest.raises(ValueError, match=r"bad.npy: tuning queries must be .* \(Q, 32\)"):
        cli_main(base + ["--out", str(tmp_path / "x"), "--target-recall", "0.9",
                         "--tune-queries", str(tmp_path / "bad.npy")])  # fmt: skip
    for extra in (["--target-recall", "0.9"],
                  ["--target-recall", "1.2", "--tune-queries", str(tmp_path / "q.npy")]):  # fmt: skip
        assert main(["index", *base, "--out", str(tmp_path / "x"), *extra]) == 2
    assert main(["index", "--embeddings", str(emb_dir), "--backend", "exact", "--out",
                 str(tmp_path / "x"), "--target-recall", "0.9", "--tune-queries",
                 str(tmp_path / "q.npy")]) == 2  # fmt: skip
    assert not (tmp_path / "x" / MANIFEST).exists()
