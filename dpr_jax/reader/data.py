"""Reader inputs and answer-span labels (Karpukhin et al. 2020, sec. 6.1; DPR's ``reader_data.py``).

The reader sees each (question, passage) pair as one BERT sequence, the layout of DPR and of
Hugging Face's ``DPRReaderTokenizer``::

    [CLS] question [SEP] title [SEP] text            (``trailing_sep=True`` appends one [SEP])

with all-zero token_type_ids (:class:`dpr_jax.reader.model.Reader` always feeds zeros).

Truncation, in this order (``ReaderInputConfig``):

- the question keeps its first ``max_question_length`` word pieces, so a very long question can
  never crowd the passage out of the sequence (Hugging Face instead cuts the whole concatenation
  at ``max_length``, which for a long enough question leaves no passage at all);
- the title keeps what fits in ``max_length`` after the question and the special tokens;
- the passage text fills the rest and is cut at ``max_length`` (for training, as DPR; reading,
  :class:`dpr_jax.reader.span.ReaderPredictor` reads a text that does not fit in overlapping
  windows instead, :meth:`ReaderTokenizer.windows`).

Every passage-text token keeps its character offsets in the original text, so a predicted token
span maps back to the exact original substring (:mod:`dpr_jax.reader.span`).

Answer spans (DPR's ``_find_answer_positions``): each answer string is tokenized on its own and
*every* occurrence of its word-piece sequence in the passage text is a gold span, for every
answer. One refinement over DPR: a match must end on a word boundary (the next token is not a
``##`` continuation), so the answer "cat" is not found inside "catapults" (``cat ##ap ##ult``).
Spans cut off by truncation are dropped; a passage whose spans are all cut off cannot be a
positive.

Training samples (DPR's ``_create_question_passages_tensors``): per question, M passages:
one positive (a passage with ``has_answer`` and at least one span; chosen at random among the
question's positives) at index 0, then M-1 negatives drawn at random from its first
``max_negatives`` passages without the answer. Slots left when a question has fewer negatives
are padding (``passage_mask`` 0: out of the selection softmax, unlike DPR, which scores empty
sequences). Questions without any usable positive are skipped and counted. Negatives with empty
text are kept (they are still passages to rank); at prediction time a passage with no text tokens
is scored for relevance but yields no span.

The random choices depend only on ``(seed, epoch, question index)``, so a batch is a pure
function of the training step: resuming at step s reproduces the uninterrupted run exactly.

Sources (:func:`read_reader_examples`):

- DPR retrieval-results JSON: ``{question, answers, ctxs: [{id, title, text, has_answer}]}``,
  passages in retrieval order; a missing ``has_answer`` is computed with DPR's ``has_answer``;
- DPR biencoder JSON: ``positive_ctxs`` (positives) then ``hard_negative_ctxs`` and
  ``negative_ctxs`` (negatives);
- SQuAD v1.1 JSON: the gold paragraph is the positive, the article's other paragraphs that do
  not contain an answer are the negatives (in a seeded random order).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from dpr_jax.data.answers import AnswerMatcher, has_answer
from dpr_jax.data.formats import Passage, open_text, read_biencoder, read_retrieval_results
from dpr_jax.data.squad import parse_squad
from dpr_jax.data.textio import json_error
from dpr_jax.data.tokenize import DPRTokenizer, padded_length
from dpr_jax.errors import UserError

FORMATS = ("auto", "retrieval", "biencoder", "squad")


@dataclasses.dataclass(frozen=True)
class ReaderInputConfig:
    """How (question, passage) pairs become sequences. Saved with every reader model."""

    max_length: int = 350  # DPR's reader sequence length
    max_question_length: int = 64  # word pieces kept of the question
    trailing_sep: bool = False  # DPR and Hugging Face: no [SEP] after the text

    def __post_init__(self):
        if self.max_question_length < 1:
            raise UserError(
                f"ReaderInputConfig.max_question_length must be >= 1, got {self.max_question_length}"
            )
        need = self.max_question_length + 4 + int(self.trailing_sep)
        if self.max_length < need:
            raise UserError(
                f"ReaderInputConfig.max_length {self.max_length} leaves no room for passage text "
                f"after a question of max_question_length {self.max_question_length} and the "
                f"special tokens (needs >= {need})"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReaderInputConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"ReaderInputConfig: unknown fields {unknown} (have {sorted(names)})")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class ReaderExample:
    """A question with its answers and candidate passages (retrieval order)."""

    question: str
    answers: tuple[str, ...]
    passages: tuple[Passage, ...]
    id: str | None = None


@dataclasses.dataclass(frozen=True)
class PassageTokens:
    """A passage tokenized once: title ids, text ids, char offsets and ``##`` flags of the text."""

    title_ids: np.ndarray  # (Lt,) int32
    text_ids: np.ndarray  # (L,) int32
    offsets: np.ndarray  # (L, 2) int32: [start, end) characters of each text token
    subword: np.ndarray  # (L,) bool: token is a "##" continuation of the previous word


