"""Hard negatives mined with a dense retriever, for a second round of training.

DPR trains with BM25 hard negatives (Karpukhin et al. 2020, sec. 3.2, 5.2); ANCE (Xiong et al.
2021) and RocketQA (Qu et al. 2021) showed that negatives retrieved by the dense model itself
teach it more, provided that passages which actually answer the question (false negatives) are
left out. ``dpr-jax mine`` does that for a DPR biencoder file:

1. retrieve the top ``depth`` passages of every question with a model + index
   (:class:`dpr_jax.search.DenseRetriever`);
2. drop the question's positives (by passage id, or by title + text when a positive has no id)
   and every passage that contains an answer (DPR's ``has_answer``, string or regex matching, as
   :mod:`dpr_jax.evaluate`);
3. of the remaining candidates, in rank order, skip the first ``skip`` (the likeliest unlabelled
   positives) and keep the next ``n``, or with ``sample`` ``n`` drawn uniformly (seeded per
   question) from all of them after the skipped ones, kept in rank order;
4. write the biencoder file with these as ``hard_negative_ctxs`` (``existing="append"`` keeps the
   input's hard negatives, BM25's from ``prepare-squad``, after the mined ones, so that training,
   which shuffles a question's hard negatives, draws from both).

Sharding and resuming, as ``dpr-jax encode``: the questions are cut into chunks of
``chunk_size``; shard ``i/n`` processes the ``i``-th contiguous range of chunks. Each finished
chunk is written atomically as ``OUT.parts/chunk-NNNNNN.jsonl`` (with its counts beside it), so a
killed run restarts at its first unfinished chunk, and shards run as independent processes. The
parts directory records the settings in ``config.json``; a run with other settings is refused.
Its inputs are recorded by content, not by path (the biencoder file's sha256, the question
tower's :func:`dpr_jax.provenance.vectors_fingerprint`, the index's
:func:`~dpr_jax.provenance.index_fingerprint`, the passages' fingerprint), so a resumed or
sharded run given another model, index, corpus or biencoder file is refused, and the same ones
under other paths are accepted.
Whichever shard finds every chunk done writes ``OUT`` (and ``OUT.config.json``: settings and
counts); ``--merge-only`` does just that. Chunks and the random draws depend on the question's
position in the input alone, so every sharding gives the same file.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpr_jax.data.answers import MATCH_TYPES
from dpr_jax.data.corpus import read_passages
from dpr_jax.data.formats import (
    BIENCODER_FILE,
    BiencoderExample,
    Passage,
    atomic_write_text,
    read_biencoder,
    write_biencoder,
)
from dpr_jax.errors import Interrupted, UserError
from dpr_jax.evaluate import AnswerMatcher, has_answer
from dpr_jax.io import (
    FILE,
    check_output,
    check_output_path,
    fingerprint_passages,
    note,
    sha256_file,
    writing,
)
from dpr_jax.provenance import check_passages, index_fingerprint, vectors_fingerprint
from dpr_jax.retriever.encode import shard_range
from dpr_jax.search import QUESTION_MAX_LENGTH, DenseRetriever

EXISTING = ("drop", "append")
_COUNTS = ("questions", "retrieved", "dropped_positive", "dropped_answer", "mined", "short")


class MineConfigError(UserError):
    """A parts directory made with other settings or inputs than this run's."""


_HINTS = {
    "biencoder_sha256": " (another --biencoder file)",
    "model_fingerprint": " (another --model: other parameters, config or tokenizer)",
    "index_fingerprint": " (another --index)",
    "passages_fingerprint": " (other --passages)",
}


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def _chunk_path(parts: Path, c: int) -> Path:
    return parts / f"chunk-{c:06d}.jsonl"


def _stats_path(parts: Path, c: int) -> Path:
    return parts / f"chunk-{c:06d}.counts.json"


def _shard_chunks(num_chunks: int, shard: int, num_shards: int) -> range:

    return range(*shard_range(num_chunks, shard, num_shards))


def _ctx_key(c: Passage) -> tuple[str, str]:
    return (c.title.strip(), " ".join(c.text.split()))


