"""The index backends by name, and building or loading an index of any of them.

``BACKENDS`` is a lazy :class:`~dpr_jax.registry.Registry`: FAISS and ScaNN are imported only
when an index of theirs is built or loaded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dpr_jax.embeddings import check_complete, load_embeddings
from dpr_jax.errors import UserError
from dpr_jax.index.base import INDEX_CONFIG, Index, read_index_config, verify_manifest
from dpr_jax.provenance import index_meta_for_embeddings
from dpr_jax.registry import Registry

# backend name -> "module:class"; imported lazily so that faiss / scann are only needed when used
BACKENDS = Registry(
    {
        "exact": "dpr_jax.index.exact:ExactIndex",
        "scann": "dpr_jax.index.scann_index:ScannIndex",
        "scann-bf": "dpr_jax.index.scann_index:ScannBruteForceIndex",
        "faiss-flat": "dpr_jax.index.faiss_index:FaissFlatIndex",
        "faiss-hnsw": "dpr_jax.index.faiss_index:FaissHNSWIndex",
        "faiss-ivfpq": "dpr_jax.index.faiss_index:FaissIVFPQIndex",
    }
)


def index_class(backend: str) -> type[Index]:
    if backend not in BACKENDS:
        raise UserError(f"unknown index backend {backend!r}; choose from {sorted(BACKENDS)}")
    return BACKENDS.load(backend)


def build_index(backend: str, emb, ids=None, **options) -> Index:
    """Build an index of ``backend`` (see ``BACKENDS``) over ``emb`` with ids ``ids``.

    ``emb`` is an (N, dim) array with ``ids`` (N,), or an embeddings directory (or a list of
    them) written by :func:`dpr_jax.encode_corpus` / ``dpr-jax encode``: then the vectors and ids
    are loaded from it and the index's ``meta`` records the model and passages they came from,
    as ``dpr-jax index`` does, so that :class:`~dpr_jax.DenseRetriever` and
    :class:`~dpr_jax.QAPipeline` can check them. An index built from bare arrays records none.
    """
    index = index_class(backend)(**options)  # options checked before any work
    dirs = [emb] if isinstance(emb, (str, Path)) else emb
    if isinstance(dirs, (list, tuple)) and dirs and all(isinstance(d, (str, Path)) for d in dirs):
        if ids is not None:
            raise UserError(
                "build_index: the ids come from the embeddings directories; give no ids"
            )
        ids, emb, index.meta = load_for_index(dirs)
    elif ids is None:
        raise UserError("build_index: give the ids of the embeddings' rows (or a directory)")
    return index.build(emb, ids)


def load_for_index(
    dirs: list[str | Path], verify: bool = True, allow_partial: bool = False,
    show_progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, dict]:  # fmt: skip
    """``(ids, vectors, meta)`` of embeddings directories, ``meta`` being what an index built
    over them records: where they are, their configs and provenance
    (:func:`dpr_jax.provenance.index_meta_for_embeddings`: a model mismatch fails before
    anything is loaded) and, with ``allow_partial``, the chunks that were missing. ``dpr-jax
    index``, :func:`build_index` and the quickstart all assemble an index's meta here."""
    meta = index_meta_for_embeddings(dirs)
    partial = [line for d in dirs for line in check_complete(d)]
    ids, emb = load_embeddings(dirs, verify=verify, show_progress=show_progress,
                               allow_partial=allow_partial)  # fmt: skip
    return ids, emb, {**meta, "allow_partial": allow_partial, "partial": partial}


def load_index(path: str | Path, verify: bool = True) -> Index:
    """Load any saved index; the backend is read from its index_config.json."""
    path = Path(path)
    verify_manifest(path, checksums=verify)
    backend = read_index_config(path)["backend"]
    if backend not in BACKENDS:
        raise UserError(
            f"{path / INDEX_CONFIG}: unknown backend {backend!r} (have {sorted(BACKENDS)})"
        )
    return index_class(backend).load(path, verify=False)  # already verified above
