"""The planner's cost reading on programs whose collectives, FLOPs and bytes are known by hand,
compiled by libtpu for an abstract TPU v5e 2x2 (4 chips; no TPU): each logical collective counted
once with its exact bytes, a collective in a scan of length 4 counted 4 times with the trip count
read from the compiled loop, matmul FLOPs with every scan trip, XLA's own HBM bytes reproduced by
the per-instruction count, and the roofline against a hand computation.

Needs libtpu (``pip install 'dpr-jax[tpu]'``, as CI installs); skips without it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from dpr_jax import plan, step_costs
from dpr_jax.models.bert import bert_forward_flops

pytestmark = pytest.mark.skipif(not plan.libtpu_available(), reason="needs libtpu: dpr-jax[tpu]")
N, D = 4096, 768  # the global [N, D] bf16 array, 1024 rows a chip


@pytest.fixture(scope="module")
def mesh():
    _, devices = plan.tpu_topology("v5e:2x2")
    return Mesh(np.array(devices), ("data",))


def _costs(mesh, fn, out_spec, *shapes):
    g = jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=out_spec, check_vma=False)
    args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P("data"))) for s, d in shapes]
    compiled = jax.jit(g).lower(*args).compile()
    module = step_costs.HloModule.parse(compiled.as_text())
    assert module.multiplicities()[1] == []  # every loop's trip count read
    summary = step_costs.collective_summary(step_costs.collectives(module, 4))
    return {k: (v["count"], v["logical_bytes"]) for k, v in summary.items() if v["count"]}, (
        compiled,
        module,
        jax.make_jaxpr(g)(*args),
    )


def test_all_gather_counted_once(mesh):
    got, _ = _costs(mesh, lambda x: jax.lax.all_gather(x, "data", tiled=True).sum(0)[None], P(),
                    ((N, D), jnp.bfloat16))  # fmt: skip
    assert got == {"all-gather": (1, N * D * 2)}


def test_all_gather_in_a_scan_of_four(mesh):
    def f(x):  # x (1024, D) -> 4 chunks of 256 rows, each gathered to (1024, D)
        def body(c, xi):
            return c + jax.lax.all_gather(xi, "data", tiled=True).sum(0), None

        return jax.lax.scan(body, jnp.zeros((D,), x.dtype), x.reshape(4, -1, D))[0][None]

    got, _ = _costs(mesh, f, P(), ((N, D), jnp.bfloat16))
    assert got == {"all-gather": (4, 4 * (N // 4) * D * 2)}


def test_reduce_scatter_and_psum(mesh):
    got, _ = _costs(mesh, lambda x: jax.lax.psum_scatter(x, "data", tiled=True), P("data"),
                    ((4 * 3072, 768), jnp.float32))  # fmt: skip
    assert got == {"reduce-scatter": (1, 3072 * 768 * 4)}  # the full array each chip reduces
    got, _ = _costs(mesh, lambda x: jax.lax.psum(x, "data"), P(), ((4 * 512, 256), jnp.float32))
    assert got == {"all-reduce": (1, 512 * 256 * 4)}
    # interconnect bytes of a ring over 4 chips: 3/4 of the array for reduce-scatter, 2 x 3/4
    # for all-reduce
    c = step_costs.Collective("all-reduce", 1000, 4, 2, "x")
    assert c.wire_bytes == 2 * 1000 * 2 * 3 / 4


def test_flops_and_bytes_with_loop_trips(mesh):
    """A (256, 512) . (512, 512) matmul per chip, in a scan of 3: 3 x 2 x 256 x 512 x 512 FLOPs,
    where XLA's cost analysis counts the body once. HBM bytes: the planner scales XLA's bytes by
    (per-instruction bytes with every trip) / (with each loop once); checked against XLA's own
    count for the same program with the scan unrolled (every trip visible to XLA)."""
    w = jnp.ones((512, 512), jnp.bfloat16)

    def make(unroll):
        def f(x):  # x (768, 512) a chip: 3 chunks of 256 rows
            def body(c, xi):
                return c + (xi @ w).sum(0), None

            xs = x.reshape(3, 256, 512)
            return jax.lax.scan(body, jnp.zeros((512,), x.dtype), xs, unroll=unroll)[0][None]

        return f

    shape = ((4 * 768, 512), jnp.bfloat16)
    _, (compiled, module, jaxpr) = _costs(mesh, make(1), P(), shape)
    assert step_costs.jaxpr_flops(jaxpr.jaxpr, 4) == 3 * 2 * 256 * 512 * 512
    assert step_costs.jaxpr_flops(jaxpr.jaxpr, 4, loops=False) == 2 * 256 * 512 * 512

    def xla_bytes(c):
        cost = c.cost_analysis()
        return (cost[0] if isinstance(cost, (list, tuple)) else cost)["bytes accessed"]

    scaled = (
        xla_bytes(compiled)
        * step_costs.hbm_bytes(module)
        / step_costs.hbm_bytes(module, with_trips=False)
    )
    _, (unrolled, _, _) = _costs(mesh, make(True), P(), shape)
    assert scaled == pytest.approx(xla_bytes(unrolled), rel=0.25)
    assert scaled > 1.5 * xla_bytes(compiled)


def test_roofline_against_hand_count():
    # 1e12 FLOPs at 197 TFLOP/s = 5.08 ms; 2 GB at 819 GB/s = 2.44 ms; 0.4 GB at 400 GB/s = 1 ms
    chip = plan.CHIPS["v5e"]
    t, bound, terms = step_costs.roofline(1e12, 2e9, 0.4e9, chip.peak_flops, chip.hbm_bytes_s,
                                          chip.ici_bytes_s)  # fmt: skip
    assert bound == "compute" and t == pytest.approx(1e12 / 197e12)
    assert terms["hbm"] == pytest.approx(2e9 / 819e9) and terms["ici"] == pytest.approx(1e-3)
    t, bound, _ = step_costs.roofline(1e9, 2e9, 0.4e9, 197e12, 819e9, 400e9)
    assert bound == "hbm" and t == pytest.approx(2e9 / 819e9)


def test_cls_pooling_flops_hand_count():
    """[CLS] pooling: the last layer computes K and V at every position but the query, attention
    output and feed-forward at position 0 alone."""
    from dpr_jax.models.bert import BertConfig

    bert = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128)  # fmt: skip
    h, i, t, s = 64, 128, 10, 3
    full_layer = 2 * s * t * (4 * h * h + 2 * h * i) + 4 * s * t * t * h
    last = 2 * s * t * 2 * h * h + 2 * s * (2 * h * h + 2 * h * i) + 4 * s * t * h
    assert bert_forward_flops(bert, s, t) == 2 * full_layer
    assert bert_forward_flops(bert, s, t, first_only=True) == full_layer + last
