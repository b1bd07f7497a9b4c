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

``--mode equal`` compares methods at equal *measured* recall on held-out queries, the rule the
tuned mode lacks (there each method is timed wherever its held-out recall lands). A method is an
index and a tuner: ScaNN tree-AH and FAISS IVF-PQ + refine (and HNSW unless skipped) with
:func:`dpr_jax.index.tune.tune`, ScaNN's own ``builder(...).autopilot()`` and FAISS's own
``ParameterSpace.explore`` (its ``OperatingPoints``) on the same FAISS index. Each tuner's
settings (tuned on ``--tune-queries`` separate queries; the dpr_jax tuner also at targets
+-0.02 so that the held-out curve brackets each target; autopilot's default and its
``leaves_to_search`` from 1 to every leaf) are measured on the benchmark queries: recall@k per
query for each ``--ks`` k (DPR reads 100), q/s over ``--repeats`` rounds, every setting of every
method in turn in each round. A method's q/s at a target is read off its own held-out Pareto
curve (each point at its best q/s over the rounds: other jobs on a shared machine only slow a
run down, so the fastest round is the least disturbed) by linear interpolation between the two
points that bracket the target (shown in the table); its spread is min / median / max over
rounds (the same two points, each round's q/s);
the uncertainty from the choice of queries is a bootstrap over them (``--bootstrap`` resamples:
each point's recall re-measured on the resample, the interpolation redone; paired across
methods). Every ratio has both. The tuners' own picks at the target are listed with their
held-out recall, so the unequal-recall comparison stays visible. FAISS IVF and ScaNN tree rows also
carry each setting's work a query, which no load changes (:class:`FaissWork`: codes scanned,
FAISS's own counter, and vectors rescored by the refine; :class:`ScannWork`: the datapoints of
the leaves searched, from ScaNN's serialized tree, and the reorder depth), to tell a q/s
difference from timing noise.
Outputs: ``table.md``,
``results.json`` (every point, every round), ``recall_qps.png`` (every curve, recall bars =
bootstrap 95%, q/s bars and bands = min-max over rounds, stars = q/s at the targets),
``recall_work.png`` (recall against codes scanned a query, for the methods with a work count).

Scale (``--data-dir``): the synthetic corpus is generated 65,536 rows at a time into a
``.npy`` memory map (:func:`synthetic_memmap`, made once and reused), and the exact neighbours
stream over it in blocks (:func:`exact_topk_chunked`), so the corpus itself never needs memory
(the page cache holds what is read). At dim 384 a vector is 1,536 bytes of float32: 1M vectors
are 1.5 GB and the three indexes (ScaNN tree-AH and autopilot with float32 reorder data ~1.7 KB a
vector each, IVF-PQ + flat refine ~1.6 KB) ~5 GB together, well inside 24 GiB. 10M vectors are
a 15.4 GB memory map and ~17 / 17 / 16 GB of indexes, ~50 GB together, which does not fit:
``--sequential`` keeps one index at a time (build, tune, measure, free; timing round-robin
within that index's methods only), a peak of ~17.5 GB (ScaNN's float32 copy 15.4 GB + AH codes
1 GB + ids 0.6 GB + ``Index.build``'s finiteness check, a transient 3.8 GB bool array, before
the copy) plus the (Q, 65,536) float32 score block of the exact search (0.2 GB at Q = 800).

``--mode accel`` runs on a GPU or TPU and prints one line and exits 0 when there is none: exact
JAX search (float32 and bfloat16 storage) and its ``approx_max_k`` search (``recall_target``
swept) on the JAX accelerator, exact PyTorch search (float32, bfloat16) on its GPU, and, where the installed FAISS has GPU support, GPU flat, IVF-Flat
and IVF-PQ (``nprobe`` swept through ``GpuParameterSpace``) and CAGRA (``itopk_size`` swept;
where FAISS was built with cuVS), all read at the targets by the same rule.

Data: ``--embeddings DIR [DIR ...] --queries Q.npy`` (e.g. SQuAD passages and questions encoded
by ``dpr-jax encode``), or by default a seeded synthetic set fitted to real all-MiniLM-L6-v2
embeddings of SQuAD (see :func:`synthetic`). Outputs in ``--out``: ``results.json``
(every point and the configuration), ``table.md``, ``recall_qps.png`` and ``scaling.png``.

    nice -n 10 python scripts/bench_ann.py --n 1000000 --threads 1 --out artifacts/bench_ann
    nice -n 10 python scripts/bench_ann.py --mode tuned --n 1000000 --out artifacts/bench_tuned
    nice -n 10 python scripts/bench_ann.py --mode sharded --n 1000000 --out artifacts/bench_shard
    python scripts/bench_ann.py --mode equal --n 1000000 --threads 1 --num-queries 500 \
        --tune-queries 300 --targets 0.90,0.95 --ks 10,100 --skip hnsw --repeats 3 \
        --data-dir /tmp/ann_data --out artifacts/bench_equal_1m
    python scripts/bench_ann.py --mode equal --n 10000000 ... --sequential --data-dir /big/disk
    python scripts/bench_ann.py --mode accel --n 1000000 --num-queries 1000 --ks 10,100 \
        --targets 0.90,0.95 --repeats 3 --out artifacts/bench_accel_1m
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from dpr_jax.cli.errors import run_script  # neither imports numpy (set_thread_env)
from dpr_jax.cli.options import NON_NEGATIVE, POSITIVE, name_list, number_list
from dpr_jax.errors import UserError

# what --skip names: indexes (exact, scann, hnsw, ivfpq), --mode sweep's scaling run, and the
# libraries' own tuners in --mode equal (ScaNN autopilot(), FAISS ParameterSpace with / without ht)
SKIP_NAMES = ("exact", "scann", "autopilot", "hnsw", "ivfpq", "paramspace", "paramspace-noht",
              "scaling")  # fmt: skip


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=POSITIVE, default=1_000_000, help="synthetic corpus size")
    ap.add_argument("--dim", type=POSITIVE, default=384, help="synthetic dimension (MiniLM: 384)")
    ap.add_argument("--num-queries", type=POSITIVE, default=1000, help="synthetic queries")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--embeddings", nargs="+", help="embeddings dirs (instead of synthetic)")
    ap.add_argument("--queries", help="query vectors .npy (Q, dim), with --embeddings")
    ap.add_argument(
        "--max-queries", type=POSITIVE, default=1000, help="use at most this many queries"
    )
    ap.add_argument("--k", type=POSITIVE, default=10)
    ap.add_argument("--threads", type=POSITIVE, default=1, help="search threads, the same for all")
    ap.add_argument("--build-threads", type=POSITIVE, default=os.cpu_count() or 1)
    ap.add_argument(
        "--repeats", type=POSITIVE, default=2, help="timed runs per point (best is kept)"
    )
    ap.add_argument("--scaling", type=number_list(int, 1, example="10000,100000"),
                    default="10000,100000,1000000", help="corpus sizes")  # fmt: skip
    ap.add_argument("--skip", type=name_list(SKIP_NAMES, empty=True), default="",
                    help="comma list of: " + ",".join(SKIP_NAMES))  # fmt: skip
    ap.add_argument("--out", default="artifacts/bench_ann")
    ap.add_argument("--mode", choices=["sweep", "tuned", "equal", "accel", "sharded"],
                    default="sweep",
                    help="sweep: knob sweeps (default); tuned: every method auto-tuned to each "
                    "--targets recall; equal: q/s at equal measured held-out recall, dpr_jax's "
                    "tuner beside ScaNN autopilot() and FAISS ParameterSpace; accel: the same on "
                    "a GPU/TPU (skipped without one); sharded: numpy vs exact JAX on --devices "
                    "CPU devices")  # fmt: skip
    ap.add_argument("--targets", type=number_list(float, 0, 1, lo_open=True, example="0.90,0.95"),
                    default="0.90,0.95,0.99", help="recall targets (--mode tuned / equal)")  # fmt: skip
    ap.add_argument("--tune-queries", type=POSITIVE, default=500,
                    help="tuning queries, separate from the benchmark ones (--mode tuned)")  # fmt: skip
    ap.add_argument(
        "--scann-options",
        default="{}",
        help="JSON of ScaNN build options (--mode tuned: a second ScaNN build; --mode equal: "
        "over the ScaNN group's defaults), e.g. '{\"soar_lambda\": 1.5}'",
    )
    ap.add_argument(
        "--ivfpq-options",
        default="{}",
        help="JSON of FAISS IVF-PQ build options over the IVF-PQ group's defaults (--mode equal), "
        'e.g. \'{"refine_dtype": "float16"}\'',
    )
    ap.add_argument("--ks", type=number_list(int, 1, example="10,100"), default="10",
                    help="recall@k values, comma list (--mode equal / accel), e.g. 10,100")  # fmt: skip
    ap.add_argument("--bootstrap", type=POSITIVE, default=1000,
                    help="bootstrap resamples of the queries (--mode equal / accel)")  # fmt: skip
    ap.add_argument("--data-dir", help="write the synthetic corpus here as .npy in chunks and "
                    "memory-map it (made once, reused; for 1M-10M vectors)")  # fmt: skip
    ap.add_argument("--reuse-indexes", action="store_true",
                    help="--mode equal with --data-dir: keep each built index there and reload "
                    "it in later runs (which report the first build's time)")  # fmt: skip
    ap.add_argument("--tune-only", action="store_true",
                    help="--mode equal with --reuse-indexes: build (or reload) the indexes and "
                    "keep every tuner's settings, then stop (a later run measures them)")  # fmt: skip
    ap.add_argument("--build-only", action="store_true",
                    help="--mode equal with --reuse-indexes: build and keep the indexes, then "
                    "stop (a later run measures them)")  # fmt: skip
    ap.add_argument("--sequential", action="store_true",
                    help="--mode equal: one index in memory at a time (build, tune, measure, "
                    "free); rounds are round-robin within an index only")  # fmt: skip
    ap.add_argument("--resume", action="store_true",
                    help="--mode equal --sequential: keep the indexes an earlier run into the "
                    "same --out measured in full (same data, queries, settings and CPU model) "
                    "and measure only the rest (a 10M run that was stopped or killed)")  # fmt: skip
    ap.add_argument("--ps-experiments", type=NON_NEGATIVE, default=0,
                    help="FAISS ParameterSpace.n_experiments (0: FAISS's default)")  # fmt: skip
    ap.add_argument("--accel-force-cpu", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--devices", type=number_list(int, 1, example="1,8"), default="1,8",
                    help="CPU device counts (--mode sharded)")  # fmt: skip
    ap.add_argument("--sharded-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if bool(args.embeddings) != bool(args.queries):
        ap.error("--embeddings and --queries go together")
    if args.resume and not (args.mode == "equal" and args.sequential):
        ap.error("--resume goes with --mode equal --sequential (each index measured on its own)")
    for flag, on in (("--tune-only", args.tune_only), ("--build-only", args.build_only)):
        if on and not (args.mode == "equal" and args.reuse_indexes and args.data_dir):
            ap.error(f"{flag} goes with --mode equal --reuse-indexes --data-dir DIR (what it "
                     "makes is kept there for a later run; without them it would be lost)")  # fmt: skip
    if args.reuse_indexes and not args.data_dir:
        ap.error("--reuse-indexes keeps the indexes beside the corpus: give --data-dir DIR")
    # parsed once here: args.scann_opts / args.ivfpq_opts (the JSON texts stay as given: they
    # are part of the keys of kept builds and tunings)
    for flag, attr, what, example in (
        ("--scann-options", "scann_options", "ScaNN", '{"num_leaves": 2000}'),
        ("--ivfpq-options", "ivfpq_options", "FAISS IVF-PQ", '{"refine_dtype": "float16"}'),
    ):
        text = getattr(args, attr)
        try:
            options = json.loads(text)
        except ValueError as e:
            ap.error(f"{flag} {text!r}: not JSON ({e})")
        if not isinstance(options, dict):
            ap.error(f"{flag} {text!r}: a JSON object of {what} build options, e.g. '{example}'")
        setattr(args, attr.replace("_options", "_opts"), options)
    if args.ivfpq_opts.get("refine", True) is not True:  # its rows say "+ refine"
        ap.error(f"--ivfpq-options {args.ivfpq_options!r}: this benchmark's IVF-PQ rows are "
                 "IVF-PQ + refine (FAISS's IndexRefine); \"refine\" can only be true here")  # fmt: skip
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


def synthetic(n: int, d: int, n_queries: int, seed: int = 0, chunk: int = 65536, out=None):
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

    ``out``: an (n, d) float32 array to fill (e.g. a ``np.lib.format.open_memmap``), so that the
    corpus is written ``chunk`` rows at a time and never held in memory whole; the values are
    the same as without it (:func:`synthetic_memmap`).
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
    emb = np.empty((n, d), np.float32) if out is None else out
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
        extra = self.args.scann_opts
        if extra:  # a second ScaNN build beside the default one, e.g. SOAR spilling
            methods.append((f"ScaNN tree-AH {json.dumps(extra, sort_keys=True)}", "scann",
                            {**scann_opts, **extra}))  # fmt: skip
        methods += [
            ("FAISS HNSW", "faiss-hnsw", {"M": 32, "ef_construction": 40}),
            ("FAISS IVF-PQ + refine", "faiss-ivfpq", {"refine": True}),
        ]  # fmt: skip
        skip = set(self.args.skip)
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


# -- equal measured recall (--mode equal) --------------------------------------------------------
#
# The headline of --mode equal compares methods at the same *measured* recall on held-out queries:
# every method contributes a set of search settings (its own tuner's choices), each measured on
# the benchmark queries (recall per query, q/s over --repeats round-robin rounds); its q/s at a
# target recall is read off its own recall-q/s curve by linear interpolation between the two
# Pareto points that bracket the target. The pure arithmetic is in the functions below (tested by
# hand in tests/test_bench_tuned.py); :class:`EqualRecall` runs the libraries.

TRUTH_KEYS = ("data", "n", "dim", "num_queries", "tune_queries", "seed", "memmap")  # name a truth
BUILD_RECORD = ".build.json"  # <index dir>.build.json, beside an index kept by --reuse-indexes

RULE = (
    "q/s at a target = linear interpolation in (recall, q/s) between the two points of the "
    "method's held-out Pareto frontier (each point's best q/s over the rounds: on a shared "
    "machine other jobs only ever slow a run down) that bracket the target; "
    "'>=' where every point is above the target (a lower bound: the fastest point's q/s), "
    "'not reached' where none reaches it"
)


class PeakMemory:
    """The process's peak anonymous memory (``RssAnon`` + ``VmSwap`` of /proc/self/status,
    sampled every ``every`` s in a thread) while the ``with`` block runs: what an index build
    needs beyond the memory-mapped corpus (file pages, which the kernel can drop). ``gib`` and
    ``swap_gib`` (the most of it in swap) are None where /proc is not there."""

    def __init__(self, every: float = 0.2):
        self.every, self.gib, self.swap_gib = every, None, None

    @staticmethod
    def sample() -> tuple[int, int] | None:
        try:
            with open("/proc/self/status") as f:
                kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
                      if k in ("RssAnon", "VmSwap")}  # fmt: skip
        except OSError:
            return None
        return kb.get("RssAnon", 0) + kb.get("VmSwap", 0), kb.get("VmSwap", 0)

    def _watch(self):
        while not self._stop.wait(self.every):
            self._take()

    def _take(self):
        got = self.sample()
        if got is not None:
            self._seen = True
            self._peak = max(self._peak, got[0])
            self._swap = max(self._swap, got[1])

    def __enter__(self):
        import threading

        self._peak = self._swap = 0
        self._seen = False
        self._stop = threading.Event()
        self._take()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._take()
        if self._seen:
            self.gib, self.swap_gib = self._peak / 2**20, self._swap / 2**20
        return False


