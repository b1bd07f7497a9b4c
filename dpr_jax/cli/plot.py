"""`dpr-jax plot`: overlay the training curves of runs (their metrics.jsonl) in one picture, e.g.
round 1 vs round 2: one subplot per metric, one line per run, labelled by its directory name.

The command line over :mod:`dpr_jax.training.curves` (matplotlib: the ``plot`` extra).
"""

from __future__ import annotations

import sys

from dpr_jax.cli.errors import command_parser
from dpr_jax.io import FILE, IMAGE, check_output
from dpr_jax.training.curves import metrics_file, save_curves


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    ap.add_argument("runs", nargs="+", metavar="RUN", help="training run directories (--workdir)")
    ap.add_argument("--out", required=True, help="the picture to write (.png, .pdf, .svg)")
    ap.add_argument("--metric", action="append", default=[], metavar="NAME",
                    help="a metric to draw, e.g. train/loss, dev/accuracy, or a key alone (loss: "
                    "every split's); repeatable, comma lists too (default: train/loss and every "
                    "dev metric)")  # fmt: skip
    args = ap.parse_args(argv)
    check_output(args.out, FILE, [metrics_file(r) for r in args.runs], writes=IMAGE)
    metrics = [m.strip() for arg in args.metric for m in arg.split(",") if m.strip()]
    print(f"wrote {save_curves(args.runs, args.out, metrics or None)}", file=sys.stderr)
    return 0
