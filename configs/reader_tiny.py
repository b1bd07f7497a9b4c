"""A tiny random reader (2 layers, hidden 32) for tests and smoke runs: trains in seconds on CPU.

Reads the one-article official SQuAD fixture (gold paragraph = positive, the article's other
paragraphs = negatives) for both training and dev; tests override paths and sizes with
``dataclasses.replace`` or ``--set``.
"""

import os
from pathlib import Path

from dpr_jax.reader.task import ReaderTrainConfig

DATA = Path(os.environ.get("DPR_JAX_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
FIXTURE = str(DATA / "fixtures" / "squad-train-v1.1.University_of_Notre_Dame.official.json")

TINY_BERT = dict(
    vocab_size=30522,  # the MiniLM / bert-base-uncased vocabulary: the real tokenizer works
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=512,
)


def get_config() -> ReaderTrainConfig:
    return ReaderTrainConfig(
        name="reader_tiny",
        train_path=FIXTURE,
        dev_path=FIXTURE,
        data_format="squad",
        max_train_examples=32,
        max_dev_examples=16,
        batch_size=8,
        passages_per_question=4,
        max_negatives=8,
        max_length=192,
        max_question_length=32,
        model=TINY_BERT,
        tokenizer="minilm",
        learning_rate=1e-3,
        warmup_steps=2,
        num_steps=20,
        eval_passages=4,
        eval_top_k=(1, 4),
        eval_batch_size=32,
        log_every=5,
        checkpoint_every=10,
        keep_checkpoints=2,
        async_checkpoint=False,
        progress=False,
        seed=0,
    )
