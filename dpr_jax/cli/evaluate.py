"""`dpr-jax evaluate`: DPR top-k retrieval accuracy of a retrieval-results JSON (and ANN recall
against exact results).

The command line over :mod:`dpr_jax.evaluate`.
"""

from __future__ import annotations

import json
from typing import Any

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import parse_ks
from dpr_jax.data.formats import read_retrieval_results
from dpr_jax.errors import UserError
from dpr_jax.evaluate import MATCH_TYPES, ann_recall, count_without_answers, top_k_accuracy
from dpr_jax.io import FILE, atomic_write_text, check_output, json_format

# what --json writes (an existing file is replaced only when it holds such metrics)
METRICS_FILE = json_format("dpr-jax evaluate metrics (JSON)", "top_k_accuracy")


def format_table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    width = max(len(r[0]) for r in [header, *rows])
    lines = [f"{header[0]:<{width}}  {header[1]}", f"{'-' * width}  {'-' * len(header[1])}"]
    lines += [f"{a:<{width}}  {b}" for a, b in rows]
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:

    ap = command_parser(__name__, __doc__)
    ap.add_argument("--results", required=True, help="retrieval-results JSON (DPR format)")
    ap.add_argument("--ks", type=parse_ks, default=[1, 5, 20, 100], help="e.g. 1,5,20,100")
    ap.add_argument("--match", default="string", choices=list(MATCH_TYPES),
                    help="has_answer matching when recomputed (regex: CuratedTREC)")  # fmt: skip
    ap.add_argument("--recompute", action="store_true",
                    help="recompute has_answer even where the file stores it")  # fmt: skip
    ap.add_argument("--exact-results", help="results of exact search over the same questions: "
                    "also report ANN recall@k of --results against it")  # fmt: skip
    ap.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    args = ap.parse_args(argv)
    if args.json_out:
        check_output(
            args.json_out,
            FILE,
            [args.results, args.exact_results],
            what="--json",
            writes=METRICS_FILE,
        )

    results = read_retrieval_results(args.results)
    if not results:
        raise UserError(f"{args.results}: no questions in the results file")
    acc = top_k_accuracy(results, args.ks, args.match, recompute=args.recompute)
    depth = max(len(r["ctxs"]) for r in results)
    note = lambda k: "  (k > ctxs)" if k > depth else ""
    rows = [(f"top-{k}", f"{100 * v:6.2f}%{note(k)}") for k, v in acc.items()]
    metrics: dict[str, Any] = {"questions": len(results), "top_k_accuracy": acc}
    if args.exact_results:
        exact = read_retrieval_results(args.exact_results)
        if len(exact) != len(results):
            raise UserError(
                f"{args.exact_results}: {len(exact)} questions, but {args.results} has "
                f"{len(results)}"
            )
        for i, (a, e) in enumerate(zip(results, exact)):
            if a["question"] != e["question"]:
                raise UserError(
                    f"{args.exact_results}: question {i} is {e['question']!r}, but in "
                    f"{args.results} it is {a['question']!r}"
                )
        approx_ids = [[c["id"] for c in r["ctxs"]] for r in results]
        exact_ids = [[c["id"] for c in r["ctxs"]] for r in exact]
        recall = {k: ann_recall(approx_ids, exact_ids, k) for k in args.ks}
        metrics["ann_recall"] = recall
        rows += [(f"recall@{k}", f"{100 * v:6.2f}%") for k, v in recall.items()]
    no_gold = count_without_answers(r["answers"] for r in results)
    metrics["questions_without_answers"] = no_gold
    print(f"{args.results}: {len(results):,} questions, up to {depth} ctxs each")
    if no_gold:
        print(f"{no_gold:,} questions have no gold answers: kept and counted as misses (as DPR)")
    print(format_table(rows, ("metric", "value")))
    if args.json_out:
        payload = {**metrics, "config": {k: v for k, v in vars(args).items()}}
        atomic_write_text(args.json_out, json.dumps(payload, indent=2, default=str) + "\n")
    return 0
