"""Retrieval: questions -> top-k passages, dense (DPR sec. 3.1), BM25, or hybrid (DPR sec. 5.1).

Dense retrieval encodes the questions with E_Q and searches an index of E_P passage vectors by
maximum inner product. BM25 is the sparse baseline; the hybrid fuses both rankings (DPR used
BM25 + lambda * sim; we provide pyserini's normalised linear combination and reciprocal-rank
fusion). Results are written in DPR's retrieval-results JSON so that ``dpr-jax evaluate``, DPR's
own scripts and pyserini can read them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np


class DenseRetriever:
    """Question tower + passage index. ``search(questions, k) -> (scores (Q, k), ids (Q, k))``."""

    def __init__(self, model_dir: str | Path, index, batch_size: int = 64, max_length: int = 64):
        from dpr_jax.encode import TowerEncoder
        from dpr_jax.index import load_index

        self.encoder = TowerEncoder(model_dir, "question", batch_size, max_length, bucket=16)
        self.index = load_index(index) if isinstance(index, (str, Path)) else index

    def encode(self, questions: Sequence[str]) -> np.ndarray:
        return self.encoder.encode(list(questions))

    def search(self, questions: Sequence[str], k: int = 100):
        return self.index.search(self.encode(questions), k)


class HybridRetriever:
    """Fuses a dense and a BM25 retriever. ``method``: "linear" (pyserini) or "rrf"."""

    def __init__(
        self, dense, sparse, method: str = "linear", alpha: float = 1.0, depth: int = 1000
    ):
        if method not in ("linear", "rrf"):
            raise ValueError(f"hybrid method must be 'linear' or 'rrf', got {method!r}")
        self.dense, self.sparse, self.method, self.alpha, self.depth = (
            dense, sparse, method, alpha, depth,
        )  # fmt: skip

    def search(self, questions: Sequence[str], k: int = 100):
        """``(scores (Q, k'), ids)`` with k' = min(k, the BM25 corpus size): at depth >= the
        corpus BM25 returns every passage, so the fused lists are never padded."""
        from dpr_jax import hybrid

        ids = getattr(self.sparse, "ids", None)
        k = min(k, len(ids)) if ids is not None and len(ids) else k
        depth = max(k, self.depth)
        ds, di = self.dense.search(questions, depth)
        ss, si = self.sparse.search(questions, depth)
        if self.method == "linear":
            return hybrid.linear_fusion(ds, di, ss, si, k=k, alpha=self.alpha)
        return hybrid.rrf_fusion(ds, di, ss, si, k=k)


def results_for(questions, scores, ids, passages: dict, match: str = "string") -> list[dict]:
    """DPR retrieval-results records: question, answers, ctxs [{id, title, text, score, has_answer}]."""
    from dpr_jax.evaluate import AnswerMatcher, has_answer

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
                raise KeyError(f"passage id {pid!r} from the index is not in the passages file")
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


def _build_retriever(args, passages_list):
    dense = sparse = None
    if args.mode in ("dense", "hybrid"):
        if not (args.model and args.index):
            raise SystemExit("dpr-jax retrieve: --model and --index are needed for dense retrieval")
        dense = DenseRetriever(args.model, args.index)
    if args.mode in ("bm25", "hybrid"):
        from dpr_jax.data.bm25 import BM25Retriever

        if args.bm25_index and Path(args.bm25_index).exists():
            sparse = BM25Retriever.load(args.bm25_index)
        else:
            sparse = BM25Retriever(passages_list)
            if args.bm25_index:
                sparse.save(args.bm25_index)
    if args.mode == "hybrid":
        return HybridRetriever(dense, sparse, args.fusion, args.alpha)
    return dense or sparse


def cli_main(argv: list[str] | None = None) -> int:
    from dpr_jax.data.formats import read_passages_tsv, read_qas, write_retrieval_results

    ap = argparse.ArgumentParser(
        prog="dpr-jax retrieve",
        description="Retrieve top-k passages per question and write DPR's retrieval-results JSON.",
    )
    ap.add_argument("--questions", required=True,
                    help="qas TSV/CSV, NQ-open JSONL or SQuAD JSON")  # fmt: skip
    ap.add_argument("--passages", required=True, help="passages TSV (id, text, title)")
    ap.add_argument("--out", required=True, help="retrieval-results JSON to write")
    ap.add_argument("--mode", default="dense", choices=["dense", "bm25", "hybrid"])
    ap.add_argument("--model", help="bi-encoder model dir (dense, hybrid)")
    ap.add_argument("--index", help="index dir from `dpr-jax index` (dense, hybrid)")
    ap.add_argument("--bm25-index", help="BM25 index dir (built from --passages and saved here "
                    "if it does not exist)")  # fmt: skip
    ap.add_argument("--fusion", default="linear", choices=["linear", "rrf"])
    ap.add_argument("--alpha", type=float, default=1.0, help="linear fusion weight of BM25")
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--match", default="string", choices=["string", "regex"])
    args = ap.parse_args(argv)

    questions = read_qas(args.questions)
    passages_list = read_passages_tsv(args.passages)
    passages = {str(p.id): p for p in passages_list}
    retriever = _build_retriever(args, passages_list)
    t0 = time.time()
    scores, ids = retriever.search([q.question for q in questions], args.k)
    dt = time.time() - t0
    results = results_for(questions, scores, ids, passages, args.match)
    write_retrieval_results(args.out, results)
    print(
        f"{len(questions):,} questions, {args.mode} retrieval in {dt:.1f}s "
        f"({len(questions) / max(dt, 1e-9):.1f} q/s) -> {args.out}",
        file=sys.stderr,
    )
    return 0
