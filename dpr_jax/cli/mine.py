"""`dpr-jax mine`: mine hard negatives for a biencoder file with a dense model + index: drop
positives and passages that contain an answer, keep the top N (or a sample).

The command line over :mod:`dpr_jax.mine`.
"""

from __future__ import annotations

import sys

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE, add_quiet
from dpr_jax.data.answers import MATCH_TYPES
from dpr_jax.mine import EXISTING, merge_parts, mine_hard_negatives


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    ap.add_argument("--biencoder", required=True, help="input biencoder JSON / JSONL")
    ap.add_argument("--out", required=True, help="output biencoder file (.json or .jsonl)")
    ap.add_argument("--model", help="bi-encoder model directory (or training workdir)")
    ap.add_argument("--index", help="index directory (`dpr-jax index`) of the passages")
    ap.add_argument(
        "--passages", help="the passages the index was built from (TSV, SQuAD JSON or DPR JSON)"
    )
    ap.add_argument("--n", type=POSITIVE, default=30, help="hard negatives per question")
    ap.add_argument("--skip", type=NON_NEGATIVE, default=0,
                    help="leave out the first S candidates (after exclusion)")  # fmt: skip
    ap.add_argument("--depth", type=POSITIVE, default=100, help="passages retrieved per question")
    ap.add_argument("--sample", action="store_true",
                    help="draw N from all candidates after --skip instead of the top N")  # fmt: skip
    ap.add_argument("--seed", type=NON_NEGATIVE, default=0)
    ap.add_argument("--match", default="string", choices=MATCH_TYPES)
    ap.add_argument("--existing", default="drop", choices=EXISTING,
                    help="the input's hard negatives: drop, or append after the mined ones")  # fmt: skip
    ap.add_argument("--shard", default="0/1", help="i/n: the i-th of n contiguous chunk ranges")
    ap.add_argument(
        "--chunk-size", type=POSITIVE, default=1000, help="questions per resumable chunk"
    )
    ap.add_argument("--batch-size", type=POSITIVE, default=64)
    ap.add_argument("--merge-only", action="store_true",
                    help="write --out from finished parts (after all shards ran)")  # fmt: skip
    add_quiet(ap)
    args = ap.parse_args(argv)
    try:
        shard, num_shards = (int(x) for x in args.shard.split("/"))
    except ValueError:
        ap.error(f"--shard must look like i/n, got {args.shard!r}")
    if args.merge_only:
        print(f"wrote {merge_parts(args.out)}", file=sys.stderr)
        return 0
    if not (args.model and args.index and args.passages):
        ap.error("--model, --index and --passages are required (unless --merge-only)")
    done = mine_hard_negatives(
        args.model, args.index, args.passages, args.biencoder, args.out, args.n, args.skip,
        args.depth, args.sample, args.seed, args.match, args.existing, shard, num_shards,
        args.chunk_size, args.batch_size, progress=not args.quiet,
    )  # fmt: skip
    if done:
        print(f"wrote {done}", file=sys.stderr)
    else:
        print(f"shard {shard}/{num_shards} done; {args.out} is written when every shard is "
              "(or with --merge-only)", file=sys.stderr)  # fmt: skip
    return 0
