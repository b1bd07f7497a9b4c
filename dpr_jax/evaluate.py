"""Evaluation as DPR reports it (Karpukhin et al. 2020, sec. 5.2 retrieval, sec. 6 reader).

Retrieval (sec. 5.2, Table 2): *top-k accuracy* is the fraction of questions for which at least
one of the top-k retrieved passages contains an answer. "Contains" is DPR's ``has_answer``
(``dpr/data/qa_validation.py`` + ``dpr/utils/tokenizers.py``, copied verbatim by pyserini):

- ``match_type="string"``: NFD-normalise text and answer, tokenize both with DrQA's
  ``SimpleTokenizer`` (runs of letters/numbers/marks ``[\\p{L}\\p{N}\\p{M}]+``, or any single
  other non-space, non-control character ``[^\\p{Z}\\p{C}]``), lower-case the tokens, and look for
  the answer's token sequence as a contiguous sub-sequence of the text's tokens. So "cat" does not
  match "category", punctuation is its own token, and accents are *not* stripped: NFD splits "é"
  into "e" + a combining mark and the mark stays inside the token, so "Beyonce" does not match
  "Beyoncé" (while composed and decomposed "é" match each other).
- ``match_type="regex"`` (CuratedTREC): each answer is a regular expression, compiled with
  IGNORECASE | UNICODE | MULTILINE by the ``regex`` module and searched in the NFD text; an
  answer that does not compile matches nothing.

DPR quirk kept on purpose: an answer with no tokens (empty or whitespace only) matches every
passage in string mode, exactly as in DPR (the empty sequence is a sub-sequence of everything).

Reader (sec. 6, Table 4): SQuAD v1.1's official exact match and F1 (``normalize_answer``:
lower-case, drop punctuation and the articles a/an/the, squeeze whitespace; F1 over bags of
tokens; both maximised over the gold answers).

Questions without gold answers (an empty answers list) are **kept and counted as misses** by every
command, as DPR's retrieval validation does (``calculate_matches`` divides by all questions, and
``has_answer`` of no answers is false): ``retrieve`` writes them with every ``has_answer`` false,
``evaluate`` counts them as misses at every k, ``read`` and ``ask`` score their answers EM 0 and
F1 0 (:func:`exact_match_score` / :func:`f1_score` of no gold answers are 0, where SQuAD's script
would fail on ``max()`` of nothing). The commands report how many there were
(:func:`count_without_answers`), so a file with many of them is noticed.

ANN recall: the fraction of the exact top-k ids that an approximate index also returns in its
top-k, averaged over queries (how much ScaNN/FAISS lose against brute force).

``dpr-jax evaluate --results FILE`` prints the top-k table of a retrieval-results JSON.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import re
import string
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import regex

# DrQA / DPR SimpleTokenizer.
ALPHA_NUM = r"[\p{L}\p{N}\p{M}]+"
NON_WS = r"[^\p{Z}\p{C}]"
_FLAGS = regex.IGNORECASE | regex.UNICODE | regex.MULTILINE
_TOKEN_RE = regex.compile(f"({ALPHA_NUM})|({NON_WS})", flags=_FLAGS)  # DPR's, as written
# The same alternation without groups, so that findall returns the tokens (2x faster).
_TOKEN_FINDALL = regex.compile(f"{ALPHA_NUM}|{NON_WS}", flags=_FLAGS)

MATCH_TYPES = ("string", "regex")


def _normalize(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def simple_tokenize(text: str, uncased: bool = True) -> list[str]:
    """DPR's ``SimpleTokenizer().tokenize(text).words(uncased)`` (no normalisation here)."""
    words = _TOKEN_FINDALL.findall(text)
    return [w.lower() for w in words] if uncased else words


@functools.lru_cache(maxsize=4096)
def _compile_answer_regex(pattern: str):
    try:
        return regex.compile(pattern, flags=regex.IGNORECASE | regex.UNICODE | regex.MULTILINE)
    except regex.error:
        return None  # DPR: an answer that is not a valid regex matches nothing


def regex_match(text: str, pattern: str) -> bool:
    """True if ``pattern`` (IGNORECASE | UNICODE | MULTILINE) is found anywhere in ``text``."""
    compiled = _compile_answer_regex(pattern)
    return compiled is not None and compiled.search(text) is not None


def has_answer(answers: Iterable[str], text: str, match_type: str = "string") -> bool:
    """DPR's ``has_answer``: does ``text`` contain any of ``answers`` (see the module docstring)."""
    if isinstance(answers, str):
        raise TypeError("answers must be a list of strings, not a single string")
    text = _normalize(text)
    if match_type == "string":
        words = simple_tokenize(text)
        for answer in answers:
            ans = simple_tokenize(_normalize(answer))
            n = len(ans)
            for i in range(0, len(words) - n + 1):
                if words[i : i + n] == ans:
                    return True
        return False
    if match_type == "regex":
        return any(regex_match(text, _normalize(a)) for a in answers)
    raise ValueError(f"match_type must be one of {MATCH_TYPES}, got {match_type!r}")


