"""BERT in Flax (linen), numerically the Hugging Face PyTorch ``BertModel``.

DPR (Karpukhin et al. 2020, section 3.1) uses two independent BERT-base encoders and takes the
representation at the [CLS] token. This module is the BERT both towers and the reader stand on:
embeddings (word + position + token type, LayerNorm), N post-LayerNorm transformer layers with
exact (erf) GELU, an optional tanh pooler. Parameter names mirror Hugging Face's state-dict names
(``embeddings/word_embeddings``, ``encoder/layer_3/attention/self/query`` ...) so conversion is
a rename plus a transpose of every Dense kernel.

Precision: parameters are always float32 (``param_dtype``); ``dtype`` is the compute dtype
(float32 or bfloat16). In bfloat16, softmax and LayerNorm statistics are still taken in float32;
inference in bfloat16 on XLA:CPU runs mixed (float32 activations, bfloat16 products accumulated
in float32: :func:`cpu_mixed_inference`). Inference attention on XLA:CPU runs one (example, head)
block at a time (:func:`_looped_attention`), or batched in mixed inference while a device's
scores are small (``BATCHED_CPU_ATTENTION_BYTES``): the same numbers either way.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpr_jax.errors import UserError
from dpr_jax.io import read_json_object
from dpr_jax.models.fsdp import FsdpGather, fsdp_wrap
from dpr_jax.models.kind import ModelKind, without_pooler

Array = jax.Array

# Fields of Hugging Face's BertConfig that change the computation. Anything else in a
# config.json (architectures, transformers_version, ...) is kept aside in `extra` on load.
_HF_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "initializer_range",
    "pad_token_id",
)


# The architectures of well-known checkpoints (their Hugging Face config.json fields), so that a
# config can name the model it fine-tunes without the weights being here.
PRESETS: dict[str, dict[str, Any]] = {
    "bert-base-uncased": dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12,
                              num_attention_heads=12, intermediate_size=3072),
    "bert-large-uncased": dict(vocab_size=30522, hidden_size=1024, num_hidden_layers=24,
                               num_attention_heads=16, intermediate_size=4096),
    "all-MiniLM-L6-v2": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                             num_attention_heads=12, intermediate_size=1536),
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The architecture of a BERT; reads and writes Hugging Face ``config.json``."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise UserError(
                f"hidden_size {self.hidden_size} is not a multiple of "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(
                f"hidden_act {self.hidden_act!r} is not supported (have {sorted(_ACTIVATIONS)})"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> BertConfig:
        """From a Hugging Face config dict (extra keys ignored, missing keys take BERT defaults),
        or a named architecture of :data:`PRESETS` (``"bert-base-uncased"``, or
        ``{"preset": "bert-base-uncased", ...}`` with fields that override it): what
        ``dpr-jax plan`` needs to plan a model whose weights are not on this machine."""
        if isinstance(d, str):
            d = {"preset": d}
        if "preset" in d:
            name = d["preset"]
            if name not in PRESETS:
                raise UserError(f"unknown BERT preset {name!r} (have {sorted(PRESETS)})")
            d = {**PRESETS[name], **{k: v for k, v in d.items() if k != "preset"}}
        pet = d.get("position_embedding_type", "absolute")
        if pet != "absolute":
            raise UserError(f"position_embedding_type {pet!r} is not supported (only 'absolute')")
        return cls(**{k: d[k] for k in _HF_FIELDS if k in d})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_dict(self, architectures: list[str] | None = None) -> dict[str, Any]:
        d = {"model_type": "bert", **self.to_dict(), "position_embedding_type": "absolute"}
        if architectures:
            d["architectures"] = architectures
        return d

    @classmethod
    def from_json_file(cls, path: str | Path) -> BertConfig:
        path = Path(path)
        d = read_json_object(path, error=UserError, missing="config file not found")
        # DPR configs from transformers nest nothing, but be lenient with {"bert": {...}} layouts.
        try:
            return cls.from_dict(d)
        except TypeError as e:
            raise UserError(f"{path}: bad BERT config ({e})") from None


def _gelu_erf(x: Array) -> Array:
    """Exact GELU, x * Phi(x) = x/2 (1 + erf(x / sqrt 2)) (BERT's "gelu"). The same function as
    ``jax.nn.gelu(approximate=False)``, which goes through erfc: XLA:CPU's erf is the cheaper of
    the two on MiniLM's (4096, 1536) intermediate activations."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(math.sqrt(0.5), x.dtype)))


_ACTIVATIONS = {
    "gelu": _gelu_erf,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


class BertOutput(NamedTuple):
    last_hidden_state: Array  # (B, T, H)
    pooler_output: Array | None  # (B, H)
    hidden_states: tuple[Array, ...] | None  # embeddings + every layer, each (B, T, H)


def cpu_mixed_inference(dtype, deterministic: bool) -> bool:
    """Inference in a 16-bit ``dtype`` on XLA:CPU runs mixed: activations, LayerNorm, GELU and
    softmax in float32, only the matrix products' inputs rounded to ``dtype`` (float32
    accumulation; :func:`_dot_rounding_inputs`), as ``torch.autocast`` does. On XLA:CPU that is
    the fast form (2-core AMD EPYC with avx512_bf16, MiniLM shapes): a bfloat16 x bfloat16 ->
    float32 product runs at ~360-400 GFLOP/s through its YNNPACK kernels, a bfloat16 ->
    bfloat16 one at ~190 (float32's rate), and bfloat16 elementwise work (GELU, LayerNorm) at
    a third to a half of float32's speed. Training and the other backends keep the dtype
    throughout (the planner's TPU figures, remat's saved products)."""
    return deterministic and jnp.dtype(dtype) != jnp.float32 and jax.default_backend() == "cpu"


def mixed_inference_params(params: Any, dtype) -> Any:
    """The parameters to run inference in ``dtype`` with: where that inference runs mixed
    (:func:`cpu_mixed_inference`), ``params`` with the kernels whose products it rounds to
    ``dtype`` (every Dense of the encoder layers, and the pooler) stored in ``dtype``: the same
    numbers, since :func:`_dot_rounding_inputs` rounds them to it anyway, without converting
    ~10M weights on every call (on each device). Everything else (embeddings, biases, LayerNorm,
    the heads, which read float32) is left as it is; elsewhere ``params`` itself. For inference
    only: nothing is trained from these."""
    if not cpu_mixed_inference(dtype, deterministic=True):
        return params
    low = jnp.dtype(dtype)

    def leaf(path, x):
        keys = [getattr(k, "key", None) for k in path]
        rounded = keys[-1] == "kernel" and any(
            isinstance(k, str) and (k.startswith("encoder_layer_") or k == "pooler_dense")
            for k in keys
        )
        return x.astype(low) if rounded and x.dtype == jnp.float32 else x

    return jax.tree_util.tree_map_with_path(leaf, params)


@functools.cache
def _dot_rounding_inputs(dtype_name: str):
    """``lax.dot_general`` with both inputs rounded to ``dtype_name`` and the product
    accumulated and returned in float32. Cached: one function per dtype, so Dense modules
    holding it compare equal."""
    low = jnp.dtype(dtype_name)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        return jax.lax.dot_general(
            lhs.astype(low),
            rhs.astype(low),
            dimension_numbers,
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    return dot_general


@functools.cache
def _trainable_products(dtype_name: str):
    """A Dense layer's ``dot_general`` for training with ``matmul_dtype`` (:class:`BertModule`):
    all three of its products (forward, input gradient, kernel gradient) take their inputs
    rounded to ``dtype_name`` and accumulate and return float32, the form
    :func:`_dot_rounding_inputs` gives inference, now with a backward pass of the same form (a
    custom VJP: autodiff would multiply the float32 incoming gradient in float32). The input is
    flattened to (rows, K) first: XLA:CPU has no bfloat16 x bfloat16 -> float32 kernel for the kernel
    gradient of a 3-D input (two contracting dimensions; "Unsupported element type for
    DotThunk"). Cached: one function per dtype, so Dense modules holding it compare equal."""
    low = jnp.dtype(dtype_name)
    nt, tn, nn_ = (((1,), (0,)), ((), ())), (((1,), (1,)), ((), ())), (((0,), (0,)), ((), ()))

    def product(a, b, dims):
        return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)

    @jax.custom_vjp
    def matmul(a, w):  # (N, K) . (K, F) -> (N, F), float32
        return product(a.astype(low), w.astype(low), nt)

    def forward(a, w):
        a16, w16 = a.astype(low), w.astype(low)
        # zero-size markers carry the inputs' dtypes to the backward pass
        return product(a16, w16, nt), (a16, w16, jnp.zeros(0, a.dtype), jnp.zeros(0, w.dtype))

    def backward(res, g):
        a16, w16, a_dt, w_dt = res
        g16 = g.astype(low)
        da = product(g16, w16, tn)  # (N, F) . (K, F)^T -> (N, K)
        dw = product(a16, g16, nn_)  # (N, K)^T . (N, F) -> (K, F)
        return da.astype(a_dt.dtype), dw.astype(w_dt.dtype)

    matmul.defvjp(forward, backward)

    def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
        if rhs.ndim != 2 or dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())):
            raise ValueError(f"not a Dense layer's product: {dimension_numbers}")
        out = matmul(lhs.reshape(-1, lhs.shape[-1]), rhs)
        return out.reshape(*lhs.shape[:-1], rhs.shape[1])

    return dot_general


