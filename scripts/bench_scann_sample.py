"""How many vectors a leaf ScaNN's tree needs to train its k-means on: recall@k at fixed
``leaves_to_search`` for one leaf count and several training samples (issue 22).

The ScaNN index of ``dpr_jax.index`` trains ``num_leaves`` k-means leaves on a sample of the
corpus. ScaNN's own ``autopilot()`` samples 200 vectors a leaf; the sample was a fixed 250,000
before, which at 10M vectors and sqrt(n) = 3,162 leaves is 79 a leaf, and 39 a leaf when the
bench gave ScaNN FAISS IVF-PQ's 12,649 lists and their k-means sample. This builds the same
index (tree + AH + exact reorder, every other option the same) on each sample and measures what
fraction of the exact top ``k`` it finds when it searches the same number of leaves, and how
fast (one search thread), on the bench's synthetic MiniLM-like corpus (``bench_ann.synthetic``;
``--data-dir`` memory-maps it and shares it with ``bench_ann.py --data-dir``)::

    python scripts/bench_scann_sample.py --n 1000000 --leaves 2932 --per-leaf 34,200 \\
        --data-dir /work/ann22_out/data

The exact neighbours are numpy's (streamed over the corpus); prints a markdown table, and
``--json`` writes it with the arguments, library versions and load averages.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ann import (  # noqa: E402  (a sibling script)
    _versions,
    exact_topk_chunked,
    set_thread_env,
    synthetic,
    synthetic_memmap,
)

from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE, parse_ks  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=POSITIVE, default=1_000_000, help="corpus size (synthetic)")
    ap.add_argument("--dim", type=POSITIVE, default=384)
    ap.add_argument("--queries", type=POSITIVE, default=500)
    ap.add_argument("--leaves", type=POSITIVE, default=2932, help="num_leaves of every build")
    ap.add_argument("--per-leaf", type=parse_ks, default=[34, 200],
                    help="k-means training vectors a leaf, one build each")  # fmt: skip
    ap.add_argument("--min-partition-size", type=NON_NEGATIVE, default=50)
    ap.add_argument("--search", type=parse_ks, default=[20, 40, 80, 160],
                    help="leaves_to_search values measured on every build")  # fmt: skip
    ap.add_argument("--reorder", type=POSITIVE, default=317, help="pre_reorder_num_neighbors")
    ap.add_argument("--k", type=POSITIVE, default=10)
    ap.add_argument("--build-threads", type=POSITIVE, default=2)
    ap.add_argument("--data-dir", help="memory-map the synthetic corpus here (bench_ann's files)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    if args.n < 2 or args.leaves < 2 or args.leaves * max(args.per_leaf) > 10 * args.n:
        ap.error("--n and --leaves must be >= 2, and the samples at most 10 n")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_thread_env(1)  # XLA and BLAS of later imports; ScaNN searches on one thread (num_threads)
    import numpy as np

    from dpr_jax.io import check_results_file, write_results  # (imports numpy)

    check_results_file(args.json)

    from dpr_jax.index.scann_index import ScannIndex

    q_total = 800  # bench_ann's files hold 800 queries (500 held out + 300 tuning)
    if args.data_dir:
        _, emb, queries = synthetic_memmap(args.data_dir, args.n, args.dim, q_total)
    else:
        _, emb, queries = synthetic(args.n, args.dim, q_total)
    queries = np.ascontiguousarray(queries[: args.queries], np.float32)
    load = [os.getloadavg()[0]]
    t = time.time()
    _, true = exact_topk_chunked(queries, emb, args.k)
    print(f"exact top-{args.k} of {len(queries)} queries in {time.time() - t:.0f}s", flush=True)
    corpus = np.asarray(emb, np.float32)
    rows = []
    for per_leaf in args.per_leaf:
        sample = min(args.n, per_leaf * args.leaves)
        ix = ScannIndex(num_leaves=args.leaves, training_sample_size=sample, scoring="ah",
                        min_partition_size=args.min_partition_size, reorder=args.reorder,
                        num_threads=1, training_threads=args.build_threads)  # fmt: skip
        t = time.time()
        ix.build(corpus, np.arange(args.n))
        row = {"per_leaf": per_leaf, "sample": sample, "build_s": time.time() - t, "search": []}
        for lts in args.search:
            ix.search(queries[:20], args.k, leaves_to_search=lts,
                      pre_reorder_num_neighbors=args.reorder)  # warm  # fmt: skip
            t = time.time()
            _, ids = ix.search(queries, args.k, leaves_to_search=lts,
                               pre_reorder_num_neighbors=args.reorder)  # fmt: skip
            dt = time.time() - t
            got = np.asarray(ids).astype(np.int64)
            rec = float(np.mean([len(set(a) & set(b)) / args.k
                                 for a, b in zip(got.tolist(), true.tolist())]))  # fmt: skip
            row["search"].append({"leaves_to_search": lts, "recall": rec,
                                  "qps": len(queries) / dt})  # fmt: skip
        rows.append(row)
        print(f"{per_leaf} a leaf: built in {row['build_s']:.0f}s", flush=True)
        del ix
    load.append(os.getloadavg()[0])
    head = " | ".join(f"{s} leaves: recall@{args.k} (q/s)" for s in args.search)
    print(f"\nScaNN tree-AH, {args.n:,} x {args.dim} synthetic, {args.leaves:,} leaves, "
          f"min_partition_size {args.min_partition_size}, reorder {args.reorder}, "
          f"{len(queries)} queries, one search thread; load average {load[0]:.1f} / {load[1]:.1f}")  # fmt: skip
    print(f"\n| k-means vectors a leaf (sample) | build s | {head} |")
    print("|---|---:|" + "---:|" * len(args.search))
    for r in rows:
        cells = " | ".join(f"{s['recall']:.3f} ({s['qps']:,.0f})" for s in r["search"])
        print(f"| {r['per_leaf']} ({r['sample']:,}) | {r['build_s']:.0f} | {cells} |")
    if args.json:
        write_results(args.json, {"args": vars(args), "rows": rows, "loadavg": load,
                                  "versions": _versions(np)}, "scripts/bench_scann_sample.py")  # fmt: skip
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_scann_sample", main))