class AnswerMatcher:
    """``has_answer(answers, text, "string")`` for many (answers, text) pairs, with caching.

    Tokens of the SimpleTokenizer never contain whitespace, so "the answer's tokens are a
    contiguous run of the text's tokens" is the same as "' ' + ' '.join(answer tokens) + ' '
    is a substring of ' ' + ' '.join(text tokens) + ' '". Each text is tokenized once (cached by
    key), which makes mining hard negatives over millions of (question, passage) pairs cheap.
    Results equal :func:`has_answer` exactly (tested).
    """

    def __init__(self):
        self._texts: dict[Any, str] = {}

    @staticmethod
    def _joined(text: str) -> str:
        return " " + " ".join(simple_tokenize(_normalize(text))) + " "

    def answer_keys(self, answers: Iterable[str]) -> list[str]:
        return [self._joined(a) for a in answers]

    def text_key(self, text: str, key: Any = None) -> str:
        if key is None:
            return self._joined(text)
        joined = self._texts.get(key)
        if joined is None:
            joined = self._texts[key] = self._joined(text)
        return joined

    def match(self, answer_keys: Sequence[str], text: str, key: Any = None) -> bool:
        joined = self.text_key(text, key)
        # An answer with no tokens is "  ": DPR matches it everywhere.
        return any(a == "  " or a in joined for a in answer_keys)


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1 official evaluation (reader EM / F1)


