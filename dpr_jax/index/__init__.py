"""Passage indexes for DPR's maximum-inner-product search (Karpukhin et al. 2020, sec. 3.1).

One interface (:class:`Index`: ``build``, ``search``, ``save``, ``load``, ``size_bytes``,
``config``) over exact JAX search and the ScaNN and FAISS libraries; see :mod:`.base` for the
on-disk format and :mod:`.backends` for the names. FAISS and ScaNN are imported only when used.
"""

from dpr_jax.index.backends import BACKENDS, build_index, index_class, load_index
from dpr_jax.index.base import Index, IndexIntegrityError

__all__ = ["BACKENDS", "Index", "IndexIntegrityError", "build_index", "index_class", "load_index"]
