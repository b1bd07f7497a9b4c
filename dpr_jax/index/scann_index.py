"""ScaNN maximum-inner-product search (Karpukhin et al. 2020, sec. 3.1; Guo et al. 2020, ScaNN).

DPR searched its 21M passage vectors with FAISS; ScaNN (anisotropic vector quantization, ICML
2020) is the stronger CPU library for MIPS. ScaNN searches in three phases, each configured by
``scann.scann_ops_pybind.builder(db, k, "dot_product")``:

1. partitioning, ``.tree(num_leaves, num_leaves_to_search, ...)``: k-means leaves, search only the
   closest ``leaves_to_search`` of them;
2. scoring, ``.score_ah(dimensions_per_block, anisotropic_quantization_threshold)`` (asymmetric
   hashing: 4-bit product-quantization codes scored with in-register lookup tables) or
   ``.score_brute_force()``;
3. rescoring, ``.reorder(k')``: the best k' AH candidates are rescored exactly.

Defaults follow ScaNN's ``docs/algorithms.md`` rules of thumb: brute force below 20k points, AH +
reorder below 100k, tree + AH + reorder above, ``num_leaves ~ sqrt(n)``, ``dimensions_per_block
= 2``, ``anisotropic_quantization_threshold = 0.2`` and ``reorder(100)`` as in ScaNN's README.
Every setting is an option; ``leaves_to_search`` and ``pre_reorder_num_neighbors`` can also be
overridden per ``search`` call (``search_batched``'s arguments).

Saving and loading never touch a pickle: ScaNN's ``serialize`` writes ``scann_docids.pkl`` only
for searchers built with docids (ours keep ids in ``ids.npy``), and its ``load_searcher`` unpickles
that file whenever it exists, so a planted one would run code. ``_load_files`` therefore refuses
the file by name and builds the searcher from ``scann_assets.pbtxt`` itself, the pickle-free part
of ``load_searcher``.

Threads: ``num_threads = 1`` uses ``search_batched`` (one thread); ``n > 1`` uses
``search_batched_parallel`` on a pool of n threads; 0 means all cores.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dpr_jax.errors import UserError, optional_import
from dpr_jax.index.base import Index, Opt
from dpr_jax.index.tune import ladder

SCANN_DIR = "scann"
SCANN_ASSETS = "scann_assets.pbtxt"
SCANN_PICKLE = "scann_docids.pkl"  # written and unpickled by ScaNN for docids; never used here


def import_scann():
    return optional_import("scann.scann_ops.py.scann_ops_pybind", "scann", "the ScaNN index")


def _threads(n: int) -> int:
    return int(n) if int(n) > 0 else (os.cpu_count() or 1)


# k-means training vectors a leaf: what ScaNN's own autopilot() trains its tree on
# (``suggest_autopilot``'s ``expected_sample_size`` is 200 x ``num_children`` at every size)
SAMPLE_PER_LEAF = 200


def default_training_sample(n: int, num_leaves: int) -> int:
    """Vectors the tree's k-means trains ``num_leaves`` leaves on: 200 a leaf (autopilot's rule),
    at least 250,000, at most ``n``. Fewer a leaf makes poorer leaves: at 1M vectors and 2,932
    leaves, searching 80 leaves finds 0.756 / 0.920 / 0.935 of the true top 10 with 34 / 79 /
    200 a leaf (``scripts/bench_scann_sample.py``); at 10M, 3,162 leaves trained on 79 a leaf
    (the fixed 250,000 before this rule) needed 315-473 leaves searched for recall@10 0.90, on
    200 a leaf 93-140 (README, "ANN at equal measured recall")."""
    return min(n, max(250000, SAMPLE_PER_LEAF * int(num_leaves)))


class ScannIndex(Index):
    """ScaNN tree + asymmetric hashing + exact reorder (``backend = "scann"``).

    ``None`` options are resolved from the data at build time (the resolved values are saved):
    ``scoring`` ("ah" if n >= 20000 else "brute_force"), ``num_leaves`` (0 = no tree if
    n < 100000, else round(sqrt(n))), ``num_leaves_to_search`` (ceil(num_leaves / 10)),
    ``training_sample_size`` (:func:`default_training_sample`: 200 vectors a leaf, at least
    250,000, at most n), ``ah_training_sample_size`` (min(n, 100000)).
    """

    backend = "scann"
    DEFAULTS = {
        "num_neighbors": 10,
        "scoring": None,
        "num_leaves": None,
        "num_leaves_to_search": None,
        "training_sample_size": None,
        "min_partition_size": 50,
        "training_iterations": 12,
        "spherical": False,
        "quantize_centroids": False,
        "soar_lambda": None,
        "dimensions_per_block": 2,
        "anisotropic_quantization_threshold": 0.2,
        "hash_type": "lut16",
        "ah_training_sample_size": None,
        "reorder": 100,
        "reorder_dtype": "float32",
        "num_threads": 0,
        "training_threads": 0,
        "query_batch_size": 16384,
    }
    OPTIONS = {
        "num_neighbors": Opt("int", 1),
        "scoring": Opt("choice", choices=("ah", "brute_force"), null="chosen from the corpus size"),
        "num_leaves": Opt("int", 0, null="chosen from the corpus size; 0: no tree"),
        "num_leaves_to_search": Opt("int", 1, null="ceil(num_leaves / 10)"),
        "training_sample_size": Opt("int", 1, null="200 a leaf, at least 250,000, at most n"),
        "min_partition_size": Opt("int", 1),
        "training_iterations": Opt("int", 1),
        "spherical": Opt("bool"),
        "quantize_centroids": Opt("bool"),
        "soar_lambda": Opt("float", 0, null="no SOAR spilling"),
        "dimensions_per_block": Opt("int", 1),
        "anisotropic_quantization_threshold": Opt("float"),
        "hash_type": Opt("choice", choices=("lut16", "lut256")),
        "ah_training_sample_size": Opt("int", 1, null="min(n, 100000)"),
        "reorder": Opt("int", 0),
        "reorder_dtype": Opt("choice", choices=("float32", "int8", "bfloat16")),
        "num_threads": Opt("int", 0),
        "training_threads": Opt("int", 0),
        "query_batch_size": Opt("int", 1),
    }
    SEARCH_PARAMS = ("leaves_to_search", "pre_reorder_num_neighbors")
    SEARCH_OPTIONS = {"leaves_to_search": Opt("int", 1), "pre_reorder_num_neighbors": Opt("int", 1)}

    def __init__(self, **options):
        super().__init__(**options)
        self.searcher = None

    def _resolve(self, n: int) -> None:
        o = self.options
        if o["scoring"] is None:
            o["scoring"] = "ah" if n >= 20000 else "brute_force"
        if o["scoring"] not in ("ah", "brute_force"):
            raise UserError(f"option scoring must be 'ah' or 'brute_force', got {o['scoring']!r}")
        if o["num_leaves"] is None:
            o["num_leaves"] = 0 if n < 100000 else max(2, round(math.sqrt(n)))
        if o["num_leaves"]:
            if o["num_leaves_to_search"] is None:
                o["num_leaves_to_search"] = max(1, math.ceil(o["num_leaves"] / 10))
            if o["training_sample_size"] is None:
                o["training_sample_size"] = default_training_sample(n, int(o["num_leaves"]))
            t = min(n, int(o["training_sample_size"]))
            if int(o["num_leaves"]) > t:
                raise UserError(
                    f"scann: option num_leaves={o['num_leaves']} needs at least as many training "
                    f"vectors, there are {t}: use num_leaves <= {t} (0: no tree, the default "
                    "below 100,000 vectors)"
                )
            if int(o["num_leaves_to_search"]) > int(o["num_leaves"]):
                raise UserError(
                    f"scann: option num_leaves_to_search={o['num_leaves_to_search']} is more than "
                    f"num_leaves={o['num_leaves']}: use num_leaves_to_search <= {o['num_leaves']}"
                )
        if o["scoring"] == "ah" and o["ah_training_sample_size"] is None:
            o["ah_training_sample_size"] = min(n, 100000)

    def _builder(self, emb: np.ndarray):
        sp = import_scann()
        o = self.options
        ReorderType = optional_import(  # noqa: N806 (scann's class)
            "scann.scann_ops.py.scann_builder", "scann", "the ScaNN index"
        ).ReorderType
        b = sp.builder(emb, int(o["num_neighbors"]), "dot_product")
        b = b.set_n_training_threads(int(o["training_threads"]))
        if o["num_leaves"]:
            b = b.tree(
                num_leaves=int(o["num_leaves"]),
                num_leaves_to_search=int(o["num_leaves_to_search"]),
                training_sample_size=int(o["training_sample_size"]),
                min_partition_size=int(o["min_partition_size"]),
                training_iterations=int(o["training_iterations"]),
                spherical=bool(o["spherical"]),
                quantize_centroids=bool(o["quantize_centroids"]),
                soar_lambda=o["soar_lambda"],
            )
        if o["scoring"] == "brute_force":
            return b.score_brute_force()
        if len(emb) < 16:
            raise UserError(f"ScaNN AH needs at least 16 vectors, got {len(emb)}")
        b = b.score_ah(
            int(o["dimensions_per_block"]),
            anisotropic_quantization_threshold=float(o["anisotropic_quantization_threshold"]),
            training_sample_size=int(o["ah_training_sample_size"]),
            hash_type=o["hash_type"],
        )
        if o["reorder"]:
            dtype = {"float32": ReorderType.FLOAT32, "int8": ReorderType.INT8,
                     "bfloat16": ReorderType.BFLOAT16}[o["reorder_dtype"]]  # fmt: skip
            b = b.reorder(int(o["reorder"]), quantize=dtype)
        return b

    def _build(self, emb: np.ndarray) -> None:
        self._resolve(len(emb))
        emb = np.ascontiguousarray(emb, dtype=np.float32)
        self.searcher = self._builder(emb).build()
        self._apply_threads()

    def _apply_threads(self) -> None:
        n = _threads(self.options["num_threads"])
        if n > 1:
            self.searcher.set_num_threads(n)

    def set_num_threads(self, num_threads: int) -> None:
        super().set_num_threads(num_threads)
        if self.searcher is not None:
            self._apply_threads()

    def _search(self, queries, k, leaves_to_search=None, pre_reorder_num_neighbors=None):
        o = self.options
        kwargs = {"final_num_neighbors": int(k)}
        if o.get("num_leaves") and leaves_to_search is not None:
            kwargs["leaves_to_search"] = min(int(leaves_to_search), int(o["num_leaves"]))
        if o.get("scoring") == "ah" and o.get("reorder"):
            pre = o["reorder"] if pre_reorder_num_neighbors is None else pre_reorder_num_neighbors
            kwargs["pre_reorder_num_neighbors"] = max(int(pre), int(k))
        parallel = _threads(o["num_threads"]) > 1
        search = self.searcher.search_batched_parallel if parallel else self.searcher.search_batched
        scores = np.empty((len(queries), k), np.float32)
        rows = np.empty((len(queries), k), np.int64)
        qb = int(o["query_batch_size"])
        for start in range(0, len(queries), qb):
            idx, dist = search(queries[start : start + qb], **kwargs)
            idx, dist = np.asarray(idx, np.int64), np.asarray(dist, np.float32)
            n, got = idx.shape
            r = np.full((n, k), -1, np.int64)
            s = np.full((n, k), -np.inf, np.float32)
            r[:, :got], s[:, :got] = idx, dist
            none = ~np.isfinite(s)  # ScaNN pads missing neighbours with row 0 and nan
            r[none] = -1
            rows[start : start + n], scores[start : start + n] = r, s
        return scores, rows

    def _wider(self, k, params):
        """leaves_to_search doubled up to every leaf (every vector a candidate); AH candidates
        are always at least k (pre_reorder_num_neighbors >= k)."""
        leaves = int(self.options.get("num_leaves") or 0)
        if not leaves:
            return
        n = min(int(params.get("leaves_to_search") or self.options["num_leaves_to_search"]), leaves)
        while n < leaves:
            n = min(2 * n, leaves)
            yield {**params, "leaves_to_search": n}

    def tune_space(self, k: int) -> list[tuple[str, list]]:
        """leaves_to_search (1 ... all leaves), then the reorder depth (k ... max(1000, 40 k))
        when AH candidates are reordered."""

        o, space = self.options, []
        if o.get("num_leaves"):
            space.append(("leaves_to_search", ladder(1, int(o["num_leaves"]))))
        if o.get("scoring") == "ah" and o.get("reorder"):
            depth = min(self.size, max(1000, 40 * k))
            space.append(("pre_reorder_num_neighbors", ladder(k, max(k, depth))))
        return space

    def _save_files(self, directory: Path) -> None:
        out = directory / SCANN_DIR
        out.mkdir()
        self.searcher.serialize(str(out), relative_path=True)
        if (out / SCANN_PICKLE).exists():  # only with docids, which we never give ScaNN
            raise RuntimeError(f"{out / SCANN_PICKLE}: ScaNN wrote a pickle; not saving it")

    def _load_files(self, directory: Path) -> None:
        sp = import_scann()
        path = directory / SCANN_DIR
        assets = path / SCANN_ASSETS
        if (path / SCANN_PICKLE).exists():
            raise UserError(
                f"{path / SCANN_PICKLE}: a pickle in a ScaNN index directory (dpr-jax never writes "
                "one, and unpickling runs code); not loading this index. Rebuild it with "
                "`dpr-jax index`"
            )
        if not assets.is_file():
            raise UserError(f"{assets}: missing (not a ScaNN index)")
        # scann_ops_pybind.load_searcher without its pickle of docids (see the module docstring)
        self.searcher = sp.ScannSearcher(
            sp.scann_pybind.ScannNumpy(str(path), assets.read_text()), docids=None
        )
        if self.searcher.size() != self.size:
            raise UserError(
                f"{path}: ScaNN searcher has {self.searcher.size()} points, ids {self.size}"
            )
        self._apply_threads()


class ScannBruteForceIndex(ScannIndex):
    """ScaNN exact brute-force scoring (``backend = "scann-bf"``): no tree, no quantization."""

    backend = "scann-bf"
    DEFAULTS = {"num_neighbors": 10, "num_threads": 0, "training_threads": 0,
                "query_batch_size": 16384}  # fmt: skip
    OPTIONS = {name: ScannIndex.OPTIONS[name] for name in DEFAULTS}
    SEARCH_PARAMS = ()
    SEARCH_OPTIONS = {}

    def tune_space(self, k: int) -> list[tuple[str, list]]:
        return []

    def _resolve(self, n: int) -> None:
        pass

    def _builder(self, emb: np.ndarray):
        sp = import_scann()
        b = sp.builder(emb, int(self.options["num_neighbors"]), "dot_product")
        return b.set_n_training_threads(int(self.options["training_threads"])).score_brute_force()


class ScannTree:
    """The partition of a serialized ScaNN searcher (the files ``serialize`` writes into
    ``directory``), to count what a search does: ``centres`` (leaves, dim), ``sizes`` (leaves,)
    the datapoints each leaf holds,
    ``leaves_to_search`` and ``reorder`` (0: no exact rescoring) the searcher's defaults.

    :meth:`read` returns None for a searcher without a one-level k-means tree (brute force, or a
    multi-level tree), with database spilling (SOAR: a datapoint in several leaves) or with
    quantized centres (``quantize_centroids``: the query ranks the leaves by int8 centres, not
    by the float centres this class reads), whose work this class does not model.
    """

    def __init__(self, centres, sizes, dot: bool, leaves_to_search: int, reorder: int):
        self.centres, self.sizes, self.dot = centres, sizes, dot
        self.leaves_to_search, self.reorder = leaves_to_search, reorder

    @classmethod
    def read(cls, directory: str | Path) -> ScannTree | None:
        partitioner_pb2 = optional_import(
            "scann.partitioning.partitioner_pb2", "scann", "reading a ScaNN tree"
        )
        scann_pb2 = optional_import("scann.proto.scann_pb2", "scann", "reading a ScaNN tree")
        directory = Path(directory)
        config = scann_pb2.ScannConfig()
        config.ParseFromString((directory / "scann_config.pb").read_bytes())
        part_file = directory / "serialized_partitioner.pb"
        if not config.HasField("partitioning") or not part_file.exists():
            return None
        part = partitioner_pb2.SerializedPartitioner()
        part.ParseFromString(part_file.read_bytes())
        root = part.kmeans.kmeans_tree.root
        if part.kmeans.HasField("next_bottom_up_level") or any(c.children for c in root.children):
            return None
        p = config.partitioning
        if p.HasField("database_spilling") and p.database_spilling.spilling_type != 0:
            return None  # SOAR and the like (0: NO_SPILLING)
        if p.query_tokenization_type != p.FLOAT:
            return None  # quantize_centroids: leaves ranked by int8 centres (FIXED_POINT_INT8)
        # a query ranks the leaves by the tokenization distance (DotProductDistance for MIPS)
        measure = (p.query_tokenization_distance_override.distance_measure
                   if p.HasField("query_tokenization_distance_override")
                   else p.partitioning_distance.distance_measure)  # fmt: skip
        if measure not in ("DotProductDistance", "SquaredL2Distance"):
            return None
        centres = np.array([list(c.dimension) for c in root.centers], np.float32)
        token = np.load(directory / "datapoint_to_token.npy")
        sizes = np.bincount(token, minlength=len(centres))
        if root.children:  # leaf ids in the order of the centres
            sizes = sizes[[c.leaf_id for c in root.children]]
        reorder = config.exact_reordering.approx_num_neighbors if config.HasField(
            "exact_reordering") else 0  # fmt: skip
        return cls(centres, sizes, measure == "DotProductDistance",
                   int(p.query_spilling.max_spill_centers), int(reorder))  # fmt: skip

    @classmethod
    def of_searcher(cls, searcher) -> ScannTree | None:
        """:meth:`read` of a searcher in memory (serialized into a temporary directory)."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix="dpr_jax_scann_tree_") as tmp:
            searcher.serialize(tmp)
            return cls.read(tmp)

    def twins(self, rel: float = 1e-4) -> int:
        """Leaves whose centre lies within ``rel`` x the median centre norm of another's. ScaNN's
        k-means can leave such near-copies (seen ~1e-7 apart on small clustered data); a query
        ranks twins alike to float precision, and which one ScaNN searches at the boundary of its ``leaves_to_search``
        is its own tie-break, so :meth:`scored` may count the other one there."""
        c = self.centres.astype(np.float64)
        sq = (c**2).sum(1)
        tol = (rel * float(np.median(np.sqrt(sq)))) ** 2
        out = 0
        for start in range(0, len(c), 1024):
            d2 = sq[start : start + 1024, None] + sq[None] - 2 * c[start : start + 1024] @ c.T
            d2[np.arange(len(d2)), start + np.arange(len(d2))] = np.inf
            out += int((d2.min(1) <= tol).sum())
        return out

    def scored(self, queries: np.ndarray) -> np.ndarray:
        """(Q, leaves): datapoints scored by a search of the i + 1 nearest leaves, column i
        (the leaves in the query's own order, as ScaNN's query tokenization ranks them)."""
        q = np.asarray(queries, np.float32)
        if self.dot:
            rank = -(q @ self.centres.T)
        else:
            rank = -2 * (q @ self.centres.T) + (self.centres**2).sum(1)
        order = np.argsort(rank, axis=1, kind="stable")
        return np.cumsum(self.sizes[order], axis=1)
