"""BM25, DPR's sparse baseline and source of hard negatives (Karpukhin et al. 2020, sec. 3.2, 5.1).

DPR compares against BM25 (Lucene) and trains with "BM25 negatives: top passages returned by BM25
which don't contain the answer but match most question tokens" (sec. 3.2). This module indexes
``title + " " + text`` of every passage with `bm25s <https://github.com/xhluca/bm25s>`_ (a fast,
pure-numpy eager BM25) and searches many questions at once.

Tokenization (same for passages and questions): lower-case, ``\\w+`` runs (so one-character
tokens such as "7" or "x" are kept, unlike bm25s' default ``\\w\\w+``), optional stopword
removal (``stopwords="en"``: bm25s' English list; off by default because it did not help: on
the SQuAD dev split of ``prepare-squad`` top-1/20/100 were 74.2/94.3/97.3% without and
73.8/94.2/97.4% with it) and no stemming (it would need the extra PyStemmer package).
``k1=0.9, b=0.4`` are Anserini/pyserini's defaults, which DPR's BM25 numbers come from (on the
same split: top-1/20/100 74.2/94.3/97.3% vs 73.4/94.3/97.5% with k1=1.5, b=0.75);
``method="lucene"`` is Lucene's BM25:
``idf = ln(1 + (N - df + 0.5) / (df + 0.5))``, ``tf / (tf + k1 (1 - b + b dl / avgdl))``.

Scores are BM25 scores (higher is better); ``search`` returns ``(scores (Q, k) float32, ids)``
with ``ids`` a list of lists of passage-id strings, best first. Index directories hold bm25s'
files plus ``bm25_config.json`` (options, corpus size, ``corpus_fingerprint``: the
:func:`dpr_jax.io.fingerprint_passages` of the indexed passages) and ``ids.json`` (row ->
passage id). :meth:`BM25Retriever.check_corpus` refuses a passages file that is not that corpus
(other ids, or the same ids with other titles or texts).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpr_jax.data.answers import AnswerMatcher
from dpr_jax.data.checks import question_texts
from dpr_jax.errors import ProvenanceError, UserError, optional_import
from dpr_jax.io import BM25, check_output, fingerprint_passages, staged_dir
from dpr_jax.io import progress as progress_bar

TOKEN_PATTERN = r"(?u)\b\w+\b"


def _import_bm25s():
    bm25s = optional_import("bm25s", "bm25", "BM25")
    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets its own logger to DEBUG
    return bm25s


@dataclasses.dataclass(frozen=True)
class BM25Config:
    k1: float = 0.9
    b: float = 0.4
    method: str = "lucene"
    stopwords: str | None = None  # "en" or None
    token_pattern: str = TOKEN_PATTERN
    index_title: bool = True


def _stopword_set(name: str | None) -> frozenset[str]:
    if name is None:
        return frozenset()
    if name != "en":
        raise UserError(f"stopwords must be 'en' or None, got {name!r}")
    tokenization = optional_import("bm25s.tokenization", "bm25", "BM25 stopwords")
    return frozenset(tokenization.STOPWORDS_EN)


class BM25Retriever:
    """BM25 over a list of passages (objects with ``id``, ``text`` and optionally ``title``)."""

    CONFIG_FILE = "bm25_config.json"
    IDS_FILE = "ids.json"

    def __init__(
        self,
        passages: Sequence[Any] | None = None,
        config: BM25Config | None = None,
        show_progress: bool = False,
        **options,
    ):
        if config is not None and options:
            raise UserError("give either config or keyword options, not both")
        self.config = config or BM25Config(**options)
        self._pattern = re.compile(self.config.token_pattern)
        self._stop = _stopword_set(self.config.stopwords)
        self.ids: list[str] = []
        self.model = None
        self.corpus_fingerprint: str | None = None  # of the indexed passages (ids, titles, texts)
        self.show_progress = show_progress
        if passages is not None:
            self.index(passages)

    def tokenize(self, text: str) -> list[str]:
        return [t for t in self._pattern.findall(text.lower()) if t not in self._stop]

    def _doc_text(self, p: Any) -> str:
        title = getattr(p, "title", "") or ""
        return f"{title} {p.text}" if (self.config.index_title and title) else p.text

    def index(self, passages: Sequence[Any]) -> BM25Retriever:
        bm25s = _import_bm25s()
        if not passages:
            raise UserError("cannot build a BM25 index over an empty corpus")
        self.ids = [str(p.id) for p in passages]
        if len(set(self.ids)) != len(self.ids):
            raise UserError("passage ids must be unique for a BM25 index")
        self.corpus_fingerprint = fingerprint_passages(passages)
        corpus_tokens = [self.tokenize(self._doc_text(p)) for p in passages]
        c = self.config
        self.model = bm25s.BM25(k1=c.k1, b=c.b, method=c.method)
        self.model.index(corpus_tokens, show_progress=self.show_progress)
        return self

    def __len__(self) -> int:
        return len(self.ids)

    def check_corpus(self, passages: Sequence[Any], passages_file=None, index_dir=None) -> None:
        """Refuse ``passages`` (read from ``passages_file``) when they are not the corpus this
        index was built from: by its ``corpus_fingerprint``, or, for an index saved by an older
        dpr-jax without one, by its ids (with a warning that texts cannot be checked)."""
        where = index_dir or "the BM25 index"
        src = passages_file or "the passages"
        fix = f"give the passages file it was built from, or delete {where} to rebuild it"
        if self.corpus_fingerprint is not None:
            if fingerprint_passages(passages) != self.corpus_fingerprint:
                raise ProvenanceError(
                    f"{src}: not the passages {where} was built from (their ids, titles or "
                    f"texts differ); {fix}"
                )
            return
        warnings.warn(
            f"{where}: records no corpus fingerprint (saved by an older dpr-jax); only its "
            f"passage ids can be checked against {src}",
            stacklevel=2,
        )
        known = {str(p.id) for p in passages}
        missing = next((i for i in self.ids if i not in known), None)
        if missing is not None:
            raise ProvenanceError(f"{src}: lacks passage id {missing!r} of {where}; {fix}")

    def search_rows(
        self,
        questions: Sequence[str],
        k: int,
        n_threads: int = 0,
        chunk: int = 2048,
        progress: bool = False,
        desc: str = "BM25 search",
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows of the corpus: ``(scores float32 (Q, k), rows int64 (Q, k))``.

        ``k`` is clamped to the corpus size. Questions are searched in chunks of ``chunk``
        (``n_threads`` > 0: bm25s' thread pool within a chunk).
        """
        if self.model is None:
            raise RuntimeError("BM25 index is empty: call index() or load() first")
        questions = question_texts(questions)
        if int(k) < 1:
            raise UserError(f"k must be >= 1, got {k}")
        k = min(int(k), len(self.ids))
        scores = np.zeros((len(questions), k), np.float32)
        rows = np.zeros((len(questions), k), np.int64)
        bar = progress_bar(total=len(questions), desc=desc, unit="q", enabled=progress)
        for lo in range(0, len(questions), chunk):
            toks = [self.tokenize(q) for q in questions[lo : lo + chunk]]
            # numpy top-k: 1.6x faster here than bm25s' default (one jax.lax.top_k dispatch
            # per query when JAX is installed), and data preparation never touches JAX devices.
            r, s = self.model.retrieve(
                toks, k=k, show_progress=False, n_threads=n_threads, backend_selection="numpy"
            )
            rows[lo : lo + len(toks)] = r
            scores[lo : lo + len(toks)] = s
            bar.update(len(toks))
        bar.close()
        return scores, rows

    def search(
        self, questions: Sequence[str], k: int = 100, n_threads: int = 0, progress: bool = False
    ) -> tuple[np.ndarray, list[list[str]]]:
        """``(scores float32 (Q, k), ids list[list[str]])``, best first (k clamped to corpus)."""
        scores, rows = self.search_rows(questions, k, n_threads, progress=progress)
        return scores, [[self.ids[j] for j in row] for row in rows]

    # -----------------------------------------------------------------------------------------

    def save(self, out_dir: str | Path) -> Path:
        """Write the index into ``out_dir`` (a temporary sibling renamed into place)."""
        if self.model is None:
            raise RuntimeError("nothing to save: the BM25 index is empty")
        out_dir = check_output(out_dir, BM25, what="BM25 index path")  # only a BM25 index
        with staged_dir(out_dir) as tmp:  # the path never stops naming a whole index
            self.model.save(str(tmp), show_progress=False)
            cfg = {**dataclasses.asdict(self.config), "size": len(self.ids),
                   "corpus_fingerprint": self.corpus_fingerprint,
                   "created_by": "dpr_jax.data.bm25"}  # fmt: skip
            (tmp / self.CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
            (tmp / self.IDS_FILE).write_text(json.dumps(self.ids))
        return out_dir

    @classmethod
    def load(cls, index_dir: str | Path, show_progress: bool = False) -> BM25Retriever:
        bm25s = _import_bm25s()
        index_dir = Path(index_dir)
        cfg_path = index_dir / cls.CONFIG_FILE
        if not cfg_path.exists():
            raise FileNotFoundError(f"{cfg_path}: not a dpr-jax BM25 index (no {cls.CONFIG_FILE})")
        try:
            cfg = json.loads(cfg_path.read_text())
            ids = json.loads((index_dir / cls.IDS_FILE).read_text())
        except (json.JSONDecodeError, FileNotFoundError) as e:
            raise UserError(f"{index_dir}: unreadable BM25 index ({e})") from None
        size = cfg.pop("size", None)
        cfg.pop("created_by", None)
        corpus_fingerprint = cfg.pop("corpus_fingerprint", None)
        try:
            config = BM25Config(**cfg)
        except TypeError as e:
            raise UserError(f"{cfg_path}: unknown BM25 option ({e})") from None
        if size is not None and size != len(ids):
            raise UserError(f"{index_dir}: {cls.IDS_FILE} has {len(ids)} ids, config says {size}")
        self = cls(config=config, show_progress=show_progress)
        self.model = bm25s.BM25.load(str(index_dir), show_progress=False)
        self.ids = [str(i) for i in ids]
        self.corpus_fingerprint = corpus_fingerprint
        return self


def bm25_hard_negatives(
    retriever: BM25Retriever,
    questions: Sequence[str],
    answers: Sequence[Sequence[str]],
    passages: Sequence[Any],
    n: int = 10,
    depth: int = 50,
    exclude: Sequence[Sequence[str]] | None = None,
    is_positive: Callable[[int, int], bool] | None = None,
    min_score: float = 0.0,
    n_threads: int = 0,
    progress: bool = False,
    desc: str = "BM25 hard negatives",
) -> tuple[list[list[int]], list[list[float]]]:
    """BM25 hard negatives (DPR sec. 3.2): per question, the top-``n`` of the BM25 top-``depth``
    passages that do *not* contain any answer (DPR's ``has_answer``, string match).

    ``passages`` must be the corpus the retriever indexed, in the same order. ``exclude[i]``
    optionally lists passage ids never to use for question i (e.g. its positives);
    ``is_positive(i, row)`` is an extra veto. Passages scoring ``<= min_score`` (by default those
    sharing no term with the question) are never negatives. Returns, per question, the corpus rows of the
    negatives and their BM25 scores, best first (possibly fewer than ``n``).
    """

    if len(questions) != len(answers):
        raise UserError(f"{len(questions)} questions but {len(answers)} answer lists")
    if len(passages) != len(retriever):
        raise UserError(f"{len(passages)} passages but the index has {len(retriever)}")
    matcher = AnswerMatcher()
    scores, rows = retriever.search_rows(
        questions, depth, n_threads=n_threads, progress=progress, desc=desc
    )
    out_rows: list[list[int]] = []
    out_scores: list[list[float]] = []
    for i in range(len(questions)):
        keys = matcher.answer_keys(answers[i])
        banned = set(exclude[i]) if exclude is not None else ()
        got_r, got_s = [], []
        for s, r in zip(scores[i], rows[i]):
            if s <= min_score:
                break  # sorted: the rest score no higher
            r = int(r)
            p = passages[r]
            if str(p.id) in banned or (is_positive is not None and is_positive(i, r)):
                continue
            if matcher.match(keys, p.text, key=r):
                continue
            got_r.append(r)
            got_s.append(float(s))
            if len(got_r) == n:
                break
        out_rows.append(got_r)
        out_scores.append(got_s)
    return out_rows, out_scores
