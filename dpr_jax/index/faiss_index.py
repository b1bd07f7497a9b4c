"""FAISS maximum-inner-product search (Karpukhin et al. 2020, sec. 3.1; Johnson et al. 2017).

DPR indexes its passage vectors with FAISS: ``IndexFlatIP`` for exact search and
``IndexHNSWFlat`` for fast approximate search (DPR's ``DenseHNSWFlatIndexer`` turns MIPS into L2
with an extra dimension; FAISS now supports ``METRIC_INNER_PRODUCT`` in HNSW directly, which is
what we use). Three backends:

- ``faiss-flat``: ``IndexFlatIP``, exact;
- ``faiss-hnsw``: ``IndexHNSWFlat(d, M, METRIC_INNER_PRODUCT)``, ``efConstruction`` at build and
  ``efSearch`` per search (FAISS's defaults M=32, efConstruction=40; efSearch raised to 128);
- ``faiss-ivfpq``: ``IndexIVFPQ`` with an ``IndexFlatIP`` coarse quantizer (``nlist`` ~
  4 sqrt(n) lists, ``nprobe`` searched), ``m`` sub-quantizers of ``nbits`` bits; ``fast_scan``
  switches to ``IndexIVFPQFastScan`` (4-bit codes scored with SIMD lookup tables, the FAISS
  counterpart of ScaNN's AH); ``refine`` wraps it in ``IndexRefineFlat`` so that the best
  ``k * k_factor`` candidates are rescored exactly (the counterpart of ScaNN's reorder). Refine
  is on by default: without it IVF-PQ does not reach recall@10 = 0.9 on our test sets.
  ``refine_dtype`` float16 or int8 keeps the refine vectors as a scalar quantizer's codes
  (``IndexRefine`` over ``IndexScalarQuantizer``: 2 or 1 bytes a dimension instead of 4, as
  ScaNN's ``reorder_dtype``), rescoring with those codes instead of exactly.

FAISS labels are int64 rows; they are mapped back to the string ids. A row with -1 ("no
result") is searched again wider (``nprobe`` up to ``nlist``, ``efSearch`` up to 8x) and then
over every vector of the index's own store (HNSW's storage, IVF-PQ's refine vectors: exactly,
or with the codes of a float16 / int8 ``refine_dtype``), so every question
gets ``min(k, n)`` distinct passages (:meth:`Index.search`). ``num_threads`` sets FAISS's OpenMP threads (a process-wide setting,
applied before every build and search; 0 = all cores).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dpr_jax.errors import UserError, optional_import
from dpr_jax.index.base import Index, Opt
from dpr_jax.index.tune import ladder

FAISS_FILE = "faiss.index"


# OpenBLAS's AVX-512 kernels need these (its SkylakeX target)
_AVX512_SKYLAKEX = frozenset({"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


def openblas_coretype(cpuinfo: str, environ: dict) -> str | None:
    """The ``OPENBLAS_CORETYPE`` to load FAISS's OpenBLAS with, or None (OpenBLAS's own choice).

    The faiss-cpu wheels bundle an OpenBLAS (0.3.15 in faiss-cpu 1.x) that picks its kernels from
    the CPU model it was taught: a CPU newer than it (Intel Sapphire / Emerald Rapids) gets its
    fallback, ``Prescott`` (SSE3), and every FAISS matrix product (k-means, IVF assignment,
    ``IndexFlatIP``, batched coarse search) runs ~4.4x slower there (27 against 119 GFLOP/s, one
    thread, on an Emerald Rapids: ``scripts/bench_faiss_blas.py``). So the kernels OpenBLAS picks
    for the models it knows are named from the CPU's features: Intel with AVX-512 ``SkylakeX``
    (Skylake-SP to Ice Lake), Intel with AVX2 ``Haswell``, AMD with AVX2 ``Zen``; other CPUs,
    and a ``OPENBLAS_CORETYPE`` the user set, are left as they are."""
    if environ.get("OPENBLAS_CORETYPE"):
        return None
    vendor = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines()
                   if ln.startswith("vendor_id")), "")  # fmt: skip
    flags = next((set(ln.split(":", 1)[1].split()) for ln in cpuinfo.splitlines()
                  if ln.startswith("flags")), set())  # fmt: skip
    if vendor == "GenuineIntel" and _AVX512_SKYLAKEX <= flags:
        return "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return {"GenuineIntel": "Haswell", "AuthenticAMD": "Zen"}.get(vendor)
    return None


def import_faiss():
    """``faiss``; imported the first time with its OpenBLAS pointed at the CPU's own kernels
    (:func:`openblas_coretype`: OpenBLAS reads the setting once, when it is loaded)."""
    import sys

    if "faiss" not in sys.modules:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
        core = openblas_coretype(cpuinfo, os.environ)
        if core is not None:
            os.environ["OPENBLAS_CORETYPE"] = core
    return optional_import("faiss", "faiss", "the FAISS index")


def faiss_blas_core() -> str | None:
    """The kernels FAISS's bundled OpenBLAS runs (``openblas_get_corename``, e.g. "SkylakeX",
    "Haswell", "Prescott"), or None where FAISS has none of its own (another BLAS)."""
    import ctypes

    faiss = import_faiss()
    libs = sorted((Path(faiss.__file__).parent.parent / "faiss_cpu.libs").glob("libopenblas*.so*"))
    if not libs:
        return None
    lib = ctypes.CDLL(str(libs[0]))  # already loaded by faiss: the same library
    lib.openblas_get_corename.restype = ctypes.c_char_p
    return lib.openblas_get_corename().decode()


def set_faiss_threads(num_threads: int) -> None:
    """FAISS's OpenMP thread count for the whole process (0: all cores)."""
    import_faiss().omp_set_num_threads(int(num_threads) if num_threads > 0 else os.cpu_count() or 1)


