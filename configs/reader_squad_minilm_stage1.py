"""Reader recipe, stage 1 of 2: SQuAD reading comprehension on gold passages (issue 21, item 2).

Karpukhin et al. 2020, sec. 6.1 train the reader on passages retrieved for each training
question; a small model learns span extraction faster when it first reads the gold passage
alone, so this recipe splits it in two (as DPR's SQuAD experiments start from a BERT that already
reads): stage 1 (this file) learns spans on every SQuAD training question's gold 100-word
passage (one passage per question: no selection loss); stage 2
(``configs/reader_squad_minilm_stage2.py``) starts from stage 1's model and learns to select the
answer-bearing passage among retrieved ones.

Data: ``dpr-jax prepare-squad`` (train/dev split by article; the dev articles are never seen)::

    dpr-jax prepare-squad --squad ../shared/data/squad/train-v1.1.json --out $SQUAD_DPR \
        --chunking fixed   # DPR's fixed 100-word passages, as the README's figures
    dpr-jax train-reader --config configs/reader_squad_minilm_stage1.py \\
        --train $SQUAD_DPR/train.biencoder.json --dev $SQUAD_DPR/dev.biencoder.json \\
        --workdir runs/reader-s1

Resumable: run the same command again and it continues from the latest checkpoint (every 200
steps; the batches are a pure function of the step). Two epochs over the ~78k training questions
with a positive: 4,890 steps of 32, in batches of similar lengths (``length_groups=20``), each
padded to its longest sequence (``bucket``). The second epoch raised gold-passage EM to about the
goal of 65, not clearly above it: one epoch (the GPU run in README) read 62.4 EM on the 500 dev questions of the
stage-1 evaluation; two epochs on a 2-core CPU read 62.4 / 65.2 / 68.4 / 66.8 at steps 2,000 /
3,000 / 4,000 / 4,890, and 65.4 on all 8,303 validation gold passages (95% interval [64.4,
66.4]; README). On a GPU a few minutes (``scripts/gpu_session.sh`` runs both
stages and the evaluation on one lent GPU), on a 2-core CPU ~2.9 s a step, ~4 hours
(``scripts/bench_reader_lengths.py``: 2.6 s a step vs 4.95 padded to 256 and ungrouped).
``--set num_epochs=1.0 --set length_groups=0`` is the earlier one-epoch recipe. On a CPU
with AMX or avx512_bf16, ``--set matmul_dtype=bfloat16`` (bfloat16 inputs to the Dense products,
float32 accumulation) makes a step 1.39x faster (README, "bfloat16 products in float32 training").
"""

from dpr_jax.reader.task import ReaderTrainConfig


def get_config() -> ReaderTrainConfig:
    return ReaderTrainConfig(
        name="reader_squad_minilm_stage1",
        data_format="biencoder",
        max_train_examples=0,  # every training question
        max_dev_examples=500,
        batch_size=32,
        passages_per_question=1,  # the gold passage alone
        max_negatives=0,
        max_length=256,  # question (<= 32 pieces) + title + a 100-word passage, uncut
        max_question_length=32,
        init_from="minilm",
        learning_rate=1e-4,
        warmup_fraction=0.1,
        num_epochs=2.0,
        length_groups=20,  # batches of similar lengths (HF group_by_length)
        weight_decay=0.01,
        max_grad_norm=1.0,
        eval_passages=1,
        eval_top_k=(1,),
        eval_batch_size=64,
        log_every=20,
        eval_every=1000,
        checkpoint_every=200,
        keep_checkpoints=2,
        seed=12345,
    )
