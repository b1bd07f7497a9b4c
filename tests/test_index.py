"""Index backends against numpy brute force: exactness, recall, save/load, integrity, CLI."""

import json

import jax
import numpy as np
import pytest

from dpr_jax.cli.index import cli_main, parse_option
from dpr_jax.embeddings import EmbeddingWriter
from dpr_jax.index import BACKENDS, IndexIntegrityError, build_index, load_index
from dpr_jax.index.base import MANIFEST
from dpr_jax.io import OutputPathError

pytest.importorskip("faiss", reason="pip install 'dpr-jax[faiss]'")
pytest.importorskip("scann", reason="pip install 'dpr-jax[scann]'")

EXACT = ["exact", "scann-bf", "faiss-flat"]
ANN = ["scann", "faiss-hnsw", "faiss-ivfpq"]
FAST = {"num_threads": 1}  # results do not depend on threads; 1 avoids OpenMP contention in CI


def _opts(backend, **extra):
    return {**(FAST if "num_threads" in _cls(backend).DEFAULTS else {}), **extra}


def _cls(backend):
    from dpr_jax.index import index_class

    return index_class(backend)


def brute_force(queries, emb, k):
    s = queries.astype(np.float64) @ emb.astype(np.float64).T  # (Q, D) . (D, N) -> (Q, N)
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, rows, axis=1), rows