class FaissIndex(Index):
    """Shared FAISS plumbing; subclasses implement ``_make`` and ``_params``."""

    backend = "faiss"
    DEFAULTS = {"num_threads": 0, "query_batch_size": 16384}
    OPTIONS = {"num_threads": Opt("int", 0), "query_batch_size": Opt("int", 1)}

    def __init__(self, **options):
        super().__init__(**options)
        self.index = None

    def _make(self, emb: np.ndarray):
        raise NotImplementedError

    def _params(self, k: int, **params):
        """SearchParameters for one call (None: the index's own settings)."""
        return None

    def _build(self, emb: np.ndarray) -> None:
        set_faiss_threads(self.options["num_threads"])
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        self.index = self._make(emb)
        if not self.index.is_trained:
            raise RuntimeError(f"{self.backend}: FAISS index is not trained after build")
        if self.index.ntotal != len(emb):
            self.index.add(emb)

    def _search(self, queries: np.ndarray, k: int, **params):
        sp = self._params(k, **params)
        return self._batched(self.index, queries, k, {} if sp is None else {"params": sp})

    def _batched(self, index, queries: np.ndarray, k: int, kwargs: dict):
        set_faiss_threads(self.options["num_threads"])
        scores = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        qb = int(self.options["query_batch_size"])
        for start in range(0, len(queries), qb):
            s, r = index.search(queries[start : start + qb], k, **kwargs)
            scores[start : start + len(s)], rows[start : start + len(s)] = s, r
        return scores, rows

    def _flat_storage(self):
        """The index's own exact inner-product store of every vector, or None."""
        return None

    def factory_key(self) -> str:
        """The ``faiss.index_factory`` key of this index (inner-product metric)."""
        raise NotImplementedError

    def _exact_search(self, q, k):
        flat = self._flat_storage()
        if flat is None:
            return None
        return self._batched(flat, q, k, {})

    def size_bytes(self) -> int:
        """The bytes ``write_index`` writes, counted as they stream past (``serialize_index``
        would hold a second copy of the index in memory: 16 GB for 10M x 384 with refine)."""
        faiss = import_faiss()
        n = 0

        def count(b):
            nonlocal n
            n += len(b)
            return len(b)

        writer = faiss.PyCallbackIOWriter(count)
        faiss.write_index(self.index, writer)
        del writer  # flushes
        return n

    def _save_files(self, directory: Path) -> None:
        import_faiss().write_index(self.index, str(directory / FAISS_FILE))

    def _load_files(self, directory: Path) -> None:
        faiss = import_faiss()
        path = directory / FAISS_FILE
        try:
            self.index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise UserError(f"{path}: FAISS cannot read it: {e}") from e
        if self.index.ntotal != self.size or self.index.d != self.dim:
            raise UserError(
                f"{path}: FAISS index has {self.index.ntotal} x {self.index.d} vectors, "
                f"index_config.json says {self.size} x {self.dim}"
            )
        self._after_load()

    def _after_load(self) -> None:
        pass