def synthetic_memmap(data_dir, n: int, d: int, n_queries: int, seed: int = 0,
                     chunk: int = 65536):  # fmt: skip
    """:func:`synthetic` written to ``data_dir`` as .npy files (made once, then memory-mapped):
    the corpus is generated ``chunk`` rows at a time into an ``open_memmap``, so a 10M x 384
    corpus (15.4 GB of float32) never needs 15.4 GB of memory; the page cache holds what is read.
    Returns (ids, emb memmap read-only, queries)."""
    import numpy as np

    base = Path(data_dir) / f"synthetic_n{n}_d{d}_q{n_queries}_s{seed}"
    emb_p, q_p, done = (base.with_suffix(".emb.npy"), base.with_suffix(".queries.npy"),
                        base.with_suffix(".done"))  # fmt: skip
    if not done.exists():
        base.parent.mkdir(parents=True, exist_ok=True)
        out = np.lib.format.open_memmap(emb_p, mode="w+", dtype=np.float32, shape=(n, d))
        _, _, q = synthetic(n, d, n_queries, seed, chunk=chunk, out=out)
        out.flush()
        del out
        np.save(q_p, q)
        done.write_text(json.dumps({"n": n, "d": d, "n_queries": n_queries, "seed": seed}))
    emb = np.load(emb_p, mmap_mode="r")
    return np.arange(n).astype(str), emb, np.load(q_p)


def exact_topk_chunked(queries, emb, k: int, rows: int = 65536):
    """Exact MIPS top-k (scores (Q, k), rows (Q, k)), best first, ties to the lower row, reading
    the corpus ``rows`` rows at a time (a memmap is streamed once, whatever the query count:
    memory is a (Q, rows) score block plus the running (Q, 2k) candidates)."""
    import numpy as np

    q = np.ascontiguousarray(queries, np.float32)
    k = min(k, len(emb))
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_r = np.zeros((len(q), 0), np.int64)
    for start in range(0, len(emb), rows):
        block = np.asarray(emb[start : start + rows], np.float32)
        sc = q @ block.T  # (Q, D) . (D, rows) -> (Q, rows)
        kk = min(k, sc.shape[1])
        part = np.argpartition(-sc, kk - 1, axis=1)[:, :kk]
        cand_s = np.concatenate([best_s, np.take_along_axis(sc, part, axis=1)], axis=1)
        cand_r = np.concatenate([best_r, part + start], axis=1)
        order = np.lexsort((cand_r, -cand_s), axis=1)[:, :k]  # score desc, then row asc
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_r = np.take_along_axis(cand_r, order, axis=1)
    return best_s, best_r


def per_query_recall(got_ids, true_ids):
    """(Q,) |returned top-k ∩ exact top-k| / k per query (its mean is :func:`recall`)."""
    import numpy as np

    k = true_ids.shape[1]
    return np.array([len(set(a) & set(b)) / k
                     for a, b in zip(np.asarray(got_ids).tolist(), np.asarray(true_ids).tolist())])  # fmt: skip


def least_work(points: list[dict], target: float) -> dict | None:
    """The point of ``points`` (one method's held-out curve at one k) with a work count and
    held-out recall >= ``target`` that scans the fewest codes a query, then rescores the fewest
    vectors (None: no counted point reaches the target)."""
    ok = [p for p in points if p.get("work") and p["recall"] >= target]
    return min(ok, key=lambda p: (p["work"]["codes"], p["work"].get("rescored") or 0),
               default=None)  # fmt: skip


def frontier_indices(recalls, qps) -> list[int]:
    """Indices of the Pareto points (no other point has both more recall and more q/s), in
    ascending recall (so descending q/s)."""
    order = sorted(range(len(recalls)), key=lambda i: (-recalls[i], -qps[i]))
    out, best = [], -math.inf
    for i in order:
        if qps[i] > best:
            out.append(i)
            best = qps[i]
    return out[::-1]


def interpolate_at(recalls, qps, target: float) -> dict:
    """q/s at recall ``target`` on the curve of points (``recalls[i]``, ``qps[i]``) (see RULE).

    Returns ``status`` ("measured": a point at the target or two bracketing it; "lower bound":
    every point is above it, ``qps`` is the fastest's; "not reached": ``qps`` None), ``qps``,
    ``lo`` / ``hi`` (indices of the bracketing points; equal for a point at the target) and
    ``w`` (qps = qps[lo] + w (qps[hi] - qps[lo]), the weight to apply to other q/s of the same
    points, e.g. each round's)."""
    front = frontier_indices(recalls, qps)
    for j, i in enumerate(front):
        if recalls[i] >= target:
            if recalls[i] == target:
                return {"status": "measured", "qps": qps[i], "lo": i, "hi": i, "w": 0.0}
            if j == 0:
                return {"status": "lower bound", "qps": qps[i], "lo": i, "hi": i, "w": 0.0}
            lo = front[j - 1]
            w = (target - recalls[lo]) / (recalls[i] - recalls[lo])
            return {"status": "measured", "qps": qps[lo] + w * (qps[i] - qps[lo]), "lo": lo,
                    "hi": i, "w": w}  # fmt: skip
    return {"status": "not reached", "qps": None, "lo": None, "hi": None, "w": None}


def apply_bracket(at: dict, values) -> float | None:
    """The interpolation of ``at`` (:func:`interpolate_at`) applied to other values of the same
    points (one round's q/s)."""
    if at["lo"] is None:
        return None
    return values[at["lo"]] + at["w"] * (values[at["hi"]] - values[at["lo"]])


def spread(values) -> dict | None:
    """min / median / max of a list (None where empty)."""
    import numpy as np

    v = [x for x in values if x is not None]
    if not v:
        return None
    return {"min": float(min(v)), "median": float(np.median(v)), "max": float(max(v))}


def bootstrap_means(per_query, n_boot: int = 1000, seed: int = 0):
    """(P, n_boot) means of each row of ``per_query`` (P, Q) over ``n_boot`` resamples of the
    Q queries with replacement; the same resamples for every row (and, with the same seed and Q,
    for every call: paired across methods)."""
    import numpy as np

    per_query = np.atleast_2d(np.asarray(per_query, np.float64))
    nq = per_query.shape[1]
    rng = np.random.default_rng(seed)
    counts = np.zeros((n_boot, nq))
    for b in range(n_boot):
        counts[b] = np.bincount(rng.integers(0, nq, nq), minlength=nq)
    return per_query @ counts.T / nq  # (P, Q) . (Q, B) -> (P, B)


def percentile_interval(samples, level: float = 0.95):
    """(lo, hi) percentile interval of the finite samples (None where there are none)."""
    import numpy as np

    s = np.asarray([x for x in samples if x is not None and np.isfinite(x)], np.float64)
    if not len(s):
        return None
    a = (1 - level) / 2
    return float(np.quantile(s, a)), float(np.quantile(s, 1 - a))


def bootstrap_ci(per_query, n_boot: int = 1000, seed: int = 0, level: float = 0.95):
    """Percentile bootstrap interval of the mean of ``per_query`` (Q,) over queries."""
    return percentile_interval(bootstrap_means(per_query, n_boot, seed)[0], level)


def bootstrap_qps_at(per_query, qps, target: float, n_boot: int = 1000, seed: int = 0):
    """(n_boot,) q/s at ``target`` (:func:`interpolate_at`, None where not bracketed) with each
    point's recall re-measured on a resample of the queries: the q/s uncertainty that comes from
    which queries were asked. ``per_query`` (P, Q) recalls of the P points, ``qps`` (P,)."""
    means = bootstrap_means(per_query, n_boot, seed)
    out = []
    for b in range(means.shape[1]):
        at = interpolate_at(list(means[:, b]), list(qps), target)
        out.append(at["qps"] if at["status"] == "measured" else None)
    return out


def ratio_of(a: dict, b: dict) -> dict:
    """a / b of two q/s-at-target rows (:meth:`EqualRecall.summarise`): of the medians, per
    round (min / median / max: both were timed in the same rounds) and per bootstrap resample
    (the same resamples of the queries for both); ``bound``: True where ``a`` is only a lower
    bound (all its points above the target), so the ratio is one too."""
    rounds = [x / y for x, y in zip(a["rounds"], b["rounds"])]
    boot = [x / y if x is not None and y is not None else None
            for x, y in zip(a.get("_boot", []), b.get("_boot", []))]  # fmt: skip
    return {"ratio": a["qps"] / b["qps"], "spread": spread(rounds),
            "boot_ci": percentile_interval(boot), "bound": a["status"] == "lower bound"}  # fmt: skip


