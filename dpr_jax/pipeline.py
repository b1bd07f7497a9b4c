"""Open-domain QA end to end (Karpukhin et al. 2020, sec. 6): question -> passages -> answer.

A retriever (dense DPR, BM25 or hybrid; anything with ``search(questions, k)``) returns the top-k
passages; the extractive reader ranks them by its relevance logit and extracts the best span.
``QAPipeline`` loads everything once and answers one question or a batch; ``dpr-jax ask`` is its
command line, and in batch mode writes DPR's reader-predictions JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Sequence
from pathlib import Path


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
    ``ReaderPredictor``).
    """

    def __init__(
        self,
        retriever,
        passages: dict,
        reader,
        n_passages: int = 50,
        max_answer_length: int = 10,
        batch_size: int = 8,
    ):
        from dpr_jax.span import ReaderPredictor

        self.retriever = retriever
        self.passages = passages
        self.n_passages = n_passages
        self.batch_size = batch_size
        if isinstance(reader, (str, Path)):
            reader = ReaderPredictor.from_dir(reader, max_answer_length=max_answer_length)
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
        from dpr_jax.data.formats import read_passages_tsv
        from dpr_jax.provenance import check_passages
        from dpr_jax.retrieve import DenseRetriever

        passages_list = read_passages_tsv(passages_tsv)
        retriever = DenseRetriever(retriever_model, index_dir)  # checks the model against it
        check_passages(retriever.index, passages_tsv, passages_list, index_dir)
        passages = {str(p.id): p for p in passages_list}
        return cls(retriever, passages, reader_model, **kw)

    def retrieve(self, questions: Sequence[str]) -> list[list]:
        _, ids = self.retriever.search(list(questions), self.n_passages)
        return [[self.passages[str(i)] for i in row] for row in ids]

    def answer(self, questions: str | Sequence[str]):
        single = isinstance(questions, str)
        qs = [questions] if single else list(questions)
        ctxs = self.retrieve(qs)
        k = self.n_passages
        as_dicts = [
            [{"id": str(p.id), "title": p.title, "text": p.text} for p in cs] for cs in ctxs
        ]
        self.last_predictions = self.reader.predict(qs, as_dicts, top_k=(k,))
        out = []
        for q, qp, cs in zip(qs, self.last_predictions, ctxs):
            sp = qp.predictions[k]
            p = cs[sp.passage_idx] if 0 <= sp.passage_idx < len(cs) else None
            out.append(Answer(
                q, sp.text, sp.score, sp.relevance_score, p and str(p.id), p and p.title,
                sp.passage, len(cs),
            ))  # fmt: skip
        return out[0] if single else out


def cli_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="dpr-jax ask",
        description="Answer questions end to end: dense retrieval over an index, then the reader.",
    )
    ap.add_argument("question", nargs="?", help="one question (or use --questions FILE)")
    ap.add_argument("--questions", help="qas TSV / NQ-open JSONL / SQuAD JSON: batch mode")
    ap.add_argument("--out", help="batch mode: reader-predictions JSON to write")
    ap.add_argument("--retriever", required=True, help="bi-encoder model dir")
    ap.add_argument("--index", required=True, help="index dir (dpr-jax index)")
    ap.add_argument("--passages", required=True, help="passages TSV of the index")
    ap.add_argument("--reader", required=True, help="reader model dir")
    ap.add_argument("--k", type=int, default=50, help="passages given to the reader")
    ap.add_argument("--max-answer-length", type=int, default=10)
    args = ap.parse_args(argv)
    if not args.question and not args.questions:
        ap.error("give a question or --questions FILE")

    pipe = QAPipeline.from_dirs(
        args.retriever, args.index, args.passages, args.reader,
        n_passages=args.k, max_answer_length=args.max_answer_length,
    )  # fmt: skip
    if args.question:
        t0 = time.time()
        p = pipe.answer(args.question)
        print(f"{p.text}\n  (from {p.title!r}, score {p.score:.2f}, {time.time() - t0:.2f}s)")
        return 0

    from dpr_jax.data.formats import read_qas
    from dpr_jax.evaluate import exact_match_score, f1_score
    from dpr_jax.span import QuestionPrediction, write_predictions

    questions = read_qas(args.questions)
    t0 = time.time()
    preds = pipe.answer([q.question for q in questions])
    dt = time.time() - t0
    em = sum(exact_match_score(p.text, q.answers) for p, q in zip(preds, questions))
    f1 = sum(f1_score(p.text, q.answers) for p, q in zip(preds, questions))
    n = len(questions)
    print(f"{n} questions: EM {100 * em / n:.1f}  F1 {100 * f1 / n:.1f}  "
          f"({1000 * dt / n:.0f} ms/question)", file=sys.stderr)  # fmt: skip
    if args.out:
        gold = [
            QuestionPrediction(qp.question, tuple(q.answers), qp.predictions)
            for qp, q in zip(pipe.last_predictions, questions)
        ]
        write_predictions(args.out, gold, {"retriever": args.retriever, "index": args.index,
                                           "reader": args.reader, "k": args.k})  # fmt: skip
        print(f"predictions -> {args.out}", file=sys.stderr)
    return 0