class FaissFlatIndex(FaissIndex):
    """Exact inner-product search, ``faiss.IndexFlatIP``."""

    backend = "faiss-flat"

    def _make(self, emb):
        index = import_faiss().IndexFlatIP(emb.shape[1])
        index.add(emb)
        return index

    def factory_key(self) -> str:
        return "Flat"


class FaissHNSWIndex(FaissIndex):
    """``faiss.IndexHNSWFlat(d, M, METRIC_INNER_PRODUCT)``; per-call ``ef_search``."""

    backend = "faiss-hnsw"
    DEFAULTS = {**FaissIndex.DEFAULTS, "M": 32, "ef_construction": 40, "ef_search": 128}
    OPTIONS = {
        **FaissIndex.OPTIONS,
        "M": Opt("int", 2, 512),  # graph degree; FAISS's own advice is 4 ... 64
        "ef_construction": Opt("int", 1),
        "ef_search": Opt("int", 1),
    }
    SEARCH_PARAMS = ("ef_search",)
    SEARCH_OPTIONS = {"ef_search": OPTIONS["ef_search"]}

    def _make(self, emb):
        faiss = import_faiss()
        index = faiss.IndexHNSWFlat(
            emb.shape[1], int(self.options["M"]), faiss.METRIC_INNER_PRODUCT
        )
        index.hnsw.efConstruction = int(self.options["ef_construction"])
        index.hnsw.efSearch = int(self.options["ef_search"])
        index.add(emb)
        return index

    def _after_load(self):
        self.index.hnsw.efSearch = int(self.options["ef_search"])

    def factory_key(self) -> str:
        return f"HNSW{self.options['M']},Flat"

    def tune_space(self, k):
        """efSearch from k to max(4096, 8 k) (FAISS searches with max(efSearch, k))."""
        return [("ef_search", ladder(k, max(4096, 8 * k), ratio=1.2))]

    def _params(self, k, ef_search=None):
        ef = int(self.options["ef_search"] if ef_search is None else ef_search)
        return import_faiss().SearchParametersHNSW(efSearch=max(ef, k))

    def _wider(self, k, params):
        """efSearch doubled up to 8x (at most the corpus size), then exact over the storage."""
        ef = max(int(params.get("ef_search") or self.options["ef_search"]), k)
        top = min(self.size, 8 * ef)
        while ef < top:
            ef = min(2 * ef, top)
            yield {"ef_search": ef}

    def _flat_storage(self):
        return import_faiss().downcast_index(self.index.storage)


