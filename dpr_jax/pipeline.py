"""Open-domain QA end to end (Karpukhin et al. 2020, sec. 6): question -> passages -> answer.

A retriever (dense DPR, BM25 or hybrid; anything with ``search(questions, k)``) returns the top-k
passages; the extractive reader reads a span out of them (by default the best log P(passage) +
log P(start) + log P(end), ``selection="joint"``; DPR's own rule is ``selection="dpr"``:
:mod:`dpr_jax.reader.span`).
``QAPipeline`` loads everything once and answers one question or a batch; ``dpr-jax ask`` is its
command line, and in batch mode writes DPR's reader-predictions JSON.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from dpr_jax.data.corpus import read_passages
from dpr_jax.errors import UserError
from dpr_jax.provenance import check_passages
from dpr_jax.reader.span import DEFAULT_SELECTION, ReaderPredictor
from dpr_jax.search import DenseRetriever


@dataclasses.dataclass(frozen=True)
class Answer:
    """The pipeline's answer to one question."""

    question: str
    text: str  # "" when no passage yields a span
    score: float  # start + end logit of the span
    relevance_score: float  # the reader's relevance logit of the passage
    passage_id: str | None
    title: str | None
    passage: str
    retrieved: int  # passages given to the reader


class QAPipeline:
    """``answer(questions) -> list of`` :class:`Answer` (``.text``, ``.title``, ``.score`` ...).

    ``retriever``: an object with ``search(questions, k) -> (scores, ids)``; ``passages``: id ->
    passage (``.title``, ``.text``); ``reader``: a reader model directory (or a loaded
    ``ReaderPredictor``); ``reader_dtype``: its compute dtype (``"bfloat16"``: on a CPU, mixed:
    :func:`dpr_jax.models.bert.cpu_mixed_inference`).
    """

    def __init__(
        self,
        retriever,
        passages: dict,
        reader,
        n_passages: int = 50,
        max_answer_length: int = 10,
        batch_size: int = 8,
        selection: str = DEFAULT_SELECTION,
        reader_dtype: str = "float32",
    ):

        for name, value in (("n_passages", n_passages), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"QAPipeline: {name} must be a whole number >= 1, got {value!r}")
        if not isinstance(passages, Mapping):  # a list of passages: keyed by their ids
            passages = list(passages)
            if not all(hasattr(p, "id") for p in passages):
                raise UserError(
                    "QAPipeline: passages must be a dict id -> passage, or passages with an .id"
                )
            passages = {str(p.id): p for p in passages}
        self.retriever = retriever
        self.passages = passages
        self.n_passages = n_passages
        self.batch_size = batch_size
        if isinstance(reader, (str, Path)):
            reader = ReaderPredictor.from_dir(
                reader, max_answer_length=max_answer_length, selection=selection,
                dtype=reader_dtype,
            )  # fmt: skip
        self.reader = reader

    @classmethod
    def from_dirs(
        cls,
        retriever_model: str | Path,
        index_dir: str | Path,
        passages_tsv: str | Path,
        reader_model: str | Path,
        **kw,
    ) -> QAPipeline:

        passages_list = read_passages(passages_tsv)
        retriever = DenseRetriever(retriever_model, index_dir)  # checks the model against it
        check_passages(retriever.index, passages_tsv, passages_list, index_dir)
        passages = {str(p.id): p for p in passages_list}
        return cls(retriever, passages, reader_model, **kw)

    def retrieve(self, questions: Sequence[str], progress: bool = False) -> list[list]:
        kw = {"progress": True} if progress else {}  # any retriever: progress is optional
        _, ids = self.retriever.search(list(questions), self.n_passages, **kw)
        try:
            return [[self.passages[str(i)] for i in row] for row in ids]
        except KeyError as e:
            raise UserError(
                f"passage id {e.args[0]!r}, retrieved, is not among the pipeline's "
                f"{len(self.passages):,} passages: the retriever searches another corpus"
            ) from None

    def answer(self, questions: str | Sequence[str], progress: bool = False):
        """The answer to one question (an :class:`Answer`) or to each of a list; ``progress``
        shows bars on stderr: questions retrieved, then the reader's passage sequences."""
        single = isinstance(questions, str)
        qs = [questions] if single else list(questions)
        ctxs = self.retrieve(qs, progress)
        k = self.n_passages
        as_dicts = [
            [{"id": str(p.id), "title": p.title, "text": p.text} for p in cs] for cs in ctxs
        ]
        self.last_predictions = self.reader.predict(qs, as_dicts, top_k=(k,), progress=progress)
        out = []
        for q, qp, cs in zip(qs, self.last_predictions, ctxs):
            sp = qp.predictions[k]
            p = cs[sp.passage_idx] if 0 <= sp.passage_idx < len(cs) else None
            out.append(Answer(
                q, sp.text, sp.score, sp.relevance_score, p and str(p.id), p and p.title,
                sp.passage, len(cs),
            ))  # fmt: skip
        return out[0] if single else out
