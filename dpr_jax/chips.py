"""Accelerator chips as the planner and the index's memory model see them: one table.

``hbm_gib`` is the usable HBM, the nominal capacity less what the runtime reserves; both
``dpr-jax plan`` (:mod:`dpr_jax.plan`) and the exact index's memory per device
(:func:`dpr_jax.index.exact.search_memory`) read it from here.
"""

from __future__ import annotations

import dataclasses
import math

from dpr_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Chip:
    """Per-chip figures of one TPU generation (bf16 peak, HBM, ICI)."""

    name: str
    hbm_gib: float  # usable HBM: the nominal capacity less 0.25 GiB that the runtime reserves
    peak_flops: float  # bf16 FLOP/s
    hbm_bytes_s: float
    ici_bytes_s: float  # bidirectional inter-chip interconnect bandwidth per chip
    source: str


# Public sources (Cloud TPU system architecture pages). The 0.25 GiB reserve is what a v5e chip
# reports (15.75 GiB of 16 GiB usable, the figure of the project's issue 10); it is assumed
# for the other generations.
CHIPS: dict[str, Chip] = {
    # 275 TFLOPs bf16, 32 GiB HBM2 at 1200 GBps, ICI 2400 Gbps; one JAX device per chip
    # (megacore): https://cloud.google.com/tpu/docs/v4
    "v4": Chip("TPU v4", 32 - 0.25, 275e12, 1200e9, 300e9, "https://cloud.google.com/tpu/docs/v4"),
    # 197 TFLOPs bf16, 16 GB HBM2 at 819 GBps, ICI 400 GBps: https://cloud.google.com/tpu/docs/v5e
    "v5e": Chip(
        "TPU v5e", 16 - 0.25, 197e12, 819e9, 400e9, "https://cloud.google.com/tpu/docs/v5e"
    ),
    # 459 TFLOPs bf16, 95 GB HBM2e at 2765 GBps, ICI 1200 GBps:
    # https://cloud.google.com/tpu/docs/v5p
    "v5p": Chip(
        "TPU v5p", 95 - 0.25, 459e12, 2765e9, 1200e9, "https://cloud.google.com/tpu/docs/v5p"
    ),
    # 918 TFLOPs bf16, 32 GB HBM at 1638 GBps, ICI 800 GBps: https://cloud.google.com/tpu/docs/v6e
    "v6e": Chip(
        "TPU v6e", 32 - 0.25, 918e12, 1638e9, 800e9, "https://cloud.google.com/tpu/docs/v6e"
    ),
}


def tpu_slice(topology: str) -> tuple[int, float]:
    """(chips, usable HBM bytes per chip) of a TPU slice named like ``"v5e:4x4"``."""
    generation, _, shape = topology.partition(":")
    dims = [int(x) for x in shape.split("x")] if shape else []
    if generation not in CHIPS or not dims or min(dims) < 1:
        raise UserError(f"unknown TPU topology {topology!r} (e.g. v5e:4x4; have {sorted(CHIPS)})")
    return math.prod(dims), CHIPS[generation].hbm_gib * 2**30