def headline_ratios(at: dict, pairs) -> dict:
    """At one k and target, from each method's q/s-at-target row ``at[name]``: the best FAISS
    method (highest median q/s among those measured at the target), every other method / that
    FAISS, and each (numerator, denominator) of ``pairs``; a denominator must be measured, a
    numerator may be a lower bound (then so is the ratio)."""
    ok = {n: a for n, a in at.items() if a["status"] == "measured"}
    num = {n: a for n, a in at.items() if a["status"] in ("measured", "lower bound")}
    faiss = {n: a for n, a in ok.items() if n.startswith("FAISS")}
    best = max(faiss, key=lambda n: faiss[n]["qps"]) if faiss else None
    rows = []
    if best is not None:
        rows += [{"num": n, "den": best, **ratio_of(a, ok[best])}
                 for n, a in num.items() if not n.startswith("FAISS")]  # fmt: skip
    rows += [{"num": x, "den": y, **ratio_of(num[x], ok[y])} for x, y in pairs
             if x in num and y in ok]  # fmt: skip
    return {"best FAISS": best, "ratios": rows}


def _key(params: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(params.items())) or "(defaults)"


class EqualRecall:
    """``--mode equal``: every method's held-out recall-q/s curve and its q/s at equal measured
    recall.

    Groups are indexes (built once each); methods are (index, tuner) pairs whose search
    settings make the curve: ``dpr_jax.index.tune`` (the candidates it times when tuned to each
    target and to targets around it, so that the held-out curve brackets the target), ScaNN's
    ``autopilot()`` (the configuration ScaNN chooses from the data size; its default search and
    ``leaves_to_search`` from 1 to every leaf) and FAISS's ``ParameterSpace.explore`` (its
    ``OperatingPoints.optimal_pts`` on the tuning queries, with FAISS's own parameter ranges).
    """

    SCANN, AUTOPILOT, IVFPQ, HNSW = ("ScaNN tree-AH", "ScaNN autopilot()",
                                     "FAISS IVF-PQ + refine", "FAISS HNSW")  # fmt: skip
    TUNE, PS = " + dpr_jax tune", " + ParameterSpace"
    PS_NOHT = " + ParameterSpace without ht"

    def __init__(self, args, ids, emb, queries, tune_queries):
        self.args, self.ids, self.emb = args, ids, emb
        self.queries, self.tune_queries = queries, tune_queries
        self.ks = sorted(set(args.ks))
        self.targets = sorted(args.targets)
        self.skip = set(args.skip)
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.t_start = time.time()
        self.groups, self.methods, self.kept_at = {}, {}, {}
        self.trees = {}  # ScaNN groups built here: their trees, read where their bytes were
        self.data_key = None  # names the corpus when it is a reusable --data-dir memmap
        self.results = {"config": {}, "rule": RULE, "builds": {}, "methods": {}, "headline": {}}

    def log(self, msg):
        print(f"[{time.time() - self.t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def save(self):
        self.results["config"]["elapsed_s"] = round(time.time() - self.t_start, 1)
        self.results["config"]["loadavg_end"] = os.getloadavg()
        from dpr_jax.io import atomic_write_text

        # atomic: a kill mid-write leaves the last one whole
        atomic_write_text(self.out / "results.json",
                          json.dumps(self.results, indent=1, default=_json_default))  # fmt: skip

    # data ------------------------------------------------------------------------------------

    def truth(self):
        """Exact top-k of the benchmark and tuning queries (numpy, streamed over the corpus);
        with ``--reuse-indexes`` kept beside the indexes and reloaded by later runs."""
        import numpy as np

        kmax = max(100, *self.ks)  # DPR's 100 whatever --ks: one kept truth serves every k
        where = self.saved_build("exact", {"k": kmax, "queries": len(self.queries),
                                           "tune_queries": len(self.tune_queries)})  # fmt: skip
        path = None if where is None else where.with_name(where.name + ".truth.npz")
        if path is None and self.args.sequential:  # small; kept in --out for --resume
            path = self.out / "truth.npz"
        cfg = self.results["config"]
        mark = json.dumps({"k": kmax, **{key: cfg.get(key) for key in TRUTH_KEYS}}, default=str)
        kept = None
        if path is not None and path.exists():
            try:
                kept = dict(np.load(path))
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # e.g. cut short
                self.log(f"{path}: unreadable ({e}); computing the exact neighbours again")
            # a --reuse-indexes file from before the mark was written is named by its key alone
            if kept is not None and str(kept.get("mark", mark)) != mark:
                self.log(f"{path}: the exact neighbours of other data or queries; computed again")
                kept = None
        if kept is not None:
            rows, self.tune_rows = kept["rows"], kept["tune_rows"]
            self.results["exact"] = json.loads(str(kept["record"]))
            self.log(f"exact neighbours reused from {path}")
        else:
            t0 = time.perf_counter()
            _, rows = exact_topk_chunked(self.queries, self.emb, kmax)
            sec = time.perf_counter() - t0
            _, self.tune_rows = exact_topk_chunked(self.tune_queries, self.emb, kmax)
            self.results["exact"] = {"method": "numpy brute force (chunked)", "k": kmax,
                                     "qps": len(self.queries) / sec, "loadavg": os.getloadavg()}  # fmt: skip
            self.log(f"exact top-{kmax} of {len(self.queries)} + {len(self.tune_queries)} "
                     f"queries ({len(self.queries) / sec:.1f} q/s)")  # fmt: skip
            if path is not None:
                import io

                from dpr_jax.io import atomic_write_bytes

                path.parent.mkdir(parents=True, exist_ok=True)
                buf = io.BytesIO()
                np.savez(buf, rows=rows, tune_rows=self.tune_rows, mark=mark,
                         record=json.dumps(self.results["exact"]))  # fmt: skip
                atomic_write_bytes(path, buf.getvalue())
        self.true_ids = self.ids[rows]

    def rows_to_ids(self, rows):
        import numpy as np

        rows = np.asarray(rows, np.int64)
        return np.where(rows >= 0, self.ids[np.clip(rows, 0, len(self.ids) - 1)], "")

    # groups: one index each ------------------------------------------------------------------

    def _record_build(self, name, backend, build_s, size, options, **extra):
        n = len(self.emb)
        self.results["builds"][name] = {"backend": backend, "build_s": build_s,
                                        "bytes_per_vector": size / n, "size_bytes": size,
                                        "options": options, "loadavg": os.getloadavg(), **extra}  # fmt: skip
        self.log(f"{name}: built in {build_s:.1f}s, {size / n:.1f} bytes/vector")

    def saved_build(self, name: str, spec: dict) -> Path | None:
        """Where a build of ``name`` with ``spec`` is kept under ``--data-dir`` with
        ``--reuse-indexes`` (None otherwise): an index is built once per corpus and options and
        reloaded by later runs, which then report the first build's time and load average."""
        if not (self.args.reuse_indexes and self.data_key):
            return None
        import hashlib

        key = json.dumps({**spec, "data": self.data_key}, sort_keys=True, default=str)
        slug = "".join(c if c.isalnum() else "_" for c in name)
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return Path(self.args.data_dir) / "indexes" / f"{slug}-{digest}"

    def _reuse(self, name: str, where: Path | None) -> bool:
        record = None if where is None else where.with_name(where.name + BUILD_RECORD)
        if record is None or not record.exists():
            return False
        self.kept_at[name] = where
        self.results["builds"][name] = {**json.loads(record.read_text()),
                                        "reused_from": str(where)}  # fmt: skip
        self.log(f"{name}: reusing the build in {where}")
        return True

    def _keep(self, name: str, where: Path | None, save) -> None:
        if where is not None:
            where.parent.mkdir(parents=True, exist_ok=True)
            save(where)
            record = where.with_name(where.name + BUILD_RECORD)  # written last: the build is whole
            record.write_text(json.dumps(self.results["builds"][name], default=str))
            self.kept_at[name] = where

    def saved_tuning(self, name: str, k: int, points=None, picks=None):
        """With ``--reuse-indexes``: a tuner's settings and picks at one k (``points``,
        ``picks``) kept beside the indexes, keyed by the method, the corpus, the tuning queries,
        k and the targets (and ``--scann-options``), so that runs for different k can tune side
        by side; returns the kept (points, picks), None where none are, when not given them."""
        where = self.saved_build(name, {"tuning": name, "tune_queries": len(self.tune_queries),
                                        "k": k, "targets": self.targets,
                                        "scann_options": self.args.scann_options,
                                        **({"ivfpq_options": self.args.ivfpq_options}
                                           if name.startswith(self.IVFPQ)
                                           and self.args.ivfpq_opts else {})})  # fmt: skip
        if where is None:
            return None
        path = where.with_name(where.name + ".tuning.json")
        if points is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"points": points, "picks": picks,
                                        "loadavg": os.getloadavg()}, default=str))  # fmt: skip
            return None
        if not path.exists():
            return None
        rec = json.loads(path.read_text())
        self.log(f"  {name} k={k}: reusing the tuner's settings in {path}")
        self.results.setdefault("reused_tuning", {})[f"{name}, k={k}"] = {
            "from": str(path), "loadavg": rec["loadavg"]}  # fmt: skip
        return rec["points"], {float(t): p for t, p in rec["picks"].items()}

    def build_project(self, name, backend, **options):
        from dpr_jax.index import build_index, load_index
        from dpr_jax.index.faiss_index import set_faiss_threads

        bt = self.args.build_threads
        set_faiss_threads(bt)
        opts = {"num_threads": bt, **options}
        if backend == "scann":
            opts["training_threads"] = bt
        where = self.saved_build(name, {"backend": backend, **options})
        if self._reuse(name, where):
            index = load_index(where)
        else:
            t0 = time.perf_counter()
            with PeakMemory() as mem:
                index = build_index(backend, self.emb, self.ids, **opts)
            build_s = time.perf_counter() - t0
            extra = {"peak_gib": mem.gib, "peak_swap_gib": mem.swap_gib}
            if backend.startswith("faiss"):
                extra["index_factory"] = index.factory_key()
            if backend == "scann":  # serialized once: its bytes and its tree
                write = index.searcher.serialize
                size = self._serialized(name, lambda d: write(d, relative_path=True))
            else:
                size = index.size_bytes()
            self._record_build(name, backend, build_s, size, index.options, **extra)
            self._keep(name, where, index.save)
        index.set_num_threads(self.args.threads)
        self.groups[name] = index
        return index

    def _serialized(self, name, serialize) -> int:
        """Bytes of a ScaNN searcher as ``serialize(directory)`` writes it, and its tree
        (:class:`dpr_jax.index.scann_index.ScannTree`, for the work columns) read from the same
        files, so a searcher is serialized once (~17 GB at 10M x 384)."""
        import tempfile

        from dpr_jax.index.scann_index import ScannTree

        with tempfile.TemporaryDirectory(prefix="bench_scann_") as tmp:
            serialize(tmp)
            self.trees[name] = ScannTree.read(tmp)
            return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())

    def build_autopilot(self):
        import numpy as np

        from dpr_jax.index.scann_index import import_scann

        sp = import_scann()
        config = autopilot_config(len(self.emb), self.emb.shape[1], max(self.ks))
        where = self.saved_build(self.AUTOPILOT, {"k": max(self.ks)})
        if self._reuse(self.AUTOPILOT, where):
            path = where / "scann"  # ScannIndex._load_files' pickle-free load_searcher
            assets = (path / "scann_assets.pbtxt").read_text()
            searcher = sp.ScannSearcher(sp.scann_pybind.ScannNumpy(str(path), assets), docids=None)
        else:
            emb = np.ascontiguousarray(self.emb, np.float32)
            builder = sp.builder(emb, max(self.ks), "dot_product").autopilot()
            builder = builder.set_n_training_threads(self.args.build_threads)
            t0 = time.perf_counter()
            with PeakMemory() as mem:
                searcher = builder.build()
            build_s = time.perf_counter() - t0
            size = self._serialized(self.AUTOPILOT, searcher.serialize)
            self._record_build(self.AUTOPILOT, "scann autopilot()", build_s, size,
                               {"autopilot": "tree_ah, reordering_dtype FLOAT32"}, chosen=config,
                               peak_gib=mem.gib, peak_swap_gib=mem.swap_gib)  # fmt: skip

            def save(d):
                (d / "scann").mkdir(parents=True)
                searcher.serialize(str(d / "scann"), relative_path=True)

            self._keep(self.AUTOPILOT, where, save)
        if self.args.threads > 1:
            searcher.set_num_threads(self.args.threads)
        self.groups[self.AUTOPILOT] = searcher
        return searcher, config

    # methods: an index and a tuner -----------------------------------------------------------

    def add_method(self, name, group, tuner, search, points, picks, ordered_from=None, work=None):
        """``search(queries, k, params) -> ids``; ``points[k]``: [{"params", "tune_recall"}];
        ``picks[k][target]``: the params the tuner itself would serve at that target;
        ``ordered_from``: points[k][ordered_from:] are a sweep in increasing recall and cost,
        measured only until one is well above the highest target; ``work``: a
        :class:`FaissWork` or :class:`ScannWork` counting each held-out search's work."""
        self.methods[name] = {"group": group, "tuner": tuner, "search": search, "points": points,
                              "picks": picks, "work": work,
                              "ordered_from": math.inf if ordered_from is None else ordered_from}  # fmt: skip

    def project_tuner(self, name, group, index):
        from dpr_jax.index.tune import TuneError, tune

        grid = sorted({round(min(0.999, max(0.05, t + m)), 4) for t in self.targets
                       for m in (-0.02, 0.0, 0.02)})  # fmt: skip
        points, picks = {}, {}
        for k in self.ks:
            kept = self.saved_tuning(name, k)
            if kept is not None:
                points[k], picks[k] = kept
                continue
            cache, seen, pts = {}, {}, []
            picks[k] = {}
            for target in grid:
                try:
                    t = tune(index, self.emb, self.tune_queries, target, k=k,
                             repeats=min(2, self.args.repeats), true_rows=self.tune_rows[:, :k],
                             cache=cache)  # fmt: skip
                except TuneError as e:
                    self.log(f"  {name} k={k} @ {target}: {e}")
                    if target in self.targets:
                        picks[k][target] = None
                    continue
                for c in t["candidates"]:
                    key = _key(c["params"])
                    if key not in seen:
                        seen[key] = True
                        pts.append({"params": c["params"], "tune_recall": c["recall"]})
                if target in self.targets:
                    picks[k][target] = t["params"]
            index.tuned = None
            points[k] = pts
            self.log(f"  {name} k={k}: {len(pts)} settings from dpr_jax tune at {grid}")
            self.saved_tuning(name, k, pts, picks[k])
        work = None  # the work columns of a measuring run (none in --tune-only)
        measuring = not self.args.tune_only
        if measuring and index.backend.startswith("faiss"):
            default_kf = index.options.get("k_factor", 1) if index.options.get("refine") else None
            work = FaissWork.of(index.index, lambda p: p.get("k_factor", default_kf))
        elif measuring and index.backend == "scann":
            work = ScannWork.of(self.scann_tree(group), self.queries)
        self.add_method(name, group, "dpr_jax.index.tune",
                        lambda q, k, p, ix=index: ix.search(q, k, **p)[1], points, picks,
                        work=work)  # fmt: skip

    def autopilot_method(self, searcher, config):
        """ScaNN's own choice: the searcher ``autopilot()`` built (for the largest k) and, for
        each k, the reorder depth autopilot picks for that k (it depends on k alone) with the
        leaves it searches by default, then ``leaves_to_search`` from 1 to every leaf as the
        curve at that depth."""
        from dpr_jax.index.tune import ladder

        leaves = config.get("num_leaves")
        parallel = self.args.threads > 1

        def search(q, k, p):
            fn = searcher.search_batched_parallel if parallel else searcher.search_batched
            rows, _ = fn(q, final_num_neighbors=k, **p)
            return self.rows_to_ids(rows)

        pts, picks = {}, {}
        for k in self.ks:
            own = autopilot_config(len(self.emb), self.emb.shape[1], k)
            base = {"pre_reorder_num_neighbors": own["reorder"]} if "reorder" in own else {}
            grid = [base] + ([{**base, "leaves_to_search": v} for v in ladder(1, leaves)]
                             if leaves else [])  # fmt: skip
            pts[k] = [{"params": p, "tune_recall": None} for p in grid]
            picks[k] = {t: base for t in self.targets}  # autopilot's own default
            self.results["builds"][self.AUTOPILOT].setdefault("chosen_per_k", {})[k] = own
        work = (None if self.args.tune_only
                else ScannWork.of(self.scann_tree(self.AUTOPILOT), self.queries))  # fmt: skip
        self.add_method(self.AUTOPILOT, self.AUTOPILOT, "scann autopilot()", search, pts, picks,
                        ordered_from=1, work=work)  # fmt: skip

    def scann_tree(self, group):
        """The ScaNN group's tree (:class:`dpr_jax.index.scann_index.ScannTree`): read when it
        was built and measured here, else from the copy ``--reuse-indexes`` kept."""
        from dpr_jax.index.scann_index import ScannTree

        if group in self.trees:
            tree = self.trees[group]
        else:
            tree = ScannTree.read(self.kept_at[group] / "scann")
        if tree is not None:
            twins = tree.twins()
            self.results["builds"][group]["twin_leaves"] = twins
            self.log(f"{group}: {len(tree.sizes):,} leaves, {twins:,} with a near-twin centre")
        return tree

    def parameter_space(self, name, group, index, drop=()):
        """FAISS's own tuner on the same FAISS index: ``ParameterSpace.initialize`` (FAISS's
        ranges), ``explore`` with an ``IntersectionCriterion`` (recall@k) on the tuning queries,
        the ``OperatingPoints``' optimal points as the curve; the pick at a target is the fastest
        optimal point whose recall there reaches it. ``drop``: ranges left out (e.g. IVF-PQ's
        polysemous ``ht``, of no use for codes not trained to be polysemous), the others kept as
        FAISS sets them (``ParameterSpace.add_range``)."""
        import numpy as np

        from dpr_jax.index.faiss_index import import_faiss, set_faiss_threads

        faiss = import_faiss()
        fi = index.index
        ps = faiss.ParameterSpace()
        ps.initialize(fi)
        ranges = {}
        for i in range(ps.parameter_ranges.size()):
            pr = ps.parameter_ranges.at(i)
            ranges[pr.name] = [pr.values.at(j) for j in range(pr.values.size())]
        if drop:
            ps = faiss.ParameterSpace()
            for pname, values in ranges.items():
                if pname not in drop:
                    pr = ps.add_range(pname)  # filled at once: the next add_range may move it
                    for v in values:
                        pr.values.push_back(v)
            ranges = {n: v for n, v in ranges.items() if n not in drop}
        ps.verbose = 0
        if self.args.ps_experiments:
            ps.n_experiments = self.args.ps_experiments
        saved = _faiss_state(faiss, fi)
        points, picks = {}, {}
        set_faiss_threads(self.args.threads)
        for k in self.ks:
            kept = self.saved_tuning(name, k)
            if kept is not None:
                points[k], picks[k] = kept
                continue
            crit = faiss.IntersectionCriterion(len(self.tune_queries), k)
            crit.set_groundtruth(None, np.ascontiguousarray(self.tune_rows[:, :k], np.int64))
            crit.nnn = k
            t0 = time.perf_counter()
            op = ps.explore(fi, np.ascontiguousarray(self.tune_queries, np.float32), crit)
            _faiss_restore(faiss, fi, saved)
            opt = [op.optimal_pts.at(i) for i in range(op.optimal_pts.size())]
            opt = [(p.key, p.perf, p.t) for p in opt if p.key]
            self.log(f"  {name} k={k}: explore {op.all_pts.size()} settings in "
                     f"{time.perf_counter() - t0:.0f}s, {len(opt)} optimal")  # fmt: skip
            low = min(self.targets) - 0.15
            keep = [o for o in opt if o[1] >= low]
            below = [o for o in opt if o[1] < low]
            keep = below[-1:] + keep
            points[k] = [{"params": {"key": key}, "tune_recall": perf} for key, perf, _ in keep]
            picks[k] = {}
            for target in self.targets:
                ok = [o for o in opt if o[1] >= target]
                picks[k][target] = {"key": min(ok, key=lambda o: o[2])[0]} if ok else None
            self.saved_tuning(name, k, points[k], picks[k])
        self.results["builds"][group].setdefault("parameter_space", ranges)

        def search(q, k, p):
            set_faiss_threads(self.args.threads)
            ps.set_index_parameters(fi, p["key"])
            try:
                _, rows = fi.search(q, k)
            finally:
                _faiss_restore(faiss, fi, saved)
            return self.rows_to_ids(rows)

        refine_kf = saved.get("k_factor_rf")  # the index's own unless the key sets it

        def k_factor_of(p):
            for part in p["key"].split(","):
                if part.startswith("k_factor_rf="):
                    return float(part.split("=", 1)[1])
            return refine_kf

        self.add_method(name, group, "faiss ParameterSpace", search, points, picks,
                        work=FaissWork.of(fi, k_factor_of))  # fmt: skip

    # measuring -------------------------------------------------------------------------------

    def measure(self, names):
        """Held-out recall of every point of ``names``' methods, then q/s of those near the
        targets over ``--repeats`` rounds, round-robin over every (method, k, point)."""

        todo = []
        low, high = min(self.targets) - 0.05, min(1.0, max(self.targets) + 0.03)
        for name in names:
            m = self.methods[name]
            res = self.results["methods"].setdefault(name, {"group": m["group"],
                                                            "tuner": m["tuner"], "curves": {}})  # fmt: skip
            res["picks"] = {str(k): [[t, p] for t, p in m["picks"][k].items()] for k in self.ks}
            for k in self.ks:
                true = self.true_ids[:, :k]
                pts = []
                for i, p in enumerate(m["points"][k]):
                    if m["work"]:
                        m["work"].start()
                    got = m["search"](self.queries, k, p["params"])
                    pq = per_query_recall(got, true)
                    pts.append({**p, "recall": float(pq.mean()), "_pq": pq, "qps_rounds": []})
                    if m["work"]:
                        pts[-1]["work"] = m["work"].stop(k, len(self.queries), p["params"])
                    if i >= m["ordered_from"] and pts[-1]["recall"] >= high:
                        break  # a sweep in increasing cost: the rest lie further above the targets
                # time the points from a little below the lowest target to a little above the
                # highest, and the nearest one on either side of each target (the brackets)
                for p in pts:
                    p["timed"] = low <= p["recall"] <= high
                for t in self.targets:
                    below = [p for p in pts if p["recall"] < t]
                    above = [p for p in pts if p["recall"] >= t]
                    if below:
                        max(below, key=lambda p: p["recall"])["timed"] = True
                    if above:
                        min(above, key=lambda p: p["recall"])["timed"] = True
                res["curves"][str(k)] = pts
                todo += [(name, k, p) for p in pts if p["timed"]]
            self.log(f"  {name}: held-out recall of {sum(len(m['points'][k]) for k in self.ks)} "
                     "settings")  # fmt: skip
        for r in range(self.args.repeats):
            for name, k, p in todo:
                fn = self.methods[name]["search"]
                t0 = time.perf_counter()
                fn(self.queries, k, p["params"])
                p["qps_rounds"].append(len(self.queries) / (time.perf_counter() - t0))
            self.log(f"timing round {r + 1}/{self.args.repeats}: {len(todo)} settings")
        for name in names:
            for pts in self.results["methods"][name]["curves"].values():
                for p in pts:
                    p["qps"] = spread(p["qps_rounds"])
                    p["recall_ci"] = bootstrap_ci(p["_pq"], self.args.bootstrap, self.args.seed)
        self.save()

    def summarise(self):
        """Per method, k and target: q/s at the target (median curve, every round's curve,
        bootstrap over queries); the headline ratio ScaNN (dpr_jax tune) / best FAISS."""
        import numpy as np

        B, seed = self.args.bootstrap, self.args.seed
        for res in self.results["methods"].values():
            res["at"] = {}
            for k, pts in res["curves"].items():
                timed = [p for p in pts if p["timed"] and p["qps"]]
                rec = [p["recall"] for p in timed]
                med = [p["qps"]["max"] for p in timed]  # best of rounds (see RULE)
                pq = np.array([p["_pq"] for p in timed]) if timed else np.zeros((0, 1))
                res["at"][k] = {}
                for t in self.targets:
                    at = interpolate_at(rec, med, t)
                    row = {"status": at["status"], "qps": at["qps"]}
                    if at["lo"] is not None:
                        rounds = [apply_bracket(at, [p["qps_rounds"][r] for p in timed])
                                  for r in range(len(timed[0]["qps_rounds"]))]  # fmt: skip
                        row.update(rounds=rounds, spread=spread(rounds),
                                   bracket=[timed[at["lo"]]["params"], timed[at["hi"]]["params"]],
                                   bracket_recall=[rec[at["lo"]], rec[at["hi"]]], w=at["w"])  # fmt: skip
                    if at["status"] == "measured":
                        row["_boot"] = bootstrap_qps_at(pq, med, t, B, seed)
                        row["boot_ci"] = percentile_interval(row["_boot"])
                    res["at"][k][f"{t:.2f}"] = row
        head = {}
        for k in map(str, self.ks):
            head[k] = {}
            for t in (f"{t:.2f}" for t in self.targets):
                at = {n: r["at"][k][t] for n, r in self.results["methods"].items()}
                head[k][t] = headline_ratios(at, self.pairs())
        self.results["headline"] = head
        self.save()

    def pairs(self) -> list[tuple[str, str]]:
        """Each library's own tuner against dpr_jax's on the same index (numerator first)."""
        return [(self.SCANN + self.TUNE, self.AUTOPILOT), (self.IVFPQ + self.TUNE, self.IVFPQ + self.PS),
                (self.IVFPQ + self.TUNE, self.IVFPQ + self.PS_NOHT),
                (self.HNSW + self.TUNE, self.HNSW + self.PS)]  # fmt: skip

    # report ----------------------------------------------------------------------------------

    def write_table(self):
        cfg = self.results["config"]
        L = [f"# ANN at equal measured recall: {cfg['data']}", ""]
        L.append(f"N = {cfg['n']:,} vectors of dim {cfg['dim']}; {cfg['num_queries']} held-out "
                 f"queries (recall and q/s), {cfg['tune_queries']} separate tuning queries (the "
                 f"tuners only); {cfg['threads']} search thread(s), {cfg['build_threads']} build "
                 f"threads; {cfg['repeats']} round-robin timing rounds; {cfg['cpu']}; load "
                 f"average {cfg['loadavg_start'][0]:.1f} at start, "
                 f"{cfg['loadavg_end'][0]:.1f} at end.")  # fmt: skip
        if cfg.get("ivfpq_options"):
            L.append(f"{self.IVFPQ} built with `--ivfpq-options "
                     f"'{json.dumps(cfg['ivfpq_options'])}'` over its defaults.")  # fmt: skip
        if cfg.get("scann_options"):
            L.append(f"{self.SCANN} built with `--scann-options "
                     f"'{json.dumps(cfg['scann_options'])}'` over its defaults.")  # fmt: skip
        for group, r in self.results.get("resumed", {}).items():
            cpu = ("(its CPU model not recorded)" if "cpu_model" in
                   self.results.get("resume_assumed", []) else "on the same CPU model")  # fmt: skip
            L.append(f"{group}: measured by an earlier run into this --out {cpu} "
                     f"(finished {r['finished']}; load average "
                     f"{(r['earlier_loadavg_start'] or [math.nan])[0]:.1f} at its start), kept "
                     "by --resume.")  # fmt: skip
        L += ["", f"**Rule.** {RULE}. Spread: min / median / max over the rounds (each round's "
              "q/s interpolated between the same two points); [a, b]: 95% bootstrap interval over "
              f"the held-out queries ({self.args.bootstrap} resamples; recall re-measured, the "
              "same resamples for every method).", "", WORK_NOTE, ""]  # fmt: skip
        for k in map(str, self.ks):
            L += [f"## recall@{k}", "", "| target | method | q/s at target | rounds: min / median / max "
                  "| bootstrap 95% | bracketing points (held-out recall) |",
                  "|---|---|---|---|---|---|"]  # fmt: skip
            for t in (f"{t:.2f}" for t in self.targets):
                for name, res in self.results["methods"].items():
                    a = res["at"][k][t]
                    if a["status"] == "not reached":
                        L.append(f"| {t} | {name} | not reached | | | |")
                        continue
                    ge = ">= " if a["status"] == "lower bound" else ""
                    sp = a.get("spread") or {}
                    ci = a.get("boot_ci")
                    br = " / ".join(f"{_key(p)} ({r:.4f})"
                                    for p, r in zip(a["bracket"], a["bracket_recall"]))  # fmt: skip
                    L.append(f"| {t} | {name} | {ge}{a['qps']:,.0f} | {sp.get('min', 0):,.0f} / "
                             f"{sp.get('median', 0):,.0f} / {sp.get('max', 0):,.0f} | "
                             f"{_ci(ci, ',.0f')} | {br} |")  # fmt: skip
            L += ["", "| target | ratio of q/s at the target | ratio | per round: min / median / "
                  "max | bootstrap 95% |", "|---|---|---|---|---|"]  # fmt: skip
            for t, h in self.results["headline"][k].items():
                if not h["ratios"]:
                    L.append(
                        f"| {t} | n/a (best FAISS: {h['best FAISS'] or 'not reached'}) | | | |"
                    )
                for r in h["ratios"]:
                    sp = r["spread"]
                    ge = ">= " if r["bound"] else ""
                    L.append(f"| {t} | {r['num']} / {r['den']} | **{ge}{r['ratio']:.2f}x** | "
                             f"{sp['min']:.2f} / {sp['median']:.2f} / {sp['max']:.2f} | "
                             f"{_ci(r['boot_ci'], '.2f')} |")  # fmt: skip
            L += ["", "What each tuner serves on its own at the target (its pick on the tuning "
                  "queries, measured on the held-out ones):", "",
                  "| target | method | pick | recall (tuning) | held-out recall [95%] | q/s "
                  f"best (min, median) | {WORK_HEADER} |", "|---|---|---|---|---|---|---|"]  # fmt: skip
            for t in self.targets:
                for name, res in self.results["methods"].items():
                    picks = {float(t): p for t, p in res.get("picks", {}).get(k, [])}
                    if t not in picks:
                        continue
                    pick = picks[t]
                    if pick is None:
                        L.append(f"| {t:.2f} | {name} | not reached | | | |")
                        continue
                    p = next((p for p in res["curves"][k] if p["params"] == pick), None)
                    if p is None:
                        continue
                    tr = "" if p["tune_recall"] is None else f"{p['tune_recall']:.4f}"
                    q = p["qps"]
                    qs = _qps_cell(q) or "not timed"
                    L.append(f"| {t:.2f} | {name} | {_key(pick)} | {tr} | {p['recall']:.4f} "
                             f"{_ci(p['recall_ci'], '.4f')} | {qs} | {_work_cell(p)} |")  # fmt: skip
            L += self.least_work_table(k)
            L.append("")
        L += [
            "## Builds",
            "",
            "| index | build s (load average) | bytes / vector | peak memory GiB (swapped) "
            "| options |",
            "|---|---|---|---|---|",
        ]
        for name, b in self.results["builds"].items():
            opts = {k: v for k, v in b["options"].items()
                    if k not in ("num_threads", "training_threads", "query_batch_size")}  # fmt: skip
            extra = ""
            if "index_factory" in b:
                extra = f"; `index_factory` key {b['index_factory']}"
            if "chosen" in b:
                extra = f"; chosen by ScaNN: {json.dumps(b['chosen'], sort_keys=True)}"
            if "twin_leaves" in b:
                extra += f"; {b['twin_leaves']:,} leaves with a near-twin centre"
            if "parameter_space" in b:
                extra += "; ParameterSpace ranges: " + ", ".join(
                    f"{n} {v[0]:g}..{v[-1]:g} ({len(v)})" for n, v in b["parameter_space"].items()
                )
            reused = ", reused from an earlier run" if "reused_from" in b else ""
            load = f" ({b['loadavg'][0]:.1f}{reused})" if b.get("loadavg") else ""
            peak = "" if b.get("peak_gib") is None else f"{b['peak_gib']:.1f}"
            if peak and b.get("peak_swap_gib"):
                peak += f" ({b['peak_swap_gib']:.1f})"
            L.append(f"| {name} | {b['build_s']:.1f}{load} | {b['bytes_per_vector']:.0f} | {peak} "
                     f"| `{json.dumps(opts, sort_keys=True)}`{extra} |")  # fmt: skip
        for name, r in self.results.get("reused_tuning", {}).items():
            L.append(f"\n{name}: its tuner's settings were chosen by an earlier run "
                     f"(`--tune-only`, load average {r['loadavg'][0]:.1f}) and measured here.")  # fmt: skip
        ex = self.results.get("exact")
        if ex:
            L += ["", f"Exact top-{ex['k']} (numpy, chunked over the corpus): {ex['qps']:.1f} q/s."]
        L += ["", "## Curves (held-out; timed points have q/s)", ""]
        for name, res in self.results["methods"].items():
            for k, pts in res["curves"].items():
                L += [f"### {name}, recall@{k}", "", "| setting | recall (tuning) | held-out "
                      f"recall [95%] | q/s best (min, median) | {WORK_HEADER} |",
                      "|---|---|---|---|---|"]  # fmt: skip
                for p in sorted(pts, key=lambda p: p["recall"]):
                    tr = "" if p["tune_recall"] is None else f"{p['tune_recall']:.4f}"
                    q = p.get("qps")
                    qs = _qps_cell(q)
                    L.append(f"| {_key(p['params'])} | {tr} | {p['recall']:.4f} "
                             f"{_ci(p['recall_ci'], '.4f')} | {qs} | {_work_cell(p)} |")  # fmt: skip
                L.append("")
        L += [f"Command: `{cfg['command']}`; total {cfg['elapsed_s']:.0f}s.", ""]
        (self.out / "table.md").write_text("\n".join(L))

    def least_work_table(self, k: str) -> list[str]:
        """Table lines: at each target, every counted method's least work (:func:`least_work`),
        and its codes as a multiple of the fewest any method needs there."""
        rows = []
        for t in self.targets:
            got = {name: least_work(res["curves"][k], t)
                   for name, res in self.results["methods"].items()}  # fmt: skip
            fewest = min((p["work"]["codes"] for p in got.values() if p), default=None)
            for name, p in got.items():
                if p is not None:
                    rows.append(f"| {t:.2f} | {name} | {_key(p['params'])} | {p['recall']:.4f} | "
                                f"{_work_cell(p)} | {p['work']['codes'] / fewest:.2f}x |")  # fmt: skip
        if not rows:
            return []
        return ["", "Least work at the target (the same on any machine): each method's held-out "
                "setting with recall at or above it that scans the fewest codes a query (then "
                "rescores the fewest), among the settings measured:", "",
                f"| target | method | setting | held-out recall | {WORK_HEADER} | codes / the "
                "fewest |", "|---|---|---|---|---|---|", *rows]  # fmt: skip

    def plot(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        cfg = self.results["config"]
        fig, axes = plt.subplots(1, len(self.ks), figsize=(7 * len(self.ks), 5), squeeze=False)
        for ax, k in zip(axes[0], map(str, self.ks)):
            for i, (name, res) in enumerate(self.results["methods"].items()):
                c = f"C{i}"
                pts = sorted((p for p in res["curves"][k] if p.get("qps")),
                             key=lambda p: p["recall"])  # fmt: skip
                if not pts:
                    continue
                r = [p["recall"] for p in pts]
                med = [p["qps"]["max"] for p in pts]  # best of rounds (see RULE)
                lo = [p["recall"] - p["recall_ci"][0] for p in pts]
                hi = [p["recall_ci"][1] - p["recall"] for p in pts]
                ylo = [p["qps"]["max"] - p["qps"]["min"] for p in pts]
                yhi = [0.0] * len(pts)
                ax.errorbar(r, med, xerr=[lo, hi], yerr=[ylo, yhi], fmt="o", ms=3, color=c,
                            alpha=0.6, elinewidth=0.8, capsize=0)  # fmt: skip
                front = frontier_indices(r, med)
                fr = [r[j] for j in front]
                ax.plot(fr, [med[j] for j in front], "-", color=c, label=name)
                ax.fill_between(fr, [pts[j]["qps"]["min"] for j in front],
                                [pts[j]["qps"]["max"] for j in front], color=c, alpha=0.15)  # fmt: skip
                for t, a in res["at"][k].items():
                    if a["status"] == "measured":
                        ax.plot([float(t)], [a["qps"]], "*", ms=10, color=c, mec="k", mew=0.5)
            self._recall_axes(
                ax, f"recall@{k} on {cfg['num_queries']} held-out queries (bars: 95% bootstrap)",
                f"queries/s, {cfg['threads']} thread(s): best of rounds (bars, band: to the "
                "slowest)", f"{cfg['n']:,} x {cfg['dim']}, recall@{k}; stars: q/s at the targets",
                "lower left",
            )  # fmt: skip
        fig.tight_layout()
        fig.savefig(self.out / "recall_qps.png", dpi=130)
        plt.close(fig)
        self.plot_work(plt)

    def plot_work(self, plt):
        """``recall_work.png``: held-out recall against the codes each query scans (the work
        columns; the same on any machine), every counted setting, a line through each method's
        Pareto points (more recall for fewer codes); labels: vectors rescored."""
        cfg = self.results["config"]
        counted = [(i, name, res) for i, (name, res) in enumerate(self.results["methods"].items())
                   if any(p.get("work") for pts in res["curves"].values() for p in pts)]  # fmt: skip
        if not counted:
            return
        fig, axes = plt.subplots(1, len(self.ks), figsize=(7 * len(self.ks), 5), squeeze=False)
        for ax, k in zip(axes[0], map(str, self.ks)):
            for i, name, res in counted:
                pts = sorted((p for p in res["curves"][k] if p.get("work")),
                             key=lambda p: p["recall"])  # fmt: skip
                if not pts:
                    continue
                r = [p["recall"] for p in pts]
                codes = [p["work"]["codes"] for p in pts]
                ax.plot(r, codes, "o", ms=3, color=f"C{i}", alpha=0.5)
                front = frontier_indices(r, [-c for c in codes])
                ax.plot([r[j] for j in front], [codes[j] for j in front], "-", color=f"C{i}",
                        label=name)  # fmt: skip
                for j in front:
                    if pts[j]["work"].get("rescored"):
                        ax.annotate(f"{pts[j]['work']['rescored']:,}", (r[j], codes[j]),
                                    fontsize=6, color=f"C{i}", xytext=(2, 2),
                                    textcoords="offset points")  # fmt: skip
            self._recall_axes(
                ax, f"recall@{k} on {cfg['num_queries']} held-out queries",
                "codes scanned a query (labels: vectors rescored)",
                f"{cfg['n']:,} x {cfg['dim']}, recall@{k}: work a query, any machine",
                "upper left",
            )  # fmt: skip
        fig.tight_layout()
        fig.savefig(self.out / "recall_work.png", dpi=130)
        plt.close(fig)

    def _recall_axes(self, ax, xlabel: str, ylabel: str, title: str, legend: str) -> None:
        """A recall-x, log-y panel: the targets as dashed lines, labels, legend, grid."""
        for t in self.targets:
            ax.axvline(t, ls="--", lw=0.6, color="k", alpha=0.4)
        ax.set_yscale("log")
        ax.set_xlim(max(0.5, min(self.targets) - 0.15), 1.002)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc=legend)
        ax.grid(alpha=0.3, which="both")

    def strip_private(self):
        for res in self.results["methods"].values():
            for pts in res["curves"].values():
                for p in pts:  # kept as one line of text: --resume reads it back
                    pq = p.pop("_pq", None)
                    if pq is not None:
                        p["per_query_recall"] = " ".join(f"{x:.6g}" for x in pq)
            for ats in res.get("at", {}).values():
                for a in ats.values():
                    a.pop("_boot", None)

    # the run ---------------------------------------------------------------------------------

    def run(self):
        build_only = self.args.build_only
        n = len(self.emb)
        plan = []  # groups (indexes) in build order
        if "scann" not in self.skip:
            plan.append(self.SCANN)
        if "autopilot" not in self.skip:
            plan.append(self.AUTOPILOT)
        if "ivfpq" not in self.skip:
            plan.append(self.IVFPQ)
        if "hnsw" not in self.skip:
            plan.append(self.HNSW)
        done = self.resume(plan) if self.args.resume else set()
        if not build_only:
            self.truth()
        pending = []
        for group in plan:
            # the previous index's last reference: gone before this one is built (at 10M two
            # indexes do not fit in memory together)
            ix = searcher = None
            if group in done:
                continue
            if group == self.SCANN:
                opts = {"scoring": "ah", "num_leaves": max(2, round(math.sqrt(n))),
                        **self.args.scann_opts}  # fmt: skip
                ix = self.build_project(group, "scann", **opts)
                if build_only:
                    self.free(group)
                    continue
                names = self.method_names(group)
                self.project_tuner(names[0], group, ix)
            elif group == self.AUTOPILOT:
                searcher, config = self.build_autopilot()
                if build_only:
                    self.free(group)
                    continue
                self.autopilot_method(searcher, config)
                names = self.method_names(group)
            else:
                backend, opts = (("faiss-ivfpq", {"refine": True,
                                                  **self.args.ivfpq_opts})
                                 if group == self.IVFPQ
                                 else ("faiss-hnsw", {"M": 32, "ef_construction": 40}))  # fmt: skip
                ix = self.build_project(group, backend, **opts)
                if build_only:
                    self.free(group)
                    continue
                names = self.method_names(group)
                self.project_tuner(names[0], group, ix)
                if group + self.PS in names:
                    self.parameter_space(group + self.PS, group, ix)
                if group + self.PS_NOHT in names:
                    self.parameter_space(group + self.PS_NOHT, group, ix, drop=("ht",))
            self.save()
            if self.args.tune_only:
                self.free(group)
            elif self.args.sequential:  # one index in memory at a time (10M): measure, free
                self.measure(names)
                self.results.setdefault("measured", {})[group] = {
                    "methods": names, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "loadavg": os.getloadavg()}  # fmt: skip
                self.save()
                self.free(group)
            else:
                pending += names
        if build_only or self.args.tune_only:
            self.save()
            return
        if pending:
            self.measure(pending)
        self.summarise()
        self.strip_private()
        self.save()
        self.write_table()
        self.plot()

    def method_names(self, group) -> list[str]:
        """The methods measured on ``group``'s index under this run's ``--skip``."""
        if group == self.AUTOPILOT:
            return [self.AUTOPILOT]
        names = [group + self.TUNE]
        if group in (self.IVFPQ, self.HNSW) and "paramspace" not in self.skip:
            names.append(group + self.PS)
        if group == self.IVFPQ and "paramspace-noht" not in self.skip:
            names.append(group + self.PS_NOHT)
        return names

    RESUME_KEYS = ("data", "n", "dim", "num_queries", "tune_queries", "ks", "targets", "threads",
                   "build_threads", "repeats", "bootstrap", "seed", "sequential", "memmap",
                   "versions", "scann_options", "ivfpq_options", "ps_experiments")  # fmt: skip

    def resume(self, plan) -> set:
        """``--resume``: the groups of ``plan`` that the earlier run into ``--out`` measured in
        full (build, every method this run would measure, held-out recall and every timing
        round; a finished run or one stopped later), copied into this run's results and not
        measured again. The earlier run must match this one in data, queries and settings
        (:attr:`RESUME_KEYS`) and CPU model: its q/s are set beside this run's; a setting of
        some indexes only (:attr:`GROUP_KEYS`) measures those again. Raises
        :class:`ResumeError` when it does not."""
        path = self.out / "results.json"
        if not path.exists():
            self.log(f"--resume: no {path} yet, measuring every index")
            return set()
        try:
            old = json.loads(path.read_text())
            cfg, methods = old["config"], old["methods"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ResumeError(f"{path}: not a results.json of bench_ann --mode equal ({e})") from e
        new, stale = self.results["config"], {}
        for key in (*self.RESUME_KEYS, "cpu_model"):
            # a bench before --resume wrote none: taken to be this run's, unless it is a
            # setting of some indexes only and this run's is not the default (measured again)
            if key not in cfg and key in self.LATER_KEYS and not (key in self.GROUP_KEYS
                                                                  and new.get(key)):  # fmt: skip
                self.log(f"--resume: {path} does not record its {key}; taken to be this run's")
                self.results.setdefault("resume_assumed", []).append(key)
                continue
            if json.dumps(cfg.get(key), default=str) != json.dumps(new.get(key), default=str):
                if key in self.GROUP_KEYS:  # a setting of some indexes only: those measured again
                    was = f"was {cfg[key]!r}" if key in cfg else "was not recorded"
                    for group in self.GROUP_KEYS[key]:
                        stale.setdefault(group, f"the earlier run's {key} {was}")
                    continue
                raise ResumeError(f"{path}: cannot resume: the earlier run's {key} is "
                                  f"{cfg.get(key)!r}, this run's {new.get(key)!r}")  # fmt: skip
        done = set()
        for group in plan:
            names = self.method_names(group)
            why = stale.get(group) or self._not_kept(old, group, names)
            if why:
                self.log(f"--resume: {group} not kept ({why}): measured again")
                continue
            for name in names:
                for pts in methods[name]["curves"].values():
                    for p in pts:
                        p["_pq"] = self._per_query(p, path, name)
                self.results["methods"][name] = methods[name]
            self.results["builds"][group] = old["builds"][group]
            first = old.get("resumed", {}).get(group)  # kept by an earlier --resume: its origin
            if first is None:
                when = old.get("measured", {}).get(group, {}).get("finished")
                if when is None:  # a bench before --resume: the file's last writing bounds it
                    mtime = time.localtime(path.stat().st_mtime)
                    when = "by " + time.strftime("%Y-%m-%d %H:%M:%S", mtime)
                first = {"from": str(path), "finished": when, "methods": names,
                         "earlier_loadavg_start": cfg.get("loadavg_start")}  # fmt: skip
            self.results.setdefault("resumed", {})[group] = first
            self.log(f"--resume: {group} measured by an earlier run (finished "
                     f"{first['finished']}), kept")  # fmt: skip
            done.add(group)
        return done

    LATER_KEYS = ("scann_options", "ivfpq_options", "ps_experiments", "cpu_model")  # added later
    # settings that shape some indexes only: a change measures those again and keeps the rest
    # (e.g. ScaNN at another num_leaves beside the FAISS indexes already measured)
    GROUP_KEYS = {"scann_options": (SCANN,), "ivfpq_options": (IVFPQ,),
                  "ps_experiments": (IVFPQ, HNSW)}  # fmt: skip

    @staticmethod
    def _not_kept(old: dict, group: str, names: list[str]) -> str:
        """Why ``group`` of the earlier results cannot be kept ("" when it can)."""
        if group not in old.get("builds", {}):
            return "not built"
        for name in names:
            m = old["methods"].get(name)
            if not m or m.get("group") != group or not m.get("curves"):
                return f"{name} not measured"
            pts = [p for c in m["curves"].values() for p in c]
            if not all("qps" in p for p in pts):
                return f"{name}'s timing unfinished"
            if not all("_pq" in p or "per_query_recall" in p for p in pts):
                return f"{name}'s per-query recall not kept"
        return ""

    def _per_query(self, p: dict, path, name: str):
        """A point's per-query recall as kept in results.json: a list (a run stopped midway),
        a space-separated text (a finished run), or numpy's text of an array (a bench before
        --resume); one line naming the file when it is not that."""
        import numpy as np

        pq = p.pop("per_query_recall", None) if "_pq" not in p else p["_pq"]
        if isinstance(pq, str):
            pq = pq.replace("[", " ").replace("]", " ").split()
        try:
            pq = np.asarray(pq, np.float64)
        except (TypeError, ValueError) as e:
            raise ResumeError(
                f"{path}: {name}: a point's per-query recall is unreadable ({e})"
            ) from e
        if pq.shape != (len(self.queries),):
            raise ResumeError(f"{path}: {name}: a point's per-query recall has {pq.size} values, "
                              f"not {len(self.queries)}")  # fmt: skip
        return pq

    def free(self, group):
        for name in [n for n, m in self.methods.items() if m["group"] == group]:
            self.methods[name]["search"] = None
        self.groups.pop(group, None)
        gc.collect()


class ResumeError(UserError):
    """--resume cannot use the earlier run's results (one line, exit 2)."""


def _json_default(x):
    """results.json: numpy arrays and scalars as JSON numbers (so --resume can read them back),
    anything else as its text."""
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _qps_cell(q) -> str:
    """ "best (min, median)" of a point's q/s over the rounds."""
    if not q:
        return ""
    return f"{q['max']:,.0f} ({q['min']:,.0f}, {q['median']:,.0f})"


WORK_HEADER = "work a query: codes scanned + vectors rescored"
WORK_NOTE = (
    "**Work a query** (the same on any machine and under any load): FAISS IVF: the codes of the "
    "lists probed (FAISS's own counter `indexIVF_stats.ndis`) + k x k_factor vectors rescored by "
    "the refine; ScaNN tree: the datapoints of the leaves searched (the sizes of the leaves "
    "nearest the query by ScaNN's own query tokenization, read from its serialized tree) + the "
    "pre-reorder depth rescored. A code's size differs between the libraries: see bytes / vector "
    "under Builds."
)


def _work_cell(p: dict) -> str:
    w = p.get("work")
    if not w:
        return ""
    cell = f"{w['codes']:,.0f}"
    return cell if w.get("rescored") is None else f"{cell} + {w['rescored']:,}"


class FaissWork:
    """What a FAISS search did, independent of the machine and its load (ann-benchmarks'
    "distance computations"), so that two settings' q/s can be checked against their work:
    codes scanned a query (FAISS's own counter ``indexIVF_stats.ndis``, the vectors of the
    inverted lists probed) and vectors rescored exactly a query by a refine stage (``k x
    k_factor``, the candidates ``IndexRefine`` asks its base index for)."""

    def __init__(self, faiss, k_factor_of):
        self.faiss, self.k_factor_of = faiss, k_factor_of

    @classmethod
    def of(cls, fi, k_factor_of) -> FaissWork | None:
        """A counter for FAISS index ``fi`` if it is IVF-based (else None); ``k_factor_of(params)
        -> the refine's k_factor for a setting``, None without a refine stage."""
        from dpr_jax.index.faiss_index import import_faiss

        faiss = import_faiss()
        return cls(faiss, k_factor_of) if faiss.try_extract_index_ivf(fi) is not None else None

    def start(self) -> None:
        self.faiss.cvar.indexIVF_stats.reset()

    def stop(self, k: int, n_queries: int, params: dict) -> dict:
        kf = self.k_factor_of(params)
        return {"codes": self.faiss.cvar.indexIVF_stats.ndis / n_queries,
                "rescored": None if kf is None else int(k * float(kf))}  # fmt: skip


class ScannWork:
    """What a ScaNN tree search does, as :class:`FaissWork` for FAISS: datapoints scored a query
    (the sizes of the ``leaves_to_search`` leaves nearest each held-out query by ScaNN's own
    query tokenization, from the searcher's serialized tree; tests/test_bench_tuned.py checks
    them against the candidates ScaNN itself returns) and vectors rescored exactly (the
    pre-reorder depth, at least k, at most what was scored)."""

    def __init__(self, tree, queries):
        self.tree = tree
        self.scored = tree.scored(queries)  # (Q, leaves): column i, the i + 1 nearest leaves

    @classmethod
    def of(cls, tree, queries) -> ScannWork | None:
        return None if tree is None else cls(tree, queries)

    def start(self) -> None:
        pass

    def stop(self, k: int, n_queries: int, params: dict) -> dict:
        import numpy as np

        leaves = int(params.get("leaves_to_search") or self.tree.leaves_to_search)
        codes = self.scored[:, min(leaves, self.scored.shape[1]) - 1]
        out = {"codes": float(codes.mean()), "rescored": None}
        if self.tree.reorder:
            depth = max(int(params.get("pre_reorder_num_neighbors") or self.tree.reorder), k)
            out["rescored"] = int(round(float(np.minimum(codes, depth).mean())))
        return out


def _ci(ci, fmt: str) -> str:
    return "" if not ci else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _faiss_state(faiss, fi) -> dict:
    """The search-time state ParameterSpace may change (nprobe, refine k_factor, IVF-PQ's
    polysemous ht, HNSW efSearch), to restore after each of its searches so that the
    dpr_jax-tuned rows on the same index see the index as built."""
    state = {}
    ivf = faiss.try_extract_index_ivf(fi)
    if ivf is not None:
        state["nprobe"] = ivf.nprobe
        if hasattr(faiss.downcast_index(ivf), "polysemous_ht"):
            state["ht"] = faiss.downcast_index(ivf).polysemous_ht
    if hasattr(faiss.downcast_index(fi), "k_factor"):
        state["k_factor_rf"] = faiss.downcast_index(fi).k_factor
    hnsw = getattr(faiss.downcast_index(fi), "hnsw", None)
    if hnsw is not None:
        state["efSearch"] = hnsw.efSearch
    return state


def _faiss_restore(faiss, fi, state: dict) -> None:
    ivf = faiss.try_extract_index_ivf(fi)
    if "nprobe" in state:
        ivf.nprobe = state["nprobe"]
    if "ht" in state:
        faiss.downcast_index(ivf).polysemous_ht = state["ht"]
    if "k_factor_rf" in state:
        faiss.downcast_index(fi).k_factor = state["k_factor_rf"]
    if "efSearch" in state:
        faiss.downcast_index(fi).hnsw.efSearch = state["efSearch"]


def autopilot_config(n: int, dim: int, k: int) -> dict:
    """What ScaNN's ``autopilot()`` chooses for an (n, dim) dot-product corpus
    (``ScannNumpy.suggest_autopilot``, as its builder calls it): num_leaves, leaves searched,
    reorder depth, AH dims per block ({} entries where it chooses brute force)."""
    import re

    import numpy as np

    from dpr_jax.index.scann_index import import_scann

    sp = import_scann()
    b = sp.builder(np.zeros((1, dim), np.float32), k, "dot_product").autopilot()
    text = sp.scann_pybind.ScannNumpy.suggest_autopilot(super(type(b), b).create_config(), n, dim)
    out = {"scoring": "ah" if "asymmetric_hash" in text else "brute_force"}
    for key, pat in [("num_leaves", r"num_children:\s*(\d+)"),
                     ("leaves_to_search", r"max_spill_centers:\s*(\d+)"),
                     ("reorder", r"approx_num_neighbors:\s*(\d+)"),
                     ("dims_per_block", r"num_dims_per_block:\s*(\d+)")]:  # fmt: skip
        m = re.search(pat, text)
        if m:
            out[key] = int(m.group(1))
    return out


def equal_mode(args, ids, emb, queries, tune_queries, data: str) -> int:
    import numpy as np

    bench = EqualRecall(args, ids, emb, queries, tune_queries)
    if args.data_dir and not args.embeddings:
        bench.data_key = f"synthetic_n{args.n}_d{args.dim}_s{args.seed}"
    bench.results["config"] = {
        "data": data, "n": len(emb), "dim": emb.shape[1], "num_queries": len(queries),
        "tune_queries": len(tune_queries), "ks": bench.ks, "targets": bench.targets,
        "threads": args.threads, "build_threads": args.build_threads, "repeats": args.repeats,
        "bootstrap": args.bootstrap, "seed": args.seed, "sequential": args.sequential,
        "cpu_model": cpu_model(), "versions": _versions(np), "loadavg_start": os.getloadavg(),
        "memmap": isinstance(emb, np.memmap), "scann_options": args.scann_opts,
        "ivfpq_options": args.ivfpq_opts,
        "ps_experiments": args.ps_experiments, "command": "python " + shlex.join(sys.argv),
    }  # fmt: skip
    bench.results["config"]["cpu"] = (
        f"{os.cpu_count()} CPU(s) {bench.results['config']['cpu_model']}{blas_core()}"
    )
    bench.run()
    if not (args.build_only or args.tune_only):
        print((bench.out / "table.md").read_text())
    return 0


# -- accelerator mode (--mode accel) -------------------------------------------------------------


def find_accelerator(force_cpu: bool = False) -> dict:
    """{"jax": platform or None, "faiss_gpus": count, "why": text}: JAX's GPU/TPU devices and
    the GPUs the installed FAISS can use (0 when it is a CPU build)."""
    import jax

    plats = sorted({d.platform for d in jax.devices()})
    acc = next((p for p in plats if p in ("gpu", "cuda", "rocm", "tpu")), None)
    try:
        from dpr_jax.index.faiss_index import import_faiss

        faiss = import_faiss()
        gpus = faiss.get_num_gpus() if hasattr(faiss, "StandardGpuResources") else 0
        fv = f"faiss {faiss.__version__} " + ("with" if hasattr(faiss, "StandardGpuResources")
                                              else "without") + " GPU support"  # fmt: skip
    except ImportError:
        gpus, fv = 0, "faiss not installed"
    if force_cpu:  # testing only: the same code path with CPU stand-ins
        acc, gpus = acc or "cpu", gpus
    why = f"jax devices: {', '.join(plats)}; {fv}, {gpus} GPU(s) visible"
    return {"jax": acc, "faiss_gpus": gpus, "why": why}


class AccelRecall(EqualRecall):
    """``--mode accel``: the project's exact search (float32, bfloat16 storage) and its
    ``approx_max_k`` search (``recall_target`` swept) on the JAX accelerator, exact PyTorch
    search (:meth:`torch_methods`), FAISS GPU indexes
    (flat, IVF-Flat and IVF-PQ with ``nprobe`` swept by ``GpuParameterSpace``, CAGRA with
    ``itopk_size`` swept, where the installed FAISS has it), every curve measured on the same
    held-out queries and read at the targets by the same rule as ``--mode equal``."""

    def __init__(self, args, ids, emb, queries, acc):
        super().__init__(args, ids, emb, queries, queries[:1])
        self.acc = acc
        self.results["accelerator"] = acc

    def truth(self):
        kmax = max(self.ks)
        t0 = time.perf_counter()
        _, rows = exact_topk_chunked(self.queries, self.emb, kmax)
        self.true_ids = self.ids[rows]
        self.results["exact"] = {"method": "numpy brute force (chunked, host CPU)", "k": kmax,
                                 "qps": len(self.queries) / (time.perf_counter() - t0)}  # fmt: skip

    def pairs(self):
        return []

    def sweep_method(self, name, group, search, grid, tuner):
        pts = {k: [{"params": p, "tune_recall": None} for p in grid] for k in self.ks}
        self.add_method(name, group, tuner, search, pts, {k: {} for k in self.ks}, ordered_from=0)

    def jax_methods(self):
        from dpr_jax.index import build_index

        # the default build in float32 and bfloat16, then float32 variants: XLA's own product
        # precision (TF32 / bfloat16 passes on GPUs / TPUs) and larger corpus blocks per top-k
        # (the per-block top-k is the cost on one GPU; one block = one product, one top_k)
        variants = [("float32", {}), ("bfloat16", {}), ("float32", {"precision": "default"}),
                    ("float32", {"block_size": 131072}),
                    ("float32", {"block_size": len(self.emb)})]  # fmt: skip
        for dtype, extra in variants:
            group = f"exact JAX ({dtype}{_variant(extra, len(self.emb))})"
            if group in self.groups:  # a small corpus: block 131072 is already one block
                continue
            t0 = time.perf_counter()
            ix = build_index("exact", self.emb, self.ids, dtype=dtype, **extra)
            ix.search(self.queries[:8], max(self.ks))
            self._record_build(group, "exact", time.perf_counter() - t0, ix.size_bytes(),
                               ix.options)  # fmt: skip
            self.groups[group] = ix
            self.sweep_method(group, group, lambda q, k, p, ix=ix: ix.search(q, k)[1], [{}],
                              "none (exact)")  # fmt: skip
            if dtype != "float32" or extra:
                continue
            fns = {}

            def approx(q, k, p, ix=ix, fns=fns):
                rt = p["recall_target"]
                ix.options["recall_target"] = rt
                ix._fns = fns.setdefault(rt, {})  # one compiled search per (target, k)
                return ix.search(q, k)[1]

            grid = [{"recall_target": r} for r in (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)]
            self.sweep_method("JAX approx_max_k (float32)", group, approx, grid,
                              "recall_target sweep")  # fmt: skip

    def torch_methods(self):
        """Exact search in PyTorch on its GPU (``q @ emb.T`` then ``torch.topk``, queries in
        blocks): the same arithmetic as the project's exact JAX search in a library we did not
        write, on the same device (the baseline where no FAISS GPU build is installed)."""
        import numpy as np

        try:
            import torch
        except ImportError:
            self.results["builds"]["exact PyTorch"] = {"error": "torch not installed"}
            return
        if not torch.cuda.is_available() and not self.args.accel_force_cpu:
            self.results["builds"]["exact PyTorch"] = {"error": "torch sees no CUDA device"}
            return
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        for dtype in ("float32", "bfloat16"):
            group = f"exact PyTorch ({dtype})"
            t0 = time.perf_counter()
            emb = torch.from_numpy(np.ascontiguousarray(self.emb, np.float32)).to(dev)
            emb = emb.to(getattr(torch, dtype))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            self._record_build(group, f"torch {torch.__version__} {dev.type}",
                               time.perf_counter() - t0, emb.numel() * emb.element_size(), {})  # fmt: skip

            def search(q, k, p, emb=emb):
                rows = []
                with torch.inference_mode():
                    for lo in range(0, len(q), 256):
                        qb = torch.from_numpy(np.ascontiguousarray(q[lo : lo + 256], np.float32))
                        scores = qb.to(dev, emb.dtype) @ emb.T
                        rows.append(torch.topk(scores.float(), k, dim=1).indices.cpu().numpy())
                return self.rows_to_ids(np.concatenate(rows))

            self.groups[group] = emb
            self.sweep_method(group, group, search, [{}], "none (exact)")

    def faiss_methods(self):
        import numpy as np

        from dpr_jax.index.faiss_index import default_nlist, default_training_sample, import_faiss

        faiss = import_faiss()

        res = faiss.StandardGpuResources() if self.acc["faiss_gpus"] else None
        emb = np.ascontiguousarray(self.emb, np.float32)
        n, d = emb.shape
        nlist = default_nlist(n)
        m = next(m for m in (d // 8, 48, 32, 16, 8, 4, 2, 1) if m and d % m == 0)

        def to_dev(index):
            return faiss.index_cpu_to_gpu(res, 0, index) if res is not None else index

        def built(group, make):
            t0 = time.perf_counter()
            try:
                index = make()
            except Exception as e:  # a FAISS build without this index: reported, not fatal
                self.log(f"{group}: not built ({type(e).__name__}: {e})")
                self.results["builds"][group] = {"error": f"{type(e).__name__}: {e}"}
                return None
            size = 0
            try:
                size = int(faiss.serialize_index(faiss.index_gpu_to_cpu(index)
                                                 if res is not None else index).nbytes)  # fmt: skip
            except Exception:  # noqa: BLE001 (CAGRA may not serialize: size unknown)
                size = 0
            self._record_build(group, "faiss" + (" GPU" if res is not None else " CPU"),
                               time.perf_counter() - t0, size, {})  # fmt: skip
            self.groups[group] = index
            return index

        def search_of(index, setter=None):
            def search(q, k, p):
                if setter is not None and p:
                    setter(index, p)
                _, rows = index.search(q, k)
                return self.rows_to_ids(rows)

            return search

        def flat():
            ix = faiss.IndexFlatIP(d)
            ix.add(emb)
            return to_dev(ix)

        ix = built("FAISS flat", flat)
        if ix is not None:
            self.sweep_method("FAISS flat", "FAISS flat", search_of(ix), [{}], "none (exact)")
        gps = faiss.GpuParameterSpace() if res is not None else faiss.ParameterSpace()
        for group, key in [("FAISS IVF-Flat", f"IVF{nlist},Flat"),
                           ("FAISS IVF-PQ", f"IVF{nlist},PQ{m}")]:  # fmt: skip

            def make(key=key):
                ix = faiss.index_factory(d, key, faiss.METRIC_INNER_PRODUCT)
                sample = default_training_sample(n, nlist)
                ix.train(emb[np.random.default_rng(0).choice(n, sample, replace=False)])
                ix.add(emb)
                return to_dev(ix)

            ix = built(f"{group} ({key})", make)
            if ix is None:
                continue
            grid = [{"nprobe": p} for p in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
                    if p <= nlist]  # fmt: skip
            self.sweep_method(f"{group} ({key})", f"{group} ({key})",
                              search_of(ix, lambda i, p: gps.set_index_parameter(i, "nprobe",
                                                                                 p["nprobe"])),
                              grid, "nprobe sweep (GpuParameterSpace)")  # fmt: skip
        if res is not None and hasattr(faiss, "GpuIndexCagra"):

            def cagra():
                cfg = faiss.GpuIndexCagraConfig()
                ix = faiss.GpuIndexCagra(res, d, faiss.METRIC_INNER_PRODUCT, cfg)
                ix.train(emb)
                return ix

            ix = built("FAISS CAGRA", cagra)
            if ix is not None:

                def cagra_search(q, k, p, ix=ix):
                    sp = faiss.SearchParametersCagra()
                    sp.itopk_size = max(int(p["itopk_size"]), k)
                    _, rows = ix.search(q, k, params=sp)
                    return self.rows_to_ids(rows)

                grid = [{"itopk_size": v} for v in (32, 64, 128, 256, 512)]
                self.sweep_method("FAISS CAGRA", "FAISS CAGRA", cagra_search, grid,
                                  "itopk_size sweep")  # fmt: skip
        elif res is not None:
            self.results["builds"]["FAISS CAGRA"] = {"error": "the installed faiss has no "
                                                     "GpuIndexCagra (needs a cuVS build)"}  # fmt: skip

    def run(self):
        self.truth()
        self.jax_methods()
        self.torch_methods()
        if self.acc["faiss_gpus"] or self.args.accel_force_cpu:
            self.faiss_methods()
        self.measure(list(self.methods))
        self.summarise()
        self.strip_private()
        self.save()
        self.write_table()
        self.plot()


def accel_mode(args, ids, emb, queries, data: str, acc: dict) -> int:
    import numpy as np

    bench = AccelRecall(args, ids, emb, queries, acc)
    bench.results["config"] = {
        "data": data, "n": len(emb), "dim": emb.shape[1], "num_queries": len(queries),
        "tune_queries": 0, "ks": bench.ks, "targets": bench.targets, "threads": args.threads,
        "build_threads": args.build_threads, "repeats": args.repeats,
        "bootstrap": args.bootstrap, "seed": args.seed, "accelerator": acc["why"],
        "cpu": f"{os.cpu_count()} CPU(s) {cpu_model()}",
        "versions": _versions(np), "loadavg_start": os.getloadavg(),
        "command": "python " + shlex.join(sys.argv),
    }  # fmt: skip
    bench.run()
    print((bench.out / "table.md").read_text())
    return 0


def _variant(extra: dict, n: int) -> str:
    """The name suffix of an exact JAX variant: ", precision default", ", one block", ..."""
    out = ""
    if "precision" in extra:
        out += f", precision {extra['precision']}"
    if "block_size" in extra:
        b = extra["block_size"]
        out += ", one block" if b >= n else f", block {b}"
    return out


def _versions(np) -> dict:
    import jax

    from dpr_jax import __version__

    versions = {"dpr_jax": __version__, "jax": jax.__version__, "numpy": np.__version__}
    from dpr_jax.errors import MissingDependency
    from dpr_jax.index.faiss_index import import_faiss

    for mod, load in (("faiss", import_faiss), ("scann", lambda: __import__("scann"))):
        try:  # faiss through dpr_jax: its OpenBLAS on the CPU's own kernels
            versions[mod] = load().__version__
        except (ImportError, MissingDependency, AttributeError):
            versions[mod] = None
    return versions


def blas_core() -> str:
    """ ", FAISS's OpenBLAS: SkylakeX" (the kernels its matrix products run), or ""."""
    from dpr_jax.errors import MissingDependency
    from dpr_jax.index.faiss_index import faiss_blas_core

    try:
        core = faiss_blas_core()
    except (ImportError, MissingDependency, OSError, AttributeError):
        return ""
    return f", FAISS's OpenBLAS: {core}" if core else ""


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
    for n_dev in args.devices:
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
                          "command": "python " + shlex.join(sys.argv),
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
    """The bench; a user mistake (a bad option value, files that do not fit, a --resume that
    cannot) is one line on stderr and exit 2, before any index is built where it can be."""
    return run_script("bench_ann", _main, argv)  # the command line's contract (dpr_jax.cli.errors)


def _claim_out(args) -> None:
    """--out, before any work: a new or empty folder, or one this script wrote (after
    set_thread_env: dpr_jax.io imports numpy)."""
    from dpr_jax.io import claim_results_folder

    claim_results_folder(args.out, "scripts/bench_ann.py")


def _main(argv=None) -> int:
    args = parse_args(argv)
    if args.sharded_child:
        return sharded_child(args)
    if args.mode == "sharded":
        _claim_out(args)
        return sharded(args)
    if args.mode == "accel":
        os.environ["OPENBLAS_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        acc = find_accelerator(args.accel_force_cpu)
        if acc["jax"] is None and not acc["faiss_gpus"]:
            print(f"bench_ann --mode accel: skipped, no GPU or TPU here ({acc['why']})")
            return 0
    else:
        set_thread_env(args.threads)
    import numpy as np

    if args.mode in ("equal", "tuned") and "scann" not in args.skip:
        from dpr_jax.index.scann_index import ScannIndex

        ScannIndex(**{"scoring": "ah", **args.scann_opts})  # checked before any work
    if args.mode == "equal" and "ivfpq" not in args.skip:
        from dpr_jax.index.faiss_index import FaissIVFPQIndex

        FaissIVFPQIndex(**{"refine": True, **args.ivfpq_opts})
    _claim_out(args)
    if args.embeddings:
        from dpr_jax.embeddings import load_embeddings

        ids, emb = load_embeddings(args.embeddings, show_progress=True)
        try:
            queries = np.load(args.queries, allow_pickle=False).astype(np.float32)
        except (ValueError, EOFError, OSError) as e:
            if isinstance(e, (FileNotFoundError, PermissionError)):
                raise
            raise UserError(f"{args.queries}: not a .npy array of query vectors ({e})") from e
        if queries.ndim != 2 or queries.shape[1] != emb.shape[1]:
            raise UserError(
                f"{args.queries}: queries {queries.shape} do not match dim {emb.shape[1]}"
            )
        tune_queries = queries[args.max_queries : args.max_queries + args.tune_queries]
        queries = queries[: args.max_queries]
        if args.mode in ("tuned", "equal") and len(tune_queries) < args.tune_queries:
            raise UserError(
                f"{args.queries}: --mode tuned needs {args.max_queries} + {args.tune_queries} "
                f"queries (benchmark + tuning), the file has {len(queries) + len(tune_queries)}"
            )
        data = f"{', '.join(args.embeddings)} + {args.queries}"
    else:
        t0 = time.time()
        n_tune = args.tune_queries if args.mode in ("tuned", "equal") else 0
        if args.data_dir:
            ids, emb, queries = synthetic_memmap(args.data_dir, args.n, args.dim,
                                                 args.num_queries + n_tune, args.seed)  # fmt: skip
        else:
            ids, emb, queries = synthetic(args.n, args.dim, args.num_queries + n_tune, args.seed)
        tune_queries = queries[args.num_queries :]
        queries = queries[: min(args.num_queries, args.max_queries)]
        data = "synthetic MiniLM-like embeddings"
        print(f"synthetic data in {time.time() - t0:.1f}s", file=sys.stderr)
    if args.mode == "equal":
        return equal_mode(args, ids, emb, queries, tune_queries, data)
    if args.mode == "accel":
        return accel_mode(args, ids, emb, queries, data, acc)
    bench = Bench(args, ids, emb, queries)
    versions = _versions(np)
    bench.results["config"] = {
        "data": data, "n": len(emb), "dim": emb.shape[1], "num_queries": len(queries),
        "k": args.k, "threads": args.threads, "build_threads": args.build_threads,
        "repeats": args.repeats, "seed": args.seed, "cpu": f"{os.cpu_count()} CPU(s) "
        f"{cpu_model()}", "versions": versions,
        "loadavg_start": os.getloadavg(), "command": "python " + shlex.join(sys.argv),
    }  # fmt: skip
    skip = set(args.skip)
    bench.ground_truth()
    if args.mode == "tuned":
        bench.results["config"]["tune_queries"] = len(tune_queries)
        bench.tuned(tune_queries, args.targets)
        bench.tuned_headline()
        bench.save()
        bench.write_tuned_table()
        print((bench.out / "table.md").read_text())
        return 0
    if "exact" not in skip:
        bench.exact()
    sizes = args.scaling
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
