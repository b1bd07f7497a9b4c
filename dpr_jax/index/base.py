"""One index interface for DPR's maximum-inner-product search (Karpukhin et al. 2020, sec. 3.1).

DPR retrieves the passages p maximising sim(q, p) = E_Q(q)^T E_P(p) and, for a large corpus,
indexes the passage vectors with FAISS (sec. 3.1: "we use FAISS ... an extremely efficient,
open-source library for similarity search and clustering of dense vectors"). Every backend here
answers the same question, maximum inner product over string passage ids:

- ``exact``: brute force on the JAX devices, the reference for recall (:mod:`.exact`);
- ``scann-bf``, ``scann``: ScaNN brute force, and its tree + anisotropic hashing + reorder
  (:mod:`.scann_index`);
- ``faiss-flat``, ``faiss-hnsw``, ``faiss-ivfpq``: FAISS exact, HNSW graph and IVF-PQ
  (:mod:`.faiss_index`).

An *index directory* is::

    INDEX_DIR/
      index_config.json   {"backend", "options", "dim", "size", "meta" (e.g. the embeddings'
                          config.json), "created_by", and "tuned" when the search knobs were
                          tuned to a recall target (:mod:`.tune`)}
      ids.npy             the passage ids, row i of the index is ids[i]
      ...                 the backend's own files
      manifest.json       size and sha256 of every file above

``save`` writes into a temporary sibling directory and swaps it into place
(:func:`dpr_jax.io.replace_dir`), so a failed save never damages an existing index and the path
never stops naming a complete one; ``load`` checks every file against the manifest and refuses a
truncated, corrupted or unlisted one by name (:class:`IndexIntegrityError`) before any backend
reads it. ``meta`` records where the vectors came from (``model_fingerprint``, and ``passages``:
the sha256 and content fingerprint of each embeddings directory's corpus), which
:mod:`dpr_jax.provenance` checks before a question is encoded.
"""

from __future__ import annotations

import abc
import datetime
import importlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dpr_jax import __version__, io
from dpr_jax.io import atomic_write_json, read_json_object

INDEX_CONFIG = "index_config.json"
MANIFEST = "manifest.json"
IDS_FILE = "ids.npy"
FORMAT = "dpr-jax-index/1"

# backend name -> (module, class); imported lazily so that faiss / scann are only needed when used
BACKENDS: dict[str, tuple[str, str]] = {
    "exact": ("dpr_jax.index.exact", "ExactIndex"),
    "scann": ("dpr_jax.index.scann_index", "ScannIndex"),
    "scann-bf": ("dpr_jax.index.scann_index", "ScannBruteForceIndex"),
    "faiss-flat": ("dpr_jax.index.faiss_index", "FaissFlatIndex"),
    "faiss-hnsw": ("dpr_jax.index.faiss_index", "FaissHNSWIndex"),
    "faiss-ivfpq": ("dpr_jax.index.faiss_index", "FaissIVFPQIndex"),
}


class IndexIntegrityError(io.IntegrityError):
    """An index file is missing, truncated or corrupted (the message names the file)."""


def _version() -> str:
    return __version__


