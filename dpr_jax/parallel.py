"""Devices, meshes and global batches for data-parallel DPR training.

DPR trains with in-batch negatives over the whole global batch (Karpukhin et al. 2020, sec. 3.2,
batch size 128 over 8 GPUs). dpr-jax lays the global batch along one mesh axis, ``"data"``, over
every device of every process: each device holds B/n whole question groups (see
:mod:`dpr_jax.retriever.loss` for the layout), parameters are replicated, and the loss gathers passages
across the axis. Each process loads only its own rows (:func:`process_slice`) and
:func:`global_batch_from_local` assembles them into global ``jax.Array`` s without copying
other processes' data.

Multi-process runs call :func:`initialize_distributed` before anything touches a device, and
copy results to the host with :func:`gather_to_host`, which every process must call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpr_jax.errors import UserError

DATA_AXIS = "data"


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> None:
    """``jax.distributed.initialize``, with gloo collectives for CPU processes.

    Call once per process, before any other JAX call that touches devices. With all arguments
    None, JAX auto-detects the cluster (SLURM, TPU pods, ...). On CPU, cross-process collectives
    need the gloo implementation; it is selected here (it has no effect on GPU/TPU).
    """
    if num_processes is not None and num_processes < 1:
        raise UserError(f"num_processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise UserError(f"process_id {process_id} not in [0, {num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids,
        )
    except ValueError as e:  # what the environment did not say (no SLURM / TPU pod around)
        given = {"coordinator": coordinator_address, "num-processes": num_processes,
                 "process-id": process_id}  # fmt: skip
        missing = [f"--{k}" for k, v in given.items() if v is None]
        said = str(e).rstrip(".")
        need = ", ".join(missing) or "the three of --coordinator, --num-processes, --process-id"
        raise UserError(
            f"multi-process run: {said} (jax.distributed found no cluster to read it from); "
            f"give {need}"
        ) from None


def make_mesh(devices: Sequence[jax.Device] | None = None, axis: str = DATA_AXIS) -> Mesh:
    """A 1-D mesh named ``axis`` over ``devices`` (default: every device of every process).

    Devices are ordered by (process, id), so each process's devices are one contiguous block of
    the axis and hence of the batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise UserError("make_mesh: no devices")
    devices.sort(key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (axis,))


def batch_sharding(mesh: Mesh, axis: str = DATA_AXIS) -> NamedSharding:
    """Leading (batch) axis split over ``axis``; other axes whole."""
    return NamedSharding(mesh, P(axis))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of ``mesh`` (parameters, optimizer state, rng)."""
    return NamedSharding(mesh, P())


def process_slice(
    global_batch_size: int, mesh: Mesh | None = None, axis: str = DATA_AXIS
) -> tuple[int, int]:
    """Rows [start, stop) of a global batch that this process loads.

    With ``mesh`` the rows are those of this process's devices along ``axis`` (they must be
    contiguous, as :func:`make_mesh` guarantees); without it the batch is split evenly by
    ``jax.process_index()``. Raises ValueError if the split is not even.
    """
    if mesh is None:
        n, i = jax.process_count(), jax.process_index()
        if global_batch_size % n:
            raise UserError(
                f"global batch size {global_batch_size} is not divisible by the {n} processes"
            )
        per = global_batch_size // n
        return i * per, (i + 1) * per
    devices = list(mesh.devices.reshape(-1)) if len(mesh.axis_names) == 1 else None
    if devices is None:
        raise UserError(f"process_slice expects a 1-D mesh, got axes {mesh.axis_names}")
    n_dev = len(devices)
    if global_batch_size % n_dev:
        raise UserError(
            f"global batch size {global_batch_size} is not divisible by the {n_dev} devices "
            f"of mesh axis {axis!r}"
        )
    per_dev = global_batch_size // n_dev
    mine = [k for k, d in enumerate(devices) if d.process_index == jax.process_index()]
    if not mine:
        raise UserError("process_slice: this process owns no device of the mesh")
    if mine != list(range(mine[0], mine[-1] + 1)):
        raise UserError(
            f"process_slice: this process's devices are not contiguous on axis {axis!r} "
            f"(positions {mine}); build the mesh with make_mesh"
        )
    return mine[0] * per_dev, (mine[-1] + 1) * per_dev


def global_batch_from_local(
    local_batch: Mapping[str, Any], mesh: Mesh, axis: str = DATA_AXIS
) -> dict[str, jax.Array]:
    """Global arrays sharded over ``axis`` from this process's rows (see :func:`process_slice`).

    ``local_batch`` maps field names to host arrays whose leading axis holds this process's rows
    of the global batch (for the DPR batch, the question fields have B/num_processes rows and the
    passage fields B*G/num_processes). In a single process this is just a sharded device_put.
    """
    sharding = batch_sharding(mesh, axis)
    out = {}
    for name, x in local_batch.items():
        x = np.asarray(x)
        if x.ndim == 0:
            raise UserError(f"batch field {name!r} is a scalar; every field needs a batch axis")
        out[name] = jax.make_array_from_process_local_data(sharding, x)
    return out


def gather_to_host(tree: Any) -> Any:
    """Host numpy copy of a pytree of (global) arrays, whatever their sharding.

    In a multi-process job every process must call it (with the same tree): an array sharded
    over devices of several processes (e.g. FSDP parameters) is gathered with
    ``multihost_utils.process_allgather``, a collective. A fully replicated array is read from
    a local device without communication. Every process receives the whole value.
    """
    from jax.experimental import multihost_utils

    def one(x):
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------
# Where the train state lives: replicated (data parallel) or sharded (FSDP / ZeRO-3).
#
# Data parallelism keeps a full copy of the parameters and of the optimizer state on every
# device: for AdamW with float32 master weights that is 16 bytes a parameter (params, two
# moments, and the gradient while the step runs), 14.9 GiB for the 1.0B parameters of
# configs/bert_1b_pair.py, nearly all of a TPU v5e chip's 15.75 GiB. Fully sharded data parallelism (Rajbhandari et al. 2020, "ZeRO: Memory
# Optimizations Toward Training Trillion Parameter Models", stage 3; Zhao et al. 2023, PyTorch
# FSDP) splits each large parameter and its optimizer moments over the data axis, so a device
# holds 1/n of them; the compiler gathers a parameter before it is used and reduce-scatters its
# gradient. The computation itself, and hence the loss and its gradient, is unchanged: only the
# placement differs (tests/test_sharding.py checks FSDP steps equal replicated ones).
#
# The rule (:func:`leaf_spec`): a leaf with at least ``min_size`` elements is split along its
# largest dimension that the axis size divides (ties: the first such dimension); smaller leaves
# (biases, LayerNorm scales, the step counter, optimizer counters) and leaves with no divisible
# dimension stay replicated.


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
