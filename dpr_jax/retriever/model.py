"""DPR's bi-encoder: a question tower E_Q and a passage tower E_P (Karpukhin et al. 2020, sec. 3.1).

sim(q, p) = E_Q(q)^T E_P(p), where each tower is a BERT whose representation is the [CLS] vector
(optionally mean pooling or the BERT pooler, and an optional linear projection, DPR's
``encode_proj``). The towers are separate by default; ``shared=True`` uses one BERT for both (the
"single encoder" variant of DPR's ablations).

``normalize=True`` L2-normalises each tower's output, so that the dot product is the cosine
similarity, as contrastive sentence encoders are trained (sentence-transformers' ``Normalize``
module; Reimers & Gurevych 2019): all-MiniLM-L6-v2 is mean pooling + normalisation. Training
such a model multiplies the cosine by a scale (1 / temperature; ``TrainConfig.scale``, 20 in
sentence-transformers' MultipleNegativesRankingLoss); DPR itself (``normalize=False``) scores
with the raw dot product.

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

from dpr_jax.errors import UserError
from dpr_jax.models.bert import BertConfig, BertModule
from dpr_jax.models.fsdp import FsdpGather, fsdp_wrap
from dpr_jax.models.kind import ModelKind, without_pooler

POOLINGS = ("cls", "mean", "pooler")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Everything that fixes a bi-encoder's parameters and outputs, besides the BERT itself."""

    bert: BertConfig
    shared: bool = False
    pooling: str = "cls"
    projection_dim: int = 0  # 0: no encode_proj
    add_pooling_layer: bool = False  # keep a BERT pooler (needed for pooling="pooler")
    normalize: bool = False  # L2-normalise the output vector (dot product = cosine)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise UserError(f"pooling {self.pooling!r} not in {POOLINGS}")
        if self.pooling == "pooler" and not self.add_pooling_layer:
            raise UserError("pooling='pooler' needs add_pooling_layer=True")
        if self.projection_dim < 0:
            raise UserError(f"projection_dim must be >= 0, got {self.projection_dim}")
        if not isinstance(self.normalize, bool):
            raise UserError(f"normalize must be true or false, got {self.normalize!r}")

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
    """One tower: BERT -> pooled vector (B, D) -> optional encode_proj -> optional L2
    normalisation. Output is float32."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    remat: bool = False
    fsdp: FsdpGather | None = None  # parameters arrive as FSDP shards (dpr_jax.models.fsdp)
    matmul_dtype: Any = None  # training: the Dense products' input dtype (BertModule)

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True, dropout_rows=None):
        cfg = self.config
        # DPR's convention: token_type_ids are all zero, also for "title [SEP] text" passages.
        out = BertModule(
            cfg.bert, self.dtype, add_pooling_layer=cfg.add_pooling_layer, remat=self.remat,
            fsdp=self.fsdp, matmul_dtype=self.matmul_dtype, name="bert_model",
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
            v = fsdp_wrap(self.fsdp, nn.Dense, self, "encode_proj")(
                cfg.projection_dim, dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(cfg.bert.initializer_range), name="encode_proj",
            )(v)  # fmt: skip
        v = v.astype(jnp.float32)
        if cfg.normalize:
            v = l2_normalize(v)
        return v


class BiEncoder(nn.Module):
    """Question and passage towers. ``__call__`` encodes both (used by ``init``)."""

    config: EncoderConfig
    dtype: Any = jnp.float32
    remat: bool = False
    fsdp: FsdpGather | None = None  # see Encoder
    matmul_dtype: Any = None  # see Encoder

    def setup(self):
        args = (self.config, self.dtype, self.remat, self.fsdp, self.matmul_dtype)
        self.question_encoder = Encoder(*args)
        if not self.config.shared:
            self.ctx_encoder = Encoder(*args)

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


def _passage_tower(config: EncoderConfig, params: dict) -> tuple[dict, str]:
    """The passage tower's BERT (a reader reads passages, as this tower does)."""
    tower = "question_encoder" if config.shared else "ctx_encoder"
    return without_pooler(params[tower]["bert_model"]), tower


BIENCODER = ModelKind(
    name="biencoder",
    config_from_dict=EncoderConfig.from_dict,
    config_to_dict=EncoderConfig.to_dict,
    init=init_biencoder_params,
    bert_of=lambda c: c.bert,
    bert_body=_passage_tower,
)


def l2_normalize(v: jax.Array, eps: float = 1e-12) -> jax.Array:
    """v / max(||v||, eps) along the last axis (torch.nn.functional.normalize, which
    sentence-transformers' Normalize calls): a zero vector stays zero, the gradient stays finite."""
    # max(||v||, eps) as sqrt(max(||v||^2, eps^2)): no sqrt'(0) = inf for a zero row
    norm = jnp.sqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), eps * eps))  # (B, 1)
    return v / norm


def similarity(q: jax.Array, p: jax.Array) -> jax.Array:
    """Dot-product similarity (the cosine for ``normalize=True`` towers). (Nq, D) . (Np, D)^T
    -> (Nq, Np)."""
    return jnp.einsum("qd,pd->qp", q, p)
