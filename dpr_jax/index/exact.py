"""Exact maximum-inner-product search on the JAX devices (Karpukhin et al. 2020, sec. 3.1).

The reference against which every approximate index is measured. The corpus (N, D) is sharded
row-wise over a 1-D ``Mesh`` of every device of every host (``jax.devices()``, ``P("data",
None)``), padded to a multiple of the device count; queries are replicated. Inside ``shard_map``
each device scores its rows block by block (bounded memory: a (Q, block) score matrix at a time),
keeps a running top-k, then the per-device top-k lists are ``all_gather``ed and merged by a final
``top_k``. Padding rows score -inf and are never returned (k is clamped to N by
:class:`~dpr_jax.index.base.Index`). Ties are broken towards the lower row, as a stable sort
would: ``lax.top_k`` puts the lower index first among equal values, and every merge keeps the
earlier rows (the running list, then lower devices) in front.

With the ``recall_target`` option the per-block top-k is ``jax.lax.approx_max_k`` (Chern et al.
2022, "TPU-KNN: K Nearest Neighbor Search at Peak FLOP/s", sec. 4): on TPU it keeps the maximum
of each of L bins of the block, L chosen so that the expected recall of the top k over the *whole*
corpus (``reduction_input_size_override`` = all rows of all devices) is at least the target, and
the merges stay exact. XLA lowers it to an exact top-k on CPU and GPU, so there the results are
exact (measured on an H200: every ``recall_target`` from 0.5 to 0.995 returned the exact lists at
the exact search's speed; README, "Accelerators").

Scores are float32 products of the stored vectors (``precision`` "highest", the default): left
to XLA's default precision a float32 matrix product runs as TensorFloat-32 on NVIDIA GPUs and
as bfloat16 passes on TPUs, and on an H200 the "exact" float32 search then found 0.9992 of the
true top-10 of 1M synthetic vectors instead of all of them (scripts/bench_ann.py --mode accel).
``precision="default"`` trades that for speed. :func:`search_memory` gives the bytes per device
of both top-k modes from the arithmetic.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpr_jax.chips import tpu_slice
from dpr_jax.errors import UserError
from dpr_jax.index.base import Index, Opt

STORE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


PRECISIONS = {"highest": jax.lax.Precision.HIGHEST, "default": None}


def _search_fn(
    mesh: Mesh, n_valid: int, n_blocks: int, block: int, k: int,
    recall_target: float | None = None, precision: str = "highest",
):  # fmt: skip
    """jitted (queries (Q, D) replicated, corpus (n_dev * n_blocks * block, D) row-sharded)
    -> (scores (Q, k), global rows (Q, k)), replicated. ``recall_target``: approximate per-block
    top-k (``lax.approx_max_k``) instead of the exact one; ``precision``: of the score products
    (:data:`PRECISIONS`)."""
    n_local = n_blocks * block
    k_local = min(k, n_local)
    k_block = min(k_local, block)
    n_total = mesh.size * n_local

    def block_top_k(s):
        if recall_target is None:
            return jax.lax.top_k(s, k_block)
        return jax.lax.approx_max_k(
            s, k_block, recall_target=recall_target, reduction_input_size_override=n_total
        )

    def local(q, emb):
        base = jax.lax.axis_index("data") * n_local
        d = emb.shape[-1]
        emb_b = emb.reshape(n_blocks, block, d)

        def step(carry, xs):
            best_s, best_i = carry
            e, j = xs
            # (Q, D) . (block, D) -> (Q, block)
            s = jnp.einsum("qd,nd->qn", q, e.astype(q.dtype), preferred_element_type=jnp.float32,
                           precision=PRECISIONS[precision])  # fmt: skip
            rows = base + j * block + jnp.arange(block, dtype=jnp.int32)
            s = jnp.where(rows[None, :] < n_valid, s, -jnp.inf)
            ts, ti = block_top_k(s)
            cand_s = jnp.concatenate([best_s, ts], axis=1)
            cand_i = jnp.concatenate([best_i, rows[ti]], axis=1)
            ms, mi = jax.lax.top_k(cand_s, k_local)
            return (ms, jnp.take_along_axis(cand_i, mi, axis=1)), None

        nq = q.shape[0]
        init = (
            jnp.full((nq, k_local), -jnp.inf, jnp.float32),
            jnp.full((nq, k_local), -1, jnp.int32),
        )
        (s, i), _ = jax.lax.scan(step, init, (emb_b, jnp.arange(n_blocks, dtype=jnp.int32)))
        # (Q, k_local) per device -> (Q, n_dev * k_local) on every device
        all_s = jax.lax.all_gather(s, "data", axis=1, tiled=True)
        all_i = jax.lax.all_gather(i, "data", axis=1, tiled=True)
        fs, fi = jax.lax.top_k(all_s, k)
        return fs, jnp.take_along_axis(all_i, fi, axis=1)

    sharded = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(P(), P("data", None)),
        out_specs=(P(), P()),
        check_vma=False,
    )
    return jax.jit(sharded)


class ExactIndex(Index):
    """Brute-force MIPS over every JAX device of every host.

    Options: ``dtype`` ("float32", "bfloat16", "float16": storage on device; scores accumulate in
    float32), ``query_batch_size`` (queries per call), ``block_size`` (corpus rows scored at once
    per device; memory per device ~ 4 * query_batch_size * block_size bytes, see
    :func:`search_memory`), ``recall_target`` (None: exact; a float in (0, 1]: approximate
    per-block top-k with ``jax.lax.approx_max_k``, exact on CPU and GPU), ``precision``
    ("highest": float32 score products; "default": XLA's, TensorFloat-32 on GPU, bfloat16 passes
    on TPU: faster, no longer exact).
    """

    backend = "exact"
    DEFAULTS = {
        "dtype": "float32",
        "query_batch_size": 512,
        "block_size": 16384,
        "recall_target": None,
        "precision": "highest",
    }
    OPTIONS = {
        "dtype": Opt("choice", choices=tuple(STORE_DTYPES)),
        "query_batch_size": Opt("int", 1),
        "block_size": Opt("int", 1),
        "recall_target": Opt("float", 0, 1, lo_open=True, null="exact top-k"),
        "precision": Opt("choice", choices=tuple(PRECISIONS)),
    }

    def __init__(self, **options):
        super().__init__(**options)
        self._emb = None
        self._fns = {}

    def _place(self, emb: np.ndarray) -> None:
        devices = jax.devices()  # every host's devices: the corpus is sharded over all of them
        self.mesh = Mesh(np.array(devices), ("data",))
        n_dev = len(devices)
        n, d = emb.shape
        per_dev = -(-n // n_dev)
        self._n_blocks = -(-per_dev // int(self.options["block_size"]))
        self._block = _round_up(-(-per_dev // self._n_blocks), 8)
        n_pad = n_dev * self._n_blocks * self._block
        dtype = np.dtype(STORE_DTYPES[self.options["dtype"]])

        def shard(idx):  # rows [start, stop) of the padded corpus, zero rows past n
            rows = idx[0]
            start, stop = rows.start or 0, n_pad if rows.stop is None else rows.stop
            out = np.zeros((stop - start, d), dtype)
            if start < n:
                out[: min(stop, n) - start] = emb[start : min(stop, n)]
            return out

        # each process fills only its own devices' shards (multi-host: every host holds emb)
        sharding = NamedSharding(self.mesh, P("data", None))
        self._emb = jax.make_array_from_callback((n_pad, d), sharding, shard)
        self._q_sharding = NamedSharding(self.mesh, P())
        self._fns = {}

    def _build(self, emb: np.ndarray) -> None:
        self._place(emb)

    def _search(self, queries: np.ndarray, k: int):
        fn = self._fns.get(k)
        if fn is None:
            rt = self.options["recall_target"]
            fn = self._fns[k] = _search_fn(
                self.mesh, self.size, self._n_blocks, self._block, k,
                None if rt is None else float(rt), self.options["precision"],
            )  # fmt: skip
        nq = len(queries)
        qb = int(self.options["query_batch_size"])
        # one compiled shape for full batches; small query sets pad to a power of two (>= 8)
        batch = min(qb, max(8, 1 << (nq - 1).bit_length()))
        scores = np.empty((nq, k), np.float32)
        rows = np.empty((nq, k), np.int64)
        for start in range(0, nq, batch):
            q = queries[start : start + batch]
            n = len(q)
            if n < batch:
                q = np.concatenate([q, np.zeros((batch - n, q.shape[1]), q.dtype)])
            q_dev = jax.make_array_from_callback(q.shape, self._q_sharding, lambda idx, q=q: q[idx])
            s, i = fn(q_dev, self._emb)
            # replicated results: this host's first copy is the whole answer
            scores[start : start + n] = np.asarray(s.addressable_data(0))[:n]
            rows[start : start + n] = np.asarray(i.addressable_data(0))[:n]
        return scores, rows

    def embeddings(self) -> np.ndarray:
        """The indexed vectors (N, dim) in the storage dtype, gathered to the host."""
        if not self._emb.is_fully_addressable:
            from jax.experimental import multihost_utils

            return np.asarray(multihost_utils.process_allgather(self._emb, tiled=True))[: self.size]
        return np.asarray(self._emb)[: self.size]

    def size_bytes(self) -> int:
        return self.size * self.dim * np.dtype(STORE_DTYPES[self.options["dtype"]]).itemsize

    def _save_files(self, directory: Path) -> None:
        emb = self.embeddings()
        if emb.dtype == jnp.bfloat16:  # .npy has no bfloat16: store float32 (exact upcast)
            emb = emb.astype(np.float32)
        with open(directory / "embeddings.npy", "wb") as f:
            np.save(f, emb, allow_pickle=False)

    def _load_files(self, directory: Path) -> None:
        p = directory / "embeddings.npy"
        emb = np.load(p, allow_pickle=False, mmap_mode="r")
        if emb.shape != (self.size, self.dim):
            raise UserError(f"{p}: shape {emb.shape}, expected ({self.size}, {self.dim})")
        self._place(emb)


# -- memory per device ---------------------------------------------------------------------------

# chips and usable HBM bytes per chip of some TPU slices (dpr_jax.chips: the planner's table)
TPU_TOPOLOGIES: dict[str, tuple[int, float]] = {
    name: tpu_slice(name) for name in ("v5e:2x2", "v5e:2x4", "v5e:4x4", "v4:2x2x1", "v5p:2x2x1")
}


def search_memory(
    n: int,
    dim: int,
    n_devices: int,
    dtype: str = "float32",
    query_batch_size: int = 512,
    block_size: int = 16384,
    k: int = 100,
) -> dict[str, int]:
    """Bytes per device of :class:`ExactIndex` search, from the shapes in :func:`_search_fn`.

    ``corpus``: the padded row shard in the storage dtype; ``block_upcast``: one (block, D) block
    cast to the float32 queries (zero for float32 storage); ``queries``: the replicated (Q, D)
    float32 batch; ``scores``: the (Q, block) float32 score matrix; ``top_k``: the per-block
    top-k's sort operands (values and int32 indices of the (Q, block) matrix; approx_max_k on TPU
    needs less, its bins are reduced in place) plus the running (Q, 2k) candidates and the
    gathered (Q, n_dev * k) lists; ``total`` their sum. XLA may fuse some of these (less) or keep
    two blocks in flight (more): these are the arithmetic's figures, not a compiled profile.
    """
    per_dev = -(-n // n_devices)
    n_blocks = -(-per_dev // block_size)
    block = _round_up(-(-per_dev // n_blocks), 8)
    itemsize = np.dtype(STORE_DTYPES[dtype]).itemsize
    q, kk = query_batch_size, min(k, n_blocks * block)
    out = {
        "rows_per_device": n_blocks * block,
        "corpus": n_blocks * block * dim * itemsize,
        "block_upcast": 0 if itemsize == 4 else block * dim * 4,
        "queries": q * dim * 4,
        "scores": q * block * 4,
        "top_k": q * block * 8 + q * 2 * kk * 8 + q * n_devices * kk * 8,
    }
    out["total"] = sum(v for key, v in out.items() if key != "rows_per_device")
    return out
