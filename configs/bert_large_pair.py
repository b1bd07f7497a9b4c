"""Two BERT-large towers (24 layers, hidden 1024, 16 heads; 334,092,288 parameters
each, 668,184,576 in all)
at global batch 4096: the DPR recipe of configs/nq_bert_base.py scaled up, for ``dpr-jax plan``
and for TPU pods. The architecture is given as ``model`` (random init), so it plans without
weights; to fine-tune a real BERT-large, ``--set init_from=DIR`` with a converted model
(``dpr-jax convert --from-hf bert-large-uncased --out DIR``).

    dpr-jax plan --config configs/bert_large_pair.py --topology v5e:4x4 --fit
"""

import os

from dpr_jax.retriever.task import TrainConfig

NQ = os.environ.get("DPR_JAX_NQ", "~/dpr_data/retriever")

BERT_LARGE = dict(
    vocab_size=30522,
    hidden_size=1024,
    num_hidden_layers=24,
    num_attention_heads=16,
    intermediate_size=4096,
    max_position_embeddings=512,
    hidden_dropout_prob=0.1,
    attention_probs_dropout_prob=0.1,
)


def get_config() -> TrainConfig:
    return TrainConfig(
        name="bert_large_pair",
        train_path=f"{NQ}/biencoder-nq-train.json",
        dev_path=f"{NQ}/biencoder-nq-dev.json",
        model={"bert": BERT_LARGE},
        tokenizer=os.environ.get("DPR_JAX_TOKENIZER", "minilm"),  # a bert-base-uncased vocab
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
