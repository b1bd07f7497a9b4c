"""Retrieval: questions -> top-k passages, dense (DPR sec. 3.1), BM25, or hybrid (DPR sec. 5.1).

Dense retrieval encodes the questions with E_Q and searches an index of E_P passage vectors by
maximum inner product. BM25 is the sparse baseline; the hybrid fuses both rankings (DPR used
BM25 + lambda * sim; we provide pyserini's normalised linear combination and reciprocal-rank
fusion). Results are written in DPR's retrieval-results JSON so that ``dpr-jax evaluate``, DPR's
own scripts and pyserini can read them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dpr_jax import hybrid
from dpr_jax.data.checks import question_texts
from dpr_jax.errors import UserError
from dpr_jax.index import load_index
from dpr_jax.io import progress as progress_bar
from dpr_jax.provenance import check_model
from dpr_jax.retriever.encode import TowerEncoder

QUESTION_MAX_LENGTH = 64  # tokens of a question (DPR's)


class DenseRetriever:
    """Question tower + passage index. ``search(questions, k) -> (scores (Q, k), ids (Q, k))``."""

    def __init__(
        self, model_dir: str | Path, index, batch_size: int = 64,
        max_length: int = QUESTION_MAX_LENGTH,
    ):  # fmt: skip

        index_dir = index if isinstance(index, (str, Path)) else None
        self.index = load_index(index) if index_dir is not None else index
        self.encoder = TowerEncoder(model_dir, "question", batch_size, max_length, bucket=16)
        # before any question is encoded: the index's passages came from this bi-encoder
        check_model(self.index, self.encoder.meta["params_sha256"], model_dir, index_dir)

    # questions per index call when searching: progress between calls, a multiple of the exact
    # index's default query batch (512), so its compiled batch shape is unchanged
    SEARCH_CHUNK = 1024

    def encode(self, questions: Sequence[str], progress: bool = False) -> np.ndarray:
        questions = question_texts(questions)
        bar = progress_bar(total=len(questions), desc="encode questions", unit="q",
                           enabled=progress)  # fmt: skip
        with bar:
            return self.encoder.encode(questions, progress=bar)

    def search(self, questions: Sequence[str], k: int = 100, progress: bool = False):
        """``progress``: bars (questions/s) on stderr while encoding and while searching."""
        q = self.encode(questions, progress)
        if not progress or len(q) <= self.SEARCH_CHUNK:
            return self.index.search(q, k)
        scores, ids = [], []
        with progress_bar(total=len(q), desc="search", unit="q") as bar:
            for lo in range(0, len(q), self.SEARCH_CHUNK):
                s, i = self.index.search(q[lo : lo + self.SEARCH_CHUNK], k)
                scores.append(s)
                ids.append(i)
                bar.update(len(s))
        return np.concatenate(scores), np.concatenate(ids)


class HybridRetriever:
    """Fuses a dense and a BM25 retriever. ``method``: "linear" (pyserini) or "rrf"."""

    def __init__(
        self, dense, sparse, method: str = "linear", alpha: float = 1.0, depth: int = 1000
    ):
        if method not in ("linear", "rrf"):
            raise UserError(f"hybrid method must be 'linear' or 'rrf', got {method!r}")
        if (
            isinstance(alpha, bool)
            or not isinstance(alpha, (int, float))
            or not (math.isfinite(alpha) and alpha >= 0)
        ):  # NaN would make every fused score NaN and the order arbitrary
            raise UserError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise UserError(f"depth must be an integer >= 1, got {depth!r}")
        self.dense, self.sparse, self.method, self.alpha, self.depth = (
            dense, sparse, method, alpha, depth,
        )  # fmt: skip

    def search(self, questions: Sequence[str], k: int = 100, progress: bool = False):
        """``(scores (Q, k'), ids)`` with k' = min(k, the BM25 corpus size): at depth >= the
        corpus BM25 returns every passage, so the fused lists are never padded. ``progress``:
        each retriever's bars on stderr."""

        questions = question_texts(questions)
        ids = getattr(self.sparse, "ids", None)
        k = min(k, len(ids)) if ids is not None and len(ids) else k
        depth = max(k, self.depth)
        # only when asked: a retriever given through the API need not take the argument
        bars = {"progress": True} if progress else {}
        ds, di = self.dense.search(questions, depth, **bars)
        ss, si = self.sparse.search(questions, depth, **bars)
        if self.method == "linear":
            return hybrid.linear_fusion(ds, di, ss, si, k=k, alpha=self.alpha)
        return hybrid.rrf_fusion(ds, di, ss, si, k=k)
