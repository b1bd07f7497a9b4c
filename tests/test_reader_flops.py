"""The reader's FLOP count (dpr_jax.reader.task.reader_forward_flops: the planner's model
FLOPs and bench_read's useful GFLOP/s) against the matmuls of the program JAX traces."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from dpr_jax import step_costs

REPO = Path(__file__).resolve().parents[1]


def test_reader_forward_flops_equal_the_traced_programs_matmuls():
    """The reader's analytic forward count (BERT, span and relevance heads) against the matmul
    FLOPs of the program JAX traces for it (every dot_general, 2 x M x N x K), at two lengths;
    bench_read's useful GFLOP a question is the sum over its sequences' real lengths."""
    from dpr_jax.models.bert import BertConfig
    from dpr_jax.reader.model import Reader, init_reader_params
    from dpr_jax.reader.task import reader_forward_flops

    bert = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    params = init_reader_params(bert, jax.random.PRNGKey(0))
    model = Reader(bert)
    for m, t in [(3, 16), (2, 40)]:
        ids = jnp.ones((1, m, t), jnp.int32)
        traced, _ = step_costs.traced_flops(
            lambda p, x: model.apply({"params": p}, x, jnp.ones_like(x)), (params, ids), 1
        )
        assert traced == reader_forward_flops(bert, m, t)
    spec = importlib.util.spec_from_file_location("bench_read", REPO / "scripts" / "bench_read.py")
    bench_read = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_read)
    seqs = [[[1] * 16, [1] * 40], [[1] * 16]]  # two questions, lengths 16 + 40 and 16
    want = (2 * reader_forward_flops(bert, 1, 16) + reader_forward_flops(bert, 1, 40)) / 2 / 1e9
    assert bench_read.useful_gflop(bert, seqs) == pytest.approx(want)
