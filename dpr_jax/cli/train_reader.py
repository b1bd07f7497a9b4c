"""`dpr-jax train-reader`: the command line over :mod:`dpr_jax.reader.task`."""

from __future__ import annotations

import argparse
import json

import jax

from dpr_jax.cli.errors import Parser
from dpr_jax.parallel import initialize_distributed
from dpr_jax.reader.task import load_config, train_and_evaluate

# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="dpr-jax train-reader",
        description="Train DPR's extractive reader (passage selection + span MML) from a config.",
    )
    p.add_argument("--config", required=True, help="a Python config file with get_config()")
    p.add_argument(
        "--workdir", required=True, help="checkpoints, metrics, config and model go here"
    )
    p.add_argument("--train", help="training data (retrieval-results, biencoder or SQuAD JSON); "
                   "overrides train_path")  # fmt: skip
    p.add_argument("--dev", help="dev data, same formats; overrides dev_path")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set num_steps=100")  # fmt: skip
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.coordinator or args.num_processes:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
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
