"""`dpr-jax read`: read answers from retrieved passages with a reader model; EM/F1 and DPR's
reader-predictions JSON.

The command line over :mod:`dpr_jax.reader.span`.
"""

from __future__ import annotations

import json
import sys

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import (
    NON_NEGATIVE,
    POSITIVE,
    READER_DTYPE_HELP,
    READER_DTYPES,
    add_quiet,
    parse_ks,
)
from dpr_jax.data.formats import PREDICTIONS_FILE
from dpr_jax.errors import UserError
from dpr_jax.io import FILE, check_output
from dpr_jax.reader.data import FORMATS, read_reader_examples, sample_examples
from dpr_jax.reader.span import (
    DEFAULT_SELECTION,
    DEFAULT_TOP_K,
    DEFAULT_WINDOW_OVERLAP,
    SELECTIONS,
    ReaderPredictor,
    evaluate_predictions,
    write_predictions,
)


def cli_main(argv: list[str] | None = None) -> int:

    ap = command_parser(__name__, __doc__)
    ap.add_argument("--model", required=True, help="reader model directory (or training workdir)")
    ap.add_argument(
        "--results",
        required=True,
        help="retrieval-results, biencoder or SQuAD JSON with questions and passages",
    )
    ap.add_argument("--format", default="auto", choices=FORMATS)
    ap.add_argument(
        "--ks",
        "--top-k",
        dest="top_k",
        type=parse_ks,
        default=list(DEFAULT_TOP_K),
        help="numbers of retrieved passages to read, e.g. 1,10,50",
    )
    ap.add_argument("--max-answer-length", type=POSITIVE, default=10)
    ap.add_argument("--selection", default=DEFAULT_SELECTION, choices=SELECTIONS,
                    help="answer selection across passages (dpr_jax.reader.span)")  # fmt: skip
    ap.add_argument("--batch-size", type=POSITIVE, default=None,
                    help="sequences per forward pass (default: 24 on a CPU, 32 on a GPU / TPU)")  # fmt: skip
    ap.add_argument("--dtype", default="float32", choices=READER_DTYPES, help=READER_DTYPE_HELP)
    cut = ap.add_mutually_exclusive_group()
    cut.add_argument(
        "--window-overlap", type=NON_NEGATIVE, default=None,  # None: argparse sees it unset
        help="a passage longer than one sequence is read in windows sharing this many tokens "
        f"(default {DEFAULT_WINDOW_OVERLAP}, or half of a shorter reader's max_length; at most "
        "half of it)",
    )  # fmt: skip
    cut.add_argument("--truncate", action="store_true",
                    help="cut a passage at the model's max length instead (DPR's reader)")  # fmt: skip
    ap.add_argument("--limit", type=POSITIVE, default=None, help="only the first N questions")
    ap.add_argument(
        "--sample", type=POSITIVE, default=None,
        help="a seeded random sample of N questions (files list questions by article)",
    )  # fmt: skip
    ap.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of --sample")
    ap.add_argument("--out", help="write DPR reader-predictions JSON here")
    add_quiet(ap)
    args = ap.parse_args(argv)  # fmt: skip
    if args.out:
        check_output(args.out, FILE, [args.results, args.model], writes=PREDICTIONS_FILE)

    examples = read_reader_examples(args.results, args.format)
    if args.sample:
        examples = sample_examples(examples, args.sample, args.seed)
    if args.limit:
        examples = examples[: args.limit]
    if not examples:
        raise UserError(f"{args.results}: no questions")
    predictor = ReaderPredictor.from_dir(
        args.model,
        max_answer_length=args.max_answer_length,
        batch_size=args.batch_size,
        selection=args.selection,
        dtype=args.dtype,
        window_overlap=None
        if args.truncate
        else ("auto" if args.window_overlap is None else args.window_overlap),
    )
    args.window_overlap = predictor.window_overlap  # recorded in --out's config as used
    args.batch_size = predictor.batch_size  # likewise
    preds = predictor.predict(
        [e.question for e in examples], [list(e.passages) for e in examples], args.top_k,
        [e.answers for e in examples], progress=not args.quiet,
    )  # fmt: skip
    metrics = evaluate_predictions(preds)
    no_gold = max((m["questions_without_answers"] for m in metrics.values()), default=0)
    if no_gold:
        print(f"{no_gold} questions have no gold answers: kept and counted as misses (EM/F1 0)",
              file=sys.stderr)  # fmt: skip
    depth = max(len(e.passages) for e in examples)
    for k, m in metrics.items():
        beyond = f"; k > the {depth} passages a question has at most" if k > depth else ""
        print(f"top-{k:<4d} EM {100 * m['em']:6.2f}  F1 {100 * m['f1']:6.2f}  "
              f"({m['questions']} questions{beyond})")  # fmt: skip
    if args.out:
        config = {**vars(args), "input_config": predictor.input_config.to_dict(),
                  "metrics": {str(k): v for k, v in metrics.items()}}  # fmt: skip
        write_predictions(args.out, preds, config)
        print(f"wrote {args.out}")
    print(json.dumps({str(k): v for k, v in metrics.items()}))
    return 0
