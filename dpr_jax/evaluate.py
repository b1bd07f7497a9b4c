"""Evaluation as DPR reports it (Karpukhin et al. 2020, sec. 5.2 retrieval, sec. 6 reader).

Retrieval (sec. 5.2, Table 2): *top-k accuracy* is the fraction of questions for which at least
one of the top-k retrieved passages contains an answer, "contains" being DPR's ``has_answer``
(:mod:`dpr_jax.data.answers`, re-exported here with the reader's exact match and F1).

Questions without gold answers are kept and counted as misses, as DPR does (see
:mod:`dpr_jax.data.answers`); the commands report how many there were.

ANN recall: the fraction of the exact top-k ids that an approximate index also returns in its
top-k, averaged over queries (how much ScaNN/FAISS lose against brute force).

``dpr-jax evaluate --results FILE`` prints the top-k table of a retrieval-results JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dpr_jax.data.answers import (
    MATCH_TYPES,
    AnswerMatcher,
    count_without_answers,
    exact_match_score,
    f1_score,
    has_answer,
    normalize_answer,
    regex_match,
    simple_tokenize,
)
from dpr_jax.errors import UserError

__all__ = [
    "MATCH_TYPES", "AnswerMatcher", "ann_recall", "count_without_answers", "exact_match_score", "f1_score", "has_answer",
    "normalize_answer", "question_hits", "regex_match", "simple_tokenize", "top_k_accuracy",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Retrieval metrics


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def question_hits(results: Sequence[Any], match_type: str = "string") -> list[list[bool]]:
    """Per question, per retrieved ctx: has_answer (the stored flag, recomputed when absent)."""
    out = []
    for i, r in enumerate(results):
        answers = _field(r, "answers")
        ctxs = _field(r, "ctxs")
        if answers is None or ctxs is None:
            raise UserError(f"result {i}: needs 'answers' and 'ctxs'")
        hits = []
        for c in ctxs:
            flag = _field(c, "has_answer")
            if flag is None:
                flag = has_answer(answers, _field(c, "text") or "", match_type)
            hits.append(bool(flag))
        out.append(hits)
    return out


def top_k_accuracy(
    results: Sequence[Any],
    ks: Sequence[int] = (1, 5, 20, 100),
    match_type: str = "string",
    recompute: bool = False,
) -> dict[int, float]:
    """DPR's top-k retrieval accuracy of retrieval-results records (dicts or objects).

    A question counts as a hit at k if any of its first k ctxs has the answer. ``has_answer``
    stored in a ctx is trusted unless ``recompute``; absent ones are computed with ``match_type``.
    A question without gold answers is kept and is a miss at every k (DPR's convention).
    A question with fewer than k ctxs is judged on the ctxs it has (DPR's files always have the
    same number per question).
    """
    if not results:
        raise UserError("no results to evaluate")
    bad = [k for k in ks if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1]
    if bad:
        raise UserError(f"top-k accuracy needs k >= 1 (whole numbers), got {bad[0]!r}")
    if recompute:
        results = [
            {
                "answers": _field(r, "answers"),
                "ctxs": [{"text": _field(c, "text")} for c in (_field(r, "ctxs") or [])],
            }
            for r in results
        ]
    hits = question_hits(results, match_type)
    first = [next((j for j, h in enumerate(row) if h), None) for row in hits]
    return {int(k): sum(1 for f in first if f is not None and f < k) / len(first) for k in ks}


def ann_recall(approx_ids: Sequence[Sequence[Any]], exact_ids: Sequence[Sequence[Any]], k: int):
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|.

    Empty ids ("" / None, how indexes pad missing results) are ignored on both sides.
    """
    if len(approx_ids) != len(exact_ids):
        raise UserError(f"{len(approx_ids)} approximate vs {len(exact_ids)} exact result rows")
    if k < 1:
        raise UserError(f"k must be >= 1, got {k}")
    recalls = []
    for a, e in zip(approx_ids, exact_ids):
        truth = {str(x) for x in list(e)[:k] if x is not None and str(x) != ""}
        if not truth:
            continue
        found = {str(x) for x in list(a)[:k]}
        recalls.append(len(truth & found) / len(truth))
    if not recalls:
        raise UserError("no query has exact results to compare with")
    return float(sum(recalls) / len(recalls))


def results_for(questions, scores, ids, passages: dict, match: str = "string") -> list[dict]:
    """DPR retrieval-results records: question, answers, ctxs [{id, title, text, score, has_answer}]
    of retrieved ``(scores, ids)`` rows: DPR's ``has_answer`` judged here, in evaluation, not
    by the retrievers (:mod:`dpr_jax.search`)."""

    # String matching tokenizes each passage once (cached by id), not once per question: the
    # same passages come back for many questions (equal to has_answer, tests/test_evaluate.py).
    matcher = AnswerMatcher() if match == "string" else None
    out = []
    for q, row_s, row_i in zip(questions, scores, ids):
        ctxs = []
        keys = matcher.answer_keys(q.answers) if matcher else None
        for s, pid in zip(row_s, row_i):
            if (pid is None or str(pid) == "") and not np.isfinite(s):
                continue  # padding: fewer results than k (k > corpus, ANN misses)
            p = passages.get(str(pid))
            if p is None:
                raise UserError(f"passage id {pid!r} from the index is not in the passages file")
            if matcher:
                hit = matcher.match(keys, p.text, key=str(pid))
            else:
                hit = has_answer(q.answers, p.text, match_type=match)
            ctxs.append({
                "id": str(pid), "title": p.title, "text": p.text, "score": float(s),
                "has_answer": bool(hit),
            })  # fmt: skip
        out.append({"question": q.question, "answers": list(q.answers), "ctxs": ctxs})
    return out
