"""Bytes per TPU chip of exact sharded search over DPR's Wikipedia corpus (Karpukhin et al. 2020).

DPR's retrieval corpus is 21,015,324 passages of 100 words; its BERT-base encoder gives 768-dim
vectors. :class:`dpr_jax.index.exact.ExactIndex` shards them row-wise over every chip; this prints
:func:`dpr_jax.index.exact.search_memory` for some TPU slices, in float32 and bfloat16, and
whether corpus + search temporaries fit the chip's HBM. Arithmetic only: nothing is compiled.

    python scripts/shard_memory.py [--n 21015324 --dim 768 --query-batch-size 512 --k 100]
"""

from __future__ import annotations

import argparse
import sys

from dpr_jax.index.exact import TPU_TOPOLOGIES, search_memory

DPR_WIKIPEDIA_PASSAGES = 21_015_324


def table(n, dim, query_batch_size, block_size, k, topologies=TPU_TOPOLOGIES) -> str:
    gib = 2**30
    lines = [
        f"Exact sharded search, {n:,} x {dim} corpus, {query_batch_size} queries per call, "
        f"block {block_size} rows, k = {k}: GiB per chip",
        "",
        "| slice | chips | HBM/chip | dtype | corpus | scores + top-k temporaries | total | fits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (chips, hbm) in topologies.items():
        for dtype in ("float32", "bfloat16"):
            m = search_memory(n, dim, chips, dtype, query_batch_size, block_size, k)
            temps = m["total"] - m["corpus"]
            fits = "yes" if m["total"] <= 0.9 * hbm else "no"  # ~10% for XLA's own buffers
            lines.append(
                f"| {name} | {chips} | {hbm / gib:.0f} | {dtype} | {m['corpus'] / gib:.2f} "
                f"| {temps / gib:.3f} | {m['total'] / gib:.2f} | {fits} |"
            )
    lines += ["", "fits: total <= 90% of HBM (the rest left to XLA and the runtime)."]
    return "\n".join(lines)


def main(argv=None) -> int:
    from dpr_jax.cli.options import POSITIVE  # (imports no jax)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=POSITIVE, default=DPR_WIKIPEDIA_PASSAGES)
    ap.add_argument("--dim", type=POSITIVE, default=768)
    ap.add_argument("--query-batch-size", type=POSITIVE, default=512)
    ap.add_argument("--block-size", type=POSITIVE, default=16384)
    ap.add_argument("--k", type=POSITIVE, default=100)
    args = ap.parse_args(argv)
    print(table(args.n, args.dim, args.query_batch_size, args.block_size, args.k))
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("shard_memory", main))
