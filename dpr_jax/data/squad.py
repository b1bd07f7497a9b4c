"""SQuAD v1.1 as an open-domain retrieval task (Karpukhin et al. 2020, sec. 4.1 and 4.2).

DPR evaluates on SQuAD v1.1 used open-domain: the question alone, retrieved against a corpus of
100-word passages (sec. 4.1), and trains the retriever with each question's gold passage as
positive and BM25 passages that do not contain the answer as hard negatives (sec. 3.2, 4.2).
This module builds exactly that from the official SQuAD JSON:

- **Passages.** Each paragraph's context is split on whitespace into non-overlapping chunks of at
  most ``words`` (100) words; a chunk never crosses a paragraph. ``chunking="balanced"`` (default)
  cuts a paragraph of n words into ceil(n / 100) chunks of near-equal size (a 130-word paragraph
  gives 65 + 65 words instead of 100 + 30; per-paragraph fixed chunks would leave ~4,000 tails of
  under 20 words in SQuAD train), ``"fixed"`` cuts every 100 words. Title = article title.
  Passage id = ``f"{article}-{paragraph}-{chunk}"`` (indices in the source file, from 0), stable
  across runs, splits and ``--max-articles``.
- **Questions** keep all their answer texts (de-duplicated, order kept), the character offset of
  each (``answer_starts``), and the article/paragraph they come from.
- **Split.** Articles (never questions) are split into train/validation: a seeded permutation of
  the article indices, ``round(val_fraction * n_articles)`` of them (at least one when the
  fraction is > 0) go to validation. Each split has its own passage corpus (its articles' passages).
- **Positive** of a question: the chunks of its own paragraph that contain an answer (DPR's
  ``has_answer``), the one holding the first answer's ``answer_start`` first. When no chunk of the
  paragraph contains an answer as a token sequence (the answer straddles a chunk boundary, or is
  part of a word, like "ton" in "tons"), the question is skipped and counted
  (``positive="answer_start"`` instead uses the chunk holding the answer's offset).
- **Hard negatives**: the BM25 top-``bm25_depth`` passages of the split's corpus (excluding zero
  scores) that contain no answer, best ``hard_negatives`` kept (:mod:`dpr_jax.data.bm25`).
  ``negative_ctxs`` (DPR's random negatives) are left empty; batching draws in-batch negatives.

``dpr-jax prepare-squad`` writes into ``--out``::

    {train,dev}.biencoder.json   DPR biencoder records (questions with a positive)
    {train,dev}.passages.tsv     the split's passage corpus (id, text, title)
    {train,dev}.qas.tsv          every question of the split: question, answers, id
    {train,dev}.questions.jsonl  provenance: id, article, paragraph, title, answers,
                                 answer_starts, positive_ids (empty if skipped)
    {train,dev}.bm25/            the split's BM25 index (``dpr-jax retrieve --bm25-index``)
    config.json                  options, source file (size, sha256), counts, timings
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from dpr_jax.data.answers import AnswerMatcher
from dpr_jax.data.bm25 import BM25Retriever, bm25_hard_negatives
from dpr_jax.data.formats import (
    BiencoderExample,
    Passage,
    Question,
    open_text,
    write_biencoder,
    write_passages_tsv,
    write_qas_tsv,
)
from dpr_jax.data.textio import json_error
from dpr_jax.errors import UserError
from dpr_jax.io import SQUAD_DATA, atomic_open, atomic_write_text, check_output

# ---------------------------------------------------------------------------------------------
# SQuAD v1.1 JSON


@dataclasses.dataclass(frozen=True)
class SquadQA:
    id: str
    question: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class SquadParagraph:
    context: str
    qas: tuple[SquadQA, ...]


@dataclasses.dataclass(frozen=True)
class SquadArticle:
    title: str
    paragraphs: tuple[SquadParagraph, ...]


def _need(d: Any, key: str, kind: type, where: str) -> Any:
    if not isinstance(d, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise UserError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}.{key}: expected {kind.__name__}, got {type(value).__name__}")
    return value


def parse_squad(data: Any, source: str | Path = "<squad>") -> list[SquadArticle]:
    """Validate a SQuAD v1.1 JSON object and convert it; errors name ``source`` and the field."""
    articles = []
    for a, art in enumerate(_need(data, "data", list, f"{source}")):
        aw = f"{source}: data[{a}]"
        title = _need(art, "title", str, aw)
        paragraphs = []
        for p, par in enumerate(_need(art, "paragraphs", list, aw)):
            pw = f"{aw}.paragraphs[{p}]"
            context = _need(par, "context", str, pw)
            qas = []
            for q, qa in enumerate(_need(par, "qas", list, pw)):
                qw = f"{pw}.qas[{q}]"
                question = _need(qa, "question", str, qw)
                qid = str(qa.get("id", f"{a}-{p}-{q}"))
                texts, starts = [], []
                for j, ans in enumerate(_need(qa, "answers", list, qw)):
                    aw2 = f"{qw}.answers[{j}]"
                    text = _need(ans, "text", str, aw2)
                    start = _need(ans, "answer_start", int, aw2)
                    if text not in texts:
                        texts.append(text)
                        starts.append(start)
                if not texts:
                    raise UserError(f"{qw}: no answers (SQuAD v2 unanswerable questions are "
                                     "not supported)")  # fmt: skip
                qas.append(SquadQA(qid, question, tuple(texts), tuple(starts)))
            paragraphs.append(SquadParagraph(context, tuple(qas)))
        articles.append(SquadArticle(title, tuple(paragraphs)))
    return articles


def squad_questions(
    articles: Sequence[SquadArticle], article_indices: Sequence[int] | None = None
) -> list[Question]:
    idx = range(len(articles)) if article_indices is None else article_indices
    return [
        Question(qa.question, list(qa.answers), qa.id)
        for a in idx
        for par in articles[a].paragraphs
        for qa in par.qas
    ]


SQUAD_URLS = {
    "train": "https://rajpurkar.github.io/SQuAD-explorer/dataset/train-v1.1.json",
    "dev": "https://rajpurkar.github.io/SQuAD-explorer/dataset/dev-v1.1.json",
}
REPO_DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"
CHUNKINGS = ("balanced", "fixed")


# ---------------------------------------------------------------------------------------------
# Loading


def default_cache_dir() -> Path:
    base = os.environ.get("DPR_JAX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dpr_jax"
    )
    return Path(base)


def resolve_squad_path(
    path: str | Path | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> Path:
    """Where SQuAD ``split`` ("train" or "dev") comes from, downloading it if needed.

    Order: ``path``; env ``DPR_JAX_SQUAD``; ``$DPR_JAX_DATA/squad/{split}-v1.1.json``;
    ``../shared/data/squad/{split}-v1.1.json`` next to the repository; the cache
    (``$DPR_JAX_CACHE`` or ``~/.cache/dpr_jax``)``/squad/``; else download the official file
    from the SQuAD explorer site into the cache (``download=False``: raise instead).
    """
    if split not in SQUAD_URLS:
        raise UserError(f"split must be one of {list(SQUAD_URLS)}, got {split!r}")
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such SQuAD file")
        return path
    if os.environ.get("DPR_JAX_SQUAD"):
        env = Path(os.environ["DPR_JAX_SQUAD"])
        if not env.exists():
            raise FileNotFoundError(f"{env}: no such SQuAD file (from $DPR_JAX_SQUAD)")
        return env
    name = f"{split}-v1.1.json"
    candidates = []
    if os.environ.get("DPR_JAX_DATA"):
        candidates.append(Path(os.environ["DPR_JAX_DATA"]) / "squad" / name)
    candidates.append(REPO_DATA_DIR / "squad" / name)
    cached = Path(cache_dir or default_cache_dir()) / "squad" / name
    candidates.append(cached)
    for c in candidates:
        if c.exists():
            return c
    if not download:
        raise FileNotFoundError(
            f"SQuAD {split} not found (looked at {', '.join(map(str, candidates))}); give a "
            "path, set DPR_JAX_SQUAD or DPR_JAX_DATA, or allow the download"
        )
    url = SQUAD_URLS[split]
    print(f"dpr-jax: downloading SQuAD v1.1 {split} from {url}\n  -> {cached}", file=sys.stderr)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
        json.loads(tmp.read_text(encoding="utf-8"))  # a truncated download is not cached
        os.replace(tmp, cached)
    finally:
        if tmp.exists():
            tmp.unlink()
    return cached


def load_squad(
    path: str | Path | None = None,
    split: str = "train",
    cache_dir: str | Path | None = None,
    download: bool = True,
) -> list[SquadArticle]:
    """Read SQuAD v1.1 (see :func:`resolve_squad_path` for where it comes from)."""
    path = resolve_squad_path(path, split, cache_dir, download)
    with open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise json_error(path, e) from None
    return parse_squad(data, path)


# ---------------------------------------------------------------------------------------------
# Passages and questions


@dataclasses.dataclass(frozen=True)
class Chunk:
    passage: Passage
    char_start: int  # offsets of the chunk's first / past its last character in the context
    char_end: int


def chunk_paragraph(
    context: str, words: int = 100, chunking: str = "balanced"
) -> list[tuple[str, int, int]]:
    """Split ``context`` into whitespace-word chunks: ``[(text, char_start, char_end)]``."""
    if chunking not in CHUNKINGS:
        raise UserError(f"chunking must be one of {CHUNKINGS}, got {chunking!r}")
    if words < 1:
        raise UserError(f"words must be >= 1, got {words}")
    spans = [m.span() for m in re.finditer(r"\S+", context)]
    n = len(spans)
    if n == 0:
        return []
    if chunking == "fixed":
        bounds = list(range(0, n, words)) + [n]
    else:
        m = math.ceil(n / words)
        base, extra = divmod(n, m)
        sizes = [base + (1 if i < extra else 0) for i in range(m)]
        bounds = [0, *itertools.accumulate(sizes)]
    out = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        text = " ".join(context[s:e] for s, e in spans[lo:hi])
        out.append((text, spans[lo][0], spans[hi - 1][1]))
    return out


def passage_id(article: int, paragraph: int, chunk: int) -> str:
    return f"{article}-{paragraph}-{chunk}"


def paragraph_chunks(
    articles: Sequence[SquadArticle],
    article_indices: Sequence[int] | None = None,
    words: int = 100,
    chunking: str = "balanced",
) -> dict[tuple[int, int], list[Chunk]]:
    """``{(article, paragraph): [Chunk]}`` for the chosen articles (all by default)."""
    idx = range(len(articles)) if article_indices is None else article_indices
    out = {}
    for a in idx:
        art = articles[a]
        for p, par in enumerate(art.paragraphs):
            out[(a, p)] = [
                Chunk(Passage(text=text, title=art.title, id=passage_id(a, p, c)), s, e)
                for c, (text, s, e) in enumerate(chunk_paragraph(par.context, words, chunking))
            ]
    return out


def squad_passages(
    articles: Sequence[SquadArticle],
    article_indices: Sequence[int] | None = None,
    words: int = 100,
    chunking: str = "balanced",
) -> list[Passage]:
    """The passage corpus of the chosen articles (all by default), in file order."""
    chunks = paragraph_chunks(articles, article_indices, words, chunking)
    return [c.passage for cs in chunks.values() for c in cs]


def split_articles(
    n_articles: int, val_fraction: float = 0.1, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Seeded article-level split: ``(train article indices, validation article indices)``."""
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1), got {val_fraction}")
    n_val = round(val_fraction * n_articles)
    if val_fraction > 0 and n_articles >= 2:
        n_val = max(1, n_val)
    n_val = min(n_val, n_articles - 1) if n_articles else 0
    perm = np.random.default_rng(seed).permutation(n_articles)
    val = sorted(int(i) for i in perm[:n_val])
    train = sorted(int(i) for i in perm[n_val:])
    return train, val


