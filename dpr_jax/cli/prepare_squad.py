"""`dpr-jax prepare-squad`: SQuAD v1.1 JSON -> 100-word passages, qas TSV and DPR biencoder JSON
with BM25 hard negatives, split by article into train/dev.

The command line over :mod:`dpr_jax.data.squad`.
"""

from __future__ import annotations

import sys

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import FRACTION, NON_NEGATIVE, POSITIVE, add_quiet
from dpr_jax.data.squad import CHUNKINGS, prepare_squad


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    ap.add_argument("--squad", help="SQuAD v1.1 JSON (default: $DPR_JAX_SQUAD, "
                    "$DPR_JAX_DATA/squad/train-v1.1.json, the cache, else download)")  # fmt: skip
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument(
        "--val-fraction", type=FRACTION, default=0.1, help="fraction of articles for dev"
    )
    ap.add_argument("--seed", type=NON_NEGATIVE, default=0, help="seed of the article split")
    ap.add_argument(
        "--hard-negatives", type=NON_NEGATIVE, default=10, help="BM25 negatives kept/question"
    )
    ap.add_argument(
        "--bm25-depth", type=POSITIVE, default=50, help="BM25 results searched for them"
    )
    ap.add_argument("--max-articles", type=POSITIVE, help="use only the first N articles")
    ap.add_argument("--words", type=POSITIVE, default=100, help="max words per passage")
    ap.add_argument("--chunking", default="balanced", choices=list(CHUNKINGS))
    ap.add_argument("--positive", default="skip", choices=["skip", "answer_start"],
                    help="when no chunk has the answer tokens: skip the question, or use the "
                    "chunk holding answer_start")  # fmt: skip
    ap.add_argument("--no-bm25-index", action="store_true", help="do not save the BM25 indexes")
    add_quiet(ap)
    args = ap.parse_args(argv)
    prepare_squad(
        args.squad, args.out, val_fraction=args.val_fraction, seed=args.seed,
        hard_negatives=args.hard_negatives, bm25_depth=args.bm25_depth,
        max_articles=args.max_articles, words=args.words, chunking=args.chunking,
        positive=args.positive, save_bm25=not args.no_bm25_index,
        progress=not args.quiet,
        log=lambda m: print(m, file=sys.stderr),
    )  # fmt: skip
    return 0
