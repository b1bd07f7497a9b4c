"""Exact maximum-inner-product search on the JAX devices (Karpukhin et al. 2020, sec. 3.1).

The reference against which every approximate index is measured. The corpus (N, D) is sharded
row-wise over a 1-D ``Mesh`` of all local devices (``P("data", None)``), padded to a multiple of
the device count; queries are replicated. Inside ``shard_map`` each device scores its rows block
by block (bounded memory: a (Q, block) score matrix at a time), keeps a running top-k, then the
per-device top-k lists are ``all_gather``ed and merged by a final ``top_k``. Padding rows score
-inf and are never returned (k is clamped to N by :class:`~dpr_jax.index.base.Index`).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpr_jax.index.base import Index

STORE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _search_fn(mesh: Mesh, n_valid: int, n_blocks: int, block: int, k: int):
    """jitted (queries (Q, D) replicated, corpus (n_dev * n_blocks * block, D) row-sharded)
    -> (scores (Q, k), global rows (Q, k)), replicated."""
    n_local = n_blocks * block
    k_local = min(k, n_local)
    k_block = min(k_local, block)

    def local(q, emb):
        base = jax.lax.axis_index("data") * n_local
        d = emb.shape[-1]
        emb_b = emb.reshape(n_blocks, block, d)

        def step(carry, xs):
            best_s, best_i = carry
            e, j = xs
            # (Q, D) . (block, D) -> (Q, block)
            s = jnp.einsum("qd,nd->qn", q, e.astype(q.dtype), preferred_element_type=jnp.float32)
            rows = base + j * block + jnp.arange(block, dtype=jnp.int32)
            s = jnp.where(rows[None, :] < n_valid, s, -jnp.inf)
            ts, ti = jax.lax.top_k(s, k_block)
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
    """Brute-force MIPS over all local JAX devices.

    Options: ``dtype`` ("float32", "bfloat16", "float16": storage on device; scores accumulate in
    float32), ``query_batch_size`` (queries per call), ``block_size`` (corpus rows scored at once
    per device; memory per device ~ 4 * query_batch_size * block_size bytes).
    """

    backend = "exact"
    DEFAULTS = {"dtype": "float32", "query_batch_size": 512, "block_size": 16384}

    def __init__(self, **options):
        super().__init__(**options)
        if self.options["dtype"] not in STORE_DTYPES:
            raise ValueError(f"option dtype must be one of {sorted(STORE_DTYPES)}")
        self._emb = None
        self._fns = {}

    def _place(self, emb: np.ndarray) -> None:
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("data",))
        n_dev = len(devices)
        n = len(emb)
        per_dev = -(-n // n_dev)
        self._n_blocks = -(-per_dev // int(self.options["block_size"]))
        self._block = _round_up(-(-per_dev // self._n_blocks), 8)
        n_pad = n_dev * self._n_blocks * self._block
        dtype = STORE_DTYPES[self.options["dtype"]]
        host = np.zeros((n_pad, emb.shape[1]), dtype=np.dtype(dtype))
        host[:n] = emb
        self._emb = jax.device_put(host, NamedSharding(self.mesh, P("data", None)))
        self._q_sharding = NamedSharding(self.mesh, P())
        self._fns = {}

    def _build(self, emb: np.ndarray) -> None:
        self._place(emb)

    def _search(self, queries: np.ndarray, k: int):
        fn = self._fns.get(k)
        if fn is None:
            fn = self._fns[k] = _search_fn(self.mesh, self.size, self._n_blocks, self._block, k)
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
            s, i = fn(jax.device_put(q, self._q_sharding), self._emb)
            scores[start : start + n] = np.asarray(s)[:n]
            rows[start : start + n] = np.asarray(i)[:n]
        return scores, rows

    def embeddings(self) -> np.ndarray:
        """The indexed vectors (N, dim) in the storage dtype, gathered to the host."""
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
        emb = np.load(p, allow_pickle=False)
        if emb.shape != (self.size, self.dim):
            raise ValueError(f"{p}: shape {emb.shape}, expected ({self.size}, {self.dim})")
        self._place(emb)
