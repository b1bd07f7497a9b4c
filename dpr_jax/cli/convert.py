"""`dpr-jax convert`: convert Hugging Face BERT / DPR / sentence-transformers checkpoints to dpr-
jax model directories (--from-hf) and back (--to-hf); convert facebookresearch/DPR's own checkpoint
files (--from-dpr FILE.cp, bi-encoder or reader).

The command line over :mod:`dpr_jax.convert`.
"""

from __future__ import annotations

import argparse
import sys

from dpr_jax.cli.errors import command_parser
from dpr_jax.convert import EXPORT_FORMATS, convert_from_dpr, convert_from_hf, convert_to_hf
from dpr_jax.model_dir import read_model_meta


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="SRC", help="HF directory or hub id to convert from")
    src.add_argument("--to-hf", metavar="MODEL_DIR", help="dpr-jax model directory to export")
    src.add_argument("--from-dpr", metavar="FILE.cp",
                     help="facebookresearch/DPR checkpoint file (bi-encoder or reader) to convert; "
                     "needs --tokenizer")  # fmt: skip
    ap.add_argument("--out", required=True, help="destination directory")
    ap.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    g = ap.add_argument_group("--from-hf")
    g.add_argument("--kind", default="auto", choices=["auto", "biencoder", "bert", "reader"],
                   help="auto: reader for a DPRReader, biencoder otherwise")  # fmt: skip
    g.add_argument("--ctx-from", metavar="SRC2",
                   help="passage tower (DPRContextEncoder or BertModel) for a question encoder SRC")  # fmt: skip
    g.add_argument("--shared", action="store_true", help="one tower for questions and passages")
    g.add_argument("--pooling", default=None, choices=["cls", "mean", "pooler"],
                   help="bi-encoder pooling (default: a sentence-transformers SRC's own, else "
                   "cls as DPR; 'pooler' keeps the BERT pooler)")  # fmt: skip
    g.add_argument("--normalize", default=None, action=argparse.BooleanOptionalAction,
                   help="L2-normalise the vectors (cosine similarity; default: a "
                   "sentence-transformers SRC's Normalize module, else off)")  # fmt: skip
    g.add_argument("--tokenizer", help="tokenizer directory or hub id: for --from-hf when SRC has "
                   "no tokenizer files; for --from-dpr always (e.g. bert-base-uncased)")  # fmt: skip
    g.add_argument(
        "--seed", type=int, default=0, help="init of fresh reader heads (BERT -> reader)"
    )
    g = ap.add_argument_group("--from-dpr")
    g.add_argument("--heads", type=int, default=None,
                   help="attention heads of the BERT (default: from the checkpoint's "
                   "pretrained_model_cfg when it names bert-base-* or bert-large-*)")  # fmt: skip
    g = ap.add_argument_group("--to-hf")
    g.add_argument("--tower", default="both", choices=["question", "ctx", "both"],
                   help="which bi-encoder towers to export (default both)")  # fmt: skip
    g.add_argument("--as", dest="as_", default=None, choices=list(EXPORT_FORMATS),
                   help="DPR classes (default for bi-encoders and readers), plain BertModel, or "
                   "sentence-transformers directories (bi-encoders)")  # fmt: skip
    g.add_argument("--allow-missing-pooler", action="store_true",
                   help="--as bert without pooler weights (transformers initialises it randomly)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.from_hf and (args.tower != "both" or args.as_ or args.allow_missing_pooler):
        ap.error("--tower, --as and --allow-missing-pooler apply to --to-hf")
    if args.to_hf and (args.kind != "auto" or args.ctx_from or args.shared or args.tokenizer
                       or args.pooling or args.normalize is not None):  # fmt: skip
        ap.error(
            "--kind, --ctx-from, --shared, --pooling, --normalize and --tokenizer apply to --from-hf"
        )
    if args.heads is not None and not args.from_dpr:
        ap.error("--heads applies to --from-dpr")
    if args.from_dpr:
        if (args.kind != "auto" or args.ctx_from or args.shared or args.pooling
                or args.normalize is not None or args.tower != "both" or args.as_
                or args.allow_missing_pooler):  # fmt: skip
            ap.error("--from-dpr takes --out, --tokenizer, --heads and --overwrite only")
        out = convert_from_dpr(args.from_dpr, args.out, args.tokenizer, args.heads, args.overwrite)
        print(f"wrote {out}", file=sys.stderr)
        return 0
    if args.from_hf:
        out = convert_from_hf(
            args.from_hf, args.out, args.kind, args.ctx_from, args.shared, args.pooling,
            args.tokenizer, args.seed, args.overwrite, args.normalize,
        )  # fmt: skip
        print(f"wrote {out}", file=sys.stderr)
        return 0
    as_ = args.as_
    if as_ is None:
        as_ = "bert" if read_model_meta(args.to_hf)["kind"] == "bert" else "dpr"
    for d in convert_to_hf(
        args.to_hf, args.out, args.tower, as_, args.allow_missing_pooler, args.overwrite
    ):
        print(f"wrote {d}", file=sys.stderr)
    return 0