def _dot_general(dot_dtype, products=None):
    """The ``dot_general`` of a Dense: in mixed inference (``dot_dtype`` set) its inputs rounded
    to ``dot_dtype``; in training with ``matmul_dtype`` (``products`` set) every product of its
    forward and backward passes in that form (:func:`_trainable_products`); ``None`` (Flax's
    own) otherwise."""
    if dot_dtype is not None:
        return _dot_rounding_inputs(jnp.dtype(dot_dtype).name)
    return None if products is None else _trainable_products(jnp.dtype(products).name)


def _einsum(spec: str, a: Array, b: Array, dot_dtype) -> Array:
    """``jnp.einsum``; with ``dot_dtype`` (mixed inference) its inputs rounded to it and the
    result in float32."""
    if dot_dtype is None:
        return jnp.einsum(spec, a, b)
    return jnp.einsum(
        spec, a.astype(dot_dtype), b.astype(dot_dtype), preferred_element_type=jnp.float32
    )


def _dense(
    config: BertConfig, features: int, name: str, dtype, dot_dtype=None, products=None
) -> nn.Dense:
    """``dot_dtype`` (mixed inference, ``dtype`` float32): the kernel's products take their
    inputs rounded to it (:func:`cpu_mixed_inference`). ``products`` (training with
    ``matmul_dtype``): so do the backward pass's (:func:`_trainable_products`)."""
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.initializers.normal(config.initializer_range),
        dot_general=_dot_general(dot_dtype, products),
        name=name,
    )


