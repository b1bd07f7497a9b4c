"""`dpr-jax train`: the command line over :mod:`dpr_jax.retriever.task`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax

from dpr_jax.cli.errors import Parser
from dpr_jax.parallel import initialize_distributed
from dpr_jax.retriever.task import evaluate_model, load_config, train_and_evaluate

# ---------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="dpr-jax train",
        description="Train a DPR bi-encoder (in-batch + hard negatives) from a config file.",
    )
    p.add_argument("--config", required=True, help="a Python config file with get_config()")
    p.add_argument(
        "--workdir", required=True, help="checkpoints, metrics, config and model go here"
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set num_steps=100")  # fmt: skip
    g = p.add_argument_group("multi-host (jax.distributed)")
    g.add_argument("--coordinator", help="host:port of process 0")
    g.add_argument("--num-processes", type=int)
    g.add_argument("--process-id", type=int)
    p.add_argument("--print-config", action="store_true", help="print the config and exit")
    p.add_argument(
        "--eval-only", action="store_true",
        help="only validate init_from on dev_path (no training); writes WORKDIR/eval.json",
    )  # fmt: skip
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.coordinator or args.num_processes:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    config = load_config(args.config, args.set)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    if args.eval_only:
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
