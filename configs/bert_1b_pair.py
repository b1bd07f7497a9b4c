"""A ~1B-parameter bi-encoder: two BERT-shaped towers of 16 layers, hidden 1536, 24 heads
(head size 64), feed-forward 6144; 500,978,688 parameters a tower, 1,001,957,376 in all
(counted by ``dpr-jax plan``), at global batch 4096. Replicated, its float32 weights, AdamW
moments and gradient alone take 14.9 GiB a chip, nearly all of a TPU v5e's 15.75 GiB: it
trains with ``fsdp=True`` (and GradCache). A random init from ``model``: ``dpr-jax plan`` needs no weights.

    dpr-jax plan --config configs/bert_1b_pair.py --topology v5e:4x4 --fit
"""

import dataclasses
from pathlib import Path

from dpr_jax.retriever.task import TrainConfig, load_config

BERT_1B_TOWER = dict(
    vocab_size=30522,
    hidden_size=1536,
    num_hidden_layers=16,
    num_attention_heads=24,
    intermediate_size=6144,
    max_position_embeddings=512,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def get_config() -> TrainConfig:
    """configs/bert_large_pair.py's recipe (data, batch 4096, optimizer) with the 1B towers."""
    large = load_config(Path(__file__).with_name("bert_large_pair.py"))
    return dataclasses.replace(large, name="bert_1b_pair", model={"bert": BERT_1B_TOWER})
