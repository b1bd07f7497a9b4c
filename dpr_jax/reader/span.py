"""Answer extraction with the reader (Karpukhin et al. 2020, sec. 6.1; DPR's ``_get_best_prediction``).

For a question and its top-k retrieved passages the reader gives every passage a relevance logit
and every token a start and an end logit (:class:`dpr_jax.reader.model.Reader`). With
``selection="dpr"`` the answer is read as DPR does:

1. rank the passages by relevance logit; take the most relevant one that yields a span (a
   passage with no text tokens, e.g. an empty passage, is scored but yields none, so the next
   one is taken);
2. in it, the span (s, e) with the highest ``start[s] + end[e]``, ``s <= e < s +
   max_answer_length``, with s and e both inside the passage *text* (never in the question or
   the title);
3. extend the span to whole words (a start on a ``##`` piece moves left, an end followed by
   ``##`` pieces moves right; DPR's ``_extend_span_to_full_words``), so the extended span can be
   longer than ``max_answer_length``;
4. the answer is the original passage substring between the character offsets of the span's
   first and last tokens (original casing and spacing, unlike DPR's detokenized word pieces).

That is ``selection="dpr"``. Two alternatives replace steps 1-2 (:func:`select_predictions`):
``"joint"``, the default, scores each passage's best span by log P(passage) + log P(start) +
log P(end), and ``"sum"`` adds those probabilities over every occurrence of the same answer
string across passages. ``scripts/bench_reader_levers.py`` compares them: with the two-stage
reader recipe on 1,000 held-out SQuAD questions (README) ``joint`` matched ``dpr`` at k = 1 and
beat it by 0.4-0.8 EM at k = 5, 10, 20, on both halves of the questions.

:func:`best_spans` returns the best spans of one passage in score order; each span is extended
to whole words before it is compared with those already chosen, and one that overlaps any of
them is skipped (DPR only skips spans nested in or containing a chosen one; here the spans are
disjoint text regions).

DPR reports EM for several numbers of retrieved passages k: the prediction at k uses only the
first k passages of the retrieval order (step 1 runs on them). :class:`ReaderPredictor` computes
all requested k at once, batched and jitted, the batch split over all local devices. Batches are
length-bucketed: the (question, passage) sequences are sorted by length and each batch is padded
only to its longest sequence rounded up to a multiple of ``bucket`` tokens (and its rows to a
multiple of 4 and of the device count), so a short passage is not computed at ``max_length``
and a question with 20 passages runs 20-odd rows, not a full batch; the few shapes this makes
compile once each. The logits are those of the unbucketed computation (padding is masked out of
every attention; a test compares both). A passage whose text does not fit in one sequence
(``max_length`` after the question and the title) is read in windows that overlap by
``window_overlap`` tokens (64; Hugging Face's ``doc_stride``), its logits merged by
:func:`merge_windows`, so an answer past the cut can still be read; ``window_overlap=None`` cuts
the text as DPR does. :func:`evaluate_predictions` scores them
with SQuAD's exact match and F1 (:mod:`dpr_jax.evaluate`). :func:`write_predictions` writes DPR's
reader-predictions JSON.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dpr_jax.data.answers import exact_match_score, f1_score, normalize_answer
from dpr_jax.data.formats import Passage, write_reader_predictions
from dpr_jax.errors import UserError
from dpr_jax.io import progress as progress_bar
from dpr_jax.model_dir import check_tokenizer_fits, load_model, load_tokenizer
from dpr_jax.parallel import batch_sharding, make_mesh, replicated
from dpr_jax.reader.data import (
    ReaderInputConfig,
    ReaderSequence,
    ReaderTokenizer,
    as_passage,
)
from dpr_jax.reader.model import Reader

DEFAULT_TOP_K = (50,)
# tokens each window of a passage longer than one sequence shares with the one before it
DEFAULT_WINDOW_OVERLAP = 64


# ---------------------------------------------------------------------------------------------
# Span decoding (numpy)


def extend_to_words(start: int, end: int, subword: np.ndarray) -> tuple[int, int]:
    """Widen [start, end] so it neither starts nor ends inside a word (``##`` pieces)."""
    n = len(subword)
    while start > 0 and subword[start]:
        start -= 1
    while end < n - 1 and subword[end + 1]:
        end += 1
    return start, end


def best_spans(
    start_logits: np.ndarray,
    end_logits: np.ndarray,
    max_answer_length: int = 10,
    top_spans: int = 1,
    subword: np.ndarray | None = None,
) -> list[tuple[int, int, float]]:
    """Best non-overlapping spans ``[(start, end, start_logit + end_logit)]`` of one passage.

    The logits are those of the passage text tokens only (position 0 = first text token).
    Candidates are ``s <= e < s + max_answer_length``; ties keep the earlier, shorter span.
    With ``subword`` each span is extended to whole words before the overlap check.
    """
    s = np.asarray(start_logits, np.float64)
    e = np.asarray(end_logits, np.float64)
    n = len(s)
    if len(e) != n:
        raise UserError(f"start logits have {n} positions, end logits {len(e)}")
    if max_answer_length < 1:
        raise UserError(f"max_answer_length must be >= 1, got {max_answer_length}")
    if n == 0 or top_spans < 1:
        return []
    length = min(max_answer_length, n)
    if top_spans == 1:  # no overlap to check: the argmax (a passage's answer in "dpr" / "joint")
        a, d, best = _padded_argmax(s[None], e[None], length)
        i, j, flat, order = [int(a[0])], [int(a[0] + d[0])], best, (0,)
    else:
        i = np.repeat(np.arange(n), length)
        j = i + np.tile(np.arange(length), n)
        keep = j < n
        i, j = i[keep], j[keep]
        flat = s[i] + e[j]
        order = _ranked(flat, top_spans)
    chosen: list[tuple[int, int, float]] = []
    for k in order:
        a, b = int(i[k]), int(j[k])
        if subword is not None:
            a, b = extend_to_words(a, b, subword)
        if any(a <= cb and ca <= b for ca, cb, _ in chosen):
            continue
        chosen.append((a, b, float(flat[k])))
        if len(chosen) == top_spans:
            break
    return chosen


def _padded_argmax(start: np.ndarray, end: np.ndarray, length: int):
    """Each row's best span ``[a, a + d]``, ``d < length``, of (rows, n) start and end logits
    (-inf past a row's text): arrays ``(a, d, score)``. score[r, i, d] is the span [i, i + d];
    its row-major order (start, then length) makes the first maximum the earlier, shorter span
    of a tie, the rule of :func:`best_spans`."""
    p, n = start.shape
    end = np.concatenate([end, np.full((p, length - 1), -np.inf)], axis=1)
    score = (start[:, :, None] + end[:, np.arange(n)[:, None] + np.arange(length)]).reshape(p, -1)
    k = score.argmax(axis=1)
    a, d = np.divmod(k, length)
    return a, d, score[np.arange(p), k]


def _ranked(score: np.ndarray, wanted: int):
    """Indices of ``score`` best first, ties in index order (a stable sort of ``-score``), lazily:
    the best ``64 * wanted`` by a partition first (enough for ``wanted`` spans that do not
    overlap, nearly always), the full sort only if the caller reads past them."""
    m = 64 * wanted
    head: Any = ()
    if len(score) > m:
        idx = np.argpartition(-score, m)
        head = idx[:m][score[idx[:m]] > score[idx[m]]]  # surely among the first: no boundary tie
        head = head[np.lexsort((head, -score[head]))]
        yield from head
    yield from np.argsort(-score, kind="stable")[len(head) :]


def merge_windows(windows: Sequence[tuple[int, float, np.ndarray, np.ndarray]]) -> PassageLogits:
    """One passage's logits from the windows it was read in, ``[(first text token, relevance
    logit, start logits, end logits)]``: each text token takes its start and end logits from the
    window where it has the most context on its poorer side (the smaller of its distances to
    the window's two edges; Hugging Face's ``_check_is_max_context``: a longer window wins a
    tie, else the earlier one), the passage its highest relevance logit. One window: its logits
    as they are."""
    if len(windows) == 1:
        _, rel, start, end = windows[0]
        return PassageLogits(rel, start, end)
    n = max(a + len(st) for a, _, st, _ in windows)
    start, end = np.zeros(n, np.float32), np.zeros(n, np.float32)
    best = np.full(n, -np.inf)
    for a, _, st, en in windows:
        j = np.arange(len(st))
        context = np.minimum(j, len(st) - 1 - j) + 0.01 * len(st)
        take = context > best[a : a + len(st)]
        idx = a + j[take]
        start[idx], end[idx], best[idx] = st[take], en[take], context[take]
    return PassageLogits(max(rel for _, rel, _, _ in windows), start, end)


@dataclasses.dataclass(frozen=True)
class SpanPrediction:
    """The answer read from one passage (DPR's ``SpanPrediction``, plus offsets)."""

    text: str
    score: float  # start + end logit of the (unextended) span
    relevance_score: float  # the passage's relevance logit
    passage_idx: int  # index of the passage in the question's list (retrieval order)
    passage: str  # the passage text
    start_char: int = -1  # [start_char, end_char) in ``passage``
    end_char: int = -1
    start_token: int = -1  # first / last passage-text token (after extension)
    end_token: int = -1


# DPR's placeholder when no passage yields a span (e.g. every passage is empty).
NO_ANSWER = SpanPrediction("", -1.0, -1.0, -1, "")


@dataclasses.dataclass(frozen=True)
class QuestionPrediction:
    question: str
    gold_answers: tuple[str, ...]
    predictions: dict[int, SpanPrediction]  # top-k passages -> prediction

    def to_json(self) -> dict[str, Any]:
        return {
            "question": self.question,
            "gold_answers": list(self.gold_answers),
            "predictions": [
                {"top_k": k, "prediction": {
                    "text": p.text, "score": p.score, "relevance_score": p.relevance_score,
                    "passage_idx": p.passage_idx, "passage": p.passage,
                }}
                for k, p in sorted(self.predictions.items())
            ],
        }  # fmt: skip


@dataclasses.dataclass
class PassageLogits:
    """Reader outputs for one (question, passage) pair, over the passage text tokens read
    (all of them when read in windows; those before the cut with ``window_overlap=None``)."""

    relevance: float
    start: np.ndarray  # (text tokens read,)
    end: np.ndarray  # (text tokens read,)


def _read_passage(
    passage: Passage, offsets: np.ndarray, subword: np.ndarray, logits: PassageLogits,
    idx: int, max_answer_length: int, top_spans: int = 1,
) -> list[SpanPrediction]:  # fmt: skip
    n = len(logits.start)
    spans = best_spans(logits.start, logits.end, max_answer_length, top_spans, subword[:n])
    return [_prediction(passage, offsets, logits, idx, s, e, score) for s, e, score in spans]


def _prediction(passage, offsets, logits, idx, s, e, score) -> SpanPrediction:
    c0, c1 = int(offsets[s, 0]), int(offsets[e, 1])
    return SpanPrediction(passage.text[c0:c1], score, logits.relevance, idx, passage.text, c0, c1,
                          s, e)  # fmt: skip


# past this many (passage, start, length) scores a question's passages are read one at a time
_BATCHED_SPAN_SCORES = 1 << 22


def _best_span_each(
    logits: Sequence[PassageLogits], max_answer_length: int
) -> tuple[list[tuple[int, int, float] | None], np.ndarray] | None:
    """Every passage's best span at once, before word extension (:func:`best_spans` with
    ``top_spans=1``, the same rule and ties; None for a passage without text tokens), and each
    passage's log-normaliser ``_logsumexp(start) + _logsumexp(end)``: the logits padded to one
    matrix with -inf, one argmax over (passage, start, length). None when that matrix would pass
    :data:`_BATCHED_SPAN_SCORES` (very long passages read in windows, a huge answer length)."""
    lens = np.array([len(lg.start) for lg in logits], np.int64)
    p, n = len(logits), int(lens.max(initial=0))
    if n == 0:
        return [None] * p, np.zeros(p)
    length = min(max_answer_length, n)
    if p * n * length > _BATCHED_SPAN_SCORES:
        return None
    start, end = np.full((p, n), -np.inf), np.full((p, n), -np.inf)
    for r, lg in enumerate(logits):
        start[r, : lens[r]], end[r, : lens[r]] = lg.start, lg.end
    spans = [
        (int(a), int(a + d), float(b)) if m else None
        for a, d, b, m in zip(*_padded_argmax(start, end, length), lens > 0)
    ]  # fmt: skip

    def lse(x):  # row-wise; -inf padding adds exp(-inf) = 0
        m = x.max(axis=1, keepdims=True)
        m[~np.isfinite(m)] = 0.0
        return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]

    with np.errstate(divide="ignore"):
        return spans, lse(start) + lse(end)


