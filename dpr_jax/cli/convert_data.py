"""`dpr-jax convert-data`: DPR biencoder JSON -> ArrayRecord directory (random access, per-host
reads); use the directory as TrainConfig.train_path / dev_path.

DPR biencoder JSON -> an ArrayRecord directory (:mod:`dpr_jax.data.records`).
"""

from __future__ import annotations

import json

from dpr_jax.cli.errors import command_parser
from dpr_jax.data.records import convert_biencoder


def cli_main(argv: list[str]) -> int:
    p = command_parser(__name__, __doc__)
    p.add_argument(
        "--biencoder", required=True, help="DPR biencoder JSON / JSONL (.gz / .xz / .bz2 allowed)"
    )
    p.add_argument("--out", required=True, help="the record directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    print(json.dumps(convert_biencoder(args.biencoder, args.out, overwrite=args.overwrite)))
    return 0