# refine stores: float32 (IndexRefineFlat, exact rescoring) or a scalar quantizer's codes
# (IndexRefine over IndexScalarQuantizer: half or a quarter of the bytes, ScaNN's reorder_dtype):
# each refine_dtype's faiss.ScalarQuantizer type (None: float32) and index_factory suffix
REFINE_DTYPES = {
    "float32": (None, "RFlat"),
    "float16": ("QT_fp16", "Refine(SQfp16)"),
    "int8": ("QT_8bit", "Refine(SQ8)"),
}


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` vectors: round(4 sqrt(n)), at most n / 39 (k-means's 39 points a
    list, FAISS's minimum)."""
    return int(max(1, min(round(4 * math.sqrt(n)), n // 39)))


def default_training_sample(n: int, nlist: int) -> int:
    """Vectors k-means trains ``nlist`` lists on: 250,000, or 39 a list where that is more
    (past 1.6M vectors at the default nlist), at most ``n``."""
    return min(n, max(250000, 39 * int(nlist)))


def _default_m(dim: int, dims_per_subquantizer: int) -> int:
    """The number of sub-quantizers closest to dim / dims_per_subquantizer that divides dim."""
    target = max(1, dim // dims_per_subquantizer)
    divisors = [m for m in range(1, dim + 1) if dim % m == 0]
    return min(divisors, key=lambda m: (abs(m - target), -m))


class FaissIVFPQIndex(FaissIndex):
    """IVF-PQ with an inner-product coarse quantizer, optional fast scan and exact refine.

    ``None`` options are resolved at build time: ``nlist`` = round(4 sqrt(n)) (at most n / 39, so
    that k-means has 39 points per list, FAISS's minimum), ``m`` = the divisor of dim closest to dim / 8 (8 dims
    per sub-quantizer: dim / 8 bytes per vector at 8 bits; FAISS trains 256-centroid codebooks
    of fewer than 8 dims 15-50x more slowly, e.g. 26 s instead of 0.5 s for 20k x 64), ``nbits`` = 8 (4
    with ``fast_scan``), ``nprobe`` = ceil(nlist / 10) (the fraction ScaNN's default searches),
    ``training_sample_size`` = min(n, max(250000, 39 nlist)) (from 1.6M vectors on the sample
    grows with nlist, so that k-means still has 39 training vectors per list: 493,311 at 10M).

    Small corpora: k-means cannot train more centroids than it has training vectors (FAISS
    aborts). With ``t`` training vectors the defaults adapt (``nbits`` = min(8, floor(log2 t)),
    ``nlist`` <= t), so any corpus of at least 2 vectors builds (16 with ``fast_scan``, whose
    codes are 4 bits); an explicit ``nlist`` > t or ``nbits`` with 2^nbits > t, or a smaller
    corpus, is a ``ValueError`` that says the minimum. A search that finds fewer than k distinct
    passages for a question (few lists probed on a small or clustered corpus: with 106 vectors,
    2 lists, 1 probed) is repeated for that question with nprobe doubled, up to every list
    (:meth:`Index.search`).
    """

    backend = "faiss-ivfpq"
    DEFAULTS = {
        **FaissIndex.DEFAULTS,
        "nlist": None,
        "m": None,
        "nbits": None,
        "nprobe": None,
        "fast_scan": False,
        "refine": True,
        "refine_dtype": "float32",
        "k_factor": 10,
        "training_sample_size": None,
        "train_iters": 10,
        "seed": 0,
    }
    OPTIONS = {
        **FaissIndex.OPTIONS,
        "nlist": Opt("int", 1, null="chosen from the corpus size"),
        "m": Opt("int", 1, null="chosen from the dimension"),
        "nbits": Opt("int", 1, 16, null="chosen from the training vectors"),
        "nprobe": Opt("int", 1, null="ceil(nlist / 10)"),
        "fast_scan": Opt("bool"),
        "refine": Opt("bool"),
        "refine_dtype": Opt("choice", choices=tuple(REFINE_DTYPES)),
        "k_factor": Opt("float", 1),
        "training_sample_size": Opt("int", 1, null="min(n, max(250000, 39 nlist))"),
        "train_iters": Opt("int", 1),
        "seed": Opt("int", 0),
    }
    SEARCH_PARAMS = ("nprobe", "k_factor")
    SEARCH_OPTIONS = {"nprobe": Opt("int", 1), "k_factor": OPTIONS["k_factor"]}

    def _resolve(self, n: int, dim: int) -> None:
        o = self.options
        if o["training_sample_size"] is None:
            o["training_sample_size"] = default_training_sample(n, o["nlist"] or default_nlist(n))
        t = min(n, int(o["training_sample_size"]))  # vectors k-means trains on
        least = 16 if o["fast_scan"] else 2
        if t < least:
            raise UserError(
                f"faiss-ivfpq: {t} training vectors are too few: IVF-PQ needs at least {least}"
                f"{' with fast_scan (4-bit codes)' if o['fast_scan'] else ''}; use the "
                "faiss-flat or exact backend for a corpus this small"
            )
        if o["nlist"] is None:
            o["nlist"] = min(default_nlist(n), t)
        if int(o["nlist"]) > t:
            raise UserError(
                f"faiss-ivfpq: option nlist={o['nlist']} needs at least {o['nlist']} training "
                f"vectors, there are {t}: use nlist <= {t} (the default adapts)"
            )
        if o["m"] is None:
            o["m"] = _default_m(dim, 8)
        if dim % int(o["m"]):
            raise UserError(f"option m={o['m']} must divide the dimension {dim}")
        if o["nbits"] is None:
            o["nbits"] = 4 if o["fast_scan"] else min(8, int(math.log2(t)))
        if o["fast_scan"] and int(o["nbits"]) != 4:
            raise UserError(f"fast_scan needs nbits=4, got {o['nbits']}")
        if 2 ** int(o["nbits"]) > t:
            raise UserError(
                f"faiss-ivfpq: option nbits={o['nbits']} trains {2 ** int(o['nbits'])} centroids "
                f"per sub-quantizer, there are {t} training vectors: use nbits <= "
                f"{int(math.log2(t))} (the default adapts)"
            )
        if o["nprobe"] is None:
            o["nprobe"] = max(1, math.ceil(o["nlist"] / 10))

    def _make(self, emb):
        faiss = import_faiss()
        n, d = emb.shape
        self._resolve(n, d)
        o = self.options
        quantizer = faiss.IndexFlatIP(d)
        ivf_cls = faiss.IndexIVFPQFastScan if o["fast_scan"] else faiss.IndexIVFPQ
        ivf = ivf_cls(quantizer, d, int(o["nlist"]), int(o["m"]), int(o["nbits"]),
                      faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        ivf.cp.niter = int(o["train_iters"])
        ivf.cp.seed = int(o["seed"])
        # a small corpus trains 2^nbits codewords on fewer than FAISS's 39 vectors each, knowingly
        # (see _resolve): no "WARNING clustering ... please provide at least" lines on stderr
        ivf.pq.cp.min_points_per_centroid = 1
        ivf.nprobe = int(o["nprobe"])
        index = ivf
        if o["refine"]:
            qt = REFINE_DTYPES[o["refine_dtype"]][0]
            if qt is None:
                index = faiss.IndexRefineFlat(ivf)
            else:
                qt = getattr(faiss.ScalarQuantizer, qt)
                store = faiss.IndexScalarQuantizer(d, qt, faiss.METRIC_INNER_PRODUCT)
                index = faiss.IndexRefine(ivf, store)  # trains both (int8: each dim's range)
                index.referenced_objects = [ivf, store]  # FAISS does not own them: Python does
            index.k_factor = float(o["k_factor"])
        rng = np.random.default_rng(int(o["seed"]))
        ns = int(o["training_sample_size"])
        sample = emb if ns >= n else emb[np.sort(rng.choice(n, ns, replace=False))]
        index.train(sample)
        index.add(emb)
        return index

    def tune_space(self, k):
        """nprobe from 1 to nlist, then the refine k_factor from 1 to 256 (with refine)."""
        space = [("nprobe", ladder(1, int(self.options["nlist"])))]
        if self.options["refine"]:
            space.append(("k_factor", ladder(1, max(1, min(256, self.size // k)))))
        return space

    def factory_key(self) -> str:
        o = self.options
        key = f"IVF{o['nlist']},PQ{o['m']}x{o['nbits']}{'fs' if o['fast_scan'] else ''}"
        return f"{key},{REFINE_DTYPES[o['refine_dtype']][1]}" if o["refine"] else key

    def _after_load(self):
        if self.options["refine"]:
            self.index.k_factor = float(self.options["k_factor"])
        import_faiss().extract_index_ivf(self.index).nprobe = int(self.options["nprobe"])

    def _wider(self, k, params):
        """nprobe doubled up to nlist (every list: every vector is a candidate); then, with
        refine, exact search over the refine store."""
        nlist = int(self.options["nlist"])
        nprobe = min(int(params.get("nprobe") or self.options["nprobe"]), nlist)
        while nprobe < nlist:
            nprobe = min(2 * nprobe, nlist)
            yield {**params, "nprobe": nprobe}

    def _flat_storage(self):
        if not self.options["refine"]:
            return None
        return import_faiss().downcast_index(self.index.refine_index)

    def _params(self, k, nprobe=None, k_factor=None):
        faiss = import_faiss()
        o = self.options
        ivf_params = faiss.SearchParametersIVF(
            nprobe=min(int(o["nprobe"] if nprobe is None else nprobe), int(o["nlist"]))
        )
        if not o["refine"]:
            if k_factor is not None:
                raise UserError("search parameter k_factor needs option refine=True")
            return ivf_params
        kf = float(o["k_factor"] if k_factor is None else k_factor)
        return faiss.IndexRefineSearchParameters(k_factor=kf, base_index_params=ivf_params)
