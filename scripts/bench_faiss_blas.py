"""FAISS's matrix products under each OpenBLAS kernel set (``OPENBLAS_CORETYPE``), side by side.

The faiss-cpu wheel bundles its own OpenBLAS, which picks kernels from the CPU models it knows; a
newer CPU gets its SSE3 fallback (``Prescott``). :func:`dpr_jax.index.faiss_index.import_faiss`
names the kernels from the CPU's features instead (:func:`~dpr_jax.index.faiss_index.openblas_coretype`).
This times, each in a fresh process (OpenBLAS reads the setting once, when it is loaded): FAISS
imported on its own (OpenBLAS's choice), through dpr_jax, and each ``--cores`` value; on
``IndexFlatIP`` exact search (``--queries`` x ``--n`` x ``--dim``: one sgemm, and the product
under k-means and IVF assignment) and a k-means of ``--kmeans`` centroids (5 iterations, what
an IVF index trains), ``--threads`` FAISS threads, the best of ``--repeats``; rounds alternate
between the settings.

    python scripts/bench_faiss_blas.py
    python scripts/bench_faiss_blas.py --cores SkylakeX,Haswell,Prescott --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import numpy as np
args = json.loads(sys.argv[1])
if args["via"] == "dpr_jax":
    from dpr_jax.index.faiss_index import import_faiss
    faiss = import_faiss()
else:
    import faiss
from dpr_jax.index.faiss_index import faiss_blas_core
faiss.omp_set_num_threads(args["threads"])
rng = np.random.default_rng(0)
x = rng.standard_normal((args["n"], args["dim"])).astype(np.float32)
q = rng.standard_normal((args["queries"], args["dim"])).astype(np.float32)
index = faiss.IndexFlatIP(args["dim"])
index.add(x)
best = {"search": float("inf"), "kmeans": float("inf")}
for _ in range(args["repeats"]):
    t = time.perf_counter(); index.search(q, 10); best["search"] = min(best["search"], time.perf_counter() - t)
    km = faiss.Kmeans(args["dim"], args["kmeans"], niter=5, seed=1, verbose=False)
    t = time.perf_counter(); km.train(x); best["kmeans"] = min(best["kmeans"], time.perf_counter() - t)
print(json.dumps({"core": faiss_blas_core(), **best}))
"""


def run_child(via: str, core: str | None, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    if core:
        env["OPENBLAS_CORETYPE"] = core
    spec = {"via": via, "threads": args.threads, "n": args.n, "dim": args.dim,
            "queries": args.queries, "kmeans": args.kmeans, "repeats": args.repeats}  # fmt: skip
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    from dpr_jax.cli.options import POSITIVE  # (imports no jax)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=POSITIVE, default=100_000, help="database vectors")
    ap.add_argument("--dim", type=POSITIVE, default=384)
    ap.add_argument("--queries", type=POSITIVE, default=4096)
    ap.add_argument("--kmeans", type=POSITIVE, default=1024, help="k-means centroids")
    ap.add_argument("--threads", type=POSITIVE, default=1)
    ap.add_argument("--repeats", type=POSITIVE, default=3)
    ap.add_argument(
        "--rounds", type=POSITIVE, default=2, help="alternating rounds of every setting"
    )
    ap.add_argument(
        "--cores", default="", help="OPENBLAS_CORETYPE values to time too, e.g. Haswell"
    )
    args = ap.parse_args(argv)
    settings = [("faiss on its own (OpenBLAS's choice)", "faiss", None),
                ("faiss through dpr_jax", "dpr_jax", None)]  # fmt: skip
    settings += [
        (f"OPENBLAS_CORETYPE={c}", "faiss", c) for c in filter(None, args.cores.split(","))
    ]
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name, via, core in settings:
            r = run_child(via, core, args)
            b = best.setdefault(name, dict(r))
            b.update({k: min(b[k], r[k]) for k in ("search", "kmeans")})
    search_flop = 2.0 * args.queries * args.n * args.dim
    kmeans_flop = 5 * 2.0 * args.n * args.kmeans * args.dim
    base = best[settings[0][0]]
    print(f"FAISS products, {args.threads} thread(s), {os.cpu_count()} CPU(s); IndexFlatIP "
          f"{args.queries} x {args.n:,} x {args.dim}; k-means {args.kmeans} centroids, 5 "
          f"iterations; best of {args.repeats} x {args.rounds} rounds; load average at the end "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| setting | OpenBLAS core | search GFLOP/s | k-means GFLOP/s | vs FAISS on its own |")
    print("|---|---|---:|---:|---:|")
    for name, *_ in settings:
        b = best[name]
        print(f"| {name} | {b['core']} | {search_flop / b['search'] / 1e9:.0f} | "
              f"{kmeans_flop / b['kmeans'] / 1e9:.0f} | {base['search'] / b['search']:.2f}x / "
              f"{base['kmeans'] / b['kmeans']:.2f}x |")  # fmt: skip
    return 0


if __name__ == "__main__":
    from dpr_jax.cli.errors import run_script

    sys.exit(run_script("bench_faiss_blas", main))
