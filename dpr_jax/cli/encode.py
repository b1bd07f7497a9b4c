"""`dpr-jax encode`: encode a passage corpus (psgs_w100-style TSV) with a bi-encoder's passage
tower into resumable .npy embedding shards.

The command line over :mod:`dpr_jax.retriever.encode`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE
from dpr_jax.data.corpus import read_passages
from dpr_jax.data.questions import is_tfds_spec, read_questions
from dpr_jax.errors import UserError
from dpr_jax.io import EMBEDDINGS, FILE, NPY, atomic_save_npy, check_output, writing
from dpr_jax.retriever.encode import DTYPES, TowerEncoder, encode_corpus


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    ap.add_argument("--checkpoint", "--model", dest="model", required=True,
                    help="bi-encoder model directory (or training workdir)")  # fmt: skip
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--passages", help="passages TSV (id, text, title), SQuAD JSON or DPR JSON")
    what.add_argument("--questions", help="questions (qas TSV/CSV, NQ-open JSONL, SQuAD JSON, "
                      "tfds:<name>/<split>): "
                      "encoded with the question tower into one float32 .npy, --out Q.npy")  # fmt: skip
    ap.add_argument("--out", required=True, help="output directory (a .npy file for --questions)")
    ap.add_argument("--shard", default="0/1", help="i/n: encode the i-th of n contiguous shards")
    ap.add_argument("--batch-size", type=POSITIVE, default=64)
    ap.add_argument("--max-length", type=POSITIVE, default=256)
    ap.add_argument("--bucket", type=NON_NEGATIVE, default=32,
                    help="pad to a multiple of this (0: off)")  # fmt: skip
    ap.add_argument("--chunk-size", type=POSITIVE, default=8192,
                    help="passages per resumable chunk")  # fmt: skip
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--compute-dtype", default="float32", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    try:
        shard, num_shards = (int(x) for x in args.shard.split("/"))
    except ValueError:
        ap.error(f"--shard must look like i/n, got {args.shard!r}")
    # before any work: never over an input, another artifact or a directory of other files
    questions_file = None if is_tfds_spec(args.questions or "") else args.questions
    inputs = [args.model, questions_file, args.passages]
    check_output(args.out, FILE if args.questions else EMBEDDINGS, inputs, writes=NPY)
    t0 = time.time()
    if args.questions:
        texts = [q.question for q in read_questions(args.questions)]
        if not texts:
            raise UserError(f"{args.questions}: no questions to encode (empty file)")
        enc = TowerEncoder(args.model, "question", args.batch_size, min(args.max_length, 64),
                           args.bucket or None, args.compute_dtype)  # fmt: skip
        vecs = enc.encode(texts)
        out = Path(args.out)
        with writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_npy(out, vecs)  # a killed job leaves no half-written file
        print(f"{len(texts):,} questions from {args.questions} -> {out} "
              f"in {time.time() - t0:.1f}s", file=sys.stderr)  # fmt: skip
        return 0
    passages = read_passages(args.passages)
    print(f"{len(passages):,} passages from {args.passages}", file=sys.stderr)
    encode_corpus(
        args.model, passages, args.out, shard, num_shards, args.chunk_size, args.batch_size,
        args.max_length, args.bucket or None, args.dtype, args.compute_dtype,
        passages_file=args.passages,
    )  # fmt: skip
    print(f"encoded into {args.out} in {time.time() - t0:.1f}s", file=sys.stderr)
    return 0
