"""The README's main job: DPR's whole pipeline on SQuAD, in minutes on a laptop CPU.

1. convert the offline all-MiniLM-L6-v2 BERT into a DPR bi-encoder (both towers from it);
2. split SQuAD v1.1 train by article, take the validation articles as corpus (100-word passages
   with titles, as DPR's psgs_w100) and their questions;
3. encode the corpus (resumable shards), index it with ScaNN, retrieve for every question;
4. evaluate top-1/5/20/100 with DPR's has_answer, for dense, BM25 and their hybrid;
5. train a small extractive reader (from MiniLM) on training-article questions for a few minutes,
   then answer validation questions end to end and report EM/F1.

Every step writes into ``--workdir`` and is skipped when its output exists, so a rerun is cheap.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

from dpr_jax.cli.errors import Parser, command_parser
from dpr_jax.cli.options import FRACTION, NON_NEGATIVE, POSITIVE, add_quiet
from dpr_jax.convert import convert_from_hf
from dpr_jax.data.answers import exact_match_score, f1_score
from dpr_jax.data.bm25 import BM25Retriever
from dpr_jax.data.formats import write_passages_tsv, write_retrieval_results
from dpr_jax.data.squad import (
    CHUNKINGS,
    load_squad,
    split_articles,
    squad_passages,
    squad_questions,
)
from dpr_jax.data.textio import load_json
from dpr_jax.errors import UserError
from dpr_jax.evaluate import results_for, top_k_accuracy
from dpr_jax.index import build_index, load_index
from dpr_jax.io import check_workdir, note, writing
from dpr_jax.io import progress as progress_bar
from dpr_jax.pipeline import QAPipeline
from dpr_jax.reader.task import ReaderTrainConfig, train_and_evaluate
from dpr_jax.retriever.encode import encode_corpus
from dpr_jax.search import DenseRetriever, HybridRetriever
from dpr_jax.training.config import minilm_path


def _squad_path(data: str | None) -> str | None:
    data = data or os.environ.get("DPR_JAX_DATA")
    if not data:
        return None  # load_squad downloads the official file
    p = Path(data)
    path = p / "squad" / "train-v1.1.json" if p.is_dir() else p
    if not path.is_file():  # checked before any work starts
        raise FileNotFoundError(
            f"{path}: no SQuAD v1.1 JSON here (--data: a folder with squad/train-v1.1.json, or "
            "the JSON itself; without --data and $DPR_JAX_DATA the official file is downloaded)"
        )
    return str(path)


# what quickstart writes in its workdir (steps it reuses on a rerun), and the temporaries of a
# write that was killed (dpr_jax.io), nothing else
_OWN_NAMES = (
    r"minilm-dpr|reader|passages(-\w+)?\.tsv|(emb|index-scann)-.+|results\..+\.json"
    rf"|(retrieval|reader)_metrics\.json|{'|'.join(CHUNKINGS)}"
)
_OWN = re.compile(rf"(?:{_OWN_NAMES})|\.(?:{_OWN_NAMES})\.(?:tmp-\w+|\w+\.tmp)")


def _check_workdir(work: Path) -> None:
    """A quickstart workdir is new, empty or a quickstart's (it reuses the steps found there):
    a folder of other files is refused before any work, so nothing is written among them."""
    check_workdir(work)  # a file, or in a model / index: refused
    if not work.exists():
        return
    others = sorted(p.name for p in work.iterdir() if not _OWN.fullmatch(p.name))
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise UserError(
            f"--workdir {work}: holds {others[0]!r}{more}, which quickstart does not make; "
            "choose a new or empty directory (a quickstart workdir keeps its steps for a rerun)"
        )


def _spread(n: int, m: int) -> list[int]:
    """m indices spread evenly over range(n) (all of them if m >= n or m <= 0)."""
    if m >= n or m <= 0:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, m).round()]


def _table(rows: list[dict], ks) -> str:
    head = "| retriever | " + " | ".join(f"top-{k}" for k in ks) + " | questions/s |"
    sep = "|---|" + "---:|" * (len(ks) + 1)
    lines = [head, sep]
    for r in rows:
        accs = " | ".join(f"{100 * r['acc'][k]:.1f}" for k in ks)
        lines.append(f"| {r['name']} | {accs} | {r['qps']:.1f} |")
    return "\n".join(lines)


def run_retrieval_eval(
    retrievers: dict,
    questions,
    passages: dict,
    out_dir: Path,
    k: int = 100,
    ks=(1, 5, 20, 100),
    progress: bool = False,
) -> list[dict]:
    """Retrieve with each named retriever, write DPR results JSON, return accuracy + speed rows;
    ``progress``: a line per retriever and its search bars on stderr."""

    rows = []
    texts = [q.question for q in questions]
    for name, retriever in retrievers.items():
        note(f"evaluating {name} on {len(texts):,} questions", progress)
        retriever.search(texts[:256], k)  # warm-up: compile the question tower's shapes
        t0 = time.perf_counter()
        scores, ids = retriever.search(texts, k, progress=progress)
        dt = time.perf_counter() - t0
        results = results_for(questions, scores, ids, passages)
        write_retrieval_results(out_dir / f"results.{name}.json", results)
        acc = top_k_accuracy(results, ks)
        rows.append({"name": name, "acc": acc, "qps": len(texts) / dt, "seconds": dt})
    return rows


def train_reader_quick(squad_path, squad, train_articles, workdir: Path, steps: int) -> Path:
    """A short reader run from MiniLM: gold paragraph + 3 other paragraphs of its article."""

    raw = load_json(squad_path) if squad_path else None
    if raw is None:  # downloaded copy: rebuild the JSON from the parsed articles
        raw = {"data": [dataclass_to_squad(a) for a in squad]}
    subset = {"version": "1.1", "data": [raw["data"][i] for i in train_articles[:40]]}
    workdir.mkdir(parents=True, exist_ok=True)
    train_json = workdir / "train-subset.squad.json"
    train_json.write_text(json.dumps(subset))
    # configs/reader_squad_minilm.py's shape: the gold paragraph + 1 other paragraph of the
    # article per question, 176 tokens, a high learning rate for a short run
    config = ReaderTrainConfig(
        name="quickstart-reader", train_path=str(train_json), data_format="squad",
        init_from="minilm", batch_size=8, passages_per_question=2, max_length=176,
        max_question_length=32, learning_rate=2e-4, warmup_steps=max(1, steps // 10),
        num_steps=steps, weight_decay=0.01, max_grad_norm=1.0, checkpoint_every=0,
        keep_checkpoints=1,
    )  # fmt: skip
    train_and_evaluate(config, workdir)
    return workdir / "model"


def dataclass_to_squad(article) -> dict:
    return {"title": article.title, "paragraphs": [
        {"context": p.context, "qas": [
            {"id": qa.id, "question": qa.question,
             "answers": [{"text": t, "answer_start": s}
                         for t, s in zip(qa.answers, qa.answer_starts)]} for qa in p.qas]}
        for p in article.paragraphs]}  # fmt: skip


def _parser() -> Parser:
    ap = command_parser(__name__, __doc__.split("\n")[0])
    ap.add_argument("--data", help="folder with squad/train-v1.1.json, or the JSON itself "
                    "(default: $DPR_JAX_DATA, else download the official file)")  # fmt: skip
    ap.add_argument("--workdir", default="runs/quickstart")
    ap.add_argument(
        "--retriever", help="a trained bi-encoder model dir (default: zero-shot MiniLM)"
    )
    ap.add_argument("--val-fraction", type=FRACTION, default=0.1)
    ap.add_argument(
        "--max-articles",
        type=NON_NEGATIVE,
        default=8,
        help="validation articles used as corpus (0: all)",
    )
    ap.add_argument("--max-questions", type=NON_NEGATIVE, default=500, help="0: every question")
    ap.add_argument("--chunking", choices=CHUNKINGS, default="balanced",
                    help="how paragraphs are cut into ~100-word passages: balanced chunks, or "
                    "DPR's fixed 100-word windows with short tails")  # fmt: skip
    ap.add_argument("--reader-steps", type=POSITIVE, default=150)
    ap.add_argument("--reader", help="a trained reader model dir (skips reader training)")
    ap.add_argument("--no-reader", action="store_true", help="stop after retrieval")
    ap.add_argument("--k", type=POSITIVE, default=100)
    ap.add_argument("--examples", type=NON_NEGATIVE, default=5, help="example answers to print")
    add_quiet(ap)
    return ap


def _scann_index(model_dir: Path, corpus: list, work: Path, tag: str, say):
    """Encode ``corpus`` with ``model_dir`` and build (or reuse) its ScaNN index."""
    emb_dir = work / f"emb-{model_dir.name}{tag}"
    encode_corpus(model_dir, corpus, emb_dir, chunk_size=2048, bucket=32)
    index_dir = work / f"index-scann-{model_dir.name}{tag}"
    if not index_dir.exists():
        t0 = time.time()
        index = build_index("scann", emb_dir)  # records the model and passages it came from
        index.save(index_dir)
        say(f"ScaNN index of {index.size:,} vectors built in {time.time() - t0:.1f}s")
    return load_index(index_dir)


def _answer_all(
    pipe: QAPipeline, questions: list, work: Path, examples: int, say, progress: bool = True
) -> None:
    """Answer every question end to end; print EM / F1 / latency and a few answers."""
    t0 = time.time()
    say(f"answering {len(questions):,} questions end to end ({pipe.n_passages} passages each)")
    preds = pipe.answer([q.question for q in questions], progress=progress)
    dt = time.time() - t0

    em = np.mean([exact_match_score(p.text, q.answers) for p, q in zip(preds, questions)])
    f1 = np.mean([f1_score(p.text, q.answers) for p, q in zip(preds, questions)])
    single = []  # latency of one question at a time (`dpr-jax ask`), after the batch warm-up
    n_single = min(10, len(questions))
    for q in progress_bar(questions[:n_single], desc="latency, one question at a time",
                          unit="q", enabled=progress):  # fmt: skip
        t1 = time.perf_counter()
        pipe.answer(q.question)
        single.append(time.perf_counter() - t1)
    latency = 1000 * float(np.median(single))
    print(f"\nEnd to end (retrieve {pipe.n_passages} -> read): EM {100 * em:.1f}  "
          f"F1 {100 * f1:.1f}  ({len(questions)} questions; batched "
          f"{1000 * dt / len(questions):.0f} ms/question, one at a time {latency:.0f} ms "
          "median)\n")  # fmt: skip
    for p, q in list(zip(preds, questions))[:examples]:
        print(f"Q: {q.question}\n   -> {p.text!r}  (gold: {q.answers[0]!r}; from {p.title!r})")
    metrics = {
        "em": em, "f1": f1, "questions": len(questions),
        "ms_per_question_batched": 1000 * dt / len(questions), "ms_per_question_single": latency,
    }  # fmt: skip
    (work / "reader_metrics.json").write_text(json.dumps(metrics, indent=2))


def cli_main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    work = Path(args.workdir)
    _check_workdir(work)
    t_start = time.time()
    say = lambda msg: print(f"[{time.time() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    squad_path = _squad_path(args.data)
    squad = load_squad(squad_path)  # bad data is refused before anything is written
    with writing(work):
        work.mkdir(parents=True, exist_ok=True)

    # 1. the retriever
    model_dir = Path(args.retriever) if args.retriever else work / "minilm-dpr"
    if not args.retriever and not model_dir.exists():
        say("converting the offline all-MiniLM-L6-v2 into a DPR bi-encoder")
        convert_from_hf(minilm_path(), model_dir)

    # 2. SQuAD validation articles
    train_articles, val_articles = split_articles(len(squad), args.val_fraction, seed=0)
    if args.max_articles > 0:
        val_articles = val_articles[: args.max_articles]
    corpus = squad_passages(squad, val_articles, chunking=args.chunking)
    questions = squad_questions(squad, val_articles)
    questions = [questions[i] for i in _spread(len(questions), args.max_questions)]
    passages = {str(p.id): p for p in corpus}
    tag = "" if args.chunking == "balanced" else f"-{args.chunking}"
    write_passages_tsv(work / f"passages{tag}.tsv", corpus)
    say(f"corpus: {len(corpus):,} passages ({args.chunking} chunks) from {len(val_articles)} "
        f"validation articles; {len(questions):,} questions")  # fmt: skip

    # 3. encode + ScaNN index
    index = _scann_index(model_dir, corpus, work, tag, say)

    # 4. retrieval accuracy: dense, BM25, hybrid
    dense = DenseRetriever(model_dir, index)
    bm25 = BM25Retriever(corpus)
    retrievers = {
        "bm25": bm25,
        f"dense ({model_dir.name})": dense,
        "hybrid (linear)": HybridRetriever(dense, bm25, "linear"),
        "hybrid (rrf)": HybridRetriever(dense, bm25, "rrf"),
    }
    out = work / args.chunking if tag else work  # results of another chunking beside
    out.mkdir(exist_ok=True)
    rows = run_retrieval_eval(retrievers, questions, passages, out, args.k,
                              progress=not args.quiet)  # fmt: skip
    ks = (1, 5, 20, 100)
    print(f"\nRetrieval accuracy on SQuAD validation articles ({args.chunking} passages, DPR "
          "has_answer)\n")  # fmt: skip
    print(_table(rows, ks))
    (out / "retrieval_metrics.json").write_text(json.dumps(rows, indent=2, default=str))
    if args.no_reader:
        say("done")
        return 0

    # 5. reader + end-to-end answers
    reader_dir = Path(args.reader) if args.reader else work / "reader"
    if not args.reader and not (reader_dir / "model").exists():
        say(f"training a MiniLM reader for {args.reader_steps} steps on training articles")
        train_reader_quick(squad_path, squad, train_articles, reader_dir,
                           args.reader_steps)  # fmt: skip
    pipe = QAPipeline(dense, passages, reader_dir / "model" if not args.reader else reader_dir,
                      n_passages=20)  # fmt: skip
    _answer_all(pipe, questions, work, args.examples, say, progress=not args.quiet)
    say("done")
    return 0
