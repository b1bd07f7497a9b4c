"""Inference levers of the reader, measured (issue 21, item 3): how the answer is chosen across
passages, how many retrieved passages are read, the longest answer allowed.

The reader's outputs for every (question, passage) pair are computed once
(:meth:`ReaderPredictor.passage_logits`); every setting then re-selects answers from them
(:func:`dpr_jax.reader.span.select_predictions`):

- selection ``dpr``: DPR's rule, the best span of the most relevant passage;
- ``joint``: the span of highest log P(passage) + log P(start) + log P(end) over the k passages;
- ``sum``: those probabilities summed over every occurrence (the 3 best spans of each passage)
  of the same normalised answer string;
- k: the first k retrieved passages; max answer length in word pieces.

The questions are a seeded sample of the retrieval results' questions, split into two disjoint
halves: pick a setting on half A, and believe it only if it also wins on half B.

    python scripts/bench_reader_levers.py --model READER --results RESULTS.json --sample 400
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from dpr_jax.io import check_results_file, write_results  # noqa: E402


def main(argv=None):
    from dpr_jax.cli.options import NON_NEGATIVE, name_list, parse_ks  # (imports no jax)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="reader model directory")
    ap.add_argument("--results", required=True, help="retrieval-results JSON (ctxs in order)")
    ap.add_argument("--sample", type=NON_NEGATIVE, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ks", type=parse_ks, default="1,5,10,20")
    ap.add_argument("--max-answer-lengths", type=parse_ks, default="10,5,20")
    # dpr_jax.reader.span.SELECTIONS (that module imports jax: XLA's flags are set below first)
    ap.add_argument(
        "--selections", type=name_list(("dpr", "joint", "sum")), default="dpr,joint,sum"
    )
    ap.add_argument("--json", default="")
    args = ap.parse_args(argv)
    check_results_file(args.json)
    flags = os.environ.get("XLA_FLAGS", "")
    if "device_count" not in flags:  # as `dpr-jax read` runs
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=8".strip()
    import numpy as np

    from dpr_jax.reader.data import read_reader_examples, sample_examples
    from dpr_jax.reader.span import (
        QuestionPrediction,
        ReaderPredictor,
        evaluate_predictions,
        select_predictions,
    )

    ks, lengths = args.ks, args.max_answer_lengths
    examples = [e for e in read_reader_examples(args.results) if e.answers]
    examples = sample_examples(examples, args.sample, args.seed)
    pred = ReaderPredictor.from_dir(args.model)
    qs = [e.question for e in examples]
    ps = [list(e.passages[: max(ks)]) for e in examples]
    logits, toks = pred.passage_logits(qs, ps, progress=True)
    half = np.random.default_rng(args.seed).permutation(len(examples)) % 2  # 0: A, 1: B
    recall = {k: 100 * np.mean([any(p.has_answer for p in e.passages[:k]) for e in examples])
              for k in ks}  # fmt: skip
    rows = []
    for sel in args.selections:
        for length in lengths:
            preds = [
                QuestionPrediction(e.question, tuple(e.answers), select_predictions(
                    ps[i], [t.offsets for t in toks[i]], [t.subword for t in toks[i]],
                    logits[i], ks, length, sel))
                for i, e in enumerate(examples)
            ]  # fmt: skip
            row = {"selection": sel, "max_answer_length": length}
            for name, keep in (("all", None), ("A", 0), ("B", 1)):
                sub = [p for p, h in zip(preds, half) if keep is None or h == keep]
                row[name] = {str(k): {"em": 100 * m["em"], "f1": 100 * m["f1"]}
                             for k, m in evaluate_predictions(sub).items()}  # fmt: skip
            rows.append(row)
    print(
        f"\n{len(examples)} questions ({args.results}, seeded sample {args.seed}); "
        f"answer in the first k passages: " + ", ".join(f"k={k} {recall[k]:.1f}%" for k in ks)
    )
    print("\nEM (F1) on all questions, then EM on half A / half B:\n")
    print("| selection | max answer length | " + " | ".join(f"k={k}" for k in ks) + " |")
    print("|---|---:|" + "---:|" * len(ks))
    for r in rows:
        cells = [f"{r['all'][str(k)]['em']:.1f} ({r['all'][str(k)]['f1']:.1f}); "
                 f"{r['A'][str(k)]['em']:.1f} / {r['B'][str(k)]['em']:.1f}" for k in ks]  # fmt: skip
        print(f"| {r['selection']} | {r['max_answer_length']} | " + " | ".join(cells) + " |")
    if args.json:
        write_results(args.json, {"args": vars(args), "recall": recall, "rows": rows},
                      "scripts/bench_reader_levers.py")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_reader_levers", main))
