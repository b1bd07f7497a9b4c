"""A ~1B-parameter bi-encoder: two BERT-shaped towers of 16 layers, hidden 1536, 24 heads
(head size 64), feed-forward 6144; 500,978,688 parameters a tower, 1,001,957,376 in all
(counted by ``dpr-jax plan``), at global batch 4096. Replicated, its float32 weights, AdamW
moments and gradient alone take 14.9 GiB a chip, nearly all of a TPU v5e's 15.75 GiB: it
trains with ``fsdp=True`` (and GradCache). A random init from ``model``: ``dpr-jax plan`` needs no weights.

    dpr-jax plan --config configs/bert_1b_pair.py --topology v5e:4x4 --fit
"""

import os

from dpr_jax.retriever.task import TrainConfig

NQ = os.environ.get("DPR_JAX_NQ", "~/dpr_data/retriever")

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
    return TrainConfig(
        name="bert_1b_pair",
        train_path=f"{NQ}/biencoder-nq-train.json",
        dev_path=f"{NQ}/biencoder-nq-dev.json",
        model={"bert": BERT_1B_TOWER},
        tokenizer=os.environ.get("DPR_JAX_TOKENIZER", "minilm"),
        batch_size=4096,
        eval_batch_size=4096,
        n_hard=1,
        q_max_len=64,
        p_max_len=256,
        dropout=0.1,
        dtype="bfloat16",
        learning_rate=1e-5,
        warmup_steps=100,
        num_epochs=40,
        max_grad_norm=2.0,
        seed=12345,
    )
