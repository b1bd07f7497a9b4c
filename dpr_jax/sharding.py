"""Where the train state lives: replicated (data parallel) or sharded (FSDP / ZeRO-3).

Data parallelism keeps a full copy of the parameters and of the optimizer state on every
device: for AdamW with float32 master weights that is 16 bytes a parameter (params, two
moments, and the gradient while the step runs), 14.9 GiB for the 1.0B parameters of
configs/bert_1b_pair.py, nearly all of a TPU v5e chip's 15.75 GiB. Fully sharded data parallelism (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", stage 3; Zhao et al. 2023, PyTorch
FSDP) splits each large parameter and its optimizer moments over the data axis, so a device
holds 1/n of them; the compiler gathers a parameter before it is used and reduce-scatters its
gradient. The computation itself, and hence the loss and its gradient, is unchanged: only the
placement differs (tests/test_sharding.py checks FSDP steps equal replicated ones).

The rule (:func:`leaf_spec`): a leaf with at least ``min_size`` elements is split along its
largest dimension that the axis size divides (ties: the first such dimension); smaller leaves
(biases, LayerNorm scales, the step counter, optimizer counters) and leaves with no divisible
dimension stay replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpr_jax.parallel import DATA_AXIS

# 2**16 float32 elements = 256 KiB: every BERT kernel and embedding is larger (bert-base's
# smallest kernel is 768 x 768), every bias and LayerNorm vector smaller.
FSDP_MIN_SIZE = 1 << 16


def leaf_spec(shape: tuple[int, ...], n_shards: int, min_size: int = FSDP_MIN_SIZE, axis=DATA_AXIS):
    """PartitionSpec of one state leaf under FSDP: its largest dimension divisible by
    ``n_shards`` split over ``axis``, or ``P()`` (replicated)."""
    size = 1
    for d in shape:
        size *= d
    if n_shards <= 1 or size < max(min_size, 1) or not shape:
        return P()
    order = sorted(range(len(shape)), key=lambda i: (-shape[i], i))
    for i in order:
        if shape[i] % n_shards == 0:
            return P(*([None] * i + [axis]))
    return P()


def state_shardings(
    abstract_state: Any,
    mesh: Mesh,
    fsdp: bool,
    axis: str = DATA_AXIS,
    min_size: int = FSDP_MIN_SIZE,
) -> Any:
    """A pytree of ``NamedSharding`` matching ``abstract_state`` (arrays or ShapeDtypeStructs):
    every leaf replicated, or with ``fsdp`` sharded by :func:`leaf_spec` over ``axis``."""
    n = mesh.shape[axis]

    def one(leaf):
        if not fsdp:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, leaf_spec(tuple(leaf.shape), n, min_size, axis))

    return jax.tree.map(one, abstract_state)


def sharded_fraction(abstract_state: Any, shardings: Any) -> float:
    """Fraction of the state's elements that are split (0 = all replicated); for reports."""
    total = split = 0
    for leaf, s in zip(jax.tree.leaves(abstract_state), jax.tree.leaves(shardings)):
        size = 1
        for d in leaf.shape:
            size *= d
        total += size
        if any(p is not None for p in s.spec):
            split += size
    return split / max(total, 1)
