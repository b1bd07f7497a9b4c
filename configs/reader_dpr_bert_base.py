"""DPR's extractive reader recipe (Karpukhin et al. 2020, sec. 6.2; ``facebookresearch/DPR``
``conf/train/extractive_reader_default.yaml``): bert-base, 24 passages per question (the
positive and 23 negatives), sequences of 350 tokens, batch 16 questions, lr 1e-5, no warmup, no
weight decay, gradient clipping 1.0, dropout 0.1. The architecture is given as ``model``
(random init) so that ``dpr-jax plan`` needs no weights; to train, start from a converted BERT
with ``--set init_from=DIR`` (``dpr-jax convert --from-hf bert-base-uncased --out DIR``) and
give the data on the command line::

    dpr-jax plan --config configs/reader_dpr_bert_base.py --topology v5e:4x4
    dpr-jax train-reader --config configs/reader_dpr_bert_base.py --set init_from=DIR \\
        --train RETRIEVED_TRAIN.json --dev RETRIEVED_DEV.json --workdir DIR
"""

import os

from dpr_jax.reader.task import ReaderTrainConfig

BERT_BASE = dict(
    vocab_size=30522,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=512,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def get_config() -> ReaderTrainConfig:
    return ReaderTrainConfig(
        name="reader_dpr_bert_base",
        model=BERT_BASE,
        tokenizer=os.environ.get("DPR_JAX_TOKENIZER", "minilm"),  # a bert-base-uncased vocab
        batch_size=16,
        passages_per_question=24,
        max_negatives=50,
        max_answers=10,
        max_length=350,
        max_question_length=64,
        dropout=0.1,
        dtype="bfloat16",
        learning_rate=1e-5,
        warmup_steps=0,
        num_epochs=16,
        weight_decay=0.0,
        max_grad_norm=1.0,
        eval_passages=50,
        eval_top_k=(1, 50),
        seed=12345,
    )
