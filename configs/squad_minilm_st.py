"""DPR fine-tuning of all-MiniLM-L6-v2 on SQuAD from its own mean pooling + cosine (round 1).

``configs/squad_minilm.py``'s recipe (batch 16, one BM25 hard negative plus in-batch negatives,
passages at 144 tokens, questions at 32), but both towers start from the
sentence-transformers conversion of all-MiniLM-L6-v2 (mean pooling + L2 normalisation, what
``dpr-jax convert --from-hf`` produces without ``--pooling``) instead of [CLS] vectors. The
scores are then cosines in [-1, 1], so the softmax needs a temperature: ``scale`` 20, as
sentence-transformers' MultipleNegativesRankingLoss. The learning rate is one for fine-tuning an
already trained sentence encoder (2e-5), not the 5e-5 used from [CLS]. The model's
``normalize`` setting comes from the model directory (``init_from``), not from this file.

Train on passages cut the way the evaluation corpus is cut (``--chunking fixed`` for DPR's fixed
100-word windows)::

    dpr-jax prepare-squad --squad $DATA/squad/train-v1.1.json --out /tmp/squad_dpr --chunking fixed
    dpr-jax convert --from-hf minilm --out /tmp/minilm_st
    dpr-jax train --config configs/squad_minilm_st.py --workdir runs/retriever-st
    dpr-jax quickstart --no-reader --max-articles 0 --max-questions 0 --chunking fixed \\
        --retriever runs/retriever-st/model --workdir runs/eval-st

150 steps (2,400 of the 78k training questions, 3% of an epoch): the README's figures come from
this file as it is (measured with ``--set eval_at_start=False`` on a shared 2-core CPU, 10-20 s a
step there: 35 min; alone on 2 cores 2.8 s a step, 8 min 15 s in all, and the quickstart
evaluation above 5 min, which measured the hybrid's 82.0 / 94.6 / 97.8 / 99.0 of README again);
more steps are untried.

Round 2 (dense-mined negatives): ``configs/squad_minilm_round2.py`` with
``DPR_JAX_ROUND1=runs/retriever-st --set scale=20 --set learning_rate=2e-5``.

Inputs (environment variables, or --set):
- ``DPR_JAX_SQUAD_DPR`` (default /tmp/squad_dpr): the output directory of
  ``dpr-jax prepare-squad`` (train.biencoder.json, dev.biencoder.json).
- ``DPR_JAX_MINILM_ST`` (default /tmp/minilm_st): the mean + cosine bi-encoder made by
  ``dpr-jax convert --from-hf $MINILM --out /tmp/minilm_st``.
"""

import dataclasses
import os
from pathlib import Path

from dpr_jax.retriever.task import TrainConfig, load_config

SQUAD = os.environ.get("DPR_JAX_SQUAD_DPR", "/tmp/squad_dpr")


def get_config() -> TrainConfig:
    """configs/squad_minilm.py's recipe from the mean + cosine conversion: scale 20, lr 2e-5,
    150 steps."""
    base = load_config(Path(__file__).with_name("squad_minilm.py"))
    return dataclasses.replace(
        base,
        name="squad_minilm_st",
        train_path=f"{SQUAD}/train.biencoder.json",
        dev_path=f"{SQUAD}/dev.biencoder.json",
        init_from=os.environ.get("DPR_JAX_MINILM_ST", "/tmp/minilm_st"),
        scale=20.0,
        learning_rate=2e-5,
        num_steps=150,
    )
