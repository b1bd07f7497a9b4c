"""Search knobs tuned to a recall target, like ``faiss.ParameterSpace`` but for every backend.

Approximate MIPS trades recall for speed through search-time knobs: ScaNN's
``leaves_to_search`` and reorder depth (Guo et al. 2020, sec. 4), HNSW's ``efSearch`` (Malkov &
Yashunin 2018, sec. 4.2), IVF's ``nprobe`` and the refine ``k_factor`` (Johnson et al. 2017,
sec. 5). DPR (Karpukhin et al. 2020, sec. 3.1) chose them by hand; :func:`tune` chooses them
from data: the setting with the highest queries/s whose recall@k against exact brute-force
neighbours, on a set of tuning queries, is at least the target.

Search: each backend lists its knobs in increasing cost (:meth:`Index.tune_space`). Recall is
taken to grow with every knob, so for one knob a binary search finds the cheapest value that
reaches the target; for two (a coarse knob, then a rescoring depth) it finds, for each coarse
value in turn, the smallest depth that reaches the target (never more than the previous coarse
value needed: a setting needing as much depth with more of the coarse knob is dominated, it is not
kept), and stops once the smallest depth suffices. Every such Pareto candidate is then
timed (best of ``repeats`` runs over all tuning queries, in rounds: each candidate once a round)
and the fastest is kept. The result is
recorded in ``index.tuned`` (saved as ``"tuned"`` in index_config.json) and used by every later
``search`` that does not override it. The recall is measured on the tuning queries: on new
queries it varies by sampling error (about 0.01 for 1000 queries at recall 0.9), so tune on
queries like those the index will serve, and aim a little above the recall you need.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from dpr_jax.errors import UserError
from dpr_jax.index.base import Index


class TuneError(UserError):
    """The recall target cannot be reached, or the index has no knob to tune."""


def ladder(lo: float, hi: float, ratio: float = 1.5) -> list[int]:
    """Increasing integers from ``lo`` to ``hi`` (both included), spaced by about ``ratio`` (the
    last step by at least sqrt(ratio))."""
    lo, hi = int(lo), int(hi)
    if hi <= lo:
        return [max(1, hi)]
    out, x = [], max(1, lo)
    while x * math.sqrt(ratio) <= hi:
        out.append(x)
        x = max(math.ceil(x * ratio), x + 1)
    return out + [hi]


def exact_neighbours(emb: np.ndarray, queries: np.ndarray, k: int, batch: int = 256) -> np.ndarray:
    """Rows (Q, k) of the exact top-k by inner product, best first (numpy brute force)."""
    emb = np.asarray(emb, np.float32)
    k = min(k, len(emb))
    rows = np.empty((len(queries), k), np.int64)
    for s in range(0, len(queries), batch):
        sc = np.asarray(queries[s : s + batch], np.float32) @ emb.T  # (b, D) . (D, N) -> (b, N)
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sc, part, axis=1), axis=1, kind="stable")
        rows[s : s + batch] = np.take_along_axis(part, order, axis=1)
    return rows


def recall_at_k(got_ids: np.ndarray, true_ids: np.ndarray) -> float:
    """Mean over queries of |returned top-k ∩ exact top-k| / k."""
    hits = sum(len(set(a) & set(b)) for a, b in zip(got_ids.tolist(), true_ids.tolist()))
    return hits / true_ids.size


def _check_inputs(index: Index, emb, queries, target_recall: float, k: int):
    if not 0 < target_recall <= 1:
        raise UserError(f"target recall must be in (0, 1], got {target_recall}")
    if int(k) < 1:
        raise UserError(f"tune k must be >= 1, got {k}")
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != index.dim or len(queries) == 0:
        raise UserError(f"tuning queries must be (Q, {index.dim}) with Q > 0, got {queries.shape}")
    emb = np.asarray(emb)
    if emb.shape != (index.size, index.dim):
        raise UserError(f"emb {emb.shape} is not the indexed ({index.size}, {index.dim}) vectors")
    return queries, emb, min(int(k), index.size)


def _qps(index: Index, queries: np.ndarray, k: int, settings: list[dict], repeats: int,
         clock) -> list[float]:  # fmt: skip
    """Queries/s of each search setting: the best of ``repeats`` timed searches, taken in rounds
    (every setting once a round), so that a spell of load on a shared machine slows every
    setting alike instead of all the runs of one."""
    best_s = [math.inf] * len(settings)
    for _ in range(max(1, int(repeats))):
        for i, params in enumerate(settings):
            t0 = clock()
            index.search(queries, k, **params)
            best_s[i] = min(best_s[i], clock() - t0)
    return [len(queries) / max(s, 1e-9) for s in best_s]


def _setting(params: dict) -> tuple:
    """A setting's key in the recall and speed caches: its (knob, value) pairs, sorted."""
    return tuple(sorted(params.items()))


