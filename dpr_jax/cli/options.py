"""Options that several commands share, spelled once: one flag vocabulary across commands."""

from __future__ import annotations

import argparse

from dpr_jax.cli.errors import Parser
from dpr_jax.parallel import initialize_distributed


def parse_ks(text: str) -> list[int]:
    """``--ks 1,5,20``: comma-separated positive integers (every command that takes cut-offs)."""
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return ks


def add_quiet(parser: argparse.ArgumentParser) -> None:
    """``--quiet`` (alias ``--no-progress``): no progress bars or phase lines on stderr; results
    and the closing summary are still printed."""
    parser.add_argument("--quiet", "--no-progress", dest="quiet", action="store_true",
                        help="no progress output on stderr")  # fmt: skip


def training_parser(prog: str, description: str) -> Parser:
    """The options of every training command: --config, --workdir, --set, --print-config and the
    multi-host group (see :func:`start_distributed`)."""
    p = Parser(prog=prog, description=description)
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
    return p


def start_distributed(args: argparse.Namespace) -> None:
    """``jax.distributed`` from the multi-host options, when given."""
    if args.coordinator or args.num_processes:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
