"""Reader recipe, stage 2 of 2: DPR's multi-passage training (Karpukhin et al. 2020, sec. 6.1),
starting from stage 1's reader (``configs/reader_squad_minilm_stage1.py``).

Each training question reads its gold passage among 7 retrieved passages without the answer (the
BM25 hard negatives ``dpr-jax prepare-squad`` mined; a retrieval-results JSON of the training
questions from the repo's best retriever works the same way: ``--train RESULTS.json``, with
``data_format`` auto), so the relevance head learns to pick the answer-bearing passage. Dev: the
held-out articles' questions with the passages a retriever returned for them (retrieval-results
JSON, in retrieval order), EM at k = 1, 5, 20::

    READER_STAGE1=runs/reader-s1 dpr-jax train-reader \\
        --config configs/reader_squad_minilm_stage2.py \\
        --train $SQUAD_DPR/train.biencoder.json --dev DEV_RESULTS.json --workdir runs/reader-s2

``init_from`` reads ``$READER_STAGE1/model`` (stage 1's exported model). Resumable like stage 1.
2,000 steps of 8 questions x 8 passages x 256 tokens: GPU/TPU-sized.
"""

from dpr_jax.reader.task import ReaderTrainConfig


def get_config() -> ReaderTrainConfig:
    return ReaderTrainConfig(
        name="reader_squad_minilm_stage2",
        data_format="auto",
        max_train_examples=0,
        max_dev_examples=500,
        batch_size=8,
        passages_per_question=8,  # the positive + 7 retrieved negatives
        max_negatives=10,
        max_length=256,
        max_question_length=32,
        init_from="$READER_STAGE1/model",
        learning_rate=3e-5,
        warmup_fraction=0.05,
        num_steps=2000,
        weight_decay=0.01,
        max_grad_norm=1.0,
        eval_passages=20,
        eval_top_k=(1, 5, 20),
        eval_batch_size=64,
        log_every=20,
        eval_every=500,
        checkpoint_every=200,
        keep_checkpoints=2,
        seed=12345,
    )