def clustered(n, d, n_clusters, n_queries, seed):
    """Unit vectors around random centres; queries are perturbed fresh draws (not corpus rows)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, d))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def draw(m, noise):
        x = centres[rng.integers(n_clusters, size=m)] + noise * rng.standard_normal((m, d))
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)

    return draw(n, 0.1), draw(n_queries, 0.15)


def recall_at_k(ids, true_ids):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(ids, true_ids)])


@pytest.fixture(scope="module")
def gaussian():
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((1003, 24)).astype(np.float32)  # 1003: not a multiple of 8
    queries = rng.standard_normal((40, 24)).astype(np.float32)
    ids = np.array([f"doc{i}" for i in range(len(emb))])
    return emb, queries, ids


@pytest.fixture(scope="module")
def clustered_20k():
    emb, queries = clustered(20000, 64, 200, 200, seed=1)
    ids = np.array([f"c{i}" for i in range(len(emb))])
    _, rows = brute_force(queries, emb, 10)
    return emb, queries, ids, ids[rows]


@pytest.mark.parametrize("backend", EXACT)
def test_exact_backends_equal_numpy(backend, gaussian):
    emb, queries, ids = gaussian
    index = build_index(backend, emb, ids, **_opts(backend))
    scores, got = index.search(queries, 10)
    want_scores, rows = brute_force(queries, emb, 10)
    assert scores.dtype == np.float32 and scores.shape == (40, 10)
    np.testing.assert_array_equal(got, ids[rows])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    # k beyond the corpus is clamped and still exact
    scores, got = index.search(queries[:3], 5000)
    want_scores, rows = brute_force(queries[:3], emb, len(emb))
    np.testing.assert_array_equal(got, ids[rows])


def test_exact_jax_on_8_devices_uneven_corpus(gaussian):
    assert jax.device_count() == 8
    emb, queries, ids = gaussian
    # 1003 rows over 8 devices, 3 blocks per device: padding rows and the running top-k are used
    index = build_index("exact", emb.astype(np.float16), ids, block_size=50, query_batch_size=16)
    assert index._emb.sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert index._n_blocks == 3 and len(index._emb) > len(emb)
    scores, got = index.search(queries, 7)  # 40 queries: 3 batches, the last one padded
    want_scores, rows = brute_force(queries, emb.astype(np.float16).astype(np.float32), 7)
    np.testing.assert_array_equal(got, ids[rows])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)
    # a corpus smaller than the device count: some devices hold only padding
    scores, got = build_index("exact", emb[:5], ids[:5]).search(queries, 5)
    np.testing.assert_array_equal(got, ids[brute_force(queries, emb[:5], 5)[1]])
    assert np.isfinite(scores).all()


@pytest.mark.parametrize("backend", ANN)
def test_ann_recall_at_default_settings(backend, clustered_20k):
    emb, queries, ids, true_ids = clustered_20k
    index = build_index(backend, emb, ids, **_opts(backend))
    scores, got = index.search(queries, 10)
    recall = recall_at_k(got, true_ids)
    assert recall >= 0.9, f"{backend} recall@10 = {recall:.3f} with {index.options}"
    # returned scores are true inner products of the returned ids (reorder / refine / flat)
    rows = np.vectorize(lambda s: int(s[1:]))(got)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, emb[rows]), atol=1e-4)


def test_ivfpq_refine_dtypes(clustered_20k, tmp_path):
    """refine_dtype float16 / int8 keep the refine vectors in 2 / 1 bytes a dimension (the index
    shrinks by 2 / 3 bytes a dimension a vector, nothing else changes), recall as the float32
    refine's, scores within the codes' rounding of the true inner products; saved and loaded
    alike."""
    emb, queries, ids, true_ids = clustered_20k
    n, d = emb.shape
    got, size = {}, {}
    for dt in ("float32", "float16", "int8"):
        index = build_index("faiss-ivfpq", emb, ids, num_threads=1, refine_dtype=dt)
        scores, got[dt] = index.search(queries, 10)
        size[dt] = index.size_bytes()
        rows = np.vectorize(lambda s: int(s[1:]))(got[dt])
        true = np.einsum("qd,qkd->qk", queries, emb[rows])
        tol = {"float32": 1e-4, "float16": 2e-3, "int8": 2e-2}[dt]
        np.testing.assert_allclose(scores, true, atol=tol)
        assert recall_at_k(got[dt], true_ids) >= 0.9, dt
        loaded = load_index(index.save(tmp_path / dt))
        assert loaded.options["refine_dtype"] == dt
        np.testing.assert_array_equal(loaded.search(queries, 10)[1], got[dt])
    assert size["float32"] - size["float16"] == pytest.approx(2 * n * d, abs=200)
    assert size["float32"] - size["int8"] == pytest.approx(3 * n * d, abs=8 * d + 200)
    same = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got["float16"], got["float32"])])
    assert same >= 0.99  # float16 rescoring reorders only near-ties
    with pytest.raises(ValueError, match="refine_dtype"):
        build_index("faiss-ivfpq", emb[:500], ids[:500], refine_dtype="bfloat16")


@pytest.mark.parametrize(
    "backend, options",
    [
        ("faiss-flat", {}),
        ("faiss-hnsw", {"M": 8}),
        ("faiss-ivfpq", {"refine": False}),
        ("faiss-ivfpq", {"fast_scan": True, "refine": False}),
        ("faiss-ivfpq", {}),
        ("faiss-ivfpq", {"refine_dtype": "float16"}),
        ("faiss-ivfpq", {"refine_dtype": "int8", "fast_scan": True}),
    ],
)
def test_factory_key_is_the_index_faiss_builds_from_it(backend, options, gaussian):
    """``factory_key()`` (the bench's ``index_factory`` column) read back by FAISS's own
    ``index_factory`` gives an index of the same kinds, list count, codes and refine store."""
    import faiss

    emb, _, ids = gaussian
    index = build_index(backend, emb, ids, **_opts(backend, **options))
    made = faiss.index_factory(emb.shape[1], index.factory_key(), faiss.METRIC_INNER_PRODUCT)

    def shape(ix):
        ix = faiss.downcast_index(ix)
        if isinstance(ix, faiss.IndexRefine):  # IndexRefineFlat is one
            return [type(ix).__name__, shape(ix.base_index), shape(ix.refine_index)]
        if isinstance(ix, faiss.IndexFlat):  # IndexFlatIP is one
            return ["Flat"]
        if isinstance(ix, faiss.IndexScalarQuantizer):
            return ["SQ", int(ix.sq.qtype)]
        if isinstance(ix, faiss.IndexHNSW):
            return ["HNSW", ix.hnsw.nb_neighbors(1), shape(ix.storage)]  # M (level 0: 2 M)
        if isinstance(ix, faiss.IndexIVF):
            return [type(ix).__name__, ix.nlist, ix.code_size, shape(ix.quantizer)]
        raise AssertionError(f"unexpected FAISS index {type(ix).__name__}")

    assert shape(made) == shape(index.index)
    assert made.metric_type == index.index.metric_type == faiss.METRIC_INNER_PRODUCT


def test_scann_tree_recall_and_overrides(clustered_20k):
    emb, queries, ids, true_ids = clustered_20k
    index = build_index("scann", emb, ids, num_leaves=141, scoring="ah", num_threads=1)
    assert index.options["num_leaves_to_search"] == 15  # resolved default: ceil(141 / 10)
    assert recall_at_k(index.search(queries, 10)[1], true_ids) >= 0.9
    # every leaf, every AH candidate reordered: exactly brute force
    _, got = index.search(queries[:20], 10, leaves_to_search=141, pre_reorder_num_neighbors=20000)
    np.testing.assert_array_equal(got, true_ids[:20])
    with pytest.raises(ValueError, match="unknown search parameter"):
        index.search(queries, 10, nprobe=3)


def test_ivfpq_overrides_reach_exact(gaussian):
    emb, queries, ids = gaussian
    index = build_index("faiss-ivfpq", emb, ids, num_threads=1)
    nlist = index.options["nlist"]
    _, got = index.search(queries, 10, nprobe=nlist, k_factor=len(emb) / 10)
    np.testing.assert_array_equal(got, ids[brute_force(queries, emb, 10)[1]])


def test_fewer_candidates_than_k_widen_the_search(gaussian):
    emb, queries, ids = gaussian
    index = build_index("scann", emb, ids, scoring="ah", num_leaves=20, num_leaves_to_search=1,
                        training_sample_size=1003, min_partition_size=10, num_threads=1)  # fmt: skip
    scores, got = index.search(queries, 300)  # one leaf of ~50 points cannot fill 300: widened
    assert got.shape == (40, 300) and (got != "").all()
    assert all(len(set(row)) == 300 for row in got.tolist())
    rows = np.vectorize(lambda s: int(s[3:]))(got)
    true = np.einsum("qd,qkd->qk", queries, emb[rows])
    np.testing.assert_allclose(scores, true, atol=1e-4)


def test_short_rows_fall_back_to_exact_search_over_the_stored_vectors(gaussian, monkeypatch):
    """A backend that keeps coming back short (here: -1s and a repeated row at every width)
    ends with exact search over its own flat store: the brute-force top-k."""
    emb, queries, ids = gaussian
    index = build_index("faiss-hnsw", emb, ids, num_threads=1)
    real = index._search

    def short(q, k, **params):
        s, r = real(q, k, **params)
        r[:, 1], r[:, -1] = r[:, 0], -1  # a duplicate and a hole in every row
        return s, r

    monkeypatch.setattr(index, "_search", short)
    scores, got = index.search(queries, 10)
    want_scores, rows = brute_force(queries, emb, 10)
    np.testing.assert_array_equal(got, ids[rows])
    np.testing.assert_allclose(scores, want_scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_save_load_identical(backend, gaussian, tmp_path):
    emb, queries, ids = gaussian
    extra = {"scoring": "ah", "num_leaves": 10} if backend == "scann" else {}
    index = build_index(backend, emb, ids, **_opts(backend, **extra))
    index.meta = {"note": "made by a test"}
    before = index.search(queries, 10)
    path = index.save(tmp_path / "idx")
    loaded = load_index(path)
    assert type(loaded) is type(index) and loaded.config["options"] == index.options
    assert loaded.meta == {"note": "made by a test"} and loaded.size == len(emb)
    after = loaded.search(queries, 10)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert index.size_bytes() > 0
    if backend.startswith("faiss"):  # counted as FAISS writes it: the saved file's size
        assert index.size_bytes() == (path / "faiss.index").stat().st_size
    manifest = json.loads((path / MANIFEST).read_text())
    assert {"ids.npy", "index_config.json"} <= set(manifest["files"])


@pytest.mark.parametrize("backend", ["exact", "scann", "faiss-hnsw"])
def test_corrupt_or_truncated_index_refused(backend, gaussian, tmp_path):
    emb, _, ids = gaussian
    extra = {"scoring": "ah", "num_leaves": 10} if backend == "scann" else {}
    path = build_index(backend, emb, ids, **_opts(backend, **extra)).save(tmp_path / "idx")
    files = [p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST]
    main = max(files, key=lambda p: p.stat().st_size)  # the vectors / codes / graph
    good = main.read_bytes()

    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    main.write_bytes(bytes(bad))
    with pytest.raises(IndexIntegrityError, match=rf"{main.name}.*checksum"):
        load_index(path)

    main.write_bytes(good[: len(good) - 100])
    for verify in (True, False):
        with pytest.raises(IndexIntegrityError, match=rf"{main.name}.*truncated"):
            load_index(path, verify=verify)

    main.write_bytes(good)
    load_index(path)
    (path / "ids.npy").unlink()
    with pytest.raises(IndexIntegrityError, match="ids.npy"):
        load_index(path)


def test_failed_save_keeps_the_old_index(gaussian, tmp_path, monkeypatch):
    emb, queries, ids = gaussian
    path = build_index("faiss-flat", emb, ids, num_threads=1).save(tmp_path / "idx")
    other = build_index("faiss-flat", emb[:100], ids[:100], num_threads=1)

    def boom(directory):
        (directory / "faiss.index").write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(other, "_save_files", boom)
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    assert load_index(path).size == len(emb)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary dirs left

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.txt").write_text("x")
    with pytest.raises(OutputPathError, match="no dpr-jax artifact"):
        build_index("faiss-flat", emb, ids).save(tmp_path / "data")
    assert (tmp_path / "data" / "precious.txt").read_text() == "x"


def test_bad_inputs_are_refused(gaussian):
    emb, queries, ids = gaussian
    with pytest.raises(ValueError, match="unknown index backend"):
        build_index("annoy", emb, ids)
    with pytest.raises(ValueError, match="unknown option"):
        build_index("faiss-hnsw", emb, ids, efSearch=3)
    bad = emb.copy()
    bad[7, 3] = np.nan
    with pytest.raises(ValueError, match="row 7 .id 'doc7'. is not finite"):
        build_index("faiss-flat", bad, ids)
    index = build_index("faiss-flat", emb, ids)
    with pytest.raises(ValueError, match=r"queries must be \(Q, 24\)"):
        index.search(queries[:, :10], 5)


# backend, option, value as typed on the command line
BAD_OPTIONS = [
    ("faiss-hnsw", "M", "-4"),  # was an OOM kill
    ("faiss-hnsw", "M", "0"),
    ("faiss-hnsw", "M", "100000"),
    ("faiss-hnsw", "M", "abc"),
    ("faiss-hnsw", "ef_search", "0"),
    ("faiss-hnsw", "ef_construction", "-1"),
    ("faiss-hnsw", "num_threads", "-2"),
    ("faiss-ivfpq", "nlist", "-1"),  # was a TypeError traceback
    ("faiss-ivfpq", "nlist", "0"),
    ("faiss-ivfpq", "nlist", "2.5"),
    ("faiss-ivfpq", "nbits", "0"),
    ("faiss-ivfpq", "nbits", "17"),
    ("faiss-ivfpq", "m", "-2"),
    ("faiss-ivfpq", "nprobe", "0"),
    ("faiss-ivfpq", "k_factor", "0.5"),
    ("faiss-ivfpq", "k_factor", "NaN"),
    ("faiss-ivfpq", "refine", "maybe"),
    ("faiss-ivfpq", "fast_scan", "1"),
    ("faiss-ivfpq", "training_sample_size", "0"),
    ("faiss-ivfpq", "train_iters", "0"),
    ("faiss-ivfpq", "seed", "-1"),
    ("faiss-flat", "query_batch_size", "0"),
    ("scann", "num_leaves", "-5"),  # was a RuntimeError traceback
    ("scann", "num_leaves", "abc"),
    ("scann", "num_leaves_to_search", "0"),
    ("scann", "num_neighbors", "0"),
    ("scann", "reorder", "-1"),
    ("scann", "scoring", "fast"),
    ("scann", "hash_type", "lut8"),
    ("scann", "reorder_dtype", "float64"),
    ("scann", "dimensions_per_block", "0"),
    ("scann", "soar_lambda", "-1"),
    ("scann", "anisotropic_quantization_threshold", "Infinity"),
    ("scann", "training_sample_size", "0"),
    ("scann-bf", "num_neighbors", "0"),
    ("exact", "block_size", "0"),  # was a ZeroDivisionError traceback
    ("exact", "block_size", "-3"),
    ("exact", "query_batch_size", "0"),
    ("exact", "dtype", "int8"),
    ("exact", "recall_target", "0"),
    ("exact", "recall_target", "1.5"),
]


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_every_option_has_its_allowed_range(backend):
    cls = _cls(backend)
    assert set(cls.OPTIONS) == set(cls.DEFAULTS)
    assert set(cls.SEARCH_OPTIONS) == set(cls.SEARCH_PARAMS)
    for name, default in cls.DEFAULTS.items():  # the defaults themselves are allowed
        assert cls.OPTIONS[name].allows(default), (name, default)


@pytest.mark.parametrize(("backend", "name", "value"), BAD_OPTIONS)
def test_bad_options_are_refused_before_any_work(backend, name, value, tmp_path, capsys):
    """One line naming the option and its allowed range, exit 2, before the embeddings are read
    (the directory given does not even exist); the same refusal from the Python API."""
    from dpr_jax.cli import main
    from dpr_jax.errors import UserError

    argv = ["index", "--embeddings", str(tmp_path / "no_such_emb"), "--backend", backend,
            "--out", str(tmp_path / "i"), "--option", f"{name}={value}"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dpr-jax index: {backend} option {name}=")
    assert "must be " in err and "no_such_emb" not in err
    assert not (tmp_path / "i").exists()
    with pytest.raises(UserError, match=rf"^{backend} option {name}=.*: must be "):
        build_index(
            backend,
            np.ones((4, 8), np.float32),
            list("abcd"),
            **dict([parse_option(f"{name}={value}")]),
        )


def test_bad_search_parameters_and_data_dependent_options_are_refused(gaussian):
    from dpr_jax.errors import UserError

    emb, queries, ids = gaussian
    small, some = emb[:106], ids[:106]
    index = build_index("faiss-ivfpq", small, some, num_threads=1)
    with pytest.raises(UserError, match=r"search parameter nprobe=0: must be an integer >= 1"):
        index.search(queries, 10, nprobe=0)
    with pytest.raises(ValueError, match=r"nlist=500 needs at least 500 .* use nlist <= 106"):
        build_index("faiss-ivfpq", small, some, nlist=500)
    with pytest.raises(ValueError, match=r"num_leaves=500 needs .* use num_leaves <= 106"):
        build_index("scann", small, some, num_leaves=500)
    with pytest.raises(ValueError, match=r"num_leaves_to_search=20 is more than num_leaves=10"):
        build_index("scann", small, some, num_leaves=10, num_leaves_to_search=20)
    with pytest.raises(UserError, match=r"option M=True: must be an integer"):
        build_index("faiss-hnsw", small, some, M=True)


def test_parse_option():
    assert parse_option("num_leaves=2000") == ("num_leaves", 2000)
    assert parse_option("threshold=0.2") == ("threshold", 0.2)
    assert parse_option("refine=False") == ("refine", False)
    assert parse_option("nlist=none") == ("nlist", None)
    assert parse_option("hash_type=lut256") == ("hash_type", "lut256")
    with pytest.raises(ValueError, match="key=value"):
        parse_option("nlist")


def test_cli_builds_an_index_with_the_embeddings_config(gaussian, tmp_path, capsys):
    emb, queries, ids = gaussian
    emb_dir = tmp_path / "emb"
    config = {"model": "tiny", "dim": 24, "dtype": "float32"}
    w = EmbeddingWriter(emb_dir, config=config)
    w.write_chunk(0, ids[:500], emb[:500])
    w.write_chunk(1, ids[500:], emb[500:])
    out = tmp_path / "index"
    argv = ["--embeddings", str(emb_dir), "--backend", "faiss-hnsw", "--out", str(out),
            "--option", "M=16", "--option", "ef_search=200", "--threads", "1"]  # fmt: skip
    assert cli_main(argv) == 0
    assert "built faiss-hnsw index of 1,003 vectors" in capsys.readouterr().err
    index = load_index(out)
    assert index.options["M"] == 16 and index.options["ef_search"] == 200
    assert index.meta["embeddings_config"][0]["model"] == "tiny"
    _, got = index.search(queries, 10)
    assert recall_at_k(got, ids[brute_force(queries, emb, 10)[1]]) >= 0.95


def test_bench_frontier_and_interpolation():
    """The benchmark's headline arithmetic (scripts/bench_ann.py), by hand."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_ann.py"
    spec = importlib.util.spec_from_file_location("bench_ann", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    points = [(0.80, 1000.0), (0.85, 500.0), (0.90, 800.0), (0.99, 100.0), (0.95, 50.0)]
    front = bench.pareto(points)  # (0.85, 500) and (0.95, 50) are dominated
    assert front == [(0.80, 1000.0), (0.90, 800.0), (0.99, 100.0)]
    qps, lower = bench.qps_at(front, 0.95)
    # log-linear: 800 * (100 / 800) ** ((0.95 - 0.90) / (0.99 - 0.90))
    assert not lower and qps == pytest.approx(800 * (1 / 8) ** (5 / 9))
    assert bench.qps_at(front, 0.90) == (800.0, False)
    assert bench.qps_at([(0.97, 300.0)], 0.95) == (300.0, True)  # only a lower bound
    assert bench.qps_at(front, 0.995) is None