class Index(abc.ABC):
    """Maximum-inner-product search over vectors with string ids.

    Subclasses set ``backend`` and ``DEFAULTS`` (every option with its default; ``None`` means
    "chosen from the data at build time", the resolved value is recorded in ``config``), and
    implement ``_build``, ``_search``, ``_save_files`` and ``_load_files``.
    """

    backend: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]] = {}
    SEARCH_PARAMS: ClassVar[tuple[str, ...]] = ()  # per-call overrides accepted by search()
    # tuned search settings: {"params": {name: value}, "k", "target_recall", "recall", "qps", ...}
    # written by dpr_jax.index.tune; search() uses "params" unless a call overrides them
    tuned: dict[str, Any] | None = None

    def __init__(self, **options):
        unknown = sorted(set(options) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(
                f"unknown option(s) {unknown} for backend {self.backend!r}; "
                f"known: {sorted(self.DEFAULTS)}"
            )
        self.options: dict[str, Any] = {**self.DEFAULTS, **options}
        self.ids: np.ndarray | None = None
        self.dim: int | None = None
        self.meta: dict[str, Any] = {}
        self.tuned = None

    # -- public API ------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return 0 if self.ids is None else len(self.ids)

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild or reload this index (written as index_config.json)."""
        return {
            "format": FORMAT,
            "backend": self.backend,
            "options": dict(self.options),
            "dim": self.dim,
            "size": self.size,
            "meta": self.meta,
            "created_by": f"dpr-jax {_version()}",
            **({"tuned": self.tuned} if self.tuned else {}),
        }

    def build(self, emb: np.ndarray, ids) -> Index:
        """Index ``emb`` (N, dim) whose row i has id ``ids[i]``; returns self."""
        emb = np.asarray(emb)
        ids = np.asarray(ids)
        if emb.ndim != 2 or emb.shape[0] == 0:
            raise ValueError(f"embeddings must be a non-empty (N, dim) array, got {emb.shape}")
        if ids.shape != (emb.shape[0],):
            raise ValueError(f"ids shape {ids.shape} does not match embeddings {emb.shape}")
        if emb.dtype.kind != "f":
            raise ValueError(f"embeddings must be floating point, got {emb.dtype}")
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():
            r = int(np.argmax(bad))
            raise ValueError(f"embedding row {r} (id {str(ids[r])!r}) is not finite")
        self.ids = ids.astype(str)
        self.dim = int(emb.shape[1])
        self._build(emb)
        return self

    def search(self, queries: np.ndarray, k: int, **params) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores float32 (Q, k), ids str (Q, k))``, best first.

        ``k`` larger than the index is clamped to its size. ``params`` are per-call overrides of
        search settings (``SEARCH_PARAMS`` of the backend, e.g. ``leaves_to_search``); without
        them a tuned index uses its tuned settings (``tuned["params"]``). An approximate backend
        that finds fewer than ``k`` candidates pads with id "" and -inf.
        """
        if self.ids is None:
            raise RuntimeError(f"{self.backend} index is empty: call build() or load() first")
        unknown = sorted(set(params) - set(self.SEARCH_PARAMS))
        if unknown:
            raise ValueError(
                f"unknown search parameter(s) {unknown} for backend {self.backend!r}; "
                f"known: {list(self.SEARCH_PARAMS)}"
            )
        if self.tuned:
            params = {**self.tuned["params"], **params}
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}), got shape {np.shape(queries)}")
        if q.dtype.kind != "f":
            raise ValueError(f"queries must be floating point, got {q.dtype}")
        if int(k) < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(int(k), self.size)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), self.ids.dtype)
        scores, rows = self._search(q, k, **params)
        scores = np.asarray(scores, np.float32)
        rows = np.asarray(rows, np.int64)
        missing = (rows < 0) | (rows >= self.size)
        ids = self.ids[np.where(missing, 0, rows)]
        if missing.any():
            ids[missing] = ""
            scores = np.where(missing, -np.inf, scores).astype(np.float32)
        return scores, ids

    def set_num_threads(self, num_threads: int) -> None:
        """Search threads (0: all cores) for backends with a ``num_threads`` option; a no-op for
        ``exact`` (XLA's CPU thread pool is fixed when JAX starts)."""
        if "num_threads" in self.DEFAULTS:
            self.options["num_threads"] = int(num_threads)

    def size_bytes(self) -> int:
        """Bytes of the index structures as saved (vectors, codes, graph), not counting ids."""
        with tempfile.TemporaryDirectory(prefix="dpr_jax_index_size_") as tmp:
            self._save_files(Path(tmp))
            return sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())

    def save(self, path: str | Path) -> Path:
        """Atomically write the index directory (see the module docstring)."""
        if self.ids is None:
            raise RuntimeError(f"{self.backend} index is empty: nothing to save")
        path = Path(path)
        if path.exists() and not (path / MANIFEST).exists() and any(path.iterdir()):
            raise FileExistsError(f"{path}: exists, is not empty and is not an index; not replaced")
        tmp = io.temp_dir_for(path)
        try:
            self._save_files(tmp)
            with open(tmp / IDS_FILE, "wb") as f:
                np.save(f, self.ids, allow_pickle=False)
            config = self.config
            config["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
            atomic_write_json(tmp / INDEX_CONFIG, config)
            write_manifest(tmp)
            io.replace_dir(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Index:
        """Load an index saved by ``save``; every file is checked against the manifest first
        (sizes always, sha256 with ``verify``)."""
        path = Path(path)
        verify_manifest(path, checksums=verify)
        config = read_index_config(path)
        if config["backend"] != cls.backend:
            raise ValueError(
                f"{path / INDEX_CONFIG}: backend is {config['backend']!r}, not {cls.backend!r}"
            )
        options = config.get("options", {})
        unknown = sorted(set(options) - set(cls.DEFAULTS))
        if unknown:
            raise ValueError(f"{path / INDEX_CONFIG}: unknown option(s) {unknown} in 'options'")
        index = cls(**options)
        ids_path = path / IDS_FILE
        try:
            ids = np.load(ids_path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise IndexIntegrityError(f"{ids_path}: not a readable .npy file: {e}") from e
        if ids.ndim != 1 or ids.dtype.kind != "U" or len(ids) != config.get("size"):
            raise IndexIntegrityError(
                f"{ids_path}: expected {config.get('size')} string ids, got {ids.dtype} {ids.shape}"
            )
        index.ids, index.dim, index.meta = ids, int(config["dim"]), config.get("meta", {})
        tuned = config.get("tuned")
        if tuned is not None:
            params = tuned.get("params") if isinstance(tuned, dict) else None
            if not isinstance(params, dict) or set(params) - set(cls.SEARCH_PARAMS):
                raise ValueError(
                    f"{path / INDEX_CONFIG}: 'tuned' must hold 'params' with search parameters of "
                    f"{cls.backend!r} ({list(cls.SEARCH_PARAMS)}), got {params!r}; re-run "
                    f"`dpr-jax index --target-recall` or delete the 'tuned' field"
                )
            index.tuned = tuned
        index._load_files(path)
        return index

    def tune_space(self, k: int) -> list[tuple[str, list]]:
        """The search knobs :mod:`.tune` may set, as ``[(param, values), ...]``: each list in
        increasing cost (and recall), the first knob the coarse one (partitions or graph breadth),
        the second, if any, the rescoring depth. Empty: nothing to tune (an exact backend)."""
        return []

    # -- backend hooks ---------------------------------------------------------------------------

    @abc.abstractmethod
    def _build(self, emb: np.ndarray) -> None:
        """Build from (N, dim) embeddings; self.ids and self.dim are already set."""

    @abc.abstractmethod
    def _search(self, queries: np.ndarray, k: int, **params) -> tuple[np.ndarray, np.ndarray]:
        """float32 (Q, dim) queries, 1 <= k <= size -> (scores (Q, k), int rows (Q, k), -1 = none)."""

    @abc.abstractmethod
    def _save_files(self, directory: Path) -> None:
        """Write the backend's files (not ids, config or manifest) into ``directory``."""

    @abc.abstractmethod
    def _load_files(self, directory: Path) -> None:
        """Read the backend's files; self.ids, self.dim, self.options are already set."""


# -- manifests -----------------------------------------------------------------------------------


def write_manifest(directory: str | Path) -> dict:
    return io.write_manifest(directory, FORMAT)


def verify_manifest(directory: str | Path, checksums: bool = True) -> dict:
    """Check every file against ``manifest.json`` and refuse unlisted ones; raise
    IndexIntegrityError naming the file."""
    return io.verify_manifest(
        directory,
        checksums=checksums,
        required=(INDEX_CONFIG,),
        what="index directory",
        error=IndexIntegrityError,
        missing_hint="not an index, or an unfinished save",
    )


def read_index_config(directory: str | Path) -> dict:
    p = Path(directory) / INDEX_CONFIG
    config = read_json_object(p, "an index directory", error=IndexIntegrityError)
    for field in ("backend", "dim", "size"):
        if field not in config:
            raise IndexIntegrityError(f"{p}: missing field {field!r}")
    if config["backend"] not in BACKENDS:
        raise ValueError(f"{p}: unknown backend {config['backend']!r} (have {sorted(BACKENDS)})")
    return config


# -- registry ------------------------------------------------------------------------------------


def index_class(backend: str) -> type[Index]:
    if backend not in BACKENDS:
        raise ValueError(f"unknown index backend {backend!r}; choose from {sorted(BACKENDS)}")
    module, name = BACKENDS[backend]
    return getattr(importlib.import_module(module), name)


def build_index(backend: str, emb: np.ndarray, ids, **options) -> Index:
    """Build an index of ``backend`` (see ``BACKENDS``) over ``emb`` with ids ``ids``."""
    return index_class(backend)(**options).build(emb, ids)


def load_index(path: str | Path, verify: bool = True) -> Index:
    """Load any saved index; the backend is read from its index_config.json."""
    path = Path(path)
    verify_manifest(path, checksums=verify)
    backend = read_index_config(path)["backend"]
    return index_class(backend).load(path, verify=False)  # already verified above