_PUNCT = frozenset(string.punctuation)


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (SQuAD v1.1)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _em(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def _f1(prediction: str, gold: str) -> float:
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    common = collections.Counter(pred_tokens) & collections.Counter(gold_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _gold_list(gold_answers: str | Iterable[str]) -> list[str]:
    return [gold_answers] if isinstance(gold_answers, str) else list(gold_answers)


def exact_match_score(prediction: str, gold_answers: str | Iterable[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0 (also with
    no gold answers: a miss, see the module docstring)."""
    return float(max((_em(prediction, g) for g in _gold_list(gold_answers)), default=False))


def f1_score(prediction: str, gold_answers: str | Iterable[str]) -> float:
    """Token-bag F1 of the normalised strings, maximised over the gold answers (0.0 with none)."""
    return max((_f1(prediction, g) for g in _gold_list(gold_answers)), default=0.0)


def count_without_answers(answer_lists: Iterable[Sequence[str]]) -> int:
    """How many questions have no gold answer (they are kept and count as misses)."""
    return sum(1 for a in answer_lists if not a)


# ---------------------------------------------------------------------------------------------
# Retrieval metrics


def _field(obj: Any, name: str, default: Any = None) -> Any:
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def question_hits(results: Sequence[Any], match_type: str = "string") -> list[list[bool]]:
    """Per question, per retrieved ctx: has_answer (the stored flag, recomputed when absent)."""
    out = []
    for i, r in enumerate(results):
        answers = _field(r, "answers")
        ctxs = _field(r, "ctxs")
        if answers is None or ctxs is None:
            raise ValueError(f"result {i}: needs 'answers' and 'ctxs'")
        hits = []
        for c in ctxs:
            flag = _field(c, "has_answer")
            if flag is None:
                flag = has_answer(answers, _field(c, "text") or "", match_type)
            hits.append(bool(flag))
        out.append(hits)
    return out


def top_k_accuracy(
    results: Sequence[Any],
    ks: Sequence[int] = (1, 5, 20, 100),
    match_type: str = "string",
    recompute: bool = False,
) -> dict[int, float]:
    """DPR's top-k retrieval accuracy of retrieval-results records (dicts or objects).

    A question counts as a hit at k if any of its first k ctxs has the answer. ``has_answer``
    stored in a ctx is trusted unless ``recompute``; absent ones are computed with ``match_type``.
    A question without gold answers is kept and is a miss at every k (DPR's convention).
    A question with fewer than k ctxs is judged on the ctxs it has (DPR's files always have the
    same number per question).
    """
    if not results:
        raise ValueError("no results to evaluate")
    if recompute:
        results = [
            {
                "answers": _field(r, "answers"),
                "ctxs": [{"text": _field(c, "text")} for c in (_field(r, "ctxs") or [])],
            }
            for r in results
        ]
    hits = question_hits(results, match_type)
    first = [next((j for j, h in enumerate(row) if h), None) for row in hits]
    return {int(k): sum(1 for f in first if f is not None and f < k) / len(first) for k in ks}


def ann_recall(approx_ids: Sequence[Sequence[Any]], exact_ids: Sequence[Sequence[Any]], k: int):
    """Mean over queries of |approx top-k ∩ exact top-k| / |exact top-k|.

    Empty ids ("" / None, how indexes pad missing results) are ignored on both sides.
    """
    if len(approx_ids) != len(exact_ids):
        raise ValueError(f"{len(approx_ids)} approximate vs {len(exact_ids)} exact result rows")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    recalls = []
    for a, e in zip(approx_ids, exact_ids):
        truth = {str(x) for x in list(e)[:k] if x is not None and str(x) != ""}
        if not truth:
            continue
        found = {str(x) for x in list(a)[:k]}
        recalls.append(len(truth & found) / len(truth))
    if not recalls:
        raise ValueError("no query has exact results to compare with")
    return float(sum(recalls) / len(recalls))


# ---------------------------------------------------------------------------------------------
# CLI


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--ks must be comma-separated integers, got {text!r}"
        ) from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--ks must be positive integers, got {text!r}")
    return ks


def format_table(rows: list[tuple[str, str]], header: tuple[str, str]) -> str:
    width = max(len(r[0]) for r in [header, *rows])
    lines = [f"{header[0]:<{width}}  {header[1]}", f"{'-' * width}  {'-' * len(header[1])}"]
    lines += [f"{a:<{width}}  {b}" for a, b in rows]
    return "\n".join(lines)


def cli_main(argv: list[str] | None = None) -> int:
    from dpr_jax.data.formats import read_retrieval_results

    ap = argparse.ArgumentParser(
        prog="dpr-jax evaluate",
        description="DPR top-k retrieval accuracy of a retrieval-results JSON "
        "(and ANN recall against exact results).",
    )
    ap.add_argument("--results", required=True, help="retrieval-results JSON (DPR format)")
    ap.add_argument("--ks", type=_parse_ks, default=[1, 5, 20, 100], help="e.g. 1,5,20,100")
    ap.add_argument("--match", default="string", choices=list(MATCH_TYPES),
                    help="has_answer matching when recomputed (regex: CuratedTREC)")  # fmt: skip
    ap.add_argument("--recompute", action="store_true",
                    help="recompute has_answer even where the file stores it")  # fmt: skip
    ap.add_argument("--exact-results", help="results of exact search over the same questions: "
                    "also report ANN recall@k of --results against it")  # fmt: skip
    ap.add_argument("--json", dest="json_out", help="also write the metrics to this JSON file")
    args = ap.parse_args(argv)

    results = read_retrieval_results(args.results)
    if not results:
        raise ValueError(f"{args.results}: no questions in the results file")
    acc = top_k_accuracy(results, args.ks, args.match, recompute=args.recompute)
    depth = max(len(r["ctxs"]) for r in results)
    note = lambda k: "  (k > ctxs)" if k > depth else ""
    rows = [(f"top-{k}", f"{100 * v:6.2f}%{note(k)}") for k, v in acc.items()]
    metrics: dict[str, Any] = {"questions": len(results), "top_k_accuracy": acc}
    if args.exact_results:
        exact = read_retrieval_results(args.exact_results)
        if len(exact) != len(results):
            raise ValueError(
                f"{args.exact_results}: {len(exact)} questions, but {args.results} has "
                f"{len(results)}"
            )
        for i, (a, e) in enumerate(zip(results, exact)):
            if a["question"] != e["question"]:
                raise ValueError(
                    f"{args.exact_results}: question {i} is {e['question']!r}, but in "
                    f"{args.results} it is {a['question']!r}"
                )
        approx_ids = [[c["id"] for c in r["ctxs"]] for r in results]
        exact_ids = [[c["id"] for c in r["ctxs"]] for r in exact]
        recall = {k: ann_recall(approx_ids, exact_ids, k) for k in args.ks}
        metrics["ann_recall"] = recall
        rows += [(f"recall@{k}", f"{100 * v:6.2f}%") for k, v in recall.items()]
    no_gold = count_without_answers(r["answers"] for r in results)
    metrics["questions_without_answers"] = no_gold
    print(f"{args.results}: {len(results):,} questions, up to {depth} ctxs each")
    if no_gold:
        print(f"{no_gold:,} questions have no gold answers: kept and counted as misses (as DPR)")
    print(format_table(rows, ("metric", "value")))
    if args.json_out:
        from dpr_jax.data.formats import atomic_write_text

        payload = {**metrics, "config": {k: v for k, v in vars(args).items()}}
        atomic_write_text(args.json_out, json.dumps(payload, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
