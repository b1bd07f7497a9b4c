"""Corpus and question encoding with the bi-encoder towers (Karpukhin et al. 2020, sec. 3.1 and 5).

DPR encodes every passage of the corpus once, offline, with E_P and indexes the vectors; questions
are encoded with E_Q at query time. ``encode_corpus``:

- splits the corpus into ``num_shards`` contiguous shards (one per process / job, ``--shard i/n``)
  and each shard into fixed-size chunks; a chunk is written atomically with its ids
  (:class:`dpr_jax.embeddings.EmbeddingWriter`), so a killed job resumes at the first unfinished
  chunk and never recomputes or corrupts a finished one;
- within a chunk, passages are sorted by length and padded per batch to a multiple of ``bucket``
  tokens (length bucketing: few shapes to compile, little padding), then restored to corpus order;
- each batch is split across all local devices (data-parallel ``jax.jit`` over a 1-D mesh).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from dpr_jax.embeddings import EmbeddingWriter
from dpr_jax.errors import ArgumentTypeError, Interrupted, UserError
from dpr_jax.io import EMBEDDINGS, OutputWriteError, check_output, fingerprint_passages, sha256_file
from dpr_jax.model_dir import check_tokenizer_fits, load_model, load_tokenizer, resolve_model_dir
from dpr_jax.models.bert import mixed_inference_params
from dpr_jax.provenance import vectors_fingerprint
from dpr_jax.retriever.model import BiEncoder

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TowerEncoder:
    """A jitted tower of a bi-encoder model directory, data-parallel over the local devices.

    ``tower``: "question" or "passage". ``compute_dtype``: "float32" or "bfloat16".
    """

    def __init__(
        self,
        model_dir: str | Path,
        tower: str,
        batch_size: int = 64,
        max_length: int | None = None,
        bucket: int | None = 32,
        compute_dtype: str = "float32",
        loaded=None,
    ):
        if tower not in ("question", "passage"):
            raise UserError(f"tower must be 'question' or 'passage', got {tower!r}")
        max_length = max_length or (64 if tower == "question" else 256)
        _check_sizes(batch_size=batch_size, max_length=max_length, bucket=bucket)
        self.model_dir = resolve_model_dir(model_dir)
        _, self.config, params, self.meta = loaded or load_model(self.model_dir, "biencoder")
        self.tokenizer = load_tokenizer(self.model_dir)
        check_tokenizer_fits(self.model_dir, self.config.bert, self.tokenizer, max_length)
        self.tower = tower
        self.max_length = max_length
        self._fingerprint = None
        self.bucket = bucket
        devices = jax.local_devices()
        self.mesh = Mesh(np.array(devices), ("data",))
        n_dev = len(devices)
        self.batch_size = max(n_dev, -(-batch_size // n_dev) * n_dev)  # a multiple of devices
        # as ReaderPredictor: on a CPU in bfloat16, the kernels in that dtype once, same vectors
        params = mixed_inference_params(params, DTYPES[compute_dtype])
        self.params = jax.device_put(params, NamedSharding(self.mesh, P()))
        model = BiEncoder(self.config, dtype=DTYPES[compute_dtype])
        method = model.encode_question if tower == "question" else model.encode_passage
        data = NamedSharding(self.mesh, P("data"))

        @partial(jax.jit, in_shardings=(NamedSharding(self.mesh, P()), data, data))
        def _encode(params, ids, mask):
            return model.apply({"params": params}, ids, mask, method=method)

        self._encode = _encode

    @property
    def fingerprint(self) -> str:
        """What this tower computes, by content (:func:`dpr_jax.provenance.vectors_fingerprint`:
        parameters, model config, tokenizer files, tower, max length), not its path."""
        if self._fingerprint is None:
            self._fingerprint = vectors_fingerprint(self.model_dir, self.tower, self.max_length)
        return self._fingerprint

    @property
    def dim(self) -> int:
        return self.config.embedding_dim

    def _tokenize(self, items: Sequence) -> tuple[np.ndarray, np.ndarray]:
        if self.tower == "question":
            return self.tokenizer.questions(list(items), self.max_length, self.bucket)
        titles = [p.title for p in items]
        texts = [p.text for p in items]
        return self.tokenizer.passages(titles, texts, self.max_length, self.bucket)

    def _lengths(self, items: Sequence) -> np.ndarray:
        texts = items if self.tower == "question" else [f"{p.title} {p.text}" for p in items]
        return np.array([len(t) for t in texts])  # characters: a cheap proxy for sorting

    def encode(self, items: Sequence, progress=None) -> np.ndarray:
        """Questions (str) or passages (objects with .title, .text) -> (N, D) float32."""
        n = len(items)
        out = np.zeros((n, self.dim), np.float32)
        order = np.argsort(-self._lengths(items), kind="stable") if self.bucket else np.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            ids, mask = self._tokenize([items[i] for i in idx])
            pad = self.batch_size - len(idx)
            if pad:  # keep one batch shape: fill with copies of a real row, dropped below
                ids = np.concatenate([ids, np.repeat(ids[:1], pad, 0)])
                mask = np.concatenate([mask, np.repeat(mask[:1], pad, 0)])
            vecs = np.asarray(self._encode(self.params, ids, mask))
            out[idx] = vecs[: len(idx)]
            if progress is not None:
                progress.update(len(idx))
        return out


def _check_sizes(**sizes) -> None:
    """Batch sizes, lengths and the bucket: integers >= 1 (``bucket`` may be None: off)."""
    for name, value in sizes.items():
        if value is None and name == "bucket":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            off = " (or None: no bucketing)" if name == "bucket" else ""
            raise UserError(f"{name} must be an integer >= 1{off}, got {value!r}")


def _check_passages(passages: Sequence, where: str) -> None:
    """Passages must be objects with ``id``, ``text`` and ``title`` (strings)."""
    for i, p in enumerate(itertools.islice(passages, 1000)):  # the API's mistakes show early
        if not all(hasattr(p, f) for f in ("id", "text", "title")) or not isinstance(p.text, str):
            raise ArgumentTypeError(
                f"{where}passages[{i}]: expected a passage with id, title and text (e.g. "
                f"dpr_jax.data.formats.Passage), got {type(p).__name__} ({p!r:.40})"
            )


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous [start, stop) of shard ``shard`` of ``num_shards`` over n items."""
    if not 0 <= shard < num_shards:
        raise UserError(f"shard {shard} is not in [0, {num_shards})")
    per = -(-n // num_shards)
    return min(n, shard * per), min(n, (shard + 1) * per)


def encode_corpus(
    model_dir: str | Path,
    passages: Sequence,
    out_dir: str | Path,
    shard: int = 0,
    num_shards: int = 1,
    chunk_size: int = 8192,
    batch_size: int = 64,
    max_length: int = 256,
    bucket: int | None = 32,
    out_dtype: str = "float16",
    compute_dtype: str = "float32",
    show_progress: bool = True,
    max_chunks: int | None = None,
    passages_file: str | Path | None = None,
) -> Path:
    """Encode this shard's passages into ``out_dir`` (resumable). ``max_chunks`` stops early
    (used by tests to simulate a killed job). ``passages_file``: the file ``passages`` were read
    from, whose sha256 is recorded (with a fingerprint of the passages themselves)."""

    if out_dtype not in ("float16", "float32"):
        raise UserError(f"out_dtype must be float16 or float32, got {out_dtype!r}")
    _check_sizes(chunk_size=chunk_size, batch_size=batch_size, max_length=max_length,
                 bucket=bucket, num_shards=num_shards)  # fmt: skip
    if not 0 <= shard < num_shards:
        raise UserError(f"shard {shard} is not in [0, {num_shards})")
    where = f"{passages_file}: " if passages_file else ""
    if len(passages) == 0:
        raise UserError(f"{where}no passages to encode (empty corpus)")
    _check_passages(passages, where)
    check_output(out_dir, EMBEDDINGS, [model_dir, resolve_model_dir(model_dir), passages_file])
    enc = TowerEncoder(model_dir, "passage", batch_size, max_length, bucket, compute_dtype)
    start, stop = shard_range(len(passages), shard, num_shards)
    config = {
        "model_dir": str(enc.model_dir.resolve()),
        "model": enc.meta["model"],
        "model_fingerprint": enc.meta["params_sha256"],  # the parameters alone (older readers)
        "vectors_fingerprint": enc.fingerprint,
        "passages_sha256": sha256_file(passages_file) if passages_file else None,
        "passages_fingerprint": fingerprint_passages(passages),
        "tower": "passage",
        "num_passages": len(passages),
        "shard": shard,
        "num_shards": num_shards,
        "shard_range": [start, stop],
        "chunk_size": chunk_size,
        "max_length": max_length,
        "bucket": bucket,
        "dtype": out_dtype,
        "compute_dtype": compute_dtype,
        "dim": enc.dim,
    }
    chunks = list(range(-(-(stop - start) // chunk_size)))
    config["num_chunks"] = len(chunks)
    writer = EmbeddingWriter(out_dir, shard=shard, num_shards=num_shards, config=config)
    done = writer.done_chunks()
    todo = [c for c in chunks if c not in done]
    if max_chunks is not None:
        todo = todo[:max_chunks]
    total = sum(min(chunk_size, stop - start - c * chunk_size) for c in todo)
    bar = tqdm(total=total, desc=f"encode shard {shard}/{num_shards}", unit="psg",
               disable=not show_progress)  # fmt: skip
    try:
        for c in todo:
            lo = start + c * chunk_size
            hi = min(stop, lo + chunk_size)
            chunk = passages[lo:hi]
            emb = enc.encode(chunk, progress=bar).astype(out_dtype)
            writer.write_chunk(c, np.array([str(p.id) for p in chunk]), emb)
    except (KeyboardInterrupt, OutputWriteError) as e:  # say what was kept, and how to go on
        bar.close()
        kept = (f"{len(writer.done_chunks())} of {len(chunks)} chunks of shard {shard}/"
                f"{num_shards} are finished and kept in {out_dir}; rerun the same command to "
                "resume")  # fmt: skip
        if isinstance(e, OutputWriteError):
            raise OutputWriteError(f"{e}; {kept}") from e
        raise Interrupted(kept) from None
    bar.close()
    return Path(out_dir)
