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

``save`` refuses a path that holds anything but an index (:func:`dpr_jax.io.check_output`), then
writes into a temporary sibling directory and swaps it into place
(:func:`dpr_jax.io.replace_dir`), so a failed save never damages an existing index and the path
never stops naming a complete one; ``load`` checks every file against the manifest and refuses a
truncated, corrupted or unlisted one by name (:class:`IndexIntegrityError`) before any backend
reads it. ``meta`` records where the vectors came from (``model_fingerprint``, and ``passages``:
the sha256 and content fingerprint of each embeddings directory's corpus), which
:mod:`dpr_jax.provenance` checks before a question is encoded.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from dpr_jax import __version__, io
from dpr_jax.errors import UserError
from dpr_jax.io import atomic_write_json, read_json_object

INDEX_CONFIG = "index_config.json"
MANIFEST = "manifest.json"
IDS_FILE = "ids.npy"
FORMAT = "dpr-jax-index/1"


INT_MAX = 2**31 - 1  # FAISS and ScaNN take C ints


@dataclasses.dataclass(frozen=True)
class Opt:
    """The allowed values of one backend option or search parameter.

    ``kind``: "int" (not bool), "float" (an int is accepted; finite), "bool" or "choice" (one of
    ``choices``); ``lo``/``hi`` bound numbers (``lo_open``: lo itself excluded; ints are at most
    :data:`INT_MAX`); ``null`` says what ``None`` means, ``None`` is refused when it is empty.
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    null: str = ""
    lo_open: bool = False

    def describe(self) -> str:
        if self.kind == "bool":
            text = "true or false"
        elif self.kind == "choice":
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            text = "an integer" if self.kind == "int" else "a finite number"
            lo = "" if self.lo is None else f"{'(' if self.lo_open else '['}{self.lo}"
            if self.hi is not None:
                text += f" in {lo or '(-inf'}, {self.hi}]"
            elif self.lo is not None:
                text += f" {'>' if self.lo_open else '>='} {self.lo}"
        return text + (f", or null ({self.null})" if self.null else "")

    def allows(self, value: Any) -> bool:
        if value is None:
            return bool(self.null)
        if self.kind == "bool":
            return isinstance(value, (bool, np.bool_))
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        numbers = (int, np.integer) if self.kind == "int" else (int, float, np.integer, np.floating)
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers):
            return False
        if not math.isfinite(value):
            return False
        hi = INT_MAX if self.hi is None and self.kind == "int" else self.hi
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return hi is None or value <= hi


def check_option(backend: str, name: str, value: Any, spec: Opt, what: str = "option") -> None:
    """Refuse ``value`` of ``name`` unless ``spec`` allows it: one line naming the option, its
    allowed range and the value (:class:`UserError`, exit 2 on the command line)."""
    if not spec.allows(value):
        raise UserError(
            f"{backend} {what} {name}={value!r}: must be {spec.describe()} "
            f"(`dpr-jax index --option {name}=VALUE`)"
        )


class IndexIntegrityError(io.IntegrityError):
    """An index file is missing, truncated or corrupted (the message names the file)."""


def check_options(
    backend: str, given: dict[str, Any], known: list[str], specs: dict[str, Opt], what: str
) -> None:
    """Refuse a name not in ``known`` and a value outside its ``specs`` range (one line)."""
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise UserError(f"unknown {what}(s) {unknown} for backend {backend!r}; known: {known}")
    for name, value in given.items():
        if name in specs:
            check_option(backend, name, value, specs[name], what)


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
    OPTIONS: ClassVar[dict[str, Opt]] = {}  # the allowed values of every option in DEFAULTS
    SEARCH_PARAMS: ClassVar[tuple[str, ...]] = ()  # per-call overrides accepted by search()
    SEARCH_OPTIONS: ClassVar[dict[str, Opt]] = {}  # the allowed values of each SEARCH_PARAMS
    # tuned search settings: {"params": {name: value}, "k", "target_recall", "recall", "qps", ...}
    # written by dpr_jax.index.tune; search() uses "params" unless a call overrides them
    tuned: dict[str, Any] | None = None

    def __init__(self, **options):
        """Every option is checked against ``OPTIONS`` here, before any work."""
        # every built-in backend specifies all of its options
        check_options(self.backend, options, sorted(self.DEFAULTS), self.OPTIONS, "option")
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
            raise UserError(f"embeddings must be a non-empty (N, dim) array, got {emb.shape}")
        if ids.shape != (emb.shape[0],):
            raise UserError(f"ids shape {ids.shape} does not match embeddings {emb.shape}")
        if emb.dtype.kind != "f":
            raise UserError(f"embeddings must be floating point, got {emb.dtype}")
        bad = ~np.isfinite(emb).all(axis=1)
        if bad.any():
            r = int(np.argmax(bad))
            raise UserError(f"embedding row {r} (id {str(ids[r])!r}) is not finite")
        str_ids = ids.astype(str)
        uniq, counts = np.unique(str_ids, return_counts=True)
        if len(uniq) != len(str_ids):
            dup = int(np.argmax(counts > 1))
            rows = np.flatnonzero(str_ids == uniq[dup])[:2].tolist()
            raise UserError(
                f"ids: {str(uniq[dup])!r} appears {int(counts[dup])} times (rows {rows[0]} and "
                f"{rows[1]}); an index maps each passage id to one vector: give unique ids"
            )
        self.ids = str_ids
        self.dim = int(emb.shape[1])
        self._build(emb)
        return self

    def search(self, queries: np.ndarray, k: int, **params) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: ``(scores float32 (Q, k), ids str (Q, k))``, best first.

        ``k`` larger than the index is clamped to its size. ``params`` are per-call overrides of
        search settings (``SEARCH_PARAMS`` of the backend, e.g. ``leaves_to_search``); without
        them a tuned index uses its tuned settings (``tuned["params"]``).

        Every row holds exactly ``min(k, size)`` distinct ids: where an approximate backend finds
        fewer distinct candidates (too few probed lists or leaves, a narrow graph search), the
        search of those rows widens (:meth:`_wider`: more lists, leaves or graph breadth, up to
        all of them) and, where that is not enough, falls back to exact search over the stored
        vectors (:meth:`_exact_search`); a row still short is a bug (``RuntimeError``).
        """
        if self.ids is None:
            raise RuntimeError(f"{self.backend} index is empty: call build() or load() first")
        check_options(self.backend, params, list(self.SEARCH_PARAMS), self.SEARCH_OPTIONS,
                      "search parameter")  # fmt: skip
        if self.tuned:
            params = {**self.tuned["params"], **params}
        q = np.asarray(queries)
        if q.ndim == 1:
            q = q[None]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UserError(f"queries must be (Q, {self.dim}), got shape {np.shape(queries)}")
        if q.dtype.kind != "f":
            raise UserError(f"queries must be floating point, got {q.dtype}")
        bad = ~np.isfinite(q).all(axis=1)
        if bad.any():
            raise UserError(
                f"queries: row {int(np.argmax(bad))} is not finite (NaN or infinity): its scores "
                "would be NaN and its order arbitrary"
            )
        if int(k) < 1:
            raise UserError(f"k must be >= 1, got {k}")
        k = min(int(k), self.size)
        q = np.ascontiguousarray(q, dtype=np.float32)
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), self.ids.dtype)
        scores, rows = self._distinct(*self._search(q, k, **params))
        short = np.flatnonzero((rows < 0).any(axis=1))
        if len(short):
            scores[short], rows[short] = self._complete(q[short], k, params)
        return scores, self.ids[rows]

    def _distinct(self, scores, rows) -> tuple[np.ndarray, np.ndarray]:
        """Rows with no "none" (-1 or out of range) and no repeated row, compacted to the
        front in their order; the freed places at the end are -1 with score -inf."""
        scores = np.array(scores, np.float32)
        rows = np.array(rows, np.int64)
        bad = (rows < 0) | (rows >= self.size) | np.isnan(scores)
        order = np.argsort(rows, axis=1, kind="stable")
        srt = np.take_along_axis(rows, order, axis=1)
        dup_sorted = np.zeros_like(bad)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]  # later copies of a row (kept: the first)
        np.put_along_axis(bad, order, np.take_along_axis(bad, order, axis=1) | dup_sorted, axis=1)
        if not bad.any():
            return scores, rows
        keep = np.argsort(bad, axis=1, kind="stable")  # good ones first, in their order
        rows = np.where(bad, -1, rows)
        scores = np.where(bad, -np.inf, scores).astype(np.float32)
        return np.take_along_axis(scores, keep, axis=1), np.take_along_axis(rows, keep, axis=1)

    def _complete(self, q: np.ndarray, k: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
        """Search the rows that came back short again, wider each time (:meth:`_wider`), then
        exactly over the stored vectors (:meth:`_exact_search`) until each has k distinct rows."""
        scores = np.full((len(q), k), -np.inf, np.float32)
        rows = np.full((len(q), k), -1, np.int64)
        todo = np.arange(len(q))
        for wider in self._wider(k, params):
            s, r = self._distinct(*self._search(q[todo], k, **wider))
            scores[todo], rows[todo] = s, r
            todo = todo[(r < 0).any(axis=1)]
            if not len(todo):
                return scores, rows
        exact = self._exact_search(q[todo], k)
        if exact is not None:
            s, r = self._distinct(*exact)
            scores[todo], rows[todo] = s, r
            todo = todo[(r < 0).any(axis=1)]
        if len(todo):
            got = int((rows[todo[0]] >= 0).sum())
            raise RuntimeError(
                f"{self.backend}: found {got} distinct passages of the {k} asked for (index of "
                f"{self.size}) even at its widest search settings; this is a bug in dpr-jax"
            )
        return scores, rows

    def _wider(self, k: int, params: dict):
        """Search parameters in increasing breadth, up to exhaustive, for rows that came back
        with fewer than k distinct results. None for an exact backend."""
        return iter(())

    def _exact_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Exact (scores, rows) over the stored vectors, or None where the index keeps none."""
        return None

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
        path = io.check_output(path, io.INDEX, what="index path")  # only an index is replaced
        with io.writing(path):  # a full disk, a read-only path: one line, nothing left
            tmp = io.temp_dir_for(path)
        try:
            with io.writing(path, tmp):
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
            raise UserError(
                f"{path / INDEX_CONFIG}: backend is {config['backend']!r}, not {cls.backend!r}"
            )
        options = config.get("options", {})
        unknown = sorted(set(options) - set(cls.DEFAULTS))
        if unknown:
            raise UserError(f"{path / INDEX_CONFIG}: unknown option(s) {unknown} in 'options'")
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
                raise UserError(
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
    config = read_json_object(p, "index directory", error=IndexIntegrityError)
    for field in ("backend", "dim", "size"):
        if field not in config:
            raise IndexIntegrityError(f"{p}: missing field {field!r}")
    return config
