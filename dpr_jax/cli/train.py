"""`dpr-jax train`: the command line over :mod:`dpr_jax.retriever.task`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import jax

from dpr_jax.cli import TRAIN_CPU_XLA_FLAGS
from dpr_jax.cli.options import start_distributed, training_parser
from dpr_jax.io import check_workdir
from dpr_jax.retriever.task import evaluate_model, load_config, train_and_evaluate


def build_parser() -> argparse.ArgumentParser:
    p = training_parser(
        "dpr-jax train", "Train a DPR bi-encoder (in-batch + hard negatives) from a config file."
    )
    p.add_argument(
        "--eval-only", action="store_true",
        help="only validate init_from on dev_path (no training); writes WORKDIR/eval.json",
    )  # fmt: skip
    return p


def slow_products_note(config) -> None:
    """One line on stderr when ``matmul_dtype`` asks for bfloat16 products on a CPU while
    XLA_FLAGS holds the train default that turns off the fusions they run fast in (a config
    file that sets the field: `dpr-jax` only sees ``--set`` before jax starts)."""
    if (
        config.matmul_dtype == "float32"
        or TRAIN_CPU_XLA_FLAGS not in os.environ.get("XLA_FLAGS", "").split()
    ):
        return
    if jax.default_backend() == "cpu" and jax.process_index() == 0:
        print(f"dpr-jax train: matmul_dtype={config.matmul_dtype} runs no faster with XLA_FLAGS' "
              f"{TRAIN_CPU_XLA_FLAGS} (the train default): run with DPR_JAX_TRAIN_XLA_FLAGS='' "
              "or --set matmul_dtype=bfloat16", file=sys.stderr)  # fmt: skip


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    start_distributed(args)
    config = load_config(args.config, args.set)
    slow_products_note(config)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.eval_only:
        check_workdir(args.workdir)
        metrics = evaluate_model(config)
        if jax.process_index() == 0:
            out = Path(args.workdir)
            out.mkdir(parents=True, exist_ok=True)
            record = {"config": config.to_dict(), "metrics": metrics}
            (out / "eval.json").write_text(json.dumps(record, indent=2))
    else:
        metrics = train_and_evaluate(config, args.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return 0
