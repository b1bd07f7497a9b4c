"""DPR's extractive reader (Karpukhin et al. 2020, sec. 6.1; Hugging Face ``DPRReader``).

Each (question, passage) pair is encoded as ``[CLS] question [SEP] title [SEP] text`` by BERT.
From the token representations P_i:
    start/end logits  = P_i w_start, P_i w_end          (``qa_outputs``: Dense(H -> 2))
    relevance logit   = P_[CLS] w_selected              (``qa_classifier``: Dense(H -> 1))
Parameter tree mirrors ``DPRReader.span_predictor``: {"encoder": {"bert_model": ...},
"qa_outputs": ..., "qa_classifier": ...}.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpr_jax.models.bert import BertConfig, BertModule, cpu_mixed_inference
from dpr_jax.models.kind import ModelKind


class ReaderOutput(NamedTuple):
    start_logits: jax.Array  # (N, M, T)
    end_logits: jax.Array  # (N, M, T)
    relevance_logits: jax.Array  # (N, M)


class ReaderEncoder(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False
    matmul_dtype: Any = None  # BertModule's

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool):
        return BertModule(
            self.config, self.dtype, add_pooling_layer=False, remat=self.remat,
            matmul_dtype=self.matmul_dtype, name="bert_model",
        )(
            input_ids, attention_mask, jnp.zeros_like(input_ids), deterministic=deterministic,
            float32_output=True,  # in mixed inference on a CPU: the heads read float32
        )  # fmt: skip


class Reader(nn.Module):
    """Input (N questions, M passages each, T tokens) -> start/end (N, M, T), relevance (N, M)."""

    config: BertConfig
    dtype: Any = jnp.float32
    remat: bool = False
    matmul_dtype: Any = None  # training: the encoder's Dense products' input dtype (BertModule)

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True) -> ReaderOutput:
        n, m, t = input_ids.shape
        flat = lambda x: x.reshape(n * m, t)
        h = ReaderEncoder(self.config, self.dtype, self.remat, self.matmul_dtype, name="encoder")(
            flat(input_ids), flat(attention_mask), deterministic
        ).last_hidden_state  # (N*M, T, H)
        init = nn.initializers.normal(self.config.initializer_range)
        # mixed inference on a CPU (cpu_mixed_inference): h and the heads in float32
        heads = jnp.float32 if cpu_mixed_inference(self.dtype, deterministic) else self.dtype
        # (N*M, T, H) . (H, 2) -> (N*M, T, 2)
        logits = nn.Dense(2, dtype=heads, param_dtype=jnp.float32, kernel_init=init,
                          name="qa_outputs")(h).astype(jnp.float32)  # fmt: skip
        # (N*M, H) . (H, 1) -> (N*M, 1)
        rel = nn.Dense(1, dtype=heads, param_dtype=jnp.float32, kernel_init=init,
                       name="qa_classifier")(h[:, 0]).astype(jnp.float32)  # fmt: skip
        return ReaderOutput(
            logits[..., 0].reshape(n, m, t), logits[..., 1].reshape(n, m, t), rel.reshape(n, m)
        )


def init_reader_params(config: BertConfig, rng: jax.Array) -> dict:
    ids = jnp.zeros((1, 1, 8), jnp.int32)
    return Reader(config).init(rng, ids, jnp.ones_like(ids))["params"]


READER = ModelKind(
    name="reader",
    config_from_dict=lambda d: BertConfig.from_dict(d["bert"]),
    config_to_dict=lambda c: {"bert": c.to_dict()},
    init=init_reader_params,
    bert_of=lambda c: c,
    bert_body=lambda c, params: (params["encoder"]["bert_model"], "encoder"),
)