# ---------------------------------------------------------------------------------------------
# Bi-encoder examples


@dataclasses.dataclass
class SplitData:
    examples: list[BiencoderExample]
    passages: list[Passage]
    questions: list[Question]
    provenance: list[dict[str, Any]]
    stats: dict[str, Any]


def _positives(qa: SquadQA, cs: list[Chunk], matcher: AnswerMatcher, positive: str, counts: dict):
    """The chunks of the question's paragraph that contain an answer, the one holding the
    annotated answer start first (with ``positive="answer_start"``, that chunk alone when no
    chunk matches); ``counts`` tallies questions, empty paragraphs and skips."""
    counts["questions"] += 1
    keys = matcher.answer_keys(qa.answers)
    hits = [c for c in cs if matcher.match(keys, c.passage.text, key=c.passage.id)]
    start = qa.answer_starts[0]
    at = next((c for c in cs if c.char_start <= start < c.char_end), None)
    if hits and at is not None and at in hits:
        hits.remove(at)
        hits.insert(0, at)
    if not cs:
        counts["empty_paragraph"] += 1
    if not hits and positive == "answer_start" and at is not None:
        hits = [at]
        counts["positive_from_answer_start"] += 1
    if not hits:
        counts["skipped_no_positive"] += 1
    return hits


