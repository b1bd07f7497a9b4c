"""Two reader-prediction files of the same questions (``dpr-jax read --out`` / ``ask --out``),
side by side: for each number of passages read, EM / F1 of each, how many answers are the same
string, how many came from the same passage, and the questions one gets right and the other not.

    python scripts/compare_predictions.py pred_float32.json pred_bfloat16.json

The reader's bfloat16 check in README (``dpr-jax read --dtype float32`` and ``--dtype bfloat16``
over the same results file, then this script).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def compare(a: list[dict], b: list[dict]) -> dict[int, dict]:
    """Per top-k: questions, EM / F1 of each side, answers equal, passages equal, right only in
    ``a`` / only in ``b``. The files must hold the same questions in the same order."""
    from dpr_jax.data.answers import exact_match_score, f1_score
    from dpr_jax.errors import UserError

    if len(a) != len(b):
        raise UserError(f"the files hold {len(a)} and {len(b)} questions")
    out: dict[int, dict] = {}
    for i, (x, y) in enumerate(zip(a, b)):
        if x["question"] != y["question"]:
            raise UserError(f"question {i} differs: {x['question']!r} / {y['question']!r}")
        py = {p["top_k"]: p["prediction"] for p in y["predictions"]}
        gold = x["gold_answers"]
        for p in x["predictions"]:
            k, pa = p["top_k"], p["prediction"]
            if k not in py:
                continue
            pb = py[k]
            row = out.setdefault(k, dict.fromkeys(
                ("questions", "em_a", "em_b", "f1_a", "f1_b", "same_answer", "same_passage",
                 "only_a", "only_b"), 0))  # fmt: skip
            ea, eb = exact_match_score(pa["text"], gold), exact_match_score(pb["text"], gold)
            row["questions"] += 1
            row["em_a"] += ea
            row["em_b"] += eb
            row["f1_a"] += f1_score(pa["text"], gold)
            row["f1_b"] += f1_score(pb["text"], gold)
            row["same_answer"] += pa["text"] == pb["text"]
            row["same_passage"] += pa["passage_idx"] == pb["passage_idx"]
            row["only_a"] += bool(ea and not eb)
            row["only_b"] += bool(eb and not ea)
    return dict(sorted(out.items()))


def main(argv=None) -> int:
    from dpr_jax.data.formats import read_reader_predictions
    from dpr_jax.errors import UserError

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("a", help="reader predictions JSON")
    ap.add_argument("b", help="reader predictions JSON of the same questions")
    args = ap.parse_args(argv)
    try:
        rows = compare(read_reader_predictions(args.a), read_reader_predictions(args.b))
    except (UserError, OSError) as e:
        print(f"compare_predictions: {e}", file=sys.stderr)
        return 2
    print(f"A = {args.a}\nB = {args.b}\n")
    print("| top-k | questions | EM A | EM B | F1 A | F1 B | same answer | same passage | "
          "right only in A | right only in B |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for k, r in rows.items():
        n = r["questions"]
        print(f"| {k} | {n} | {100 * r['em_a'] / n:.1f} | {100 * r['em_b'] / n:.1f} | "
              f"{100 * r['f1_a'] / n:.1f} | {100 * r['f1_b'] / n:.1f} | {r['same_answer']} | "
              f"{r['same_passage']} | {r['only_a']} | {r['only_b']} |")  # fmt: skip
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("compare_predictions", main))
