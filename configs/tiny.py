"""A tiny random bi-encoder (2 layers, hidden 32, separate towers) for tests and smoke runs
(big_vision's ``runlocal`` idea): trains in seconds on CPU. Mean pooling instead of DPR's [CLS]:
a random 2-layer BERT learns from a few dozen steps only through its token embeddings, which mean
pooling exposes directly. Reads the 5-question DPR fixture by default; tests point ``train_path``
/ ``dev_path`` at their own biencoder files."""

import os
from pathlib import Path

from dpr_jax.retriever.task import TrainConfig

DATA = Path(os.environ.get("DPR_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FIXTURE = str(DATA / "fixtures" / "biencoder-nq-dev.sample.json")

TINY_BERT = dict(
    vocab_size=30522,  # the MiniLM / bert-base-uncased vocabulary: the real tokenizer works
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=512,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="tiny",
        train_path=FIXTURE,
        dev_path=FIXTURE,
        batch_size=4,
        n_hard=1,
        q_max_len=16,
        p_max_len=48,
        model={"bert": TINY_BERT, "pooling": "mean"},
        tokenizer="minilm",
        learning_rate=3e-3,
        warmup_steps=2,
        num_steps=20,
        log_every=5,
        checkpoint_every=10,
        keep_checkpoints=2,
        async_checkpoint=False,
        progress=False,
        seed=0,
    )
