"""Gradient caching (GradCache, Gao et al. 2021) on 8 devices equals the uncached step.

Chunks are smaller than the per-device batch (2 questions, 6 passages per device), so the cached
step really encodes in several pieces and accumulates parameter gradients over them, while its
loss still sees all 48 passages of the global batch. Dropout is on in the first test: per-example
dropout keys make the cached re-encoding draw the same masks as the uncached step. Tolerances as
in test_train_step.py (loss rtol 1e-5, gradients rtol 1e-4 / atol 1e-6).
"""

import jax
import pytest
from test_train_step import B, G, assert_same_step, jitted_step, make_batch, run_step

from dpr_jax.parallel import make_mesh
from dpr_jax.retriever.step import LossConfig, make_train_step


def test_grad_cache_equals_uncached_with_dropout():
    batch = make_batch(10)
    cached = run_step(8, False, 0.1, batch, chunk=1)  # 2 question / 6 passage chunks per device
    _, metrics = cached
    assert float(metrics["candidates"]) == (B - 1) * G  # every passage is still a negative
    assert_same_step(cached, run_step(8, False, 0.1, batch))


def test_grad_cache_shared_towers():
    """Shared towers: question and passage chunks accumulate into the same parameters."""
    batch = make_batch(11)
    assert_same_step(run_step(8, True, 0.0, batch, chunk=2), run_step(8, True, 0.0, batch))


def test_chunk_must_divide_the_per_device_batch():
    step = jitted_step(8, False, 0.1, chunk=3)
    with pytest.raises(ValueError, match="grad_cache_chunk 3 does not divide the 2 questions"):
        step(None, make_batch(0), jax.random.key(0))
    with pytest.raises(ValueError, match="grad_cache_chunk must be >= 1"):
        make_train_step(None, None, make_mesh(), LossConfig(G), grad_cache_chunk=0)
