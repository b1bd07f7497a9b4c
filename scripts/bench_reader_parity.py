"""Learning parity of dpr-jax's reader with a PyTorch reference (issue 21, item 1).

Both sides start from the same weights (all-MiniLM-L6-v2's BERT plus the same freshly
initialised span / relevance heads of each seed), read the same batches in the same order
(dpr-jax's own :class:`dpr_jax.reader.data.ReaderTrainData` batches, fed to both as numpy),
and train with the same hyperparameters: dropout 0.1, AdamW with DPR's linear warmup / decay
and no decay on biases and LayerNorm, global-norm clipping. The reference
(``scripts/reader_reference.py``) is Hugging Face's ``DPRReader`` with DPR's loss in torch and
``torch.optim.AdamW``; its loss variant is ``--ref-loss`` (``dpr-jax``: the same reduction and
masking as dpr-jax, the default; ``dpr``: DPR's ``compute_loss`` as written, summed over the
questions, padding inside the softmaxes). A seed changes the heads' initialisation and the
dropout masks, not the data: two seeds of each implementation give the run-to-run noise.

Dev: SQuAD EM / F1 of the answers read by dpr-jax's :class:`ReaderPredictor` (the same decoding
for both: the torch weights are converted back) from each held-out question's gold passage
(k=1) and from the gold passage plus two BM25 negatives (k=3).

    python scripts/bench_reader_parity.py --train SQUAD_DPR/train.biencoder.json \\
        --dev SQUAD_DPR/dev.biencoder.json --steps 120 --batch-size 4 --out parity.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))
from dpr_jax.io import check_results_file, write_results  # noqa: E402


def parse_args(argv=None):
    from dpr_jax.cli.options import (  # (imports no jax)
        NON_NEGATIVE,
        POSITIVE,
        name_list,
        number,
        number_list,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", required=True, help="DPR biencoder JSON (dpr-jax prepare-squad)")
    ap.add_argument("--dev", required=True)
    ap.add_argument("--steps", type=NON_NEGATIVE, default=120)
    ap.add_argument("--batch-size", type=POSITIVE, default=4)
    ap.add_argument("--passages", type=POSITIVE, default=2, help="passages per question")
    ap.add_argument("--max-length", type=POSITIVE, default=176)
    ap.add_argument("--lr", type=number(float, 0, lo_open=True), default=2e-4)
    ap.add_argument("--warmup-fraction", type=number(float, 0, 1), default=0.1)
    ap.add_argument("--weight-decay", type=number(float, 0), default=0.01)
    ap.add_argument("--max-grad-norm", type=number(float, 0), default=1.0)
    ap.add_argument("--seeds", type=number_list(int, 0, example="0,1"), default="0,1")
    ap.add_argument("--impls", type=name_list(("jax", "torch")), default="jax,torch")
    ap.add_argument("--ref-loss", default="dpr-jax", choices=["dpr-jax", "dpr"])
    ap.add_argument("--train-questions", type=POSITIVE, default=2000, help="seeded sample")
    ap.add_argument("--dev-questions", type=POSITIVE, default=200, help="seeded sample")
    ap.add_argument("--eval-at", type=number_list(int, 1, example="60,120"),
                    help="steps to evaluate at (default: half, end)")  # fmt: skip
    ap.add_argument("--window", type=POSITIVE, default=20, help="steps per loss-curve point")
    ap.add_argument("--threads", type=POSITIVE, default=2, help="torch intra-op threads")
    ap.add_argument("--save-model", default="", help="save the first jax run's reader here")
    ap.add_argument("--out", default="", help="JSON with every curve and evaluation")
    args = ap.parse_args(argv)
    return args


def main(argv=None):
    args = parse_args(argv)
    check_results_file(args.out, "--out")
    for path in (args.train, args.dev):  # before a minute of imports and MiniLM
        if not Path(path).is_file():
            raise FileNotFoundError(2, "No such file or directory", str(path))
    from dpr_jax.cli import train_xla_flags

    train_xla_flags()  # the flags `dpr-jax train-reader` runs with
    import jax
    import numpy as np
    import reader_reference as ref
    import torch

    from dpr_jax.model_dir import save_model
    from dpr_jax.parallel import make_mesh
    from dpr_jax.reader.data import ReaderTokenizer, ReaderTrainData
    from dpr_jax.reader.model import Reader
    from dpr_jax.reader.span import ReaderPredictor, evaluate_predictions
    from dpr_jax.reader.step import make_train_step
    from dpr_jax.reader.task import ReaderTrainConfig, build_reader, read_examples
    from dpr_jax.training.optimizer import make_optimizer
    from dpr_jax.training.state import TrainState

    torch.set_num_threads(args.threads)
    config = ReaderTrainConfig(
        train_path=args.train, dev_path=args.dev, data_format="biencoder",
        max_train_examples=args.train_questions, max_dev_examples=args.dev_questions,
        batch_size=args.batch_size, passages_per_question=args.passages, max_negatives=10,
        max_length=args.max_length, max_question_length=32, init_from="minilm",
        learning_rate=args.lr, warmup_fraction=args.warmup_fraction, num_steps=args.steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, eval_passages=3,
        eval_top_k=(1, 3), eval_batch_size=48, seed=12345,
    )  # fmt: skip
    total = args.steps
    warmup = int(args.warmup_fraction * total)
    t0 = time.time()
    bert_cfg, _, tokenizer, _ = build_reader(config, jax.random.PRNGKey(0))
    rtok = ReaderTokenizer(tokenizer, config.input_config)
    data = ReaderTrainData(read_examples(config, "train"), rtok, config.passages_per_question,
                           config.max_answers, config.max_negatives, config.seed)  # fmt: skip
    if data.batches_per_epoch(args.batch_size) < total:
        print(f"note: {len(data)} questions, {total} steps: more than one epoch", file=sys.stderr)
    batches = [data.batch(s, args.batch_size) for s in range(total)]
    dev = read_examples(config, "dev")
    dev = [e for e in dev if e.answers]
    print(f"data: {len(data)} train questions, {len(dev)} dev, {time.time() - t0:.0f} s",
          file=sys.stderr)  # fmt: skip
    # both sides read the dev passages cut at max_length, as in the README's runs (no windows)
    predictor = ReaderPredictor(None, bert_cfg, rtok, batch_size=48, devices=jax.devices()[:1],
                                window_overlap=None)  # fmt: skip

    def evaluate(params):
        predictor.set_params(params)
        preds = predictor.predict([e.question for e in dev], [list(e.passages[:3]) for e in dev],
                                  (1, 3), [e.answers for e in dev])  # fmt: skip
        return {str(k): {"em": 100 * m["em"], "f1": 100 * m["f1"]}
                for k, m in evaluate_predictions(preds).items()}  # fmt: skip

    eval_at = sorted(set(args.eval_at or (total // 2, total)))
    mesh = make_mesh(jax.devices()[:1])
    tx, _ = make_optimizer(config, total, warmup)
    jax_step = make_train_step(Reader(bert_cfg), tx, mesh)
    runs = []
    for seed in args.seeds:
        # the seed's heads on the shared MiniLM encoder (the data seed stays config.seed)
        _, init, _, _ = build_reader(config, jax.random.PRNGKey(seed))
        for impl in args.impls:
            losses, evals, t_train = [], {}, 0.0
            if impl == "jax":
                state = TrainState.create(jax.tree.map(np.copy, init), tx)
                rng = jax.random.PRNGKey(seed)
            else:
                torch.manual_seed(seed)
                model = ref.torch_reader(init, bert_cfg)
                opt, sched = ref.make_optimizer(model, args.lr, warmup, total, args.weight_decay)
            for s, b in enumerate(batches):
                t = time.time()
                if impl == "jax":
                    state, m = jax_step(state, b, rng)
                    losses.append(float(m["loss"]))
                else:
                    losses.append(ref.train_step(model, opt, sched, b, args.max_grad_norm,
                                                 args.ref_loss))  # fmt: skip
                t_train += time.time() - t
                if s + 1 in eval_at:
                    params = state.params if impl == "jax" else ref.flax_params(model, bert_cfg)
                    evals[str(s + 1)] = evaluate(params)
                    print(f"{impl} seed {seed} step {s + 1}: loss {np.mean(losses[-20:]):.3f} "
                          f"{evals[str(s + 1)]}", file=sys.stderr, flush=True)  # fmt: skip
            if impl == "jax" and args.save_model and not any(r["impl"] == "jax" for r in runs):
                save_model(args.save_model, state.params, "reader", bert_cfg, tokenizer,
                           extra={"reader_input": config.input_config.to_dict(),
                                  "train_config": config.to_dict(), "step": total,
                                  "made_by": "scripts/bench_reader_parity.py"})  # fmt: skip
            runs.append({"impl": impl, "seed": seed, "losses": losses, "evals": evals,
                         "train_s": t_train})  # fmt: skip
    report(args, runs, eval_at)
    if args.out:
        write_results(
            args.out, {"args": vars(args), "runs": runs}, "scripts/bench_reader_parity.py"
        )


def report(args, runs, eval_at):
    import numpy as np

    name = lambda r: f"{'dpr-jax' if r['impl'] == 'jax' else 'torch'} s{r['seed']}"
    w = args.window
    print(f"\nTrain loss, mean over windows of {w} steps (batch {args.batch_size} x "
          f"{args.passages} passages x {args.max_length} tokens, lr {args.lr}, reference "
          f"loss {args.ref_loss}):\n")  # fmt: skip
    print("| steps | " + " | ".join(name(r) for r in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for lo in range(0, args.steps, w):
        vals = [np.mean(r["losses"][lo : lo + w]) for r in runs]
        print(f"| {lo + 1}-{min(lo + w, args.steps)} | " + " | ".join(f"{v:.3f}" for v in vals)
              + " |")  # fmt: skip
    print("\nDev EM / F1 (k=1: the gold passage; k=3: gold + 2 BM25 negatives):\n")
    print("| step | " + " | ".join(name(r) for r in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for s in eval_at:
        for k in ("1", "3"):
            cells = [f"{r['evals'][str(s)][k]['em']:.1f} / {r['evals'][str(s)][k]['f1']:.1f}"
                     for r in runs]  # fmt: skip
            print(f"| {s} (k={k}) | " + " | ".join(cells) + " |")
    print("\n| | " + " | ".join(name(r) for r in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    print("| train s/step | " + " | ".join(f"{r['train_s'] / args.steps:.2f}" for r in runs)
          + " |")  # fmt: skip
    # noise vs gap: mean |difference| of the windowed curves, seed to seed and impl to impl
    by = {(r["impl"], r["seed"]): np.array([np.mean(r["losses"][lo : lo + w])
                                            for lo in range(0, args.steps, w)]) for r in runs}  # fmt: skip
    seeds = sorted({s for _, s in by})
    impls = sorted({i for i, _ in by})
    if len(seeds) >= 2 and len(impls) == 2:
        seed_gap = [round(float(np.abs(by[i, seeds[0]] - by[i, seeds[1]]).mean()), 4)
                    for i in impls]  # fmt: skip
        impl_gap = [round(float(np.abs(by[impls[0], s] - by[impls[1], s]).mean()), 4)
                    for s in seeds]  # fmt: skip
        print(f"\nmean |loss difference| over the windows: seed to seed {seed_gap} "
              f"({', '.join(impls)}); implementation to implementation {impl_gap} "
              f"(seeds {seeds})")  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_reader_parity", main))