def tune(
    index: Index,
    emb: np.ndarray,
    queries: np.ndarray,
    target_recall: float,
    k: int = 10,
    repeats: int = 2,
    clock: Callable[[], float] = time.perf_counter,
    true_rows: np.ndarray | None = None,
    cache: dict | None = None,
    report: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Choose ``index``'s search knobs: the highest queries/s with recall@``k`` >= target.

    ``emb`` are the indexed vectors (the exact neighbours are computed from them), ``queries``
    the tuning queries (Q, dim). Sets and returns ``index.tuned``: ``params`` (the knobs),
    ``k``, ``target_recall``, ``recall`` and ``qps`` measured at ``params``, ``num_queries``,
    ``num_threads`` and ``candidates`` (every setting timed). Raises :class:`TuneError` if no
    setting reaches the target. ``true_rows`` (Q, >= k): the exact neighbours' rows if already
    known; ``cache``: a dict kept between calls on the same index and queries (e.g. for several
    targets) so that no setting's recall is measured, nor its speed timed, twice (a setting that
    is a candidate for several targets keeps one timing, so each target's choice compares the
    same figures). ``report``: called with one line
    per trial (each recall measured, each candidate timed), e.g. to show progress.
    """
    report = report or (lambda line: None)
    queries, emb, k = _check_inputs(index, emb, queries, target_recall, k)
    space = index.tune_space(k)
    if not space:
        raise TuneError(
            f"backend {index.backend!r} has no search knob to tune (it is exact); "
            f"drop --target-recall or choose scann, faiss-hnsw or faiss-ivfpq"
        )
    index.tuned = None  # measure the knobs themselves, not a previous tuning
    if true_rows is None:
        report(f"tune: exact top-{k} of {len(queries):,} queries over {len(emb):,} vectors")
        true_rows = exact_neighbours(emb, queries, k)
    true_ids = index.ids[np.asarray(true_rows)[:, :k]]
    recalls: dict[tuple, float] = {} if cache is None else cache.setdefault(("recall", k), {})
    speeds: dict[tuple, float] = {} if cache is None else cache.setdefault(("qps", k, repeats), {})

    def recall_of(params: dict) -> float:
        key = _setting(params)
        if key not in recalls:
            _, got = index.search(queries, k, **params)
            recalls[key] = recall_at_k(got, true_ids)
            ok = ">=" if recalls[key] >= target_recall else "<"
            report(f"tune: trial {len(recalls)}: {dict(key)} recall@{k} {recalls[key]:.4f} "
                   f"{ok} {target_recall}")  # fmt: skip
        return recalls[key]

    def cheapest(values: list, fixed: dict, name: str, hi: int) -> int | None:
        """Index of the smallest of values[: hi + 1] reaching the target (None: none does)."""
        if recall_of({**fixed, name: values[hi]}) < target_recall:
            return None
        lo = 0
        while lo < hi:
            mid = (lo + hi) // 2
            if recall_of({**fixed, name: values[mid]}) >= target_recall:
                hi = mid
            else:
                lo = mid + 1
        return hi

    candidates: list[dict] = []
    if len(space) == 1:
        (name, values), = space  # fmt: skip
        i = cheapest(values, {}, name, len(values) - 1)
        if i is not None:
            candidates.append({name: values[i]})
    else:
        (outer, outer_values), (inner, inner_values) = space[:2]
        hi = len(inner_values) - 1
        for v in outer_values:
            i = cheapest(inner_values, {outer: v}, inner, hi)
            if i is None:
                continue
            if i < hi or not candidates:  # else the previous coarse value did it as cheaply
                candidates.append({outer: v, inner: inner_values[i]})
            if i == 0:
                break  # more of the coarse knob only costs more
            hi = i
    if not candidates:
        best = max(recalls.items(), key=lambda kv: kv[1])
        raise TuneError(
            f"{index.backend}: recall@{k} {target_recall} not reached on {len(queries)} tuning "
            f"queries; the best was {best[1]:.4f} at {dict(best[0])}; lower --target-recall or "
            f"rebuild with a finer index (e.g. more leaves, larger M or m)"
        )

    keyed = [(params, _setting(params)) for params in candidates]
    todo = [(params, key) for params, key in keyed if key not in speeds]
    if todo:
        report(f"tune: timing {len(todo)} candidate(s), {max(1, int(repeats))} round(s)")
    times = _qps(index, queries, k, [params for params, _ in todo], repeats, clock)
    for (params, key), qps in zip(todo, times):
        speeds[key] = qps
        report(f"tune: timed {params}: {qps:,.0f} q/s")
    timed = [{"params": params, "recall": round(recall_of(params), 6), "qps": speeds[key]}
             for params, key in keyed]  # fmt: skip
    best = max(timed, key=lambda c: c["qps"])
    index.tuned = {
        "params": dict(best["params"]),
        "k": k,
        "target_recall": float(target_recall),
        "recall": best["recall"],
        "qps": round(best["qps"], 1),
        "num_queries": len(queries),
        "num_threads": index.options.get("num_threads"),
        "candidates": [{**c, "qps": round(c["qps"], 1)} for c in timed],
        "settings_evaluated": len(recalls),
    }
    return index.tuned
