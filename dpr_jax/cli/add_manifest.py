"""`dpr-jax add-manifest`: add a manifest (sha256 of every file) to a model directory written by an
older dpr-jax, after checking its parameters against its config. Only for files you trust.

Checksums for a model directory written before they existed.
"""

from __future__ import annotations

import sys

from dpr_jax.cli.errors import command_parser
from dpr_jax.model_dir import MANIFEST, add_manifest


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    ap.add_argument("model_dir", help="the model directory")
    args = ap.parse_args(argv)
    print(f"wrote {add_manifest(args.model_dir) / MANIFEST}", file=sys.stderr)
    return 0
