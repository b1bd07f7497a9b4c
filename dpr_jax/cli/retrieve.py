"""`dpr-jax retrieve`: retrieve top-k passages per question and write DPR's retrieval-results JSON.

The command line over :mod:`dpr_jax.search`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dpr_jax import __version__
from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import POSITIVE, add_quiet, number
from dpr_jax.data.bm25 import BM25Retriever
from dpr_jax.data.corpus import read_passages
from dpr_jax.data.formats import RESULTS_FILE, write_retrieval_results
from dpr_jax.data.questions import describe, is_tfds_spec, read_questions
from dpr_jax.errors import UsageError, UserError
from dpr_jax.evaluate import results_for
from dpr_jax.io import BM25, FILE, check_output
from dpr_jax.provenance import check_passages
from dpr_jax.search import DenseRetriever, HybridRetriever


def _build_retriever(args, passages_list):
    dense = sparse = None
    if args.mode in ("dense", "hybrid"):
        if not (args.model and args.index):
            raise UsageError("--model and --index are needed for dense retrieval")
        dense = DenseRetriever(args.model, args.index)
    if args.mode in ("bm25", "hybrid"):
        if args.bm25_index and Path(args.bm25_index).exists():
            sparse = BM25Retriever.load(args.bm25_index)
            sparse.check_corpus(passages_list, args.passages, args.bm25_index)
        else:
            sparse = BM25Retriever(passages_list)
            if args.bm25_index:
                sparse.save(args.bm25_index)
    if args.mode == "hybrid":
        return HybridRetriever(dense, sparse, args.fusion, args.alpha)
    return dense or sparse


def cli_main(argv: list[str] | None = None) -> int:

    ap = command_parser(__name__, __doc__)
    ap.add_argument("--questions", required=True,
                    help="qas TSV/CSV, NQ-open JSONL, SQuAD JSON or tfds:<name>/<split> "
                    "(e.g. tfds:natural_questions_open/validation)")  # fmt: skip
    ap.add_argument(
        "--passages", required=True, help="passages TSV (id, text, title), SQuAD JSON or DPR JSON"
    )
    ap.add_argument("--out", required=True, help="retrieval-results JSON to write")
    ap.add_argument("--mode", default="dense", choices=["dense", "bm25", "hybrid"])
    ap.add_argument("--model", help="bi-encoder model dir (dense, hybrid)")
    ap.add_argument("--index", help="index dir from `dpr-jax index` (dense, hybrid)")
    ap.add_argument("--bm25-index", help="BM25 index dir (built from --passages and saved here "
                    "if it does not exist)")  # fmt: skip
    ap.add_argument("--fusion", choices=["linear", "rrf"], help="hybrid: linear (default) or rrf")
    ap.add_argument("--alpha", type=number(float, 0), default=None,
                    help="hybrid, linear fusion: weight of BM25 (default 1)")  # fmt: skip
    ap.add_argument("--k", type=POSITIVE, default=100)
    ap.add_argument("--match", default="string", choices=["string", "regex"])
    add_quiet(ap)
    args = ap.parse_args(argv)
    if args.mode != "hybrid" and (args.fusion is not None or args.alpha is not None):
        ap.error(f"--fusion and --alpha apply to --mode hybrid, not {args.mode}")
    if args.mode == "dense" and args.bm25_index:
        ap.error("--bm25-index applies to --mode bm25 and hybrid, not dense")
    if args.fusion == "rrf" and args.alpha is not None:
        ap.error("--alpha weighs the linear fusion; --fusion rrf has no weight")
    args.fusion = args.fusion or "linear"
    args.alpha = 1.0 if args.alpha is None else args.alpha
    questions_file = None if is_tfds_spec(args.questions) else args.questions
    inputs = [questions_file, args.passages, args.model, args.index]
    check_output(args.out, FILE, [*inputs, args.bm25_index], writes=RESULTS_FILE)
    if args.bm25_index and not Path(args.bm25_index).exists():  # built and saved here
        check_output(args.bm25_index, BM25, [*inputs, args.out], what="--bm25-index")

    questions = read_questions(args.questions)
    passages_list = read_passages(args.passages)
    passages = {str(p.id): p for p in passages_list}
    if not questions:
        raise UserError(f"{args.questions}: no questions (empty)")
    if not passages_list:
        raise UserError(f"{args.passages}: no passages (empty)")
    retriever = _build_retriever(args, passages_list)
    hybrid = isinstance(retriever, HybridRetriever)
    dense = retriever.dense if hybrid else retriever
    sparse = retriever.sparse if hybrid else retriever
    dense = dense if isinstance(dense, DenseRetriever) else None
    if dense is not None:
        check_passages(dense.index, args.passages, passages_list, args.index)
    t0 = time.time()
    scores, ids = retriever.search([q.question for q in questions], args.k,
                                   progress=not args.quiet)  # fmt: skip
    dt = time.time() - t0
    results = results_for(questions, scores, ids, passages, args.match)
    config = {
        "command": "retrieve",
        "mode": args.mode,
        "model": args.model and str(Path(args.model).absolute()),
        "index": args.index and str(Path(args.index).absolute()),
        # what computed the passage vectors (and, checked above, the question's model)
        "vectors_fingerprint": dense.index.meta.get("vectors_fingerprint") if dense else None,
        "bm25_corpus_fingerprint": getattr(sparse, "corpus_fingerprint", None),
        "questions": describe(args.questions),
        "passages": str(Path(args.passages).absolute()),
        "bm25_index": args.bm25_index,
        "fusion": args.fusion if args.mode == "hybrid" else None,
        "alpha": args.alpha if args.mode == "hybrid" else None,
        "k": args.k,
        "match": args.match,
        "questions_count": len(questions),
        "seconds": dt,
        "dpr_jax": __version__,
    }
    write_retrieval_results(args.out, results, config)
    print(
        f"{len(questions):,} questions, {args.mode} retrieval in {dt:.1f}s "
        f"({len(questions) / max(dt, 1e-9):.1f} q/s) -> {args.out}",
        file=sys.stderr,
    )
    return 0
