"""Answer matching as DPR and SQuAD define it (Karpukhin et al. 2020, sec. 5.2 and 6): a leaf
module that data preparation, BM25 mining, the reader and evaluation all use.

Retrieval (sec. 5.2, Table 2): "a passage contains an answer" is DPR's ``has_answer``
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
"""

from __future__ import annotations

import collections
import functools
import re
import string
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

import regex

from dpr_jax.errors import UserError

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
    raise UserError(f"match_type must be one of {MATCH_TYPES}, got {match_type!r}")


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
