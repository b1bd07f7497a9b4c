"""DPR fine-tuning of all-MiniLM-L6-v2 on SQuAD (Karpukhin et al. 2020, sec. 5.2 recipe, small).

Both towers start from the offline all-MiniLM-L6-v2 (6 layers, hidden 384; [CLS] vectors as in
DPR), trained on SQuAD v1.1 train articles with one BM25 hard negative per question plus
in-batch negatives, validated on held-out articles (``dpr-jax prepare-squad`` splits by article).
16 questions per batch (31 in-batch + hard negatives each), passages cut at 144 tokens
(SQuAD's 100-word passages: median 101 tokens with the title, 95th percentile 142), questions at
32 (99th percentile 26). The README's run uses these settings: 250 steps (4,000 of the 78k training
questions), ~5 s a step on a quiet 2-core CPU (one JAX device), validation before and after on
a seeded sample of 256 dev questions. On an accelerator use DPR's sizes instead:
``--set batch_size=128 --set num_epochs=40 --set num_steps=0``.

Inputs (environment variables, or --set):
- ``DPR_JAX_SQUAD_DPR`` (default /tmp/squad_dpr): the output directory of
  ``dpr-jax prepare-squad`` (train.biencoder.json, dev.biencoder.json).
- ``DPR_JAX_MINILM_DPR`` (default /tmp/minilm_dpr): a bi-encoder model directory made by
  ``dpr-jax convert --from-hf minilm --pooling cls --out /tmp/minilm_dpr`` ([CLS] as DPR; without
  ``--pooling`` the model keeps MiniLM's own mean pooling and cosine, see squad_minilm_round2.py).
"""

import os

from dpr_jax.retriever.task import TrainConfig

SQUAD = os.environ.get("DPR_JAX_SQUAD_DPR", "/tmp/squad_dpr")


def get_config() -> TrainConfig:
    return TrainConfig(
        name="squad_minilm",
        train_path=f"{SQUAD}/train.biencoder.json",
        dev_path=f"{SQUAD}/dev.biencoder.json",
        max_dev_examples=256,
        init_from=os.environ.get("DPR_JAX_MINILM_DPR", "/tmp/minilm_dpr"),
        batch_size=16,
        eval_batch_size=64,
        n_hard=1,
        q_max_len=32,
        p_max_len=144,
        dropout=0.1,
        dtype="float32",
        learning_rate=5e-5,  # a short run of a small model: higher than DPR's 2e-5 for bert-base
        warmup_fraction=0.1,
        num_steps=250,
        weight_decay=0.0,
        adam_eps=1e-8,
        max_grad_norm=2.0,
        seed=12345,
        log_every=10,
        eval_every=0,  # before and after only: each dev pass costs about a minute on 2 cores
        checkpoint_every=50,
        keep_checkpoints=2,
        async_checkpoint=False,
    )