@dataclasses.dataclass(frozen=True)
class ReaderSequence:
    ids: np.ndarray  # (<= max_length,) int32, unpadded
    text_start: int  # position of the first passage-text token
    text_len: int  # passage-text tokens kept after truncation (0: no span possible)


# ---------------------------------------------------------------------------------------------
# Tokenization


class ReaderTokenizer:
    """Builds reader sequences with a Hugging Face BERT tokenizer (see the module docstring).

    ``tokenizer``: a :class:`dpr_jax.data.tokenize.DPRTokenizer`, a Hugging Face fast tokenizer
    or a directory holding one. Passage tokenizations are cached by (title, text); the cache is
    emptied whenever it would exceed ``max_cache`` entries (a long-running reader stays bounded).
    """

    def __init__(
        self, tokenizer: Any, config: ReaderInputConfig | None = None, max_cache: int = 200_000
    ):

        if isinstance(tokenizer, (str, Path)):
            tokenizer = DPRTokenizer(tokenizer)
        self.dpr_tokenizer = tokenizer if isinstance(tokenizer, DPRTokenizer) else None
        self.tok = tokenizer.tok if isinstance(tokenizer, DPRTokenizer) else tokenizer
        if not getattr(self.tok, "is_fast", False):
            raise UserError(
                f"{type(self.tok).__name__}: the reader needs a fast tokenizer (character offsets)"
            )
        self.config = config or ReaderInputConfig()
        self.cls_id = int(self.tok.cls_token_id)
        self.sep_id = int(self.tok.sep_token_id)
        self.pad_id = int(self.tok.pad_token_id)
        vocab = self.tok.convert_ids_to_tokens(list(range(len(self.tok))))
        self._subword_vocab = np.array([str(t).startswith("##") for t in vocab], bool)
        self.max_cache = max_cache
        self._cache: dict[tuple[str, str], PassageTokens] = {}

    def is_subword(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        out = np.zeros(ids.shape, bool)
        ok = (ids >= 0) & (ids < len(self._subword_vocab))
        out[ok] = self._subword_vocab[ids[ok]]
        return out

    def _encode(self, texts: Sequence[str], offsets: bool = False):
        return self.tok(list(texts), add_special_tokens=False, return_offsets_mapping=offsets)

    def question_ids(self, questions: Sequence[str]) -> list[np.ndarray]:
        """Word pieces of each question, cut to ``max_question_length``."""
        if not questions:
            return []
        enc = self._encode(questions)["input_ids"]
        n = self.config.max_question_length
        return [np.asarray(ids[:n], np.int32) for ids in enc]

    def answer_ids(self, answers: Sequence[str]) -> list[np.ndarray]:
        """Word pieces of each answer (empty answers give empty arrays, which match nothing)."""
        if not answers:
            return []
        return [np.asarray(ids, np.int32) for ids in self._encode(answers)["input_ids"]]

    def passage_tokens(self, passages: Sequence[Passage]) -> list[PassageTokens]:
        """Tokenize (title, text) of each passage; cached, new ones in one batched call."""
        keys = [(p.title or "", p.text or "") for p in passages]
        todo = list(dict.fromkeys(k for k in keys if k not in self._cache))
        if todo and len(self._cache) + len(todo) > self.max_cache:
            self._cache.clear()
            todo = list(dict.fromkeys(keys))
        if todo:
            titles = self._encode([t for t, _ in todo])["input_ids"]
            texts = self._encode([x for _, x in todo], offsets=True)
            for k, t_ids, x_ids, offs in zip(
                todo, titles, texts["input_ids"], texts["offset_mapping"]
            ):
                x = np.asarray(x_ids, np.int32)
                self._cache[k] = PassageTokens(
                    np.asarray(t_ids, np.int32),
                    x,
                    np.asarray(offs, np.int32).reshape(-1, 2),
                    self.is_subword(x),
                )
        return [self._cache[k] for k in keys]

    def clear_cache(self) -> None:
        self._cache.clear()

    def sequence(self, q_ids: np.ndarray, p: PassageTokens) -> ReaderSequence:
        """``[CLS] q [SEP] title [SEP] text [SEP]?`` cut to ``max_length`` (title, then text)."""
        cfg = self.config
        tail = 1 if cfg.trailing_sep else 0
        room = cfg.max_length - 3 - tail - len(q_ids)  # >= 1 by ReaderInputConfig's check
        title = p.title_ids[:room]
        text = p.text_ids[: room - len(title)]
        head = np.concatenate([[self.cls_id], q_ids, [self.sep_id], title, [self.sep_id]])
        parts = [head, text] + ([np.array([self.sep_id])] if tail else [])
        return ReaderSequence(np.concatenate(parts).astype(np.int32), len(head), len(text))

    def windows(
        self, q_ids: np.ndarray, p: PassageTokens, overlap: int
    ) -> list[tuple[ReaderSequence, int]]:
        """``[(sequence, its first text token)]``: the passage text read in windows of the room
        :meth:`sequence` leaves after the question and the title, each window starting
        ``overlap`` tokens before the previous one ends (Hugging Face's question-answering
        ``doc_stride``); a text that fits is one window, :meth:`sequence`'s own."""
        if overlap < 0:
            raise UserError(f"window overlap must be >= 0 tokens, got {overlap}")
        first = self.sequence(q_ids, p)
        out, n, room = [(first, 0)], len(p.text_ids), first.text_len
        if room < 1 or n <= room:
            return out
        step, a = max(1, room - overlap), 0
        while a + room < n:
            a = min(a + step, n - room)  # the last window ends at the text's end
            rest = dataclasses.replace(p, text_ids=p.text_ids[a:], offsets=p.offsets[a:],
                                       subword=p.subword[a:])  # fmt: skip
            out.append((self.sequence(q_ids, rest), a))
        return out

    def pad(self, seqs: Sequence[np.ndarray], length: int | None = None):
        """-> ids, mask: (len(seqs), length) int32, padded with the pad id."""
        t = self.config.max_length if length is None else length
        ids = np.full((len(seqs), t), self.pad_id, np.int32)
        mask = np.zeros((len(seqs), t), np.int32)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = s[:t]
            mask[i, : min(len(s), t)] = 1
        return ids, mask


def find_answer_spans(
    text_ids: np.ndarray, answers_ids: Iterable[np.ndarray], subword: np.ndarray | None = None
) -> list[tuple[int, int]]:
    """Every (start, end) (inclusive, text-token positions) where an answer's word pieces occur.

    ``subword[i]`` marks ``##`` continuation tokens: a match followed by one is part of a longer
    word and is rejected. Sorted, without duplicates.
    """
    text_ids = np.asarray(text_ids)
    n = len(text_ids)
    spans: set[tuple[int, int]] = set()
    for a in answers_ids:
        a = np.asarray(a)
        k = len(a)
        if k == 0 or k > n:
            continue
        windows = np.lib.stride_tricks.sliding_window_view(text_ids, k)  # (n-k+1, k)
        for s in np.flatnonzero((windows == a).all(axis=1)):
            e = int(s) + k - 1
            if subword is not None and e + 1 < n and subword[e + 1]:
                continue
            spans.add((int(s), e))
    return sorted(spans)


# ---------------------------------------------------------------------------------------------
# Training samples


@dataclasses.dataclass
class _TrainQuestion:
    q_ids: np.ndarray
    positives: list[tuple[PassageTokens, np.ndarray]]  # spans (K, 2) in sequence positions
    negatives: list[PassageTokens]


class ReaderTrainData:
    """Batches of (N questions, M passages) with gold spans; a pure function of the step.

    Arrays of :meth:`batch` (``n`` = questions of the requested rows, ``A = max_answers``)::

        input_ids, attention_mask  (n, M, T) int32
        passage_mask               (n, M) float32   1 real passage, 0 padding slot
        start_positions, end_positions  (n, A) int32  spans of the positive (passage 0)
        answer_mask                (n, A) float32   1 for real spans
        question_mask              (n,) float32     all 1 (kept for a uniform batch layout)

    ``T`` is ``max_length`` unless ``bucket`` > 0: then each global batch is padded only to the
    longest sequence any of its questions can yield, rounded up to a multiple of ``bucket``
    tokens (:func:`dpr_jax.data.tokenize.padded_length`). The loss is unchanged (padding is
    masked out of attention and of the span softmax), a batch of 100-word passages costs ~192
    positions instead of 256, and every process computes the same ``T`` from the global batch
    (a per-question bound fixed in ``__init__``), so the processes of a pod agree on the shape.

    ``length_groups`` > 0 (HF's ``group_by_length``): each epoch's permutation is cut into groups
    of ``length_groups`` batches, each group sorted by that bound and cut into batches, and the
    epoch's batches shuffled: batches of similar lengths, so ``bucket`` pads far less.
    """

    def __init__(
        self,
        examples: Sequence[ReaderExample],
        tokenizer: ReaderTokenizer,
        passages_per_question: int = 24,
        max_answers: int = 10,
        max_negatives: int = 50,
        seed: int = 0,
        where: str = "",
        progress: bool = False,
        bucket: int = 0,
        length_groups: int = 0,
    ):

        if bucket < 0 or length_groups < 0:
            raise UserError(f"bucket and length_groups must be >= 0, got {bucket}, {length_groups}")
        self.bucket, self.length_groups = bucket, length_groups
        if passages_per_question < 1:
            raise UserError(f"passages_per_question must be >= 1, got {passages_per_question}")
        if max_answers < 1:
            raise UserError(f"max_answers must be >= 1, got {max_answers}")
        self.tokenizer = tokenizer
        self.m = passages_per_question
        self.max_answers = max_answers
        self.max_negatives = max_negatives
        self.seed = seed
        self.questions: list[_TrainQuestion] = []
        self.stats = dict(questions=0, kept=0, skipped_no_positive=0, skipped_spans_truncated=0,
                          positives_without_span=0, fewer_negatives=0)  # fmt: skip
        # Tokenize everything up front in large batched calls (the fast tokenizer's parallel
        # path); the loop below then reads the passage cache.
        q_ids_all = tokenizer.question_ids([e.question for e in examples])
        flat_answers = [a for e in examples for a in e.answers]
        answer_ids = iter(tokenizer.answer_ids(flat_answers))
        answers_all = [[next(answer_ids) for _ in e.answers] for e in examples]
        selected = [
            ([p for p in e.passages if p.has_answer],
             [p for p in e.passages if not p.has_answer][: max(0, max_negatives)])
            for e in examples
        ]  # fmt: skip
        todo = [p for pos, neg in selected for p in (*pos, *neg)]
        chunk = 4096
        for lo in tqdm(
            range(0, len(todo), chunk),
            desc=f"tokenize passages {where}".strip(),
            disable=not progress or len(todo) <= chunk,
            dynamic_ncols=True,
        ):
            tokenizer.passage_tokens(todo[lo : lo + chunk])
        lengths: list[int] = []
        for q_ids, answers, (pos_p, neg_p) in zip(q_ids_all, answers_all, selected):
            self.stats["questions"] += 1
            positives, truncated, longest = [], False, 0
            for toks in tokenizer.passage_tokens(pos_p):
                spans = find_answer_spans(toks.text_ids, answers, toks.subword)
                if not spans:
                    self.stats["positives_without_span"] += 1
                    continue
                seq = tokenizer.sequence(q_ids, toks)
                kept = [(s, e) for s, e in spans if e < seq.text_len]
                if not kept:
                    truncated = True
                    continue
                arr = np.asarray(kept[:max_answers], np.int32) + seq.text_start
                positives.append((toks, arr))
                longest = max(longest, len(seq.ids))
            if not positives:
                key = "skipped_spans_truncated" if truncated else "skipped_no_positive"
                self.stats[key] += 1
                continue
            negatives = tokenizer.passage_tokens(neg_p)
            if len(negatives) < self.m - 1:
                self.stats["fewer_negatives"] += 1
            self.questions.append(_TrainQuestion(q_ids, positives, negatives))
            # the longest sequence this question can put in a batch (negatives only when drawn)
            if self.m > 1 and negatives:
                longest = max(longest, *(len(tokenizer.sequence(q_ids, t).ids) for t in negatives))
            lengths.append(longest)
        self.stats["kept"] = len(self.questions)
        self.lengths = np.asarray(lengths, np.int32)

    def __len__(self) -> int:
        return len(self.questions)

    def batches_per_epoch(self, batch_size: int) -> int:
        n = len(self.questions) // batch_size
        if n < 1:
            raise UserError(
                f"{len(self.questions)} usable training questions, fewer than one batch of "
                f"{batch_size}"
            )
        return n

    def question_order(self, epoch: int, batch_size: int = 1) -> np.ndarray:
        """The seeded permutation of the questions in ``epoch`` (cached for the last epoch);
        with ``length_groups``, grouped into batches of ``batch_size`` (see the class)."""
        key = (epoch, batch_size if self.length_groups else 0, self.length_groups)
        if getattr(self, "_order_key", None) != key:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(len(self.questions))
            if self.length_groups:
                order = self._grouped(order, rng, batch_size)
            self._order, self._order_key = order, key
        return self._order

    def _grouped(self, order: np.ndarray, rng: np.random.Generator, b: int) -> np.ndarray:
        """``order`` with each group of ``length_groups`` batches of ``b`` sorted by length
        (longest first), then its batches shuffled; the questions past the last full batch stay
        last."""
        nb = len(order) // b
        full, rest = order[: nb * b], order[nb * b :]
        g = self.length_groups * b
        parts = [full[i : i + g] for i in range(0, len(full), g)]
        sorted_full = np.concatenate(
            [p[np.argsort(-self.lengths[p], kind="stable")] for p in parts]
        )
        batches = sorted_full.reshape(nb, b)[rng.permutation(nb)]
        return np.concatenate([batches.reshape(-1), rest])

    def batch_length(self, idx: np.ndarray) -> int:
        """``T`` of a global batch of questions ``idx`` (see the class docstring)."""
        t = self.tokenizer.config.max_length
        return padded_length(int(self.lengths[idx].max()), t, self.bucket) if len(idx) else t

    def epoch_lengths(self, epoch: int, batch_size: int) -> np.ndarray:
        """``T`` of each global batch of ``epoch`` (its full batches), with this object's
        ``bucket`` and ``length_groups``: what an epoch of training pads to."""
        order = self.question_order(epoch, batch_size)
        nb = self.batches_per_epoch(batch_size)
        return np.asarray(
            [self.batch_length(order[b * batch_size : (b + 1) * batch_size]) for b in range(nb)],
            np.int32,
        )

    def batch(
        self, step: int, batch_size: int, rows: tuple[int, int] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows ``[lo, hi)`` of global batch ``step`` (epoch = step // batches per epoch)."""
        per_epoch = self.batches_per_epoch(batch_size)
        epoch, b = divmod(step, per_epoch)
        order = self.question_order(epoch, batch_size)[b * batch_size : (b + 1) * batch_size]
        lo, hi = rows if rows is not None else (0, batch_size)
        idx = order[lo:hi]
        t, m, a = self.batch_length(order), self.m, self.max_answers
        n = len(idx)
        out = {
            "input_ids": np.full((n, m, t), self.tokenizer.pad_id, np.int32),
            "attention_mask": np.zeros((n, m, t), np.int32),
            "passage_mask": np.zeros((n, m), np.float32),
            "start_positions": np.zeros((n, a), np.int32),
            "end_positions": np.zeros((n, a), np.int32),
            "answer_mask": np.zeros((n, a), np.float32),
            "question_mask": np.ones((n,), np.float32),
        }
        for row, qi in enumerate(idx):
            q = self.questions[int(qi)]
            rng = np.random.default_rng([self.seed, epoch, int(qi)])
            toks, spans = q.positives[int(rng.integers(len(q.positives)))]
            negs = [q.negatives[j] for j in rng.permutation(len(q.negatives))[: m - 1]]
            seqs = [self.tokenizer.sequence(q.q_ids, p).ids for p in [toks, *negs]]
            ids, mask = self.tokenizer.pad(seqs, t)
            out["input_ids"][row, : len(seqs)] = ids
            out["attention_mask"][row, : len(seqs)] = mask
            out["passage_mask"][row, : len(seqs)] = 1.0
            k = len(spans)
            out["start_positions"][row, :k] = spans[:, 0]
            out["end_positions"][row, :k] = spans[:, 1]
            out["answer_mask"][row, :k] = 1.0
        return out


# ---------------------------------------------------------------------------------------------
# Sources


def _peek_format(path: Path) -> str:
    with open_text(path) as f:
        head = f.read(1 << 16)
    stripped = head.lstrip()
    if stripped.startswith("{") and '"paragraphs"' in head:
        return "squad"
    marks = {
        "retrieval": head.find('"ctxs"'),
        "biencoder": head.find('"positive_ctxs"'),
    }
    found = {k: v for k, v in marks.items() if v >= 0}
    if not stripped:
        raise UserError(f"{path}: empty file")
    if not found and not stripped.startswith(("[", "{")):
        raise UserError(f"{path}: not a JSON file (it starts with {stripped[:20]!r})")
    if not found and len(head) < 1 << 16:  # the whole file: say where it is not JSON
        try:
            json.loads(head)
        except json.JSONDecodeError as e:
            raise json_error(path, e) from None
    if not found:
        raise UserError(
            f"{path}: not a DPR retrieval-results ('ctxs'), biencoder ('positive_ctxs') or SQuAD "
            "('data'/'paragraphs') JSON file; give the format explicitly"
        )
    return min(found, key=found.get)


def _retrieval_examples(path: Path) -> list[ReaderExample]:
    out = []
    for r in read_retrieval_results(path):
        passages = tuple(
            Passage(
                c["text"],
                c["title"],
                c["id"],
                score=c["score"],
                has_answer=bool(c["has_answer"])
                if "has_answer" in c
                else has_answer(r["answers"], c["text"]),
            )
            for c in r["ctxs"]
        )
        out.append(ReaderExample(r["question"], tuple(r["answers"]), passages))
    return out


def _biencoder_examples(path: Path) -> list[ReaderExample]:
    examples, _ = read_biencoder(path)

    def conv(c, flag):
        return Passage(c.text, c.title, c.id, score=c.score, has_answer=flag)

    return [
        ReaderExample(
            e.question,
            tuple(e.answers),
            tuple(
                [conv(c, True) for c in e.positive_ctxs]
                + [conv(c, False) for c in [*e.hard_negative_ctxs, *e.negative_ctxs]]
            ),
            e.id,
        )
        for e in examples
    ]


def squad_examples(
    articles: Sequence[Any], max_negatives: int = 50, seed: int = 0
) -> list[ReaderExample]:
    """Reader examples from parsed SQuAD (:func:`dpr_jax.data.squad.parse_squad`).

    Passage 0 is the question's own paragraph (the positive), followed by up to
    ``max_negatives`` other paragraphs of the same article that do not contain any answer (DPR's
    ``has_answer``), in a seeded random order. Paragraphs of the article that contain an answer
    but are not the gold one are left out (neither a labelled positive nor a true negative).
    """

    matcher = AnswerMatcher()
    out = []
    for a, art in enumerate(articles):
        paras = [Passage(p.context, art.title, f"{a}-{j}") for j, p in enumerate(art.paragraphs)]
        for j, par in enumerate(art.paragraphs):
            for q, qa in enumerate(par.qas):
                rng = np.random.default_rng([seed, a, j, q])
                keys = matcher.answer_keys(qa.answers)
                others = [k for k in rng.permutation(len(paras)) if k != j]
                negs = [
                    dataclasses.replace(paras[k], has_answer=False)
                    for k in others
                    if not matcher.match(keys, paras[k].text, key=paras[k].id)
                ][:max_negatives]
                pos = dataclasses.replace(paras[j], has_answer=True)
                out.append(ReaderExample(qa.question, tuple(qa.answers), (pos, *negs), qa.id))
    return out


def read_reader_examples(
    path: str | Path, fmt: str = "auto", max_negatives: int = 50, seed: int = 0
) -> list[ReaderExample]:
    """Reader examples from a retrieval-results, biencoder or SQuAD JSON file (``fmt``)."""
    path = Path(path)
    if fmt not in FORMATS:
        raise UserError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if fmt == "auto":
        fmt = _peek_format(path)
    if fmt == "retrieval":
        return _retrieval_examples(path)
    if fmt == "biencoder":
        return _biencoder_examples(path)

    with open_text(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise json_error(path, e) from None
    return squad_examples(parse_squad(data, path), max_negatives, seed)


def as_passage(p: Any, where: str = "passage") -> Passage:
    """A Passage from a Passage, a dict ({text, title?, id?}) or a plain string."""
    if isinstance(p, Passage):
        return p
    if isinstance(p, str):
        return Passage(p)
    if isinstance(p, dict):
        text = p.get("text")
        if not isinstance(text, str):
            raise UserError(f"{where}: field 'text' must be a string, got {type(text).__name__}")
        title = p.get("title") or ""
        if not isinstance(title, str):
            raise UserError(f"{where}: field 'title' must be a string")
        pid = p.get("id", p.get("passage_id"))
        pid = None if pid is None else str(pid)
        return Passage(text, title, pid, score=p.get("score"), has_answer=p.get("has_answer"))
    for name in ("text", "title"):
        if not hasattr(p, name):
            raise UserError(f"{where}: expected a dict, a string or an object with text/title")
    pid = getattr(p, "id", None)
    return Passage(p.text, p.title or "", None if pid is None else str(pid))


def sample_examples(examples: list, limit: int, seed: int) -> list:
    """A seeded random sample of ``limit`` examples in file order (all of them if ``limit`` is 0
    or not smaller): files list questions article by article, so the first N would cover a
    handful of articles."""
    if not limit or limit >= len(examples):
        return list(examples)
    keep = np.random.default_rng(seed).choice(len(examples), limit, replace=False)
    return [examples[i] for i in sorted(keep)]
