"""DPR's plain data formats (Karpukhin et al. 2020, sec. 4 "Experimental Setup" and the DPR repo).

Everything the project reads or writes is one of the formats DPR published, so its files,
pyserini's and ours are interchangeable:

- **passages TSV** (``psgs_w100.tsv``, sec. 4.1: Wikipedia split into 100-word passages)::

      id<TAB>text<TAB>title          header line
      1<TAB>"Aaron Aaron ( or ; ""Ahärôn"") is ..."<TAB>Aaron

  read with the ``csv`` module (tab delimiter, ``"`` quoting with doubled quotes, as DPR's
  ``CsvCtxSrc`` does; one row per line: a line break inside a field is written as a space);
  gzip, xz and bzip2 files are read (told by their first bytes) and written (by the suffix
  ``.gz``, ``.xz``, ``.bz2``) transparently. Unlike DPR we do not
  additionally ``strip('"')`` the text, so a passage that begins with a quotation mark survives a
  write/read round trip.
- **qas** (``nq-test.csv``, tab separated despite the name): ``question<TAB>answers`` where
  ``answers`` is a Python list literal (``['Linda Davis']``), parsed with ``ast.literal_eval``
  (never ``eval``); an optional third column is the question id. :func:`read_qas` also reads
  NQ-open JSONL (``{"question": ..., "answer": [...]}``); SQuAD JSON is :mod:`dpr_jax.data.squad`'s,
  and :func:`dpr_jax.data.questions.read_questions` reads all of them.
- **biencoder JSON** (``biencoder-nq-train.json``): a list of
  ``{question, answers, positive_ctxs, negative_ctxs, hard_negative_ctxs}``, each ctx
  ``{title, text, passage_id?, score?}``. JSON list, JSONL, optionally compressed.
- **retrieval results JSON** (``dense_retriever.py`` output): a list of
  ``{question, answers, ctxs: [{id, title, text, score, has_answer}]}``.
- **reader predictions JSON** (``train_extractive_reader.py`` output): a list of
  ``{question, gold_answers, predictions: [{top_k, prediction: {text, score, relevance_score,
  passage_idx, passage}}]}``.

Every reader validates its input and raises ``ValueError`` naming the file and the line (TSV,
JSONL) or record index (JSON). Text-level damage is a :class:`DataFormatError` (a ``ValueError``)
``"<file>, line N: <what>; <what to do>"`` (:mod:`dpr_jax.data.textio`): bytes that are not
UTF-8, a byte-order mark anywhere but at the very start (where it is skipped), and, in the TSV
formats, a quoted field that runs over a line end (an unterminated ``"``, which the ``csv``
module would let swallow the following rows: no field of these formats spans lines). Every writer is atomic: it writes a temporary file in the target's
directory and ``os.replace``s it into place, so a crash never leaves a half-written file where a
good one was. Writers take an optional ``config`` dict that is saved beside the artifact as
``<file>.config.json`` (the formats themselves have no room for it).
"""

from __future__ import annotations

import ast
import csv
import dataclasses
import io
import itertools
import json
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from dpr_jax.data.textio import (
    DECOMPRESS_ERRORS,
    UTF8_FIX,
    DataFormatError,
    damaged,
    is_decompress_error,
    iter_text_lines,
    iter_tsv_rows,
    json_error,
    load_json,
    one_line,
    open_binary,
    plain_name,
)
from dpr_jax.errors import UserError
from dpr_jax.io import (
    FILE,
    FileFormat,
    atomic_open,
    atomic_write_text,
    check_output,
    json_format,
)

logger = logging.getLogger(__name__)

PASSAGES_HEADER = ("id", "text", "title")


def _tsv_first_row(head: bytes) -> list[str]:
    line = next((x for x in head.decode("utf-8", "replace").lstrip("\ufeff").splitlines()
                 if x.strip()), "")  # fmt: skip
    return line.split("\t")


