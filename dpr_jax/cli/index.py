"""`dpr-jax index`: build a ScaNN / FAISS / exact JAX index over passage embeddings.

The passage index of Karpukhin et al. 2020, sec. 3.1. Reads one or more embeddings directories (``dpr-jax encode`` output), builds the chosen backend
and saves it with its config, which includes the embeddings' ``config.json`` so that the index
says which model made its vectors (``vectors_fingerprint``: parameters, model config, tokenizer,
max length) and from which passages. An unfinished encoding (missing chunks or shards) is refused unless ``--allow-partial``
is given, which the index config records::

    dpr-jax index --embeddings runs/emb --backend scann --out runs/index \
        --option num_leaves=2000 --option reorder=200

With ``--target-recall R --tune-queries Q.npy`` the search knobs are then tuned
(:mod:`dpr_jax.index.tune`): the fastest setting whose recall@``--tune-k`` against brute force on
those queries is at least R is saved in the index config and used by every later search.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from dpr_jax.cli.errors import command_parser
from dpr_jax.cli.options import POSITIVE, add_quiet, number
from dpr_jax.errors import Interrupted, UserError
from dpr_jax.index.backends import BACKENDS, index_class, load_for_index
from dpr_jax.index.tune import tune
from dpr_jax.io import INDEX, check_output, note


def parse_option(text: str) -> tuple[str, object]:
    """``key=value`` -> (key, value) with value parsed as JSON when possible (ints, floats,
    true/false, null), else kept as a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--option must look like key=value, got {text!r}")
    low = value.strip().lower()
    if low in ("none", "null"):
        return key, None
    if low in ("true", "false"):
        return key, low == "true"
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cli_main(argv: list[str] | None = None) -> int:
    ap = command_parser(__name__, __doc__)
    ap.add_argument("--embeddings", nargs="+", required=True,
                    help="embeddings directories written by `dpr-jax encode`")  # fmt: skip
    ap.add_argument("--backend", required=True, choices=sorted(BACKENDS))
    ap.add_argument("--out", required=True, help="index directory to write (an index already "
                    "there is replaced atomically; anything else is refused)")  # fmt: skip
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="backend option, repeatable (e.g. num_leaves=2000, ef_search=256)")  # fmt: skip
    ap.add_argument("--threads", type=POSITIVE, default=None,
                    help="build/search threads for ScaNN and FAISS (default: all cores)")  # fmt: skip
    ap.add_argument("--allow-partial", action="store_true",
                    help="index an unfinished encoding (missing chunks or shards); recorded in "
                    "the index config")  # fmt: skip
    ap.add_argument("--no-verify", action="store_true",
                    help="skip the sha256 check of the embedding chunks (sizes are still checked)")  # fmt: skip
    ap.add_argument("--target-recall", type=number(float, 0, 1, lo_open=True), default=None, metavar="R",
                    help="tune the search knobs: fastest setting with recall@k >= R (0 < R <= 1)")  # fmt: skip
    ap.add_argument("--tune-queries", default=None, metavar="Q.npy",
                    help="query vectors (Q, dim) float .npy for --target-recall")  # fmt: skip
    ap.add_argument(
        "--tune-k", type=POSITIVE, default=10, help="k of the tuned recall@k (default 10)"
    )
    add_quiet(ap)
    args = ap.parse_args(argv)
    if (args.target_recall is None) != (args.tune_queries is None):
        ap.error("--target-recall and --tune-queries go together")
    if args.target_recall is not None and not 0 < args.target_recall <= 1:
        ap.error(f"--target-recall must be in (0, 1], got {args.target_recall}")

    try:
        options = dict(parse_option(o) for o in args.option)
    except ValueError as e:
        ap.error(str(e))
    cls = index_class(args.backend)
    if args.threads is not None:
        if "num_threads" not in cls.DEFAULTS:
            ap.error(f"--threads does not apply to backend {args.backend!r}")
        options["num_threads"] = args.threads
    if args.target_recall is not None and not cls.SEARCH_PARAMS:
        ap.error(f"--target-recall: backend {args.backend!r} is exact, it has no knob to tune")
    index = cls(**options)  # every option checked against its allowed range before any work

    check_output(args.out, INDEX, [*args.embeddings, args.tune_queries])
    existed = Path(args.out).exists()
    try:
        return _build_and_save(args, index)
    except KeyboardInterrupt:  # an index is saved whole or not at all
        was = "is as it was" if existed else "was not created"
        raise Interrupted(
            f"no index was written: {args.out} {was}; the embeddings are untouched"
        ) from None


def _build_and_save(args, index) -> int:
    """Load the embeddings, build, tune and save the index (``index`` checked, not built)."""
    t0 = time.time()
    ids, emb, meta = load_for_index(args.embeddings, verify=not args.no_verify,
                                    allow_partial=args.allow_partial, show_progress=not args.quiet)  # fmt: skip
    t_load = time.time() - t0
    print(f"{len(ids):,} vectors of dim {emb.shape[1]} from {len(args.embeddings)} "
          f"director{'y' if len(args.embeddings) == 1 else 'ies'} in {t_load:.1f}s",
          file=sys.stderr)  # fmt: skip
    tune_queries = None
    if args.tune_queries is not None:
        tune_queries = load_tune_queries(args.tune_queries, emb.shape[1])
    index.meta = meta
    t0 = time.time()
    note(f"building {args.backend} index of {len(ids):,} vectors", not args.quiet)
    index.build(emb, ids)
    t_build = time.time() - t0
    note(f"built in {t_build:.1f}s", not args.quiet)
    index.meta["build_seconds"] = round(t_build, 3)
    if tune_queries is not None:
        t0 = time.time()
        note(f"tuning search knobs for recall@{args.tune_k} >= {args.target_recall}",
             not args.quiet)  # fmt: skip
        tuned = tune(index, emb, tune_queries, args.target_recall, k=args.tune_k,
                     report=None if args.quiet else note)  # fmt: skip
        print(f"tuned for recall@{tuned['k']} >= {args.target_recall} on {len(tune_queries)} "
              f"queries in {time.time() - t0:.1f}s: {json.dumps(tuned['params'])}, recall "
              f"{tuned['recall']:.4f}, {tuned['qps']:,.0f} q/s", file=sys.stderr)  # fmt: skip
    del emb
    out = index.save(args.out)
    size = index.size_bytes()
    print(
        f"built {args.backend} index of {index.size:,} vectors in {t_build:.1f}s, "
        f"{size / 2**20:.1f} MiB ({size / index.size:.1f} bytes/vector) -> {out}",
        file=sys.stderr,
    )
    print(json.dumps(index.config["options"], sort_keys=True), file=sys.stderr)
    return 0


def load_tune_queries(path: str, dim: int):
    """The (Q, dim) float tuning queries of ``--tune-queries``; errors name the file."""
    import numpy as np

    try:
        q = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: --tune-queries file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e}); save it with numpy.save") from e
    if q.ndim != 2 or q.shape[1] != dim or len(q) == 0 or q.dtype.kind != "f":
        raise UserError(
            f"{path}: tuning queries must be a non-empty float (Q, {dim}) array like the "
            f"embeddings, got {q.dtype} {q.shape}"
        )
    if not np.isfinite(q).all():
        raise UserError(f"{path}: row {int(np.argmax(~np.isfinite(q).all(1)))} is not finite")
    return q.astype(np.float32)
