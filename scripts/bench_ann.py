"""ScaNN vs FAISS for DPR's maximum-inner-product search (Karpukhin et al. 2020, sec. 3.1).

On one set of passage vectors, in one process, at one search thread count:

- exact search: numpy brute force (the recall ground truth), exact JAX (:mod:`dpr_jax.index.exact`),
  FAISS ``IndexFlatIP`` and ScaNN brute force, in queries per second;
- recall@10 against the exact top 10 vs queries per second while sweeping ScaNN (tree + AH +
  reorder: ``leaves_to_search`` x ``reorder``), FAISS HNSW (``efSearch``) and FAISS IVF-PQ with
  exact refine (``nprobe`` x ``k_factor``), with build time and bytes per vector;
- the headline ratio QPS(ScaNN) / QPS(best FAISS) at recall@10 = 0.90 and 0.95, read off each
  method's Pareto frontier (log-QPS interpolated linearly in recall);
- how search time grows with the corpus (10k ... N vectors).

``--mode tuned`` instead builds ScaNN, FAISS HNSW and FAISS IVF-PQ once each and auto-tunes each
to every ``--targets`` recall (:func:`dpr_jax.index.tune.tune` on ``--tune-queries`` separate
queries), then measures recall and q/s at the tuned knobs on the benchmark queries, every tuned setting in
turn for ``--repeats`` rounds (best kept: load changes hit all methods alike): every method at its
own tuned setting, with the ScaNN / best-FAISS q/s ratio per target.
``--mode sharded`` compares numpy brute force with exact JAX search sharded over 1 and 8 CPU
devices (``--devices``; one subprocess per device count, since XLA fixes it at start-up).

Data: ``--embeddings DIR [DIR ...] --queries Q.npy`` (e.g. SQuAD passages and questions encoded
by ``dpr-jax encode``), or by default a seeded synthetic set fitted to real all-MiniLM-L6-v2
embeddings of SQuAD (see :func:`synthetic`). Outputs in ``--out``: ``results.json``
(every point and the configuration), ``table.md``, ``recall_qps.png`` and ``scaling.png``.

    nice -n 10 python scripts/bench_ann.py --n 1000000 --threads 1 --out artifacts/bench_ann
    nice -n 10 python scripts/bench_ann.py --mode tuned --n 1000000 --out artifacts/bench_tuned
    nice -n 10 python scripts/bench_ann.py --mode sharded --n 1000000 --out artifacts/bench_shard
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic corpus size")
    ap.add_argument("--dim", type=int, default=384, help="synthetic dimension (MiniLM: 384)")
    ap.add_argument("--num-queries", type=int, default=1000, help="synthetic queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embeddings", nargs="+", help="embeddings dirs (instead of synthetic)")
    ap.add_argument("--queries", help="query vectors .npy (Q, dim), with --embeddings")
    ap.add_argument("--max-queries", type=int, default=1000, help="use at most this many queries")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="search threads, the same for all")
    ap.add_argument("--build-threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per point (best is kept)")
    ap.add_argument("--scaling", default="10000,100000,1000000", help="corpus sizes")
    ap.add_argument("--skip", default="", help="comma list of: exact,scann,hnsw,ivfpq,scaling")
    ap.add_argument("--out", default="artifacts/bench_ann")
    ap.add_argument("--mode", choices=["sweep", "tuned", "sharded"], default="sweep",
                    help="sweep: knob sweeps (default); tuned: every method auto-tuned to each "
                    "--targets recall; sharded: numpy vs exact JAX on --devices CPU devices")  # fmt: skip
    ap.add_argument("--targets", default="0.90,0.95,0.99", help="recall targets (--mode tuned)")
    ap.add_argument("--tune-queries", type=int, default=500,
                    help="tuning queries, separate from the benchmark ones (--mode tuned)")  # fmt: skip
    ap.add_argument(
        "--scann-options",
        default="{}",
        help="JSON of ScaNN build options (--mode tuned), e.g. '{\"soar_lambda\": 1.5}'",
    )
    ap.add_argument("--devices", default="1,8", help="CPU device counts (--mode sharded)")
    ap.add_argument("--sharded-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if bool(args.embeddings) != bool(args.queries):
        ap.error("--embeddings and --queries go together")
    return args


def set_thread_env(threads: int) -> None:
    """Before numpy / jax are imported: BLAS and XLA use ``threads`` threads."""
    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flags).strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


# -- data ----------------------------------------------------------------------------------------


def synthetic(n: int, d: int, n_queries: int, seed: int = 0, chunk: int = 65536):
    """A seeded stand-in for all-MiniLM-L6-v2 sentence embeddings of passages and questions.

    Unit vectors from a two-level mixture: topics x 20 subtopics (Dirichlet-weighted centres,
    100 topics at 20k vectors, growing with sqrt(n)), a shared mean direction and anisotropic
    noise (covariance eigenvalues ~ i^-0.85 in a random basis: embedding spectra decay), with
    squared weights mean : topic : subtopic : noise = 0.02 : 0.3 : 0.3 : 0.38. Each query is a
    corpus vector plus noise (cos ~0.6 to it), as a SQuAD question is written from one passage.

    The constants were fitted to real all-MiniLM-L6-v2 embeddings of the 18,896 SQuAD v1.1 train
    paragraphs and 1000 of their questions. At that size (real vs synthetic): mean cos of the
    top-1 passage 0.606 / 0.629, of the 10th 0.446 / 0.430, of random pairs 0.017 / 0.020; and
    the recall@10 of searching 0.5% / 2% / 5% / 10% of sqrt(n) k-means leaves exhaustively,
    0.552 / 0.762 / 0.873 / 0.931 real vs 0.554 / 0.751 / 0.867 / 0.940 synthetic (the
    partition difficulty that separates ANN methods; iid Gaussian data or well-separated
    clusters would make it far easier or harder).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    lam = np.arange(1, d + 1, dtype=np.float64) ** -0.85
    rot, _ = np.linalg.qr(rng.standard_normal((d, d)))
    basis = (rot * np.sqrt(lam / lam.sum())).astype(np.float32)  # E|z @ basis.T|^2 = 1

    def gauss(m):
        return rng.standard_normal((m, d), dtype=np.float32) @ basis.T

    mean = rng.standard_normal(d).astype(np.float32)
    mean /= np.linalg.norm(mean)
    n_topics = max(10, round(100 * math.sqrt(n / 20000)))
    topics = np.repeat(gauss(n_topics), 20, axis=0)
    centres = math.sqrt(0.02) * mean + math.sqrt(0.3) * topics + math.sqrt(0.3) * gauss(len(topics))
    weights = rng.dirichlet(np.ones(len(centres)))
    emb = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = centres[rng.choice(len(centres), m, p=weights)] + math.sqrt(0.38) * gauss(m)
        emb[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    q = emb[rng.choice(n, n_queries, replace=False)] + 1.25 * gauss(n_queries)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    ids = np.arange(n).astype(str)
    return ids, emb, q.astype(np.float32)


# -- measuring -----------------------------------------------------------------------------------


def numpy_topk(queries, emb, k, batch: int = 64):
    """Exact MIPS with numpy (BLAS sgemm + argpartition): scores (Q, k), rows (Q, k)."""
    import numpy as np

    rows = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for s in range(0, len(queries), batch):
        sc = queries[s : s + batch] @ emb.T  # (b, D) . (D, N) -> (b, N)
        part = np.argpartition(-sc, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(sc, part, axis=1)
        order = np.argsort(-ps, axis=1)
        rows[s : s + batch] = np.take_along_axis(part, order, axis=1)
        scores[s : s + batch] = np.take_along_axis(ps, order, axis=1)
    return scores, rows


def recall(got_ids, true_ids) -> float:
    return float(sum(len(set(a) & set(b)) for a, b in zip(got_ids, true_ids)) / true_ids.size)


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def pareto(points):
    """(recall, qps) points -> the frontier, ascending recall (and descending QPS)."""
    front, best = [], -math.inf
    for r, q in sorted(points, key=lambda p: (-p[0], -p[1])):
        if q > best:
            front.append((r, q))
            best = q
    return front[::-1]


def qps_at(front, target: float):
    """QPS at ``target`` recall on a frontier, log-QPS linear in recall between neighbours, as
    (qps, is_lower_bound): when the frontier's first point is already above the target its QPS is
    only a lower bound. None if the target is never reached."""
    for i, (r, q) in enumerate(front):
        if r >= target:
            if i == 0 or r == target:
                return q, r > target
            r0, q0 = front[i - 1]
            t = (target - r0) / (r - r0)
            return math.exp(math.log(q0) + t * (math.log(q) - math.log(q0))), False
    return None


class Bench:
    def __init__(self, args, ids, emb, queries):
        self.args, self.ids, self.emb, self.queries = args, ids, emb, queries
        self.k = args.k
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = {"config": {}, "exact": [], "sweeps": {}, "builds": {}, "scaling": []}
        self.true_ids = None
        self._sub_truth = {}
        self.t_start = time.time()

    def log(self, msg):
        print(f"[{time.time() - self.t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def save(self):
        self.results["config"]["elapsed_s"] = round(time.time() - self.t_start, 1)
        self.results["config"]["loadavg_end"] = os.getloadavg()
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def qps(self, seconds):
        return len(self.queries) / seconds

    # exact search ------------------------------------------------------------------------------

    def ground_truth(self):
        sec, (scores, rows) = timed(lambda: numpy_topk(self.queries, self.emb, self.k), 1)
        self.true_ids = self.ids[rows]
        self.results["exact"].append({"method": "numpy brute force", "qps": self.qps(sec),
                                      "recall": 1.0, "seconds": sec})  # fmt: skip
        self.log(f"numpy brute force: {self.qps(sec):.1f} q/s")

    def exact(self):
        from dpr_jax.index import build_index

        for backend, label in [("exact", "exact JAX"), ("faiss-flat", "FAISS IndexFlatIP"),
                               ("scann-bf", "ScaNN brute force")]:  # fmt: skip
            opts = {} if backend == "exact" else {"num_threads": self.args.threads}
            index = build_index(backend, self.emb, self.ids, **opts)
            # warm up with the timed batch shape (JAX compiles once per query-batch shape)
            index.search(self.queries[:512] if backend == "exact" else self.queries[:64], self.k)
            sec, (_, got) = timed(lambda ix=index: ix.search(self.queries, self.k), 1)
            row = {"method": label, "qps": self.qps(sec), "recall": recall(got, self.true_ids),
                   "seconds": sec}  # fmt: skip
            if backend == "exact":
                import jax

                row["devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}"
            self.results["exact"].append(row)
            self.log(f"{label}: {row['qps']:.1f} q/s, recall {row['recall']:.4f}")
            del index
            gc.collect()
        self.save()

    # sweeps ------------------------------------------------------------------------------------

    def build(self, name, backend, **options):
        from dpr_jax.index import build_index
        from dpr_jax.index.faiss_index import set_faiss_threads

        set_faiss_threads(self.args.build_threads)
        opts = {"num_threads": self.args.build_threads, **options}
        if backend == "scann":
            opts["training_threads"] = self.args.build_threads
        t0 = time.perf_counter()
        index = build_index(backend, self.emb, self.ids, **opts)
        build_s = time.perf_counter() - t0
        index.set_num_threads(self.args.threads)
        size = index.size_bytes()
        self.results["builds"][name] = {
            "backend": backend, "options": index.options, "build_s": build_s,
            "bytes_per_vector": size / index.size, "size_bytes": size,
        }  # fmt: skip
        self.log(f"{name}: built in {build_s:.1f}s, {size / index.size:.1f} bytes/vector "
                 f"{json.dumps(index.options)}")  # fmt: skip
        index.search(self.queries[:64], self.k)  # warm up
        return index

    def sweep(self, name, index, grid):
        points = []
        for params in grid:
            sec, (_, got) = timed(lambda p=params: index.search(self.queries, self.k, **p),
                                  self.args.repeats)  # fmt: skip
            pt = {"params": params, "recall": recall(got, self.true_ids), "qps": self.qps(sec)}
            points.append(pt)
            self.log(f"  {name} {params}: recall {pt['recall']:.4f}, {pt['qps']:.0f} q/s")
        self.results["sweeps"][name] = points
        self.save()

    def scann(self):
        n = len(self.emb)
        index = self.build("ScaNN tree-AH", "scann", scoring="ah",
                           num_leaves=max(2, round(math.sqrt(n))))  # fmt: skip
        leaves = index.options["num_leaves"]
        fracs = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)
        l2s = sorted({max(1, round(leaves * f)) for f in fracs})
        grid = [{"leaves_to_search": lt, "pre_reorder_num_neighbors": r}
                for lt in l2s for r in (30, 100, 300)]  # fmt: skip
        self.sweep("ScaNN tree-AH", index, grid)
        self.scaling_point(n, "ScaNN (default)", index)
        del index
        gc.collect()

    def hnsw(self):
        index = self.build("FAISS HNSW", "faiss-hnsw", M=32, ef_construction=40)
        grid = [{"ef_search": ef} for ef in (10, 16, 32, 64, 128, 256, 512)]
        self.sweep("FAISS HNSW", index, grid)
        self.scaling_point(len(self.emb), "FAISS HNSW (default)", index)
        del index
        gc.collect()

    def ivfpq(self):
        index = self.build("FAISS IVF-PQ + refine", "faiss-ivfpq", refine=True)
        nlist = index.options["nlist"]
        probes = sorted({max(1, round(nlist * f)) for f in (0.0025, 0.005, 0.01, 0.02, 0.04, 0.08)})
        grid = [{"nprobe": p, "k_factor": kf} for p in probes for kf in (1, 3, 10, 30)]
        self.sweep("FAISS IVF-PQ + refine", index, grid)
        del index
        gc.collect()

    # auto-tuned ------------------------------------------------------------------------------

    def tuned(self, tune_queries, targets):
        """Each method built once and tuned to each target on ``tune_queries``; then every tuned
        setting timed on the benchmark queries in turn, round-robin (``--repeats`` rounds, best
        kept), so that a change in machine load hits every method alike."""
        from dpr_jax.index.tune import TuneError, tune

        n = len(self.emb)
        sec, (_, tune_rows) = timed(lambda: numpy_topk(tune_queries, self.emb, self.k), 1)
        self.log(f"exact neighbours of {len(tune_queries)} tuning queries in {sec:.1f}s")
        scann_opts = {"scoring": "ah", "num_leaves": max(2, round(math.sqrt(n)))}
        methods = [("ScaNN tree-AH", "scann", scann_opts)]
        extra = json.loads(self.args.scann_options)
        if extra:  # a second ScaNN build beside the default one, e.g. SOAR spilling
            methods.append((f"ScaNN tree-AH {json.dumps(extra, sort_keys=True)}", "scann",
                            {**scann_opts, **extra}))  # fmt: skip
        methods += [
            ("FAISS HNSW", "faiss-hnsw", {"M": 32, "ef_construction": 40}),
            ("FAISS IVF-PQ + refine", "faiss-ivfpq", {"refine": True}),
        ]  # fmt: skip
        skip = set(filter(None, self.args.skip.split(",")))
        rows = self.results.setdefault("tuned", [])
        indexes = {}
        for name, backend, opts in methods:
            if {"scann": "scann", "faiss-hnsw": "hnsw", "faiss-ivfpq": "ivfpq"}[backend] in skip:
                continue
            index = indexes[name] = self.build(name, backend, **opts)
            build_s = self.results["builds"][name]["build_s"]
            cache = {}
            for target in targets:
                row = {"method": name, "target": target, "build_s": build_s}
                t0 = time.perf_counter()
                try:
                    t = tune(index, self.emb, tune_queries, target, k=self.k,
                             repeats=self.args.repeats, true_rows=tune_rows, cache=cache)  # fmt: skip
                except TuneError as e:
                    row.update(params=None, error=str(e))
                    self.log(f"  {name} @ {target}: {e}")
                    rows.append(row)
                    continue
                row.update(params=t["params"], tune_recall=t["recall"], tune_qps=t["qps"],
                           tune_s=time.perf_counter() - t0, candidates=t["candidates"],
                           qps=0.0)  # fmt: skip
                rows.append(row)
                self.log(f"  {name} @ {target}: tuned {t['params']} recall {t['recall']:.4f}, "
                         f"{t['qps']:.0f} q/s in {row['tune_s']:.0f}s")  # fmt: skip
            self.save()
        timed_rows = [r for r in rows if r.get("params") is not None]
        for round_ in range(self.args.repeats):
            for r in timed_rows:
                index, p = indexes[r["method"]], r["params"]
                sec, (_, got) = timed(lambda p=p, ix=index: ix.search(self.queries, self.k, **p), 1)
                r["qps"] = max(r["qps"], self.qps(sec))
                r["recall"] = recall(got, self.true_ids)
            self.log(f"timing round {round_ + 1}/{self.args.repeats}: "
                     + ", ".join(f"{r['method']} @ {r['target']} {r['qps']:.0f} q/s"
                                 for r in timed_rows))  # fmt: skip
        for r in timed_rows:
            self.log(f"  {r['method']} @ {r['target']}: {r['params']} recall {r['recall']:.4f} "
                     f"(tuning {r['tune_recall']:.4f}), {r['qps']:.0f} q/s")  # fmt: skip
        indexes.clear()
        gc.collect()
        self.save()

    def tuned_headline(self):
        out = {}
        for target in sorted({r["target"] for r in self.results.get("tuned", [])}):
            at = {r["method"]: r for r in self.results["tuned"]
                  if r["target"] == target and r.get("params")}  # fmt: skip
            faiss = {m: r for m, r in at.items() if m.startswith("FAISS")}
            best = max(faiss, key=lambda m: faiss[m]["qps"]) if faiss else None
            ratios = {m: r["qps"] / faiss[best]["qps"] if best else None
                      for m, r in at.items() if m.startswith("ScaNN")}  # fmt: skip
            out[f"{target:.2f}"] = {"best FAISS": best, "ratio": ratios.get("ScaNN tree-AH")}
            if len(ratios) > 1:
                out[f"{target:.2f}"]["ratios"] = ratios
        self.results["tuned_headline"] = out
        self.save()
        return out

    def write_tuned_table(self):
        cfg = self.results["config"]
        L = [f"# Auto-tuned ANN benchmark: {cfg['data']}", ""]
        L.append(f"N = {cfg['n']:,} vectors of dim {cfg['dim']}; each method tuned "
                 f"(`dpr_jax.index.tune`) to each recall@{self.k} target on "
                 f"{cfg['tune_queries']} tuning queries, then measured at those knobs on "
                 f"{cfg['num_queries']} other queries; {cfg['threads']} search thread(s), "
                 f"{cfg['build_threads']} build threads; {cfg['cpu']}; load average at start "
                 f"{cfg['loadavg_start'][0]:.1f}.")  # fmt: skip
        L += ["", "| method | target | tuned knobs | recall (tuning) | recall | q/s | build s |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in self.results["tuned"]:
            if not r.get("params"):
                L.append(f"| {r['method']} | {r['target']:.2f} | not reached | | | | "
                         f"{r['build_s']:.1f} |")  # fmt: skip
                continue
            knobs = ", ".join(f"{k}={v}" for k, v in r["params"].items())
            L.append(f"| {r['method']} | {r['target']:.2f} | {knobs} | {r['tune_recall']:.4f} "
                     f"| {r['recall']:.4f} | {r['qps']:,.0f} | {r['build_s']:.1f} |")  # fmt: skip
        L += [""] + [f"- {name} built with `{json.dumps(b['options'], sort_keys=True)}`"
                     for name, b in self.results["builds"].items()]  # fmt: skip
        L += ["", "| target | best FAISS | ScaNN / FAISS q/s |", "|---|---|---|"]
        for target, h in self.results.get("tuned_headline", {}).items():
            ratio = f"{h['ratio']:.2f}x" if h["ratio"] else "n/a"
            if "ratios" in h:
                ratio = ", ".join(f"{m}: {x:.2f}x" if x else f"{m}: n/a"
                                  for m, x in h["ratios"].items())  # fmt: skip
            L.append(f"| {target} | {h['best FAISS'] or 'not reached'} | {ratio} |")
        L += ["", f"Command: `{cfg['command']}`; total {cfg['elapsed_s']:.0f}s.", ""]
        (self.out / "table.md").write_text("\n".join(L))

    # scaling -----------------------------------------------------------------------------------

    def scaling_point(self, m, method, index):
        sec, (_, got) = timed(lambda: index.search(self.queries, self.k), self.args.repeats)
        true = self.true_ids if m == len(self.emb) else self._sub_truth[m]
        self.results["scaling"].append({"n": m, "method": method, "ms_per_query":
                                        1000 * sec / len(self.queries),
                                        "recall": recall(got, true)})  # fmt: skip
        self.log(f"  scaling n={m:,} {method}: {1000 * sec / len(self.queries):.3f} ms/q")

    def scaling(self, sizes):
        """numpy and exact JAX at every size, ScaNN and HNSW (default settings) below N; the
        full-size points come from ``exact`` and the sweeps."""
        from dpr_jax.index import build_index

        n = len(self.emb)
        for r in self.results["exact"]:
            if r["method"] in ("numpy brute force", "exact JAX"):
                self.results["scaling"].append({"n": n, "method": r["method"], "recall": r["recall"],
                                                "ms_per_query": 1000 / r["qps"]})  # fmt: skip
        for m in sorted(s for s in sizes if s < n):
            sub, ids = self.emb[:m], self.ids[:m]
            sec, (_, rows) = timed(lambda s=sub: numpy_topk(self.queries, s, self.k), 1)
            self._sub_truth[m] = ids[rows]
            self.results["scaling"].append({"n": m, "method": "numpy brute force",
                                            "ms_per_query": 1000 * sec / len(self.queries),
                                            "recall": 1.0})  # fmt: skip
            index = build_index("exact", sub, ids)
            index.search(self.queries[:512], self.k)
            self.scaling_point(m, "exact JAX", index)
            del index
            for method, backend in [("ScaNN (default)", "scann"),
                                    ("FAISS HNSW (default)", "faiss-hnsw")]:  # fmt: skip
                opts = {"num_threads": self.args.build_threads}
                if backend == "scann":  # the sweep's recipe: tree + AH at every size
                    opts.update(scoring="ah", num_leaves=max(2, round(math.sqrt(m))))
                index = build_index(backend, sub, ids, **opts)
                index.set_num_threads(self.args.threads)
                index.search(self.queries[:64], self.k)
                self.scaling_point(m, method, index)
                del index
            gc.collect()
        self.save()

    # report ------------------------------------------------------------------------------------

    def summarise(self):
        fronts = {name: pareto([(p["recall"], p["qps"]) for p in pts])
                  for name, pts in self.results["sweeps"].items()}  # fmt: skip
        headline = {}
        for target in (0.90, 0.95):
            at = {name: qps_at(f, target) for name, f in fronts.items()}
            faiss = {k: v for k, v in at.items() if k.startswith("FAISS") and v is not None}
            best = max(faiss, key=lambda k: faiss[k][0]) if faiss else None
            scann = at.get("ScaNN tree-AH")
            row = {"qps": {k: v and v[0] for k, v in at.items()},
                   "lower_bound": {k: v and v[1] for k, v in at.items()},
                   "best FAISS": best,
                   "ratio": scann[0] / faiss[best][0] if scann and best else None}  # fmt: skip
            headline[f"{target:.2f}"] = row
        self.results["frontiers"] = fronts
        self.results["headline"] = headline
        self.save()
        return fronts, headline

    def write_table(self, fronts, headline):
        cfg = self.results["config"]
        L = [f"# ANN benchmark: {cfg['data']}", ""]
        L.append(f"N = {cfg['n']:,} vectors of dim {cfg['dim']}, {cfg['num_queries']} queries, "
                 f"recall@{self.k} against exact brute force, {cfg['threads']} search thread(s) "
                 f"for every method, one process; {cfg['cpu']}; load average at start "
                 f"{cfg['loadavg_start'][0]:.1f} (a shared machine: QPS is noisy, ratios less so).")  # fmt: skip
        L += ["", "## Headline: QPS at equal recall (Pareto frontiers, log-QPS interpolated)", ""]
        L += ["| recall@10 | ScaNN q/s | best FAISS | its q/s | ScaNN / FAISS |",
              "|---|---|---|---|---|"]  # fmt: skip
        bounded = False
        for target, row in headline.items():
            best = row["best FAISS"]
            qps, lower = row["qps"], row["lower_bound"]
            sc = _fmt(qps.get("ScaNN tree-AH"), lower.get("ScaNN tree-AH"))
            fq = _fmt(qps.get(best), lower.get(best)) if best else "n/a"
            ratio = f"{row['ratio']:.2f}x" if row["ratio"] else "n/a"
            if lower.get("ScaNN tree-AH") or (best and lower.get(best)):
                ratio += " *"
                bounded = True
            L.append(f"| {target} | {sc} | {best or 'not reached'} | {fq} | {ratio} |")
        if bounded:
            L += ["", "\\* a method's lowest-recall setting is already above the target, so its "
                  "QPS there (>=) is a lower bound and the ratio is bounded, not measured."]  # fmt: skip
        L += [
            "",
            "## Exact search",
            "",
            "| method | q/s | recall@10 | vs numpy |",
            "|---|---|---|---|",
        ]
        base = self.results["exact"][0]["qps"]
        for r in self.results["exact"]:
            dev = f" ({r['devices']})" if "devices" in r else ""
            L.append(f"| {r['method']}{dev} | {r['qps']:.1f} | {r['recall']:.4f} | "
                     f"{r['qps'] / base:.2f}x |")  # fmt: skip
        L += [
            "",
            "## Builds",
            "",
            "| index | build s | bytes/vector | options |",
            "|---|---|---|---|",
        ]
        for name, b in self.results["builds"].items():
            opts = ", ".join(f"{k}={v}" for k, v in b["options"].items()
                             if k not in ("num_threads", "training_threads", "query_batch_size"))  # fmt: skip
            L.append(f"| {name} | {b['build_s']:.1f} | {b['bytes_per_vector']:.0f} | {opts} |")
        L += ["", "## Sweeps (Pareto-optimal points in bold)", ""]
        for name, pts in self.results["sweeps"].items():
            front = set(fronts[name])
            L += [f"### {name}", "", "| params | recall@10 | q/s |", "|---|---|---|"]
            for p in sorted(pts, key=lambda p: p["recall"]):
                on = (p["recall"], p["qps"]) in front
                ps = ", ".join(f"{k}={v}" for k, v in p["params"].items())
                b = "**" if on else ""
                L.append(f"| {b}{ps}{b} | {p['recall']:.4f} | {p['qps']:.0f} |")
            L.append("")
        if self.results["scaling"]:
            L += ["## Search time vs corpus size (ms per query)", ""]
            sizes = sorted({r["n"] for r in self.results["scaling"]})
            methods = list(dict.fromkeys(r["method"] for r in self.results["scaling"]))
            L += ["| method | " + " | ".join(f"{s:,}" for s in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]  # fmt: skip
            for m in methods:
                cells = []
                for s in sizes:
                    r = [x for x in self.results["scaling"] if x["n"] == s and x["method"] == m]
                    cells.append(
                        f"{r[0]['ms_per_query']:.3f} (R {r[0]['recall']:.3f})" if r else ""
                    )
                L.append(f"| {m} | " + " | ".join(cells) + " |")
        L += ["", f"Command: `{cfg['command']}`; total {cfg['elapsed_s']:.0f}s.", ""]
        (self.out / "table.md").write_text("\n".join(L))

    def plot(self, fronts):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cfg = self.results["config"]
        fig, ax = plt.subplots(figsize=(7.5, 5))
        for i, (name, pts) in enumerate(self.results["sweeps"].items()):
            color = f"C{i}"
            ax.scatter([p["recall"] for p in pts], [p["qps"] for p in pts], s=10, alpha=0.3,
                       color=color)  # fmt: skip
            f = fronts[name]
            ax.plot([r for r, _ in f], [q for _, q in f], "-o", ms=4, color=color, label=name)
        for r in self.results["exact"]:
            ax.axhline(r["qps"], ls=":", lw=0.8, color="gray")
            ax.annotate(r["method"], (0.5, r["qps"]), fontsize=7, color="gray", va="bottom")
        for t in (0.90, 0.95):
            ax.axvline(t, ls="--", lw=0.6, color="k", alpha=0.4)
        ax.set_yscale("log")
        ax.set_xlim(0.5, 1.005)
        ax.set_xlabel(f"recall@{self.k}")
        ax.set_ylabel(f"queries per second ({cfg['threads']} thread(s))")
        ax.set_title(f"{cfg['data']}: {cfg['n']:,} x {cfg['dim']}", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3, which="both")
        fig.tight_layout()
        fig.savefig(self.out / "recall_qps.png", dpi=130)
        plt.close(fig)

        if self.results["scaling"]:
            fig, ax = plt.subplots(figsize=(6, 4))
            methods = list(dict.fromkeys(r["method"] for r in self.results["scaling"]))
            for m in methods:
                rs = sorted((r["n"], r["ms_per_query"]) for r in self.results["scaling"]
                            if r["method"] == m)  # fmt: skip
                ax.plot(*zip(*rs), "-o", ms=4, label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("corpus size")
            ax.set_ylabel("ms per query")
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3, which="both")
            fig.tight_layout()
            fig.savefig(self.out / "scaling.png", dpi=130)
            plt.close(fig)


def sharded_child(args) -> int:
    """One device count: numpy brute force and exact JAX sharded over ``args.sharded_child``
    CPU devices on the same data; one JSON line on stdout."""
    flag = f"--xla_force_host_platform_device_count={args.sharded_child}"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
    set_thread_env(args.threads)
    import jax

    from dpr_jax.index import build_index

    ids, emb, queries = synthetic(args.n, args.dim, args.num_queries, args.seed)
    queries = queries[: args.max_queries]
    np_s, (_, true_rows) = timed(lambda: numpy_topk(queries, emb, args.k), args.repeats)
    index = build_index("exact", emb, ids)
    index.search(queries[:512], args.k)  # compile the full-batch shape
    jax_s, (_, got) = timed(lambda: index.search(queries, args.k), args.repeats)
    out = {"devices": jax.device_count(), "shards": len(index._emb.addressable_shards),
           "numpy_qps": len(queries) / np_s, "jax_qps": len(queries) / jax_s,
           "recall": recall(got, ids[true_rows])}  # fmt: skip
    print(json.dumps(out), flush=True)
    return 0


def sharded(args) -> int:
    """numpy vs exact JAX on each of ``--devices`` CPU device counts (a subprocess each)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start, rows = time.time(), []
    load = os.getloadavg()
    for n_dev in [int(d) for d in args.devices.split(",") if d]:
        cmd = [sys.executable, __file__, "--sharded-child", str(n_dev), "--n", str(args.n),
               "--dim", str(args.dim), "--num-queries", str(args.num_queries),
               "--max-queries", str(args.max_queries), "--k", str(args.k),
               "--threads", str(args.threads), "--repeats", str(args.repeats),
               "--seed", str(args.seed)]  # fmt: skip
        t0 = time.time()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode:
            sys.stderr.write(res.stderr)
            raise RuntimeError(f"sharded child for {n_dev} devices failed ({res.returncode})")
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"[{time.time() - t_start:7.1f}s] {n_dev} device(s): numpy {row['numpy_qps']:.1f} "
              f"q/s, exact JAX {row['jax_qps']:.1f} q/s ({row['jax_qps'] / row['numpy_qps']:.2f}x), "
              f"recall {row['recall']:.4f} ({time.time() - t0:.0f}s)", file=sys.stderr)  # fmt: skip
    results = {"config": {"n": args.n, "dim": args.dim, "num_queries": args.max_queries,
                          "k": args.k, "threads": args.threads, "repeats": args.repeats,
                          "cpu": f"{os.cpu_count()} CPU(s)", "loadavg_start": load,
                          "loadavg_end": os.getloadavg(),
                          "command": "python " + " ".join(sys.argv),
                          "elapsed_s": round(time.time() - t_start, 1)},
               "rows": rows}  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1))
    L = [f"# Exact search sharded over CPU devices: {args.n:,} x {args.dim}, "
         f"{min(args.num_queries, args.max_queries)} queries, k = {args.k}", "",
         f"{args.threads} BLAS / XLA intra-op thread(s), {os.cpu_count()} CPU cores, load "
         f"average at start {load[0]:.1f}; best of {args.repeats} runs.", "",
         "| devices | numpy q/s | exact JAX q/s | JAX / numpy | recall@k |",
         "|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        L.append(f"| {r['devices']} | {r['numpy_qps']:.1f} | {r['jax_qps']:.1f} | "
                 f"{r['jax_qps'] / r['numpy_qps']:.2f}x | {r['recall']:.4f} |")  # fmt: skip
    L += ["", f"Command: `{results['config']['command']}`.", ""]
    (out / "table.md").write_text("\n".join(L))
    print("\n".join(L))
    return 0


def _fmt(x, lower=False):
    return "n/a" if x is None else f"{'>= ' if lower else ''}{x:,.0f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.sharded_child:
        return sharded_child(args)
    if args.mode == "sharded":
        return sharded(args)
    set_thread_env(args.threads)
    import numpy as np

    if args.embeddings:
        from dpr_jax.embeddings import load_embeddings

        ids, emb = load_embeddings(args.embeddings, show_progress=True)
        queries = np.load(args.queries, allow_pickle=False).astype(np.float32)
        if queries.ndim != 2 or queries.shape[1] != emb.shape[1]:
            raise ValueError(
                f"{args.queries}: queries {queries.shape} do not match dim {emb.shape[1]}"
            )
        tune_queries = queries[args.max_queries : args.max_queries + args.tune_queries]
        queries = queries[: args.max_queries]
        if args.mode == "tuned" and len(tune_queries) < args.tune_queries:
            raise ValueError(
                f"{args.queries}: --mode tuned needs {args.max_queries} + {args.tune_queries} "
                f"queries (benchmark + tuning), the file has {len(queries) + len(tune_queries)}"
            )
        data = f"{', '.join(args.embeddings)} + {args.queries}"
    else:
        t0 = time.time()
        n_tune = args.tune_queries if args.mode == "tuned" else 0
        ids, emb, queries = synthetic(args.n, args.dim, args.num_queries + n_tune, args.seed)
        tune_queries = queries[args.num_queries :]
        queries = queries[: min(args.num_queries, args.max_queries)]
        data = "synthetic MiniLM-like embeddings"
        print(f"synthetic data in {time.time() - t0:.1f}s", file=sys.stderr)
    bench = Bench(args, ids, emb, queries)
    import jax

    from dpr_jax import __version__

    versions = {"dpr_jax": __version__, "jax": jax.__version__, "numpy": np.__version__}
    for mod in ("faiss", "scann"):
        try:
            versions[mod] = __import__(mod).__version__
        except (ImportError, AttributeError):
            versions[mod] = None
    bench.results["config"] = {
        "data": data, "n": len(emb), "dim": emb.shape[1], "num_queries": len(queries),
        "k": args.k, "threads": args.threads, "build_threads": args.build_threads,
        "repeats": args.repeats, "seed": args.seed, "cpu": f"{os.cpu_count()} CPU(s) "
        f"{platform.processor() or platform.machine()}", "versions": versions,
        "loadavg_start": os.getloadavg(), "command": "python " + " ".join(sys.argv),
    }  # fmt: skip
    skip = set(filter(None, args.skip.split(",")))
    bench.ground_truth()
    if args.mode == "tuned":
        bench.results["config"]["tune_queries"] = len(tune_queries)
        bench.tuned(tune_queries, [float(t) for t in args.targets.split(",") if t])
        bench.tuned_headline()
        bench.save()
        bench.write_tuned_table()
        print((bench.out / "table.md").read_text())
        return 0
    if "exact" not in skip:
        bench.exact()
    sizes = [int(s) for s in args.scaling.split(",") if s]
    if "scann" not in skip:
        bench.scann()
    if "hnsw" not in skip:
        bench.hnsw()
    if "ivfpq" not in skip:
        bench.ivfpq()
    if "scaling" not in skip:
        bench.scaling(sizes)
    fronts, headline = bench.summarise()
    bench.write_table(fronts, headline)
    bench.plot(fronts)
    print((bench.out / "table.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