def select_negatives(
    ranked: Sequence[tuple[str, float]],
    example: BiencoderExample,
    passages: dict[str, Passage],
    n: int,
    skip: int = 0,
    sample: bool = False,
    rng: np.random.Generator | None = None,
    match: str = "string",
    matcher=None,
    counts: dict[str, int] | None = None,
) -> list[Passage]:
    """The hard negatives of one question from its ranked (passage id, score) list."""

    pos_ids = {c.id for c in example.positive_ctxs if c.id is not None}
    pos_keys = {_ctx_key(c) for c in example.positive_ctxs}
    keys = matcher.answer_keys(example.answers) if matcher is not None else None
    cands: list[Passage] = []
    c = counts if counts is not None else {}
    for pid, score in ranked:
        p = passages[pid]
        c["retrieved"] = c.get("retrieved", 0) + 1
        if pid in pos_ids or _ctx_key(p) in pos_keys:
            c["dropped_positive"] = c.get("dropped_positive", 0) + 1
            continue
        if matcher is not None:
            hit = matcher.match(keys, p.text, key=pid)
        else:
            hit = has_answer(example.answers, p.text, match_type=match)
        if hit:
            c["dropped_answer"] = c.get("dropped_answer", 0) + 1
            continue
        cands.append(Passage(p.text, p.title, pid, round(float(score), 4)))
    pool = cands[skip:]
    if sample and len(pool) > n:
        picked = np.sort(rng.choice(len(pool), n, replace=False))
        chosen = [pool[i] for i in picked]
    else:
        chosen = pool[:n]
    c["mined"] = c.get("mined", 0) + len(chosen)
    c["short"] = c.get("short", 0) + (len(chosen) < n)
    return chosen


def _with_negatives(ex: BiencoderExample, mined: list[Passage], existing: str) -> BiencoderExample:
    hard = list(mined)
    if existing == "append":
        seen = {c.id for c in mined} | {_ctx_key(c) for c in mined}
        hard += [c for c in ex.hard_negative_ctxs if c.id not in seen and _ctx_key(c) not in seen]
    return BiencoderExample(
        ex.question, ex.answers, ex.positive_ctxs, ex.negative_ctxs, hard, ex.id, ex.dataset
    )


def _check_or_write_config(parts: Path, config: dict[str, Any]) -> None:
    path = parts / "config.json"
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise MineConfigError(f"{path}: not valid JSON ({e}); delete {parts}") from None
        for k, v in config.items():
            if old.get(k) != v:
                raise MineConfigError(
                    f"{path}: this output was started with {k}={old.get(k)!r}, this run has "
                    f"{k}={v!r}{_HINTS.get(k, '')}; delete {parts} (and {parts.name[: -len('.parts')]}) to start "
                    "over, or choose another --out"
                )
        return
    with writing(parts):
        parts.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(config, indent=2, sort_keys=True) + "\n")


