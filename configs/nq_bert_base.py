"""DPR's single-dataset Natural Questions retriever (Karpukhin et al. 2020, sec. 5.2 and 6.1).

Matches ``facebookresearch/DPR`` ``conf/train/biencoder_nq.yaml`` + ``conf/encoder/hf_bert.yaml``:
two bert-base-uncased towers, [CLS] representation, no projection, dropout 0.1; global batch 128
(DPR: 16 per GPU x 8 GPUs), one BM25 hard negative per question plus in-batch negatives
(``hard_negatives: 1, other_negatives: 0``), AdamW lr 2e-5, betas (0.9, 0.999), eps 1e-8, weight
decay 0, linear warmup over 1237 steps then linear decay, gradient-norm clipping 2.0, 40 epochs,
validation once per epoch; passages up to 256 tokens (``sequence_length: 256``).

Differences: questions are padded to 64 tokens instead of 256 (attention masks padding, so the
vectors are the same for questions of <= 64 tokens, i.e. all NQ questions); the last incomplete
batch of an epoch is dropped; our "pool" validation ranks each positive among the positives and
the one hard negative of all dev questions, where DPR's ``val_av_rank`` (from epoch 30) adds 30
hard and 30 other negatives per question.

Inputs (environment variables, or --set):
- ``DPR_JAX_BERT_BASE``: a bi-encoder model directory with both towers from bert-base-uncased,
  made by ``dpr-jax convert --from-hf bert-base-uncased --out DIR``.
- ``DPR_JAX_NQ``: directory of DPR's ``biencoder-nq-train.json`` and ``biencoder-nq-dev.json``
  (``python -m dpr.data.download_data --resource data.retriever.nq``).
"""

import os

from dpr_jax.retriever.task import TrainConfig

NQ = os.environ.get("DPR_JAX_NQ", "~/dpr_data/retriever")


def get_config() -> TrainConfig:
    return TrainConfig(
        name="nq_bert_base",
        train_path=f"{NQ}/biencoder-nq-train.json",
        dev_path=f"{NQ}/biencoder-nq-dev.json",
        init_from=os.environ.get("DPR_JAX_BERT_BASE", "~/dpr_models/bert-base-uncased-biencoder"),
        # the architecture init_from holds: `dpr-jax plan` uses it where the weights are not
        # (planning comes before downloading); training reads init_from's own
        model={"bert": "bert-base-uncased", "pooling": "cls"},
        batch_size=128,
        eval_batch_size=128,
        n_hard=1,
        q_max_len=64,
        p_max_len=256,
        dropout=0.1,
        dtype="bfloat16",  # float32 master weights; DPR trained in fp32 (fp16 optional)
        learning_rate=2e-5,
        warmup_steps=1237,
        num_epochs=40,
        weight_decay=0.0,
        adam_eps=1e-8,
        max_grad_norm=2.0,
        seed=12345,
        log_every=10,
        eval_every=460,  # ~one epoch: 58,880 training questions with positives / 128
        checkpoint_every=460,
        keep_checkpoints=3,
    )
