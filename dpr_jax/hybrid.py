"""Dense + sparse fusion (Karpukhin et al. 2020, sec. 5.1 "BM25 + DPR").

DPR's hybrid reranks the union of the BM25 and DPR top-2000 lists by ``BM25(q, p) + lambda *
sim(q, p)`` with lambda = 1.1. Two fusions of one dense and one sparse ranked list per question
are provided, both over the union of the two lists:

- :func:`linear_fusion`: pyserini's ``HybridSearcher._hybrid_results``. A document missing from
  one list gets that list's *minimum* score for the query; with ``normalization`` each list's
  scores are min-max normalised per query first; the fused score is
  ``dense + alpha * sparse`` (or ``sparse + alpha * dense`` with ``weight_on_dense``).
  ``normalization``:

  * ``"pyserini"`` (default): pyserini's ``(s - (min + max) / 2) / (max - min)``, in [-0.5, 0.5];
  * ``"minmax"``: ``(s - min) / (max - min)``, in [0, 1]. Per query it differs from "pyserini" by
    the constant ``0.5 * (1 + alpha)``, so the ranking is the same;
  * ``"none"``: raw scores, DPR's own ``BM25 + lambda * sim`` (use ``weight_on_dense=True``,
    ``alpha=1.1``).

  A list whose scores are all equal normalises to 0 ("pyserini") / 1 ("minmax") instead of
  dividing by zero (pyserini would raise).
- :func:`rrf_fusion`: reciprocal-rank fusion (Cormack et al. 2009), ``sum over lists of
  1 / (rrf_k + rank)`` with 1-based ranks and ``rrf_k = 60``; a list that does not return a
  document contributes nothing.

Inputs are per-query ``(scores (Q, depth), ids (Q, depth))`` as returned by the indexes and
:class:`~dpr_jax.data.bm25.BM25Retriever` (ids as arrays or lists of strings). Padding entries
(id ``""`` or ``None``, or a non-finite score) are ignored. Outputs are ``(scores float32 (Q, k),
ids list[list[str]])`` best first; ties are broken by the best rank in the dense list, then in the
sparse list. If the union has fewer than ``k`` documents the row is padded with ``""``/``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from dpr_jax.errors import UserError

NORMALIZATIONS = ("pyserini", "minmax", "none")


def _hits(scores: Any, ids: Any, what: str) -> list[list[tuple[str, float]]]:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise UserError(f"{what} scores must be (Q, depth), got shape {scores.shape}")
    if len(ids) != scores.shape[0]:
        raise UserError(f"{what}: {scores.shape[0]} score rows but {len(ids)} id rows")
    out = []
    for q, (row_s, row_i) in enumerate(zip(scores, ids)):
        row_i = list(row_i)
        if len(row_i) != len(row_s):
            raise UserError(f"{what}, query {q}: {len(row_s)} scores but {len(row_i)} ids")
        hits, seen = [], set()
        for s, d in zip(row_s, row_i):
            if d is None or str(d) == "" or not math.isfinite(s):
                continue
            d = str(d)
            if d not in seen:  # a duplicate id keeps its best (first) occurrence
                seen.add(d)
                hits.append((d, float(s)))
        out.append(hits)
    return out


def _top_k(fused: dict[str, float], order: dict[str, tuple], k: int):
    ranked = sorted(fused, key=lambda d: (-fused[d], order[d]))[:k]
    scores = [fused[d] for d in ranked] + [-math.inf] * (k - len(ranked))
    return scores, ranked + [""] * (k - len(ranked))


def _tie_order(dense: list, sparse: list) -> dict[str, tuple]:
    big = len(dense) + len(sparse) + 1
    dr = {d: r for r, (d, _) in enumerate(dense)}
    sr = {d: r for r, (d, _) in enumerate(sparse)}
    return {d: (dr.get(d, big), sr.get(d, big)) for d in dr.keys() | sr.keys()}


def _normalizer(values: Sequence[float], normalization: str):
    lo, hi = min(values), max(values)
    if normalization == "none":
        return lambda s: s
    if normalization == "pyserini":
        mid = (lo + hi) / 2
        return (lambda s: (s - mid) / (hi - lo)) if hi > lo else (lambda s: 0.0)
    return (lambda s: (s - lo) / (hi - lo)) if hi > lo else (lambda s: 1.0)


def _fuse(runs: tuple, k: int, score) -> tuple[np.ndarray, list[list[str]]]:
    """Fuse the dense and sparse runs ``(dense_scores, dense_ids, sparse_scores, sparse_ids)``
    query by query: ``score(dense_hits, sparse_hits)`` -> {doc: fused score}; top ``k`` each."""
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    dense_scores, dense_ids, sparse_scores, sparse_ids = runs
    dense = _hits(dense_scores, dense_ids, "dense")
    sparse = _hits(sparse_scores, sparse_ids, "sparse")
    if len(dense) != len(sparse):
        raise UserError(f"{len(dense)} dense vs {len(sparse)} sparse queries")
    out_s, out_i = [], []
    for dh, sh in zip(dense, sparse):
        s_row, i_row = _top_k(score(dh, sh), _tie_order(dh, sh), k)
        out_s.append(s_row)
        out_i.append(i_row)
    return np.asarray(out_s, np.float32).reshape(len(out_s), k), out_i


def linear_fusion(
    dense_scores: Any, dense_ids: Any, sparse_scores: Any, sparse_ids: Any, k: int = 100,
    alpha: float = 1.0, normalization: str = "pyserini", weight_on_dense: bool = False,
) -> tuple[np.ndarray, list[list[str]]]:  # fmt: skip
    """pyserini's normalised linear combination (see the module docstring)."""
    if normalization not in NORMALIZATIONS:
        raise UserError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")

    def score(dh, sh) -> dict[str, float]:
        dd, sd = dict(dh), dict(sh)
        fused: dict[str, float] = {}
        if dd or sd:
            d_min = min(dd.values()) if dd else 0.0
            s_min = min(sd.values()) if sd else 0.0
            d_norm = _normalizer(list(dd.values()) or [0.0], normalization)
            s_norm = _normalizer(list(sd.values()) or [0.0], normalization)
            for doc in dd.keys() | sd.keys():
                d = d_norm(dd.get(doc, d_min))
                s = s_norm(sd.get(doc, s_min))
                fused[doc] = s + alpha * d if weight_on_dense else d + alpha * s
        return fused

    return _fuse((dense_scores, dense_ids, sparse_scores, sparse_ids), k, score)


def rrf_fusion(
    dense_scores: Any, dense_ids: Any, sparse_scores: Any, sparse_ids: Any, k: int = 100,
    rrf_k: float = 60.0,
) -> tuple[np.ndarray, list[list[str]]]:  # fmt: skip
    """Reciprocal-rank fusion: ``score(d) = sum_lists 1 / (rrf_k + rank(d))``, ranks from 1."""
    if rrf_k < 0:
        raise UserError(f"rrf_k must be >= 0, got {rrf_k}")

    def score(dh, sh) -> dict[str, float]:
        fused: dict[str, float] = {}
        for hits in (dh, sh):
            for rank, (doc, _) in enumerate(hits, 1):
                fused[doc] = fused.get(doc, 0.0) + 1.0 / (rrf_k + rank)
        return fused

    return _fuse((dense_scores, dense_ids, sparse_scores, sparse_ids), k, score)
