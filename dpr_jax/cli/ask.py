"""`dpr-jax ask`: answer questions end to end: dense retrieval over an index, then the reader.

The command line over :mod:`dpr_jax.pipeline`.
"""

from __future__ import annotations

import sys
import time

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import (
    POSITIVE,
    READER_DTYPE_HELP,
    READER_DTYPES,
    add_quiet,
    refuse_together,
)
from dpr_jax.data.answers import exact_match_score, f1_score
from dpr_jax.data.formats import PREDICTIONS_FILE
from dpr_jax.data.questions import is_tfds_spec, read_questions
from dpr_jax.errors import UserError
from dpr_jax.io import FILE, check_output
from dpr_jax.pipeline import QAPipeline
from dpr_jax.reader.span import DEFAULT_SELECTION, SELECTIONS, QuestionPrediction, write_predictions


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    ap.add_argument("question", nargs="?", help="one question (or use --questions FILE)")
    ap.add_argument(
        "--questions",
        help="batch mode: qas TSV / NQ-open JSONL / SQuAD JSON "
        "or tfds:<name>/<split> (e.g. tfds:web_questions/test)",
    )
    ap.add_argument("--out", help="batch mode: reader-predictions JSON to write")
    ap.add_argument("--retriever", required=True, help="bi-encoder model dir")
    ap.add_argument("--index", required=True, help="index dir (dpr-jax index)")
    ap.add_argument(
        "--passages",
        required=True,
        help="the passages of the index: a passages TSV, SQuAD JSON or DPR JSON (dpr_jax.data.corpus)",
    )
    ap.add_argument("--reader", required=True, help="reader model dir")
    ap.add_argument("--k", type=POSITIVE, default=50, help="passages given to the reader")
    ap.add_argument("--max-answer-length", type=POSITIVE, default=10)
    ap.add_argument("--selection", default=DEFAULT_SELECTION, choices=SELECTIONS,
                    help="answer selection across passages (dpr_jax.reader.span)")  # fmt: skip
    ap.add_argument("--dtype", default="float32", choices=READER_DTYPES, help=READER_DTYPE_HELP)
    add_quiet(ap)
    args = ap.parse_args(argv)
    if not args.question and not args.questions:
        ap.error("give a question or --questions FILE|tfds:NAME/SPLIT")
    args.__dict__["<question>"] = args.question
    refuse_together(ap, args, ("<question>", "questions"))
    if args.out and not args.questions:
        ap.error("--out writes the predictions of --questions; one question is answered on stdout")
    if args.out:
        questions_file = None if is_tfds_spec(args.questions or "") else args.questions
        inputs = [questions_file, args.retriever, args.index, args.passages, args.reader]
        check_output(args.out, FILE, inputs, writes=PREDICTIONS_FILE)
    questions = []
    if not args.question:  # batch mode; read first: a wrong spec fails before any model loads
        questions = read_questions(args.questions)
        if not questions:
            raise UserError(f"{args.questions}: no questions (empty)")

    pipe = QAPipeline.from_dirs(
        args.retriever, args.index, args.passages, args.reader,
        n_passages=args.k, max_answer_length=args.max_answer_length, selection=args.selection,
        reader_dtype=args.dtype,
    )  # fmt: skip
    size = pipe.retriever.index.size  # from_dirs builds a DenseRetriever
    if args.k > size and not args.quiet:
        print(f"dpr-jax ask: --k {args.k} > the index's {size:,} passages: the reader reads "
              f"all {size:,} for each question", file=sys.stderr)  # fmt: skip
    if args.question:
        t0 = time.time()
        p = pipe.answer(args.question)
        print(f"{p.text}\n  (from {p.title!r}, score {p.score:.2f}, {time.time() - t0:.2f}s)")
        return 0

    t0 = time.time()
    preds = pipe.answer([q.question for q in questions], progress=not args.quiet)
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
