"""The reader's host-side cost: span decoding and answer selection
(:func:`dpr_jax.reader.span.select_predictions`) per question, apart from the forward pass.

On a GPU in bfloat16 the reader's forward pass takes a fraction of a millisecond a question and
what ``ReaderPredictor.predict`` does on the host decides its speed (README, "Reading on a GPU");
this times that part on any machine. The questions and passages are ``bench_read.py``'s (each
question with 20 passages: its gold passage, BM25 negatives, random validation passages); their
logits come from ``--model`` (a reader model directory) or, by default, a tiny random reader (one
layer: the decoding's cost does not depend on the weights' quality). Each selection rule is timed
at k = 1, 5, 20 (``read``'s default), median of ``--rounds``; ``--baseline FILE`` times another
version of ``dpr_jax/reader/span.py`` beside it on the same logits, in alternating rounds, and
checks that both give the same answers::

    git show REV:dpr_jax/reader/span.py > /tmp/span_rev.py
    python scripts/bench_decode.py --data SQUAD_DPR --questions 64 --baseline /tmp/span_rev.py
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def load_module(path: str, name: str = "span_baseline"):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def main(argv=None):
    from dpr_jax.cli.options import POSITIVE  # (imports no jax)

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="prepare-squad output directory")
    ap.add_argument("--model", default="", help="reader model directory (default: tiny random)")
    ap.add_argument("--questions", type=POSITIVE, default=64)
    ap.add_argument("--passages", type=POSITIVE, default=20)
    ap.add_argument("--rounds", type=POSITIVE, default=5)
    ap.add_argument("--baseline", default="", help="another span.py to time beside this one")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp
    from bench_read import load_questions

    from dpr_jax.reader import span
    from dpr_jax.reader.data import ReaderInputConfig, ReaderTokenizer
    from dpr_jax.reader.model import Reader
    from dpr_jax.reader.task import ReaderTrainConfig, build_reader

    inp = ReaderInputConfig(256, 32)
    if args.model:
        predictor = span.ReaderPredictor.from_dir(args.model, input_config=inp)
    else:
        cfg = ReaderTrainConfig(init_from="minilm", max_length=256)
        bert_cfg, _, tok, _ = build_reader(cfg, jax.random.PRNGKey(0))
        tiny = dataclasses.replace(bert_cfg, num_hidden_layers=1, hidden_size=32,
                                   intermediate_size=64, num_attention_heads=2)  # fmt: skip
        x = jnp.zeros((1, 1, 16), jnp.int32)
        params = Reader(tiny).init(jax.random.PRNGKey(args.seed), x, x + 1)["params"]
        predictor = span.ReaderPredictor(params, tiny, ReaderTokenizer(tok, inp))
    qs, ps = load_questions(Path(args.data), args.questions, args.passages, args.seed)
    logits, toks = predictor.passage_logits(qs, ps)
    versions = {"this tree": span}
    if args.baseline:
        versions = {"baseline": load_module(args.baseline), **versions}
    top_k = (1, 5, 20)
    print(f"{len(qs)} questions x {args.passages} passages, logits of "
          f"{args.model or 'a tiny random reader'}; ms a question, median of {args.rounds}")  # fmt: skip
    print("| selection | " + " | ".join(versions) + (" | baseline / this tree | same answers |"
          if args.baseline else " |"))  # fmt: skip
    print("|---|" + "---:|" * len(versions) + ("---:|---|" if args.baseline else ""))
    for selection in span.SELECTIONS:
        times = {name: [] for name in versions}
        answers = {}
        for _ in range(args.rounds):
            for name, module in versions.items():
                t0 = time.perf_counter()
                out = [
                    module.select_predictions(
                        ps[i], [t.offsets for t in toks[i]], [t.subword for t in toks[i]],
                        logits[i], top_k, 10, selection,
                    )
                    for i in range(len(qs))
                ]  # fmt: skip
                times[name].append((time.perf_counter() - t0) / len(qs) * 1e3)
                answers[name] = [[(o[k].text, o[k].passage_idx) for k in top_k] for o in out]
        med = {name: statistics.median(t) for name, t in times.items()}
        row = f"| {selection} | " + " | ".join(f"{med[n]:.2f}" for n in versions) + " |"
        if args.baseline:
            same = answers["baseline"] == answers["this tree"]
            row += f" {med['baseline'] / med['this tree']:.2f}x | {'yes' if same else 'NO'} |"
        print(row)
    print(f"load average at the end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_decode", main))
