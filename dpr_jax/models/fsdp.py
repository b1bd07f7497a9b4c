"""FSDP inside the model: each module gathers its own parameter shards just before it runs.

Fully sharded data parallelism (ZeRO stage 3; Rajbhandari et al. 2020, sec. 5; Zhao et al. 2023,
PyTorch FSDP) keeps 1/n of every large parameter on each of n devices and gathers a layer's
parameters only while that layer runs. Inside ``jax.shard_map`` the train step receives the
local shards; a module wrapped by :meth:`FsdpGather.wrap` all-gathers the shards it owns when it
is applied (``nn.map_variables``), so the whole model is never resident at once. With ``remat``
on the layer, the gather happens inside the rematerialised function: the backward pass gathers
the layer again instead of keeping it. JAX transposes a tiled ``all_gather`` into a
``psum_scatter``: the gradient of each shard comes out summed over devices and scattered,
i.e. XLA emits a reduce-scatter per layer instead of an all-reduce of the whole gradient.

Which dimension of a leaf is split is decided once for the whole state by
:func:`dpr_jax.parallel.leaf_spec` and handed to the model as ``dims`` (parameter path -> split
dimension); a path absent from ``dims`` is a whole (replicated) leaf.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax


@dataclasses.dataclass(frozen=True)
class FsdpGather:
    """Split dimension of every sharded parameter (``"a/b/kernel"`` paths from the model's
    root) and the mesh axis the shards live on."""

    axis: str
    dims: tuple[tuple[str, int], ...]

    def gather(self, prefix: str, variables: dict) -> dict:
        """The whole parameters of the module at ``prefix`` from its local shards."""
        dims = dict(self.dims)

        def one(path, leaf):
            key = "/".join([prefix, *(str(getattr(k, "key", k)) for k in path)])
            dim = dims.get(key)
            if dim is None:
                return leaf
            return jax.lax.all_gather(leaf, self.axis, axis=dim, tiled=True)

        out = dict(variables)
        out["params"] = jax.tree_util.tree_map_with_path(one, variables["params"])
        return out

    def wrap(self, module_cls: type, parent: nn.Module, name: str) -> Any:
        """``module_cls`` whose parameters are gathered from shards when applied as the child
        ``name`` of ``parent``."""
        prefix = "/".join([*parent.scope.path, name])
        return nn.map_variables(
            module_cls,
            "params",
            trans_in_fn=lambda v: self.gather(prefix, v),
            mutable=False,
            init=parent.is_initializing(),
        )


def fsdp_wrap(fsdp: FsdpGather | None, module_cls: type, parent: nn.Module, name: str) -> Any:
    """``module_cls`` itself without FSDP, else wrapped to gather its shards."""
    return module_cls if fsdp is None else fsdp.wrap(module_cls, parent, name)


def gather_dims(param_specs: Any) -> tuple[tuple[str, int], ...]:
    """``FsdpGather.dims`` of a pytree of PartitionSpecs (split leaves only)."""
    out = []
    for path, spec in jax.tree_util.tree_flatten_with_path(
        param_specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]:
        for dim, name in enumerate(spec):
            if name is not None:
                out.append(("/".join(str(getattr(k, "key", k)) for k in path), dim))
    return tuple(sorted(out))
