"""`dpr-jax train-reader`: the command line over :mod:`dpr_jax.reader.task`."""

from __future__ import annotations

import argparse
import json

import jax

from dpr_jax.cli.options import start_distributed, training_parser
from dpr_jax.reader.task import load_config, train_and_evaluate


def build_parser() -> argparse.ArgumentParser:
    p = training_parser(
        "dpr-jax train-reader",
        "Train DPR's extractive reader (passage selection + span MML) from a config.",
    )
    p.add_argument("--train", help="training data (retrieval-results, biencoder or SQuAD JSON); "
                   "overrides train_path")  # fmt: skip
    p.add_argument("--dev", help="dev data, same formats; overrides dev_path")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    start_distributed(args)
    sets = list(args.set)
    if args.train:
        sets.insert(0, f"train_path={args.train}")
    if args.dev:
        sets.insert(0, f"dev_path={args.dev}")
    config = load_config(args.config, sets)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    metrics = train_and_evaluate(config, args.workdir)
    if jax.process_index() == 0:
        print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, (int, float))}))
    return 0
