"""`dpr-jax plan`: AOT-compile a config's train step for a TPU topology (no TPU needed): memory per
chip, FLOPs, collectives, roofline step time; --fit finds a setting that fits.

The command line over :mod:`dpr_jax.plan`. The environment it needs (the JAX runtime on the CPU, libtpu off the metadata server and off
its one-process lock file) is set by :func:`dpr_jax.cli.plan_env` before jax is imported.
"""

from __future__ import annotations

import argparse
import json

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import POSITIVE
from dpr_jax.io import FILE, atomic_write_text, check_output, json_format
from dpr_jax.plan import TOPOLOGY_EXAMPLES, run

# what --json writes (an existing file is replaced only when it holds a plan)
PLAN_FILE = json_format("dpr-jax plan record (JSON)", "definitions", "fits")


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(__name__, __doc__)
    p.add_argument("--config", required=True, help="a train or train-reader config file")
    p.add_argument("--topology", required=True,
                   help=f"TPU topology, e.g. {', '.join(TOPOLOGY_EXAMPLES)}; or `local`: this "
                   "machine's own devices, compiled and also run (--measure times)")  # fmt: skip
    p.add_argument(
        "--measure",
        type=POSITIVE,
        default=3,
        help="--topology local: time this many steps (after one warm-up)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), e.g. --set batch_size=4096")  # fmt: skip
    p.add_argument("--fit", action="store_true",
                   help="search grad_cache_chunk / remat / fsdp for the cheapest setting that fits")  # fmt: skip
    p.add_argument(
        "--max-compiles", type=POSITIVE, default=4, help="--fit: compile at most this many"
    )
    p.add_argument("--json", metavar="OUT", help="write the result as JSON")
    return p


def cli_main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.json:
        check_output(args.json, FILE, [args.config], what="--json", writes=PLAN_FILE)
    record = run(args)
    if args.json:
        atomic_write_text(args.json, json.dumps(record, indent=2, default=str))
    return 0