def merge_parts(out: str | Path) -> Path:
    """Write ``out`` from its finished parts (FileNotFoundError naming the missing chunks)."""
    out = check_output(out, FILE, writes=BIENCODER_FILE)
    parts = parts_dir(out)
    cfg_path = parts / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: no mining run for {out} (run `dpr-jax mine` first)")
    config = json.loads(cfg_path.read_text())
    missing = [c for c in range(config["num_chunks"]) if not _chunk_path(parts, c).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{parts}: {len(missing)} of {config['num_chunks']} chunks are not finished (first: "
            f"{_chunk_path(parts, missing[0]).name}); run the shards that own them"
        )
    counts = dict.fromkeys(_COUNTS, 0)
    for c in range(config["num_chunks"]):
        for k, v in json.loads(_stats_path(parts, c).read_text()).items():
            counts[k] = counts.get(k, 0) + v

    def records():
        for c in range(config["num_chunks"]):
            yield from read_biencoder(_chunk_path(parts, c))[0]

    write_biencoder(out, records(), config={**config, "counts": counts})
    return out


def mine_hard_negatives(
    model_dir: str | Path,
    index,
    passages: str | Path | Sequence[Passage],
    biencoder: str | Path,
    out: str | Path,
    n: int = 30,
    skip: int = 0,
    depth: int = 100,
    sample: bool = False,
    seed: int = 0,
    match: str = "string",
    existing: str = "drop",
    shard: int = 0,
    num_shards: int = 1,
    chunk_size: int = 1000,
    batch_size: int = 64,
    max_chunks: int | None = None,
    retriever=None,
    progress: bool = True,
) -> Path | None:
    """Mine this shard's chunks (resumable); write ``out`` once every chunk is done.

    Returns ``out`` when this call completed the file, None while other shards' chunks are
    missing. ``index``: a directory or an :class:`~dpr_jax.index.Index`; ``retriever``: any
    object with ``search(questions, k) -> (scores, ids)`` (replaces model_dir + index).
    ``max_chunks`` stops after that many chunks (tests use it to simulate a killed run).
    ``progress``: bars on stderr (questions encoded and searched, per batch) and a line per chunk.
    """

    for name, v, lo in (("n", n, 1), ("skip", skip, 0), ("depth", depth, 1),
                        ("chunk_size", chunk_size, 1)):  # fmt: skip
        if v < lo:
            raise UserError(f"{name} must be >= {lo}, got {v}")
    if match not in MATCH_TYPES:
        raise UserError(f"match must be one of {MATCH_TYPES}, got {match!r}")
    if existing not in EXISTING:
        raise UserError(f"existing must be one of {EXISTING}, got {existing!r}")
    if not 0 <= shard < num_shards:
        raise UserError(f"shard {shard} is not in [0, {num_shards})")
    if skip >= depth:  # every candidate skipped: an output without negatives, passing as mined
        raise UserError(
            f"skip {skip} >= depth {depth}: every retrieved passage would be skipped, no question "
            "would get a negative; nothing to mine, nothing written"
        )
    if not sample and skip + n > depth:
        print(f"dpr-jax mine: depth {depth} < skip {skip} + n {n}: questions get fewer than "
              f"{n} negatives", file=sys.stderr)  # fmt: skip
    # before any work: the output (and its parts) never over an input or another artifact
    inputs = [biencoder, model_dir, index if isinstance(index, (str, Path)) else None,
              passages if isinstance(passages, (str, Path)) else None]  # fmt: skip
    out = check_output(out, FILE, inputs, writes=BIENCODER_FILE)
    check_output_path(parts_dir(out), inputs, what="--out's parts directory")
    examples, stats = read_biencoder(biencoder)
    if not examples:  # an empty output would pass for a mined file
        raise UserError(
            f"{biencoder}: no usable records ({stats.records} read, {stats.skipped_no_positive} "
            "without positive_ctxs); nothing to mine, nothing written"
        )
    num_chunks = -(-len(examples) // chunk_size)
    passage_src = str(passages) if isinstance(passages, (str, Path)) else None
    if passage_src is not None:
        passages = read_passages(passages)
    by_id = {str(p.id): p for p in passages}
    dense = retriever is None  # else the caller's retriever: its model cannot be fingerprinted
    config = {  # inputs by content: a resumed or sharded run must be given the same ones
        "biencoder_sha256": sha256_file(biencoder),
        "questions": len(examples),
        "model_fingerprint": (
            vectors_fingerprint(model_dir, "question", QUESTION_MAX_LENGTH) if dense else None
        ),
        "index_fingerprint": index_fingerprint(index) if dense else None,
        "passages_fingerprint": fingerprint_passages(passages),
        "n": n, "skip": skip, "depth": depth, "sample": sample, "seed": seed, "match": match,
        "existing": existing, "chunk_size": chunk_size, "num_chunks": num_chunks,
    }  # fmt: skip
    parts = parts_dir(out)
    _check_or_write_config(parts, config)
    todo = [c for c in _shard_chunks(num_chunks, shard, num_shards)
            if not _chunk_path(parts, c).is_file()]  # fmt: skip
    if max_chunks is not None:
        todo = todo[:max_chunks]
    if todo and retriever is None:
        retriever = DenseRetriever(model_dir, index, batch_size=batch_size)
        index_dir = index if isinstance(index, (str, Path)) else None
        check_passages(retriever.index, passage_src or "the passages", passages, index_dir)
    matcher = AnswerMatcher() if match == "string" else None
    t0 = time.time()
    try:  # each chunk is written atomically as it finishes
        for done, c in enumerate(todo, 1):
            lo, hi = c * chunk_size, min(len(examples), (c + 1) * chunk_size)
            chunk = examples[lo:hi]
            kw = {"progress": True} if progress else {}  # bars per batch; any retriever works
            scores, ids = retriever.search([e.question for e in chunk], depth, **kw)
            counts = dict.fromkeys(_COUNTS, 0)
            counts["questions"] = len(chunk)
            mined = []
            for j, ex in enumerate(chunk):
                ranked = []
                for pid, s in zip(ids[j], scores[j]):
                    pid = str(pid)
                    if pid not in by_id:
                        raise UserError(
                            f"passage id {pid!r} from the index is not in the passages "
                            f"({passage_src or 'given list'}): index and passages do not match"
                        )
                    ranked.append((pid, float(s)))
                rng = np.random.default_rng([seed, lo + j])  # depends on the question alone
                negs = select_negatives(
                    ranked, ex, by_id, n, skip, sample, rng, match, matcher, counts
                )
                mined.append(_with_negatives(ex, negs, existing))
            atomic_write_text(_stats_path(parts, c), json.dumps(counts) + "\n")
            write_biencoder(_chunk_path(parts, c), mined)  # last: marks the chunk done
            note(f"dpr-jax mine: shard {shard}/{num_shards}: chunk {c} ({done}/{len(todo)}), "
                 f"{counts['mined'] / max(1, len(chunk)):.1f} negatives/question, "
                 f"{time.time() - t0:.0f}s", progress)  # fmt: skip
    except KeyboardInterrupt:
        kept = sum(_chunk_path(parts, c).is_file() for c in range(num_chunks))
        raise Interrupted(
            f"{kept} of {num_chunks} chunks are finished and kept in {parts}; rerun the same "
            "command to resume"
        ) from None
    if all(_chunk_path(parts, c).is_file() for c in range(num_chunks)):
        return merge_parts(out)
    return None
