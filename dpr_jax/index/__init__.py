"""Passage indexes for DPR's maximum-inner-product search (Karpukhin et al. 2020, sec. 3.1).

One interface (:class:`Index`: ``build``, ``search``, ``save``, ``load``, ``size_bytes``,
``config``) over exact JAX search and the ScaNN and FAISS libraries; see :mod:`.base` for the
on-disk format and ``BACKENDS`` for the names. FAISS and ScaNN are imported only when used.
"""

from dpr_jax.index.base import (
    BACKENDS,
    Index,
    IndexIntegrityError,
    build_index,
    index_class,
    load_index,
)

__all__ = ["BACKENDS", "Index", "IndexIntegrityError", "build_index", "index_class", "load_index"]