def build_split(
    articles: Sequence[SquadArticle],
    article_indices: Sequence[int],
    hard_negatives: int = 10,
    bm25_depth: int = 50,
    words: int = 100,
    chunking: str = "balanced",
    positive: str = "skip",
    bm25_options: dict[str, Any] | None = None,
    progress: bool = True,
    name: str = "split",
) -> tuple[SplitData, Any]:
    """Biencoder examples, passages and questions of ``article_indices``.

    Returns ``(SplitData, BM25Retriever or None)`` (None when there are no passages or no
    hard negatives are asked for).
    """

    if positive not in ("skip", "answer_start"):
        raise UserError(f"positive must be 'skip' or 'answer_start', got {positive!r}")
    timings = {}
    t0 = time.time()
    chunks = paragraph_chunks(articles, article_indices, words, chunking)
    passages = [c.passage for cs in chunks.values() for c in cs]
    matcher = AnswerMatcher()

    counts = dict(questions=0, kept=0, skipped_no_positive=0, positive_from_answer_start=0,
                  empty_paragraph=0)  # fmt: skip
    kept_qas, kept_pos, prov, questions = [], [], [], []
    for a in tqdm(article_indices, desc=f"{name}: positives", unit="article", disable=not progress):
        art = articles[a]
        for p, par in enumerate(art.paragraphs):
            for qa in par.qas:
                questions.append(Question(qa.question, list(qa.answers), qa.id))
                hits = _positives(qa, chunks[(a, p)], matcher, positive, counts)
                prov.append({"id": qa.id, "question": qa.question, "answers": list(qa.answers),
                             "answer_starts": list(qa.answer_starts), "article": a,
                             "paragraph": p, "title": art.title,
                             "positive_ids": [c.passage.id for c in hits]})  # fmt: skip
                if hits:
                    kept_qas.append(qa)
                    kept_pos.append([c.passage for c in hits])
    counts["kept"] = len(kept_qas)
    timings["chunk_and_positives_s"] = time.time() - t0

    retriever = None
    negs: list[list[int]] = [[] for _ in kept_qas]
    neg_scores: list[list[float]] = [[] for _ in kept_qas]
    if passages and hard_negatives > 0 and kept_qas:
        t1 = time.time()
        retriever = BM25Retriever(passages, show_progress=False, **(bm25_options or {}))
        timings["bm25_index_s"] = time.time() - t1
        t2 = time.time()
        negs, neg_scores = bm25_hard_negatives(
            retriever,
            [qa.question for qa in kept_qas],
            [qa.answers for qa in kept_qas],
            passages,
            n=hard_negatives,
            depth=bm25_depth,
            exclude=[[p.id for p in pos] for pos in kept_pos],
            progress=progress,
            desc=f"{name}: BM25 hard negatives",
        )
        timings["bm25_mine_s"] = time.time() - t2

    examples = []
    n_hard = []
    for qa, pos, rows, scores in zip(kept_qas, kept_pos, negs, neg_scores):
        hard = [
            Passage(passages[r].text, passages[r].title, passages[r].id, round(s, 4))
            for r, s in zip(rows, scores)
        ]
        n_hard.append(len(hard))
        examples.append(
            BiencoderExample(
                question=qa.question,
                answers=list(qa.answers),
                positive_ctxs=[Passage(p.text, p.title, p.id) for p in pos],
                hard_negative_ctxs=hard,
                id=qa.id,
                dataset="squad1",
            )
        )
    counts.update(
        articles=len(article_indices),
        paragraphs=len(chunks),
        passages=len(passages),
        passage_words_max=max((len(p.text.split()) for p in passages), default=0),
        hard_negatives_mean=float(np.mean(n_hard)) if n_hard else 0.0,
        questions_with_fewer_hard_negatives=int(sum(1 for n in n_hard if n < hard_negatives)),
        timings={k: round(v, 2) for k, v in timings.items()},
    )
    return SplitData(examples, passages, questions, prov, counts), retriever


