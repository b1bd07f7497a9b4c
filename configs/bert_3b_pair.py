"""A ~3B-parameter bi-encoder: two BERT-shaped towers of 28 layers, hidden 2048, 16 heads (head
size 128), feed-forward 8192, at global batch 4096 (configs/bert_large_pair.py's recipe). Its
float32 weights and AdamW moments alone are ~33 GiB: it trains only with ``fsdp=True`` (the step
itself sharded: per-layer gathers, reduce-scattered gradients) and GradCache. A random init from
``model``: ``dpr-jax plan`` needs no weights.

    dpr-jax plan --config configs/bert_3b_pair.py --topology v5e:4x4 \\
        --set fsdp=true --set remat=true --set grad_cache_chunk=32
"""

import dataclasses
from pathlib import Path

from dpr_jax.retriever.task import TrainConfig, load_config


def get_config() -> TrainConfig:
    """configs/bert_1b_pair.py (bert_large_pair's recipe: data, batch 4096, optimizer) with wider
    and deeper towers."""
    one_b = load_config(Path(__file__).with_name("bert_1b_pair.py"))
    tower = {**one_b.model["bert"], "hidden_size": 2048, "num_hidden_layers": 28,
             "num_attention_heads": 16, "intermediate_size": 8192}  # fmt: skip
    return dataclasses.replace(one_b, name="bert_3b_pair", model={"bert": tower})