def _layer_norm(config: BertConfig, name: str, dtype) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=config.layer_norm_eps, dtype=dtype, param_dtype=jnp.float32, name=name
    )


def _mix32(x: Array) -> Array:
    """A bijective 32-bit integer hash (lowbias32: xor-shift / multiply rounds)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep_mask(
    key: Array, shape: tuple[int, ...], rate: float, rows: Array | None = None
) -> Array:
    """Keep mask of inverted dropout (True with probability 1 - rate, to within 2^-32).

    Counter-based: element i keeps iff hash(i, seed) >= rate * 2^32, the 64-bit seed drawn
    from ``key`` by one threefry call. Drawing every element from threefry
    (``jax.random.bernoulli``, what ``flax.linen.Dropout`` does) costs ~20 ns per element on a
    CPU, a quarter of a MiniLM training step (scripts/bench_train.py); the hash costs ~0.5 ns
    and fuses into the surrounding ops.

    ``rows`` (shape[0],) integers: row b's mask depends only on ``key``, ``rows[b]`` and
    ``shape[1:]``, not on the other rows. The train step passes each example's index in the
    global batch, so that the masks, and hence the step, are the same on any number of devices
    and with any gradient-cache chunking. Without ``rows`` the mask depends on the key and the
    whole shape.
    """
    if rows is not None and rows.shape != shape[:1]:
        raise UserError(f"dropout rows {rows.shape} do not match the leading axis of {shape}")
    counted = shape if rows is None else shape[1:]  # what the element counter runs over
    n = math.prod(counted)
    if n >= 2**32:
        per_row = "" if rows is None else " per row"
        raise UserError(
            f"dropout over {n} elements{per_row}: more than the 2^32 the counter can index"
        )
    s0, s1 = jax.random.bits(key, (2,), jnp.uint32)
    x = _mix32(jax.lax.iota(jnp.uint32, n).reshape(counted) * jnp.uint32(0x9E3779B9) + s0)
    if rows is None:
        seed = s1
    else:  # one seed per row, broadcast along the row
        seed = _mix32(rows.astype(jnp.uint32) * jnp.uint32(0x85EBCA6B) + s1)  # (B,)
        seed = seed.reshape(shape[:1] + (1,) * (len(shape) - 1))
    return _mix32(x ^ seed) >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))


class Dropout(nn.Module):
    """Inverted dropout (``flax.linen.Dropout``'s semantics and its "dropout" rng stream) with
    a hashed mask (:func:`dropout_keep_mask`; ``rows``: per-row masks, see there)."""

    rate: float

    @nn.compact
    def __call__(self, x: Array, deterministic: bool, rows: Array | None = None) -> Array:
        if deterministic or self.rate == 0.0:
            return x
        if self.rate >= 1.0:
            return jnp.zeros_like(x)
        keep = dropout_keep_mask(self.make_rng("dropout"), x.shape, self.rate, rows)
        return jnp.where(keep, x / jnp.asarray(1.0 - self.rate, x.dtype), jnp.zeros_like(x))


class BertEmbeddings(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool, rows=None):
        cfg = self.config
        init = nn.initializers.normal(cfg.initializer_range)

        def embed(num, name):
            return nn.Embed(
                num, cfg.hidden_size, embedding_init=init, dtype=self.dtype,
                param_dtype=jnp.float32, name=name,
            )  # fmt: skip

        x = (
            embed(cfg.vocab_size, "word_embeddings")(input_ids)
            + embed(cfg.max_position_embeddings, "position_embeddings")(position_ids)
            + embed(cfg.type_vocab_size, "token_type_embeddings")(token_type_ids)
        )
        x = _layer_norm(cfg, "LayerNorm", self.dtype)(x)
        return Dropout(cfg.hidden_dropout_prob)(x, deterministic, rows)


def _looped_attention(q, k, v, key_mask, dtype, dot_dtype=None):
    """Inference attention on CPU, one (example, head) block at a time: the batched numbers.

    Batched, XLA:CPU writes the (B, H, T, S) scores to memory and passes over them several times
    (scale, mask, softmax, product); a (T, S) block at a time stays in cache: 3-4x faster
    attention, ~1.4x faster MiniLM passage encoding on a 2-core CPU (scripts/bench_encode.py).
    Each step takes G = gcd(B, device_count) examples strided across the batch (example
    i * B/G + j is row i of step j), so a batch sharded over devices stays sharded: a scan over
    the sharded axis itself would all-gather it.
    """
    b, t, h, dh = q.shape
    g = math.gcd(b, jax.device_count())
    n = b // g

    def split(x):  # (B, T, H, Dh) -> (n*H, G, T, Dh)
        return x.reshape(g, n, t, h, dh).transpose(1, 3, 0, 2, 4).reshape(n * h, g, t, dh)

    mask = key_mask.reshape(g, n, t).transpose(1, 0, 2)  # (n, G, S)
    mask = jnp.broadcast_to(mask[:, None], (n, h, g, t)).reshape(n * h, g, t)

    def step(args):
        q, k, v, m = args  # (G, T, Dh) x 3, (G, S)
        # (G, T, Dh) . (G, S, Dh) -> (G, T, S)
        scores = _einsum("gtd,gsd->gts", q, k, dot_dtype) / jnp.sqrt(dh).astype(dtype)
        scores = jnp.where(m[:, None, :], scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        # (G, T, S) . (G, S, Dh) -> (G, T, Dh)
        return _einsum("gts,gsd->gtd", probs, v, dot_dtype).astype(dtype)

    ctx = jax.lax.map(step, (split(q), split(k), split(v), mask))  # (n*H, G, T, Dh)
    return ctx.reshape(n, h, g, t, dh).transpose(2, 0, 3, 1, 4).reshape(b, t, h * dh)


# Mixed inference on XLA:CPU (cpu_mixed_inference) reads attention batched, not looped, while each
# device's float32 scores, (rows, H, T, S), fit in this many bytes and it holds at least this many
# rows: scripts/bench_attention.py (MiniLM-L6's shapes, 2-core AMD EPYC, 4 and 8 XLA CPU devices)
# measured the whole forward pass 3-17% faster batched for 0.9-8.4 MiB of scores a device and
# 4-16 rows, and within 5% either way for 1-2 rows; from 9.4 MiB the looped form is as fast or
# faster (1.4-1.5x at 24-48 MiB). In float32 the two tie to within 5% up to ~3 MiB and the
# looped form wins above: float32 stays looped.
BATCHED_CPU_ATTENTION_BYTES = 9 * 2**20
BATCHED_CPU_ATTENTION_ROWS = 4


def _batched_cpu_attention(b: int, t: int, s: int, h: int, dot_dtype) -> bool:
    """Whether CPU inference attention runs batched (see ``BATCHED_CPU_ATTENTION_BYTES``);
    ``b`` is the global batch, split evenly over the devices as dpr_jax's jitted callers do."""
    if dot_dtype is None:
        return False
    rows = max(1, b // jax.device_count())
    return (
        rows >= BATCHED_CPU_ATTENTION_ROWS and rows * h * t * s * 4 <= BATCHED_CPU_ATTENTION_BYTES
    )


class BertSelfAttention(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    dot_dtype: Any = None  # mixed inference (cpu_mixed_inference): the products' input dtype
    products: Any = None  # training with matmul_dtype: the projections' (BertModule)

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, first_only: bool = False, rows=None):
        """``first_only``: queries from position 0 alone (keys and values from every position);
        the output is (B, 1, H*Dh), exactly row 0 of the full output."""
        cfg = self.config
        b, s, _ = x.shape
        h, dh = cfg.num_attention_heads, cfg.head_dim

        def proj(name, y):  # (B, T, H*Dh) -> (B, T, H, Dh)
            dense = _dense(cfg, cfg.hidden_size, name, self.dtype, self.dot_dtype, self.products)
            return dense(y).reshape(b, -1, h, dh)

        q = proj("query", x[:, :1] if first_only else x)
        k, v = proj("key", x), proj("value", x)
        t = q.shape[1]
        if (
            deterministic
            and not first_only
            and jax.default_backend() == "cpu"
            and not _batched_cpu_attention(b, t, s, h, self.dot_dtype)
        ):
            return _looped_attention(q, k, v, key_mask, self.dtype, self.dot_dtype)
        # (B, T, H, Dh) . (B, S, H, Dh) -> (B, H, T, S)
        scores = _einsum("bthd,bshd->bhts", q, k, self.dot_dtype) / jnp.sqrt(dh).astype(self.dtype)
        scores = scores.astype(jnp.float32)
        # key_mask: (B, S) -> (B, 1, 1, S). Same as HF's additive finfo.min mask for any row
        # with at least one real key.
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        probs = Dropout(cfg.attention_probs_dropout_prob)(probs, deterministic, rows)
        # (B, H, T, S) . (B, S, H, Dh) -> (B, T, H, Dh)
        ctx = _einsum("bhts,bshd->bthd", probs, v, self.dot_dtype).astype(self.dtype)
        return ctx.reshape(b, t, h * dh)


class BertLayer(nn.Module):
    config: BertConfig
    dtype: Any = jnp.float32
    dot_dtype: Any = None  # mixed inference (cpu_mixed_inference): the products' input dtype
    products: Any = None  # training with matmul_dtype: the Dense layers' (BertModule)

    @nn.compact
    def __call__(self, x, key_mask, deterministic: bool, first_only: bool = False, rows=None):
        """``first_only``: compute the output at position 0 alone, (B, 1, H): what [CLS]
        pooling needs from the last layer (the other positions only feed keys and values)."""
        cfg = self.config
        drop = Dropout(cfg.hidden_dropout_prob)

        # attention/self, attention/output/{dense, LayerNorm}
        dot, prod = self.dot_dtype, self.products
        ctx = BertSelfAttention(cfg, self.dtype, dot, prod, name="attention_self")(
            x, key_mask, deterministic, first_only, rows
        )
        if first_only:
            x = x[:, :1]
        a = _dense(cfg, cfg.hidden_size, "attention_output_dense", self.dtype, dot, prod)(ctx)
        x = _layer_norm(cfg, "attention_output_LayerNorm", self.dtype)(
            drop(a, deterministic, rows) + x
        )
        # intermediate/dense, output/{dense, LayerNorm}
        i = _dense(cfg, cfg.intermediate_size, "intermediate_dense", self.dtype, dot, prod)(x)
        i = _ACTIVATIONS[cfg.hidden_act](i)
        o = _dense(cfg, cfg.hidden_size, "output_dense", self.dtype, dot, prod)(i)
        return _layer_norm(cfg, "output_LayerNorm", self.dtype)(drop(o, deterministic, rows) + x)


class BertModule(nn.Module):
    """``BertModel``: embeddings -> N layers -> optional pooler.

    Params: ``embeddings/...``, ``encoder/layer_{i}/...``, ``pooler/dense`` (if
    ``add_pooling_layer``). ``remat`` recomputes each layer in the backward pass (activation
    memory O(1 layer) instead of O(N)); a string names the ``jax.checkpoint_policies`` policy
    that decides what is saved instead (e.g. ``"dots_with_no_batch_dims_saveable"``).
    ``fsdp`` (inside ``shard_map`` only): the parameters arrive as FSDP shards and each of the
    embeddings, every layer and the pooler gathers its own just before it runs (inside the
    remat'ed layer, so the backward pass gathers it again; :mod:`dpr_jax.models.fsdp`).
    ``matmul_dtype`` (with ``dtype`` float32; for training): every Dense product of the layers
    and the pooler, forward and backward, takes its inputs rounded to it and accumulates in
    float32 (:func:`_trainable_products`); activations, LayerNorm, softmax and attention's
    products stay float32. On a CPU with AMX or avx512_bf16, bfloat16 is the fast form of
    training (``scripts/bench_reader_lengths.py --matmul-dtype``). It holds whether or not
    dropout runs (a retriever without dropout trains with ``deterministic``); evaluation
    builds its model without it.
    """

    config: BertConfig
    dtype: Any = jnp.float32
    add_pooling_layer: bool = True
    remat: bool | str = False
    fsdp: FsdpGather | None = None
    matmul_dtype: Any = None

    @nn.compact
    def __call__(
        self,
        input_ids: Array,  # (B, T) int
        attention_mask: Array | None = None,  # (B, T) 1 = real token
        token_type_ids: Array | None = None,  # (B, T)
        position_ids: Array | None = None,
        deterministic: bool = True,
        output_hidden_states: bool = False,
        first_token_only: bool = False,
        dropout_rows: Array | None = None,  # (B,) int
        float32_output: bool = False,
    ) -> BertOutput:
        """``first_token_only``: the last layer computes position 0 alone and
        ``last_hidden_state`` is (B, 1, H), equal to ``[:, :1]`` of the full output. [CLS]
        pooling and the pooler need nothing else: it saves ~5/6 of the last layer's work.
        ``dropout_rows``: each row's index in the global batch; dropout masks then depend on
        it rather than on the row's position here (:func:`dropout_keep_mask`).
        ``float32_output``: in mixed inference (:func:`cpu_mixed_inference`) return the float32
        activations as they are (the reader's span heads read them), not rounded to ``dtype``."""
        cfg = self.config
        b, t = input_ids.shape
        if t > cfg.max_position_embeddings:
            raise UserError(
                f"sequence length {t} exceeds max_position_embeddings {cfg.max_position_embeddings}"
            )
        if attention_mask is None:
            attention_mask = jnp.ones((b, t), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((b, t), jnp.int32)
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        key_mask = attention_mask.astype(bool)
        # 16-bit inference on a CPU: float32 activations, 16-bit products (cpu_mixed_inference)
        mixed = cpu_mixed_inference(self.dtype, deterministic)
        act, dot = (jnp.float32, self.dtype) if mixed else (self.dtype, None)
        prod = None if mixed else self.matmul_dtype
        if prod is not None and jnp.dtype(self.dtype) != jnp.float32:
            raise UserError(f"matmul_dtype {prod} needs dtype float32, not {self.dtype}")

        x = fsdp_wrap(self.fsdp, BertEmbeddings, self, "embeddings")(cfg, act, name="embeddings")(
            input_ids, token_type_ids, position_ids, deterministic, dropout_rows
        )
        policy = (
            getattr(jax.checkpoint_policies, self.remat) if isinstance(self.remat, str) else None
        )
        hidden = [x]
        for i in range(cfg.num_hidden_layers):
            last = first_token_only and i == cfg.num_hidden_layers - 1
            name = f"encoder_layer_{i}"
            layer_cls = fsdp_wrap(self.fsdp, BertLayer, self, name)  # gathers inside the remat
            if self.remat:
                layer_cls = nn.remat(layer_cls, static_argnums=(3, 4), policy=policy)
            x = layer_cls(cfg, act, dot, prod, name=name)(
                x, key_mask, deterministic, last, dropout_rows
            )
            if output_hidden_states:
                hidden.append(x)
        top = x  # float32 in mixed inference: the pooler's input
        if mixed and not float32_output:  # the output dtypes of the dtype's own forward pass
            x = x.astype(self.dtype)
            hidden = [y.astype(self.dtype) for y in hidden]

        pooled = None
        if self.add_pooling_layer:
            pooler = fsdp_wrap(self.fsdp, nn.Dense, self, "pooler_dense")(
                cfg.hidden_size, dtype=act, param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(cfg.initializer_range), name="pooler_dense",
                dot_general=_dot_general(dot, prod),
            )  # fmt: skip
            pooled = jnp.tanh(pooler(top[:, 0])).astype(self.dtype)
        return BertOutput(x, pooled, tuple(hidden) if output_hidden_states else None)


def init_bert_params(config: BertConfig, rng: Array, add_pooling_layer: bool = True) -> dict:
    """Random parameters (HF initialisation: N(0, initializer_range), zero biases)."""
    ids = jnp.zeros((1, 8), jnp.int32)
    return BertModule(config, add_pooling_layer=add_pooling_layer).init(rng, ids)["params"]


def bert_forward_flops(bert, sequences: int, tokens: int, first_only: bool = False) -> float:
    """Forward FLOPs of ``sequences`` x ``tokens`` through BERT's layers: the weight matmuls
    (2 x tokens x (4H^2 + 2HI) a layer) and attention's two batched matmuls (QK^T and PV,
    2 x 2 x T^2 x H a layer per sequence). ``first_only`` ([CLS] and pooler pooling): the last
    layer computes position 0 alone (keys and values of every position, the query, attention
    output and feed-forward of one), as :class:`dpr_jax.models.bert.BertModule` does. Embedding
    lookups, LayerNorm, softmax and biases are not counted."""
    h, i, n_layers = bert.hidden_size, bert.intermediate_size, bert.num_hidden_layers
    matmul = 2.0 * sequences * tokens * (4 * h * h + 2 * h * i)
    attention = 4.0 * sequences * tokens * tokens * h
    if not first_only:
        return n_layers * (matmul + attention)
    last = (
        2.0 * sequences * (tokens * 2 * h * h + 2 * h * h + 2 * h * i)
        + 4.0 * sequences * tokens * h
    )
    return (n_layers - 1) * (matmul + attention) + last


class PlainBertConfig(NamedTuple):
    """The config of a ``bert`` model directory: a plain BERT, with or without its pooler."""

    bert: BertConfig
    add_pooling_layer: bool = True


BERT = ModelKind(
    name="bert",
    config_from_dict=lambda d: PlainBertConfig(
        BertConfig.from_dict(d["bert"]), bool(d.get("add_pooling_layer", True))
    ),
    config_to_dict=lambda c: {"bert": c.bert.to_dict(), "add_pooling_layer": c.add_pooling_layer},
    init=lambda c, rng: init_bert_params(c.bert, rng, c.add_pooling_layer),
    bert_of=lambda c: c.bert,
    bert_body=lambda c, params: (without_pooler(params), ""),
)