# ---------------------------------------------------------------------------------------------
# Preparation (the `dpr-jax prepare-squad` job)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def prepare_squad(
    squad_json: str | Path | None,
    out_dir: str | Path,
    val_fraction: float = 0.1,
    seed: int = 0,
    hard_negatives: int = 10,
    bm25_depth: int = 50,
    max_articles: int | None = None,
    words: int = 100,
    chunking: str = "balanced",
    positive: str = "skip",
    bm25_options: dict[str, Any] | None = None,
    save_bm25: bool = True,
    progress: bool = True,
    log=print,
) -> dict[str, Any]:
    """SQuAD JSON -> DPR training/evaluation files in ``out_dir`` (see the module docstring).

    Returns the written ``config.json`` content: options, source, per-split counts, timings
    and ``paths`` (split -> kind -> file).
    """
    t_start = time.time()
    # before any work: only a prepare-squad directory is written over (an empty or new one too)
    check_output(out_dir, SQUAD_DATA, [squad_json])
    src = resolve_squad_path(squad_json)
    check_output(out_dir, SQUAD_DATA, [src])
    articles = load_squad(src)
    n_total = len(articles)
    if max_articles is not None:
        if max_articles < 1:
            raise UserError(f"max_articles must be >= 1, got {max_articles}")
        articles = articles[:max_articles]
    if hard_negatives > bm25_depth:
        raise UserError(f"hard_negatives ({hard_negatives}) > bm25_depth ({bm25_depth})")
    t_load = time.time() - t_start
    train_idx, val_idx = split_articles(len(articles), val_fraction, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"prepare-squad: {src}: {len(articles)} of {n_total} articles "
        f"-> {len(train_idx)} train / {len(val_idx)} dev articles")  # fmt: skip

    options = dict(
        val_fraction=val_fraction, seed=seed, hard_negatives=hard_negatives,
        bm25_depth=bm25_depth, max_articles=max_articles, words=words, chunking=chunking,
        positive=positive, bm25_options=bm25_options or {},
    )  # fmt: skip
    config: dict[str, Any] = {
        "created_by": "dpr_jax.data.squad.prepare_squad",
        "options": options,
        "source": dict(
            path=str(src), bytes=src.stat().st_size, sha256=_sha256(src), articles=n_total
        ),
        "splits": {},
        "paths": {},
    }
    for split, idx in (("train", train_idx), ("dev", val_idx)):
        t0 = time.time()
        data, retriever = build_split(
            articles, idx, hard_negatives, bm25_depth, words, chunking, positive,
            bm25_options, progress, name=split,
        )  # fmt: skip
        paths = {
            "biencoder": out_dir / f"{split}.biencoder.json",
            "passages": out_dir / f"{split}.passages.tsv",
            "qas": out_dir / f"{split}.qas.tsv",
            "questions": out_dir / f"{split}.questions.jsonl",
        }
        t_w = time.time()
        write_biencoder(paths["biencoder"], data.examples)
        write_passages_tsv(paths["passages"], data.passages)
        write_qas_tsv(paths["qas"], data.questions)
        with atomic_open(paths["questions"]) as f:
            for rec in data.provenance:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if save_bm25 and retriever is not None:
            paths["bm25"] = retriever.save(out_dir / f"{split}.bm25")
        data.stats["timings"]["write_s"] = round(time.time() - t_w, 2)
        data.stats["timings"]["total_s"] = round(time.time() - t0, 2)
        data.stats["article_titles"] = [articles[a].title for a in idx]
        config["splits"][split] = data.stats
        config["paths"][split] = {k: str(v) for k, v in paths.items()}
        s = data.stats
        log(f"  {split}: {s['articles']} articles, {s['paragraphs']:,} paragraphs, "
            f"{s['passages']:,} passages, {s['questions']:,} questions, {s['kept']:,} with a "
            f"positive ({s['skipped_no_positive']:,} skipped), "
            f"{s['hard_negatives_mean']:.2f} hard negatives/question, {s['timings']}")  # fmt: skip
    config["timings"] = {"load_s": round(t_load, 2), "total_s": round(time.time() - t_start, 2)}
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    log(f"prepare-squad: wrote {out_dir} in {config['timings']['total_s']:.1f}s")
    return config