def _logsumexp(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    m = float(x.max())
    return m + float(np.log(np.exp(x - m).sum()))


SELECTIONS = ("dpr", "joint", "sum")
DEFAULT_SELECTION = "joint"  # scripts/bench_reader_levers.py on a trained reader: README


def check_selection(selection: str) -> None:
    if selection not in SELECTIONS:
        raise UserError(f"selection must be one of {SELECTIONS}, got {selection!r}")


def select_predictions(
    passages: Sequence[Passage],
    offsets: Sequence[np.ndarray],
    subwords: Sequence[np.ndarray],
    logits: Sequence[PassageLogits],
    top_k: Sequence[int],
    max_answer_length: int = 10,
    selection: str = DEFAULT_SELECTION,
    spans_per_passage: int = 3,
) -> dict[int, SpanPrediction]:
    """The answer at every k of ``top_k`` from the first k passages (:data:`NO_ANSWER` if none
    yields a span), chosen by ``selection``:

    - ``"dpr"``: DPR's rule: the best span of the most relevant passage that yields one;
    - ``"joint"``: the span with the highest ``log P(passage) + log P(start) + log P(end)``,
      P(passage) the softmax of the relevance logits over the k passages, P(start) / P(end)
      the softmax of the passage's start / end logits over its text tokens (the best span of
      each passage competes);
    - ``"sum"``: the same probabilities, summed over the ``spans_per_passage`` best spans of
      every passage with the same SQuAD-normalised answer string; the answer with the largest
      sum wins (reported as its most probable occurrence).
    """
    check_selection(selection)
    rel = np.array([lg.relevance for lg in logits], np.float64)
    order = np.argsort(-rel, kind="stable")
    per = 1 if selection != "sum" else spans_per_passage
    cache: dict[int, list[SpanPrediction]] = {}
    norms: dict[int, float] = {}  # log-normalisers of a passage's start and end logits
    keys: dict[str, str] = {}  # "sum": each answer string's SQuAD normal form
    if selection == "joint":  # every passage up to the largest k is read: all at once
        n_read = min(max((int(k) for k in top_k), default=0), len(logits))
        each = _best_span_each(logits[:n_read], max_answer_length) if n_read else None
        if each is not None:
            for i, (span, nm) in enumerate(zip(*each)):
                cache[i], norms[i] = [], float(nm)
                if span is not None:
                    a, b = extend_to_words(span[0], span[1], subwords[i][: len(logits[i].start)])
                    cache[i] = [_prediction(passages[i], offsets[i], logits[i], i, a, b, span[2])]

    def read(i: int) -> list[SpanPrediction]:
        if i not in cache:
            cache[i] = _read_passage(passages[i], offsets[i], subwords[i], logits[i], i,
                                     max_answer_length, per)  # fmt: skip
        return cache[i]

    def norm(i: int) -> float:  # once per passage, not once per k
        if i not in norms:
            norms[i] = _logsumexp(logits[i].start) + _logsumexp(logits[i].end)
        return norms[i]

    out = {}
    for k in top_k:
        k = int(k)
        if selection == "dpr":
            out[k] = next((p[0] for i in order if i < k and (p := read(int(i)))), NO_ANSWER)
            continue
        n = min(k, len(logits))
        if n == 0:
            out[k] = NO_ANSWER
            continue
        log_p = rel[:n] - _logsumexp(rel[:n])  # log P(passage) over the first k
        scored: list[tuple[float, SpanPrediction]] = []
        for i in range(n):
            spans = read(i)
            if spans:
                scored += [(log_p[i] + sp.score - norm(i), sp) for sp in spans]
        if not scored:
            out[k] = NO_ANSWER
        elif selection == "joint":
            out[k] = max(scored, key=lambda x: x[0])[1]
        else:
            totals: dict[str, float] = {}
            best: dict[str, tuple[float, SpanPrediction]] = {}
            for lp, sp in scored:
                key = keys.get(sp.text)
                if key is None:  # once per answer string, not once per k
                    key = keys[sp.text] = normalize_answer(sp.text)
                totals[key] = totals.get(key, 0.0) + float(np.exp(lp))
                if key not in best or lp > best[key][0]:
                    best[key] = (lp, sp)
            out[k] = best[max(totals, key=totals.get)][1]
    return out


# ---------------------------------------------------------------------------------------------
# Batched, jitted reader


_FORWARD: dict[Any, Any] = {}


def _forward_fn(model, mesh):
    """Jitted (params, ids, mask) -> (start, end, relevance) over ``mesh``, memoised."""
    import jax

    key = (model.config, model.dtype, mesh)
    if key not in _FORWARD:
        if len(_FORWARD) >= 16:
            _FORWARD.clear()

        def fwd(params, ids, mask):  # ids, mask: (P, 1, T)
            out = model.apply({"params": params}, ids, mask, deterministic=True)
            return out.start_logits, out.end_logits, out.relevance_logits

        data = batch_sharding(mesh)
        _FORWARD[key] = jax.jit(
            fwd, in_shardings=(replicated(mesh), data, data), out_shardings=(data, data, data)
        )
    return _FORWARD[key]


def default_read_batch_size() -> int:
    """Sequences per forward pass when none is given: 24 on a CPU, 32 on a GPU / TPU. On the
    2-core CPU (4 XLA devices, the quickstart reader, 8 questions x 20 passages read in one call)
    `scripts/bench_read.py --batch-size 32,16,20,24,40` measured 24 and 16 fastest, 13% (bfloat16)
    and 8% (float32) faster than 32, 40 slowest; 24 keeps a question's 20 passages in one call."""
    import jax

    return 24 if jax.default_backend() == "cpu" else 32


class ReaderPredictor:
    """Reads answers out of passages with a reader model.

    ``predict(questions, passages_per_question)`` -> one :class:`QuestionPrediction` per
    question. Passages may be :class:`~dpr_jax.data.formats.Passage` s, dicts ``{text, title?, id?}`` or strings.
    All (question, passage) pairs are run through the model in batches of at most
    ``batch_size`` sequences (rounded up to a multiple of the local device count; default
    :func:`default_read_batch_size`), sorted by
    length and padded to a multiple of ``bucket`` tokens (see the module docstring); ``bucket=0``
    runs them in their own order at one fixed shape, ``(batch_size, max_length)``. A passage
    longer than one sequence is read in windows sharing ``window_overlap`` tokens (at most half
    of ``max_length``; ``"auto"``: 64, or half of a shorter reader's ``max_length``;
    :func:`merge_windows`); ``window_overlap=None`` cuts it at
    ``max_length`` as DPR does.
    """

    def __init__(
        self,
        params: Any,
        bert_config: Any = None,
        tokenizer: Any = None,
        input_config: ReaderInputConfig | None = None,
        max_answer_length: int = 10,
        batch_size: int | None = None,
        dtype: str = "float32",
        devices: Sequence[Any] | None = None,
        bucket: int = 32,
        selection: str = DEFAULT_SELECTION,
        window_overlap: int | None | str = "auto",
    ):
        import jax
        import jax.numpy as jnp

        if isinstance(params, (str, Path)):  # a model directory: what from_dir reads
            raise UserError(
                f"ReaderPredictor({str(params)!r}): a model directory is read by "
                "ReaderPredictor.from_dir(path); the constructor takes (params, bert_config, "
                "tokenizer)"
            )
        if bert_config is None or tokenizer is None:
            raise UserError("ReaderPredictor(params, bert_config, tokenizer): all three are needed")
        if max_answer_length < 1:
            raise UserError(f"max_answer_length must be >= 1, got {max_answer_length}")
        if bucket < 0:
            raise UserError(f"bucket must be >= 0, got {bucket}")
        if window_overlap != "auto" and window_overlap is not None and window_overlap < 0:
            raise UserError(f"window_overlap must be >= 0 tokens (or None), got {window_overlap}")
        check_selection(selection)
        self.bucket, self.selection, self.window_overlap = bucket, selection, window_overlap
        self.tokenizer = (
            tokenizer if isinstance(tokenizer, ReaderTokenizer)
            else ReaderTokenizer(tokenizer, input_config)
        )  # fmt: skip
        self.input_config = self.tokenizer.config
        half = self.input_config.max_length // 2
        if window_overlap == "auto":  # the default, within what this reader's sequences allow
            window_overlap = self.window_overlap = min(DEFAULT_WINDOW_OVERLAP, half)
        if window_overlap is not None and window_overlap > half:
            raise UserError(
                f"window_overlap {window_overlap} tokens: at most {half} for a reader of "
                f"max_length {self.input_config.max_length} (a larger overlap moves each window "
                "on by a few tokens, or one: hundreds of sequences for a long passage)"
            )
        self.max_answer_length = max_answer_length
        self.mesh = make_mesh(list(devices) if devices is not None else jax.local_devices())
        n_dev = self.mesh.devices.size
        batch_size = batch_size or default_read_batch_size()
        self.batch_size = max(1, math.ceil(batch_size / n_dev)) * n_dev
        self.model = Reader(bert_config, dtype=jnp.dtype(dtype))
        self._forward = _forward_fn(self.model, self.mesh)
        self.set_params(params)

    @classmethod
    def from_dir(cls, model_dir: str | Path, **kwargs) -> ReaderPredictor:
        """From a reader model directory (or a training workdir with ``model/``)."""

        _, bert_config, params, meta = load_model(model_dir, "reader")
        if "input_config" not in kwargs:
            ri = meta.get("reader_input")
            try:
                kwargs["input_config"] = ReaderInputConfig.from_dict(ri) if ri else None
            except (TypeError, ValueError) as e:
                raise UserError(f"{model_dir}: bad field 'reader_input' ({e})") from None
        tokenizer = load_tokenizer(model_dir)
        check_tokenizer_fits(model_dir, bert_config, tokenizer)
        return cls(params, bert_config, tokenizer, **kwargs)

    def set_params(self, params: Any) -> None:
        import jax

        from dpr_jax.models.bert import mixed_inference_params

        # mixed inference on a CPU: the encoder's kernels in the products' dtype once, not
        # converted on every call; the same logits, faster (README, "On a CPU with AMX")
        params = mixed_inference_params(params, self.model.dtype)
        self.params = jax.device_put(params, replicated(self.mesh))

    def _batches(self, pairs: list) -> list[tuple[list, tuple[int, int]]]:
        """``[(pairs of a batch, (rows, tokens) it is padded to)]``; see the class docstring."""
        b, t_max = self.batch_size, self.input_config.max_length
        if not self.bucket:
            return [(pairs[lo : lo + b], (b, t_max)) for lo in range(0, len(pairs), b)]
        # longest first: the first batch is the widest; ties keep the input order
        order = sorted(pairs, key=lambda p: -len(p[2].ids))
        row_step = math.lcm(4, self.mesh.devices.size)
        out = []
        for lo in range(0, len(order), b):
            chunk = order[lo : lo + b]
            rows = min(b, -(-len(chunk) // row_step) * row_step)
            length = min(t_max, -(-len(chunk[0][2].ids) // self.bucket) * self.bucket)
            out.append((chunk, (rows, length)))
        return out

    def passage_logits(
        self, questions: Sequence[str], passages: Sequence[Sequence[Passage]],
        progress: bool = False,
    ) -> tuple[list[list[PassageLogits]], list[list[Any]]]:  # fmt: skip
        """Reader outputs for every pair -> (logits[q][p], passage tokens[q][p])."""

        tok = self.tokenizer
        q_ids = tok.question_ids(list(questions))
        toks = [tok.passage_tokens(ps) for ps in passages]
        pairs: list[tuple[int, int, ReaderSequence, int]] = [
            (qi, pi, seq, a)
            for qi, pts in enumerate(toks)
            for pi, pt in enumerate(pts)
            for seq, a in (
                [(tok.sequence(q_ids[qi], pt), 0)] if self.window_overlap is None
                else tok.windows(q_ids[qi], pt, self.window_overlap)
            )
        ]  # fmt: skip
        read: dict[tuple[int, int], list] = {}  # (question, passage) -> its windows' logits
        bar = progress_bar(total=len(pairs), desc="reader", unit="seq", enabled=progress)

        def collect(chunk, outputs):
            start, end, rel = (np.asarray(x) for x in outputs)  # waits for the device
            start, end = start[:, 0], end[:, 0]
            for r, (qi, pi, seq, a) in enumerate(chunk):
                sl = slice(seq.text_start, seq.text_start + seq.text_len)
                read.setdefault((qi, pi), []).append(
                    (a, float(rel[r, 0]), start[r, sl], end[r, sl])
                )
            bar.update(len(chunk))

        pending = None  # the batch in flight: the next one is padded and sent before waiting
        for chunk, (rows, length) in self._batches(pairs):
            ids, mask = tok.pad([seq.ids for _, _, seq, _ in chunk] + [np.zeros(0, np.int32)] *
                                (rows - len(chunk)), length)  # fmt: skip
            outputs = self._forward(self.params, ids[:, None], mask[:, None])  # asynchronous
            if pending is not None:
                collect(*pending)
            pending = (chunk, outputs)
        if pending is not None:
            collect(*pending)
        bar.close()
        out: list[list[PassageLogits]] = [
            [merge_windows(read[qi, pi]) for pi in range(len(ps))] for qi, ps in enumerate(passages)
        ]
        return out, toks

    def predict(
        self,
        questions: Sequence[str],
        passages_per_question: Sequence[Sequence[Any]],
        top_k: Sequence[int] = DEFAULT_TOP_K,
        gold_answers: Sequence[Sequence[str]] | None = None,
        progress: bool = False,
        block: int = 256,
    ) -> list[QuestionPrediction]:
        """Predictions for each question at each k of ``top_k`` (passages beyond max(top_k) are
        not read). ``block`` questions are scored at a time to bound host memory."""
        if len(questions) != len(passages_per_question):
            raise UserError(
                f"{len(questions)} questions but {len(passages_per_question)} passage lists"
            )
        if gold_answers is not None and len(gold_answers) != len(questions):
            raise UserError(f"{len(questions)} questions but {len(gold_answers)} answer lists")
        top_k = sorted({int(k) for k in top_k})
        if not top_k or top_k[0] < 1:
            raise UserError(f"top_k must be positive integers, got {top_k}")
        kmax = top_k[-1]
        results: list[QuestionPrediction] = []
        for lo in range(0, len(questions), block):
            qs = list(questions[lo : lo + block])
            ps = [
                [as_passage(p, f"question {lo + i}, passage {j}") for j, p in enumerate(pl[:kmax])]
                for i, pl in enumerate(passages_per_question[lo : lo + block])
            ]
            logits, toks = self.passage_logits(qs, ps, progress)
            for i, q in enumerate(qs):
                preds = select_predictions(
                    ps[i], [t.offsets for t in toks[i]], [t.subword for t in toks[i]],
                    logits[i], top_k, self.max_answer_length, self.selection,
                )  # fmt: skip
                gold = tuple(gold_answers[lo + i]) if gold_answers is not None else ()
                results.append(QuestionPrediction(q, gold, preds))
        return results


# ---------------------------------------------------------------------------------------------
# Evaluation and output


def evaluate_predictions(predictions: Sequence[QuestionPrediction]) -> dict[int, dict[str, float]]:
    """SQuAD EM and F1 (fractions) at every k: ``{k: {"em", "f1", "questions",
    "questions_without_answers"}}``. A question without gold answers is kept and scores EM 0,
    F1 0 (a miss), as in ``dpr-jax evaluate`` and ``ask`` (see :mod:`dpr_jax.data.answers`)."""

    scores: dict[int, list[tuple[float, float]]] = {}
    no_gold: dict[int, int] = {}
    for qp in predictions:
        for k, p in qp.predictions.items():
            no_gold[k] = no_gold.get(k, 0) + (not qp.gold_answers)
            scores.setdefault(k, []).append(
                (exact_match_score(p.text, qp.gold_answers), f1_score(p.text, qp.gold_answers))
            )
    return {
        k: {
            "em": float(np.mean([s[0] for s in v])),
            "f1": float(np.mean([s[1] for s in v])),
            "questions": len(v),
            "questions_without_answers": no_gold[k],
        }  # fmt: skip
        for k, v in sorted(scores.items())
    }


def write_predictions(
    path: str | Path, predictions: Sequence[QuestionPrediction], config: dict | None = None
) -> Path:
    """DPR's reader-predictions JSON (via :mod:`dpr_jax.data.formats`), config beside it."""

    return write_reader_predictions(path, [p.to_json() for p in predictions], config)