# What each writer below writes: an existing file at its output path is replaced only when it holds
# the same (io.check_output)
BIENCODER_FILE = json_format('DPR biencoder data (JSON with "positive_ctxs")', "positive_ctxs")
RESULTS_FILE = json_format('DPR retrieval results (JSON with "ctxs")', "ctxs")
PREDICTIONS_FILE = json_format('DPR reader predictions (JSON with "predictions")', "predictions")
PASSAGES_FILE = FileFormat(
    "DPR passages TSV (header id, text, title)",
    lambda head, path: tuple(x.strip() for x in _tsv_first_row(head)) == PASSAGES_HEADER,
)
QAS_FILE = FileFormat(
    "DPR qas TSV (question, ['answer', ...])",
    lambda head, path: len(row := _tsv_first_row(head)) in (2, 3) and row[1].startswith("["),
)

# ---------------------------------------------------------------------------------------------
# Files


class _CheckedText(io.TextIOWrapper):
    """A UTF-8 text stream whose decoding error is a :class:`DataFormatError` naming the file,
    line and column (found again by :func:`iter_text_lines`), not a ``UnicodeDecodeError``, and
    whose damaged compressed data is one too."""

    path: Path

    def _undecodable(self, e: UnicodeDecodeError):
        for _ in iter_text_lines(self.path):  # raises with the line and column
            pass
        raise DataFormatError(f"{self.path}: not valid UTF-8 ({e.reason}): {UTF8_FIX}") from None

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except UnicodeDecodeError as e:
            self._undecodable(e)
        except (OSError, *DECOMPRESS_ERRORS) as e:
            if is_decompress_error(self.buffer, e):
                raise damaged(self.path, e) from None
            raise

    def read(self, size: int | None = -1) -> str:
        return self._guard(super().read, size)

    def readline(self, size: int = -1) -> str:
        return self._guard(super().readline, size)

    def __next__(self) -> str:
        return self._guard(super().__next__)


def open_text(path: str | Path, newline: str | None = None) -> IO[str]:
    """Open ``path`` for reading as UTF-8 text (a leading BOM skipped), decompressing gzip, xz
    and bzip2 files (:func:`~dpr_jax.data.textio.open_binary`); bytes that are not UTF-8 raise
    :class:`DataFormatError` naming the line and column, as :mod:`dpr_jax.data.textio`'s readers
    do."""
    path = Path(path)
    f = _CheckedText(open_binary(path), encoding="utf-8-sig", newline=newline)
    f.path = path
    return f


