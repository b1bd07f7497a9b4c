"""Round 2 of DPR fine-tuning on SQuAD: from the round-1 model, on negatives it mined itself.

DPR trains once, on BM25 hard negatives (Karpukhin et al. 2020, sec. 3.2). ANCE (Xiong et al.
2021) and RocketQA (Qu et al. 2021) then retrain on negatives retrieved by the dense model, with
the passages that contain an answer removed (they would be false negatives). Here round 1 is
``configs/squad_minilm_st.py`` (mean pooling + cosine, scale 20); its model encodes and indexes the
*training* articles' passages, ``dpr-jax mine`` retrieves 100 passages per training question,
drops the positive and every passage containing an answer (DPR's has_answer), skips the 3
highest-ranked survivors (the likeliest unlabelled positives) and keeps the next 30, then appends
the question's BM25 negative (``--existing append``), so that each step's hard negative (one per
question, drawn at random from the question's list by the batcher) is a dense-mined one about 30
times in 31::

    SQ=/tmp/squad_dpr R1=runs/retriever-st          # prepare-squad output, round-1 workdir
    dpr-jax encode --model $R1 --passages $SQ/train.passages.tsv --max-length 144 \
        --out runs/emb-train
    dpr-jax index --embeddings runs/emb-train --backend exact --out runs/index-train
    dpr-jax mine --model $R1 --index runs/index-train --passages $SQ/train.passages.tsv \
        --biencoder $SQ/train.biencoder.json --out $SQ/train.dense-mined.biencoder.json \
        --n 30 --skip 3 --depth 100 --existing append      # add --shard i/n per process
    DPR_JAX_ROUND1=$R1 dpr-jax train --config configs/squad_minilm_round2.py \
        --workdir runs/retriever-round2

README's round-2 rows come from this file as it is (fixed passages, top-1 67.97 -> 73.06 on the
held-out articles; 25.7 min of training on the shared 2-core CPU after 20.5 min of encoding and
18.6 min of mining). Everything else is round 1's recipe (batch 16, one hard negative, 150 steps, lr 2e-5, scale 20),
so the two rounds differ only in their negatives and starting point. From the [CLS] round 1
(``configs/squad_minilm.py``, DPR's dot product) use that file's settings instead:
``--set scale=1 --set learning_rate=5e-5 --set num_steps=250``.

Inputs (environment variables, or --set): ``DPR_JAX_SQUAD_DPR`` (default /tmp/squad_dpr),
``DPR_JAX_ROUND1`` (default runs/retriever-st: the round-1 training workdir or its model
directory), ``DPR_JAX_MINED`` (default $DPR_JAX_SQUAD_DPR/train.dense-mined.biencoder.json).
"""

import dataclasses
import os
from pathlib import Path

from dpr_jax.retriever.task import TrainConfig, load_config

SQUAD = os.environ.get("DPR_JAX_SQUAD_DPR", "/tmp/squad_dpr")


def get_config() -> TrainConfig:
    """configs/squad_minilm_st.py's recipe, from round 1 on the dense-mined negatives
    (shuffle_hard: each epoch draws a question's hard negative from its whole mined list)."""
    round1 = load_config(Path(__file__).with_name("squad_minilm_st.py"))
    return dataclasses.replace(
        round1,
        name="squad_minilm_round2",
        train_path=os.environ.get("DPR_JAX_MINED", f"{SQUAD}/train.dense-mined.biencoder.json"),
        init_from=os.environ.get("DPR_JAX_ROUND1", "runs/retriever-st"),
        shuffle_hard=True,
    )
