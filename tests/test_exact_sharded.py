"""Exact JAX search sharded over 8 CPU devices against numpy brute force: ties, padding, the
approx_max_k mode, and the memory arithmetic."""

import importlib.util
from pathlib import Path

import jax
import numpy as np
import pytest

from dpr_jax.index import build_index, load_index
from dpr_jax.index.exact import search_memory

REPO = Path(__file__).resolve().parents[1]


def numpy_top_k(queries, emb, k):
    """Brute force, best first, ties to the lower row (a stable sort of -score)."""
    s = queries.astype(np.float64) @ emb.astype(np.float64).T  # (Q, D) . (D, N) -> (Q, N)
    rows = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, rows, axis=1), rows


@pytest.fixture(scope="module")
def tied():
    """Small-integer vectors: every inner product is exact in float32 and bfloat16, and each
    distinct row appears 3 times, so most top-k lists end in ties."""
    rng = np.random.default_rng(3)
    base = rng.integers(-3, 4, size=(335, 16)).astype(np.float32)
    emb = np.concatenate([base, base[::-1], base])[:1001]  # 1001 rows: 8 devices do not divide it
    rng.shuffle(emb)
    queries = rng.integers(-2, 3, size=(37, 16)).astype(np.float32)
    ids = np.array([f"p{i}" for i in range(len(emb))])
    return emb, queries, ids


def test_mesh_covers_every_device(tied):
    emb, _, ids = tied
    index = build_index("exact", emb, ids)
    assert jax.device_count() == 8
    assert index.mesh.devices.size == jax.device_count()
    assert index._emb.sharding.spec == jax.sharding.PartitionSpec("data", None)
    assert len(index._emb.addressable_shards) == 8


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("block_size", [16384, 40])
def test_ties_break_to_the_lower_row_like_a_stable_sort(tied, dtype, block_size):
    emb, queries, ids = tied
    index = build_index("exact", emb, ids, dtype=dtype, block_size=block_size, query_batch_size=16)
    if block_size == 40:
        assert index._n_blocks == 4  # 126 rows per device: a running top-k over 4 blocks
    want_s, want_rows = numpy_top_k(queries, emb, 25)
    ties = (want_s[:, None, :] == want_s[:, :, None]).sum() - want_s.size
    assert ties > 100  # the fixture really has ties inside the top 25
    scores, got = index.search(queries, 25)
    np.testing.assert_array_equal(got, ids[want_rows])
    np.testing.assert_array_equal(scores, want_s.astype(np.float32))
    # k = N: the whole ranking, padding rows (-inf) never returned
    scores, got = index.search(queries[:4], 5000)
    np.testing.assert_array_equal(got, ids[numpy_top_k(queries[:4], emb, len(emb))[1]])
    assert np.isfinite(scores).all()


def test_saved_and_reloaded_index_is_sharded_and_equal(tied, tmp_path):
    emb, queries, ids = tied
    index = build_index("exact", emb, ids, block_size=40)
    index.save(tmp_path / "ix")
    again = load_index(tmp_path / "ix")
    assert len(again._emb.addressable_shards) == 8
    np.testing.assert_array_equal(again.search(queries, 10)[1], index.search(queries, 10)[1])


@pytest.mark.parametrize("recall_target", [0.9, 0.95])
def test_approx_max_k_mode_reaches_its_recall_target(recall_target):
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((5003, 32)).astype(np.float32)
    queries = rng.standard_normal((64, 32)).astype(np.float32)
    ids = np.arange(len(emb)).astype(str)
    exact = build_index("exact", emb, ids, block_size=256)
    approx = build_index("exact", emb, ids, block_size=256, recall_target=recall_target)
    assert approx.config["options"]["recall_target"] == recall_target
    _, want = exact.search(queries, 10)
    np.testing.assert_array_equal(want, ids[numpy_top_k(queries, emb, 10)[1]])
    scores, got = approx.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)])
    assert recall >= recall_target
    # whatever it returns are true inner products of real rows, best first
    rows = got.astype(int)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, emb[rows]), atol=1e-4)
    assert (np.diff(scores, axis=1) <= 0).all()


@pytest.mark.parametrize("precision", ["highest", "default"])
def test_precision_of_the_score_products(precision):
    """float32 searches ask XLA for float32 products (HIGHEST) unless told otherwise: XLA's
    default precision is TensorFloat-32 on NVIDIA GPUs and bfloat16 passes on TPUs, and an H200
    then missed 0.08% of the true top-10 (README). On this CPU both are exact float32."""
    from dpr_jax.index.exact import _search_fn

    rng = np.random.default_rng(2)
    emb = rng.standard_normal((600, 16)).astype(np.float32)
    queries = rng.standard_normal((8, 16)).astype(np.float32)
    ids = np.arange(len(emb)).astype(str)
    ix = build_index("exact", emb, ids, block_size=128, precision=precision)
    _, got = ix.search(queries, 5)
    np.testing.assert_array_equal(got, ids[numpy_top_k(queries, emb, 5)[1]])
    fn = _search_fn(ix.mesh, ix.size, ix._n_blocks, ix._block, 5, None, precision)
    with jax.default_matmul_precision("default"):  # conftest.py sets "highest" for all tests
        hlo = fn.lower(jax.ShapeDtypeStruct((8, 16), np.float32), ix._emb).as_text()
    (dot,) = [line for line in hlo.splitlines() if "dot_general" in line]
    assert ("HIGHEST" in dot) == (precision == "highest"), dot
    with pytest.raises(ValueError, match="precision"):
        build_index("exact", emb, ids, precision="tf32")


def test_bad_recall_target_is_refused():
    with pytest.raises(ValueError, match="recall_target"):
        build_index("exact", np.ones((4, 2), np.float32), list("abcd"), recall_target=1.5)


def test_search_memory_by_hand():
    # 1000 rows over 8 devices: 125 per device -> one block of 128 (rounded up to 8)
    m = search_memory(1000, 64, 8, "bfloat16", query_batch_size=32, block_size=16384, k=10)
    assert m["rows_per_device"] == 128
    assert m["corpus"] == 128 * 64 * 2
    assert m["block_upcast"] == 128 * 64 * 4
    assert m["queries"] == 32 * 64 * 4
    assert m["scores"] == 32 * 128 * 4
    assert m["top_k"] == 32 * 128 * 8 + 32 * 20 * 8 + 32 * 8 * 10 * 8
    assert m["total"] == sum(v for key, v in m.items() if key not in ("total", "rows_per_device"))
    # DPR's 21,015,324 x 768 corpus on a v5e 2x2 (4 chips): float32 is 1/4 of 64.6 GB per chip
    m = search_memory(21_015_324, 768, 4, "float32")
    assert abs(m["corpus"] - 21_015_324 * 768 * 4 / 4) / m["corpus"] < 1e-3
    assert search_memory(21_015_324, 768, 16, "bfloat16")["corpus"] * 8 == pytest.approx(
        m["corpus"], rel=1e-3
    )


def test_shard_memory_script_prints_every_topology(capsys):
    spec = importlib.util.spec_from_file_location("shard_memory", REPO / "scripts/shard_memory.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--n", "1000", "--dim", "8"]) == 0
    out = capsys.readouterr().out
    assert "| v5e:2x2 | 4 | 16 | bfloat16 |" in out and "| v5e:4x4 | 16 |" in out
