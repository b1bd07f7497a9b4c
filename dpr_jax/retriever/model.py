"""DPR's bi-encoder: a question tower E_Q and a passage tower E_P (Karpukhin et al. 2020, sec. 3.1).

sim(q, p) = E_Q(q)^T E_P(p), where each tower is a BERT whose representation is the [CLS] vector
(optionally mean pooling or the BERT pooler, and an optional linear projection, DPR's
``encode_proj``). The towers are separate by default; ``shared=True`` uses one BERT for both (the
"single encoder" variant of DPR's ablations).

Parameter tree (names mirror Hugging Face's DPR classes, for conversion)::

    {"question_encoder": {"bert_model": <BertModule>, ["encode_proj": Dense]},
     "ctx_encoder":      {"bert_model": <BertModule>, ["encode_proj": Dense]}}   # absent if shared
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpr_jax.models.bert import BertConfig, BertModule

POOLINGS = ("cls", "mean", "pooler")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Everything that fixes a bi-encoder's parameters and outputs, besides the BERT itself."""

    bert: BertConfig
    shared: bool = False
    pooling: str = "cls"
    projection_dim: int = 0  # 0: no encode_proj
    add_pooling_layer: bool = False  # keep a BERT pooler (needed for pooling="pooler")

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} not in {POOLINGS}")
        if self.pooling == "pooler" and not self.add_pooling_layer:
            raise ValueError("pooling='pooler' needs add_pooling_layer=True")
        if self.projection_dim < 0:
            raise ValueError(f"projection_dim must be >= 0, got {self.projection_dim}")

    @property
    def embedding_dim(self) -> int:
        return self.projection_dim or self.bert.hidden_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bert"] = self.bert.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        d = dict(d)
        return cls(bert=BertConfig.from_dict(d.pop("bert")), **d)


class Encoder(nn.Module):
    """One tower: BERT -> pooled vector (B, D) -> optional encode_proj. Output is float32."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True, dropout_rows=None):
        cfg = self.config
        # DPR's convention: token_type_ids are all zero, also for "title [SEP] text" passages.
        out = BertModule(
            cfg.bert, self.dtype, add_pooling_layer=cfg.add_pooling_layer, remat=self.remat,
            name="bert_model",
        )(
            input_ids, attention_mask, jnp.zeros_like(input_ids), deterministic=deterministic,
            # [CLS] and pooler pooling read position 0 alone: the last layer computes only it
            first_token_only=cfg.pooling != "mean", dropout_rows=dropout_rows,
        )  # fmt: skip
        h = out.last_hidden_state  # (B, T, H), or (B, 1, H) with first_token_only
        if cfg.pooling == "cls":
            v = h[:, 0]
        elif cfg.pooling == "mean":
            m = attention_mask.astype(h.dtype)[..., None]  # (B, T, 1)
            v = (h * m).sum(1) / jnp.maximum(m.sum(1), 1)
        else:
            v = out.pooler_output
        if cfg.projection_dim:
            v = nn.Dense(
                cfg.projection_dim, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(cfg.bert.initializer_range), name="encode_proj",
            )(v)  # fmt: skip
        return v.astype(jnp.float32)


class BiEncoder(nn.Module):
    """Question and passage towers. ``__call__`` encodes both (used by ``init``)."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.question_encoder = Encoder(self.config, self.dtype, self.remat)
        if not self.config.shared:
            self.ctx_encoder = Encoder(self.config, self.dtype, self.remat)

    def encode_question(self, input_ids, attention_mask, deterministic=True, dropout_rows=None):
        return self.question_encoder(input_ids, attention_mask, deterministic, dropout_rows)

    def encode_passage(self, input_ids, attention_mask, deterministic=True, dropout_rows=None):
        tower = self.question_encoder if self.config.shared else self.ctx_encoder
        return tower(input_ids, attention_mask, deterministic, dropout_rows)

    def __call__(self, q_ids, q_mask, p_ids, p_mask, deterministic: bool = True):
        return (
            self.encode_question(q_ids, q_mask, deterministic),
            self.encode_passage(p_ids, p_mask, deterministic),
        )


def init_biencoder_params(config: EncoderConfig, rng: jax.Array) -> dict:
    ids = jnp.zeros((1, 8), jnp.int32)
    mask = jnp.ones((1, 8), jnp.int32)
    return BiEncoder(config).init(rng, ids, mask, ids, mask)["params"]


def similarity(q: jax.Array, p: jax.Array) -> jax.Array:
    """Dot-product similarity. (Nq, D) . (Np, D)^T -> (Nq, Np)."""
    return jnp.einsum("qd,pd->qp", q, p)