def write_config(path: str | Path, config: dict[str, Any] | None) -> Path | None:
    """Save ``config`` as ``<path>.config.json`` (nothing when ``config`` is None)."""
    if config is None:
        return None
    out = Path(f"{path}.config.json")
    atomic_write_text(out, json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return out


def _json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for a JSON list or a JSONL file; where = "record i" / "line n"."""
    lines = iter_text_lines(path)
    first = next(((n, line) for n, line in lines if line.strip()), None)
    head = first[1].lstrip()[0] if first else ""
    if head == "[":
        for i, rec in enumerate(load_json(path)):
            yield f"record {i}", rec
        return
    if head not in ("{", ""):
        raise DataFormatError(
            f"{path}, line {first[0]}: expected a JSON list or JSON lines, starts with {head!r}"
        )
    for n, line in itertools.chain([first] if first else [], lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise json_error(path, e, f"line {n}") from None
        yield f"line {n}", rec


def _fmt_json_list(records: Iterable[Any], f: IO[str]) -> None:
    """A JSON list with one record per line: valid JSON, greppable, diffable."""
    f.write("[")
    for i, rec in enumerate(records):
        f.write(",\n" if i else "\n")
        f.write(json.dumps(rec, ensure_ascii=False))
    f.write("\n]\n")


def _write_records(path: str | Path, records: Iterable[Any], writes: FileFormat) -> Path:
    path = check_output(path, FILE, what="output path", writes=writes)
    jsonl = plain_name(path).endswith(".jsonl")
    with atomic_open(path) as f:
        if jsonl:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        else:
            _fmt_json_list(records, f)
    return path


def _check_str(value: Any, where: str, field: str, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _check_answers(value: Any, where: str, field: str = "answers") -> list[str]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(a, str) for a in value):
        raise UserError(f"{where}: field {field!r} must be a list of strings, got {value!r:.80}")
    return list(value)


# ---------------------------------------------------------------------------------------------
# Passages


@dataclasses.dataclass(frozen=True, slots=True)
class Passage:
    """The one passage type of dpr-jax: a retrieval unit (DPR's 100-word passage with its article
    title), a biencoder positive / negative context, a reader's candidate.

    ``id`` is the corpus id (DPR's ``passage_id``; optional for contexts and reader inputs),
    ``score`` a retriever's score where one ranked it, ``has_answer`` DPR's answer flag where it
    is known (reader training labels, retrieval results).
    """

    text: str
    title: str = ""
    id: str | None = None
    score: float | None = None
    has_answer: bool | None = None

    def to_json(self) -> dict[str, Any]:
        """The biencoder-context JSON object of DPR (``passage_id``, ``score`` when known)."""
        d: dict[str, Any] = {"title": self.title, "text": self.text}
        if self.score is not None:
            d["score"] = self.score
        if self.id is not None:
            d["passage_id"] = self.id
        return d


def read_passages_tsv(path: str | Path, check_unique: bool = True) -> list[Passage]:
    """Read a DPR passages TSV (``id, text, title``; header optional; may be compressed)."""
    path = Path(path)
    out: list[Passage] = []
    seen: set[str] = set()
    for line, row in iter_tsv_rows(path):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if not out and tuple(c.strip().lower() for c in row) == PASSAGES_HEADER:
            continue
        if len(row) != 3:
            raise DataFormatError(
                f"{path}, line {line}: expected 3 tab-separated columns "
                f"(id, text, title), got {len(row)}"
            )
        pid, text, title = row
        if not pid.strip():
            raise DataFormatError(f"{path}, line {line}: empty passage id")
        if check_unique:
            if pid in seen:
                raise DataFormatError(f"{path}, line {line}: duplicate passage id {pid!r}")
            seen.add(pid)
        out.append(Passage(text, title, pid))
    return out


def _write_tsv(
    path: str | Path, rows: Iterable[Sequence], config: dict[str, Any] | None, writes: FileFormat
) -> Path:
    """Tab-separated ``rows``, atomically, each field on one line; the config beside it."""
    check_output(path, FILE, what="output path", writes=writes)
    with atomic_open(path, newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        for row in rows:
            w.writerow([one_line(x) for x in row])
    write_config(path, config)
    return Path(path)


def write_passages_tsv(
    path: str | Path, passages: Iterable[Passage], config: dict[str, Any] | None = None
) -> Path:
    """Write passages as DPR's TSV (with header), atomically. A line break inside a field is
    written as a space (no field of the format spans lines; the reader refuses one that does)."""
    rows = ((p.id, p.text, p.title) for p in passages)
    return _write_tsv(path, itertools.chain([PASSAGES_HEADER], rows), config, PASSAGES_FILE)


# ---------------------------------------------------------------------------------------------
# Questions


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    answers: list[str]
    id: str | None = None


def _parse_answers_literal(text: str, where: str) -> list[str]:
    try:
        value = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, MemoryError, RecursionError) as e:
        raise UserError(
            f"{where}: answers column is not a list literal ({e}): {text!r:.80}"
        ) from None
    return _check_answers(value, where)


def _read_qas_tsv(path: Path) -> list[Question]:
    out = []
    for line, row in iter_tsv_rows(path):
        where = f"{path}, line {line}"
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) not in (2, 3):
            raise DataFormatError(
                f"{where}: expected 2 or 3 tab-separated columns "
                f"(question, answers[, id]), got {len(row)}"
            )
        answers = _parse_answers_literal(row[1], where)
        out.append(Question(row[0], answers, row[2] if len(row) == 3 else None))
    return out


def _question_from_record(rec: Any, where: str) -> Question:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question = _check_str(rec.get("question"), where, "question")
    if "answers" in rec:
        answers = _check_answers(rec["answers"], where, "answers")
    elif "answer" in rec:
        answers = _check_answers(rec["answer"], where, "answer")
    else:
        raise UserError(f"{where}: no 'answer' or 'answers' field")
    qid = rec.get("id")
    return Question(question, answers, None if qid is None else str(qid))


def read_qas(path: str | Path) -> list[Question]:
    """Questions with answers from a DPR qas TSV/CSV or NQ-open JSONL file (SQuAD JSON too,
    through :func:`dpr_jax.data.questions.read_questions`).

    - ``*.json`` holding a list: records with ``question`` and ``answers`` (or ``answer``), e.g.
      a retrieval-results or biencoder file.
    - ``*.jsonl`` (``.gz``, ``.xz``, ``.bz2`` too): one ``{"question": ..., "answer"|"answers": [...], "id"?}`` per line.
    - anything else: tab-separated ``question, answers-list-literal[, id]``.
    """
    path = Path(path)
    name = plain_name(path)
    if name.endswith(".json"):
        data = load_json(path)
        if isinstance(data, dict) and "data" in data:
            raise UserError(
                f"{path}: SQuAD JSON; read its questions with dpr_jax.read_questions "
                "(dpr_jax.data.questions)"
            )
        if not isinstance(data, list):
            raise UserError(f"{path}: expected a list of question records")
        return [_question_from_record(r, f"{path}, record {i}") for i, r in enumerate(data)]
    if name.endswith(".jsonl"):
        return [_question_from_record(r, f"{path}, {w}") for w, r in _json_records(path)]
    return _read_qas_tsv(path)


def write_qas_tsv(
    path: str | Path, questions: Iterable[Question], config: dict[str, Any] | None = None
) -> Path:
    """DPR qas TSV: ``question<TAB>['answer', ...]`` (+ ``<TAB>id`` when every question has one).

    The answers column is the Python ``repr`` of the list, as in DPR's files (DPR reads it with
    ``eval``, we with ``ast.literal_eval``).
    """
    questions = list(questions)
    with_ids = bool(questions) and all(q.id is not None for q in questions)
    rows = ([q.question, repr([str(a) for a in q.answers]), *([q.id] if with_ids else [])]
            for q in questions)  # fmt: skip
    return _write_tsv(path, rows, config, QAS_FILE)


# ---------------------------------------------------------------------------------------------
# Bi-encoder training data


@dataclasses.dataclass(frozen=True)
class BiencoderExample:
    question: str
    answers: list[str]
    positive_ctxs: list[Passage]
    negative_ctxs: list[Passage] = dataclasses.field(default_factory=list)
    hard_negative_ctxs: list[Passage] = dataclasses.field(default_factory=list)
    id: str | None = None
    dataset: str | None = None

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {}
        if self.dataset is not None:
            d["dataset"] = self.dataset
        if self.id is not None:
            d["id"] = self.id
        d.update(
            question=self.question,
            answers=list(self.answers),
            positive_ctxs=[c.to_json() for c in self.positive_ctxs],
            negative_ctxs=[c.to_json() for c in self.negative_ctxs],
            hard_negative_ctxs=[c.to_json() for c in self.hard_negative_ctxs],
        )
        return d


@dataclasses.dataclass(frozen=True)
class BiencoderStats:
    """What :func:`read_biencoder` kept: ``records`` read, ``kept``, ``skipped_no_positive``."""

    records: int
    kept: int
    skipped_no_positive: int


def _ctx(value: Any, where: str) -> Passage:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(value).__name__}")
    text = _check_str(value.get("text"), where, "text")
    title = _check_str(value.get("title"), where, "title", optional=True) or ""
    pid = value.get("passage_id", value.get("id"))
    score = value.get("score")
    if score is not None:
        try:
            score = float(score)
        except (TypeError, ValueError):
            raise UserError(f"{where}: field 'score' is not a number: {score!r:.40}") from None
    return Passage(text, title, None if pid is None else str(pid), score)


def _ctx_list(rec: dict, key: str, where: str) -> list[Passage]:
    value = rec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{where}: field {key!r} must be a list, got {type(value).__name__}")
    return [_ctx(c, f"{where}, {key}[{j}]") for j, c in enumerate(value)]


def read_biencoder(path: str | Path) -> tuple[list[BiencoderExample], BiencoderStats]:
    """Read DPR biencoder training data (JSON list or JSONL, optionally compressed).

    Returns ``(examples, stats)``. Records without any ``positive_ctxs`` are skipped (DPR
    filters them the same way, they cannot give a training signal) and counted in
    ``stats.skipped_no_positive``; a count > 0 is also logged. A malformed record raises
    ``ValueError`` naming the file and the record index (JSON) or line (JSONL).
    """
    path = Path(path)
    examples: list[BiencoderExample] = []
    records = skipped = 0
    for w, rec in _json_records(path):
        where = f"{path}, {w}"
        records += 1
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        question = _check_str(rec.get("question"), where, "question")
        answers = _check_answers(rec.get("answers", []), where)
        positives = _ctx_list(rec, "positive_ctxs", where)
        negatives = _ctx_list(rec, "negative_ctxs", where)
        hard = _ctx_list(rec, "hard_negative_ctxs", where)
        if not positives:
            skipped += 1
            continue
        qid = rec.get("id")
        dataset = rec.get("dataset")
        examples.append(
            BiencoderExample(
                question,
                answers,
                positives,
                negatives,
                hard,
                None if qid is None else str(qid),
                dataset if isinstance(dataset, str) else None,
            )  # fmt: skip
        )
    if skipped:
        logger.info("%s: skipped %d of %d records without positive_ctxs", path, skipped, records)
    return examples, BiencoderStats(records, len(examples), skipped)


def write_biencoder(
    path: str | Path, examples: Iterable[BiencoderExample], config: dict[str, Any] | None = None
) -> Path:
    """Write DPR biencoder JSON (a list; JSONL when the name ends in ``.jsonl``, compressed or not)."""
    out = _write_records(path, (e.to_json() for e in examples), BIENCODER_FILE)
    write_config(path, config)
    return out


# ---------------------------------------------------------------------------------------------
# Retrieval results and reader predictions


def _get(obj: Any, name: str, default: Any = None) -> Any:
    return obj.get(name, default) if isinstance(obj, dict) else getattr(obj, name, default)


def _score(value: Any, where: str) -> float:
    if value is None:
        return float("nan")
    try:
        return float(value)  # DPR writes scores as numbers or as strings
    except (TypeError, ValueError):
        raise UserError(f"{where}: field 'score' is not a number: {value!r:.40}") from None


def _result_record(rec: Any, where: str) -> dict[str, Any]:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    question = _check_str(rec.get("question"), where, "question")
    answers = _check_answers(rec.get("answers"), where)
    ctxs = rec.get("ctxs")
    if not isinstance(ctxs, list):
        raise UserError(f"{where}: field 'ctxs' must be a list, got {type(ctxs).__name__}")
    out_ctxs = []
    for j, c in enumerate(ctxs):
        cw = f"{where}, ctxs[{j}]"
        if not isinstance(c, dict):
            raise UserError(f"{cw}: expected a JSON object, got {type(c).__name__}")
        if c.get("id") is None:
            raise UserError(f"{cw}: missing field 'id'")
        ctx = {
            "id": str(c["id"]),
            "title": _check_str(c.get("title"), cw, "title", optional=True) or "",
            "text": _check_str(c.get("text"), cw, "text", optional=True) or "",
            "score": _score(c.get("score"), cw),
        }
        flag = c.get("has_answer")
        if flag is not None:
            if not isinstance(flag, bool):
                raise UserError(f"{cw}: field 'has_answer' must be true/false, got {flag!r:.20}")
            ctx["has_answer"] = flag
        elif c.get("text") is None:  # scored as a miss, silently, until issue 19
            raise UserError(
                f"{cw}: has neither 'text' nor 'has_answer', so whether it holds an answer "
                "cannot be told; write the passages' text into the results"
            )
        out_ctxs.append(ctx)
    return {"question": question, "answers": answers, "ctxs": out_ctxs}


def read_retrieval_results(path: str | Path) -> list[dict[str, Any]]:
    """DPR retrieval-results JSON -> list of validated ``{question, answers, ctxs}`` dicts.

    ``ctxs[j]`` has ``id`` (str), ``title``, ``text``, ``score`` (float; NaN if absent) and
    ``has_answer`` when the file stores it.
    """
    path = Path(path)
    return [_result_record(r, f"{path}, {w}") for w, r in _json_records(path)]


def _clean_float(x: Any) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def write_retrieval_results(
    path: str | Path, results: Sequence[Any], config: dict[str, Any] | None = None
) -> Path:
    """Write retrieval results (dicts or objects with question/answers/ctxs) as DPR's JSON.

    Non-finite scores (e.g. -inf padding) are written as ``null``.
    """

    def records():
        for r in results:
            ctxs = []
            for c in _get(r, "ctxs"):
                d = {
                    "id": str(_get(c, "id")),
                    "title": _get(c, "title", "") or "",
                    "text": _get(c, "text", "") or "",
                    "score": _clean_float(_get(c, "score", float("nan"))),
                }
                if _get(c, "has_answer") is not None:
                    d["has_answer"] = bool(_get(c, "has_answer"))
                ctxs.append(d)
            yield {"question": _get(r, "question"), "answers": list(_get(r, "answers")),
                   "ctxs": ctxs}  # fmt: skip

    out = _write_records(path, records(), RESULTS_FILE)
    write_config(path, config)
    return out


PREDICTION_FIELDS = ("text", "score", "relevance_score", "passage_idx", "passage")


def _prediction_record(rec: Any, where: str) -> dict[str, Any]:
    question = _get(rec, "question")
    gold = _get(rec, "gold_answers")
    preds = _get(rec, "predictions")
    if not isinstance(question, str):
        raise UserError(f"{where}: field 'question' must be a string")
    _check_answers(gold, where, "gold_answers")
    if not isinstance(preds, (list, tuple)):
        raise UserError(f"{where}: field 'predictions' must be a list")
    out = []
    for j, p in enumerate(preds):
        pw = f"{where}, predictions[{j}]"
        pred = _get(p, "prediction")
        if _get(p, "top_k") is None or pred is None:
            raise UserError(f"{pw}: needs 'top_k' and 'prediction'")
        missing = [k for k in PREDICTION_FIELDS if _get(pred, k) is None]
        if missing:
            raise UserError(f"{pw}: prediction lacks {missing}")
        out.append({
            "top_k": int(_get(p, "top_k")),
            "prediction": {
                "text": str(_get(pred, "text")),
                "score": float(_get(pred, "score")),
                "relevance_score": float(_get(pred, "relevance_score")),
                "passage_idx": int(_get(pred, "passage_idx")),
                "passage": str(_get(pred, "passage")),
            },
        })  # fmt: skip
    return {"question": question, "gold_answers": list(gold), "predictions": out}


def write_reader_predictions(
    path: str | Path, predictions: Sequence[Any], config: dict[str, Any] | None = None
) -> Path:
    """Write DPR reader predictions JSON (validated; dicts or objects with the same fields)."""
    records = [_prediction_record(r, f"prediction {i}") for i, r in enumerate(predictions)]
    out = _write_records(path, records, PREDICTIONS_FILE)
    write_config(path, config)
    return out


def read_reader_predictions(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    return [_prediction_record(r, f"{path}, {w}") for w, r in _json_records(path)]
