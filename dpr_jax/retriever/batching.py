"""Training batches for the bi-encoder (Karpukhin et al. 2020, sec. 3.2 and 5.2).

Each question of a batch brings a group of G = 1 + n_hard passages: its positive (DPR uses
``positive_ctxs[0]``) and ``n_hard`` hard negatives. Following DPR's ``create_biencoder_input``,
the hard negatives come from ``hard_negative_ctxs`` (shuffled in training), falling back to
``negative_ctxs`` when there are no hard negatives. Where a question has fewer than ``n_hard``
candidates, the group is filled with random passages of the corpus (other questions' positives,
never one equal to this question's positive), so every batch has the same static shape
(B questions, B*G passages) and the train step compiles once. Every other passage of the global
batch is an in-batch negative (the loss does that, :mod:`dpr_jax.retriever.loss`).

Determinism and resumption: the order of epoch ``e`` is a permutation drawn from
``(seed, e)``; everything random about one question (hard negative shuffle, fill passages) is
drawn from ``(seed, e, position in the epoch)``. A batch is therefore a pure function of its
*data position* ``(epoch, batch)``, independent of which process builds it or how often the run
was interrupted: a resumed run continues at the saved position and sees exactly the batches the
uninterrupted run would have seen.

Multi-process: each process builds only its rows ``[start, stop)`` of the global batch
(:func:`dpr_jax.parallel.process_slice`), i.e. the questions ``start..stop-1`` and passages
``start*G .. stop*G-1``, whole question groups. Over a random-access record source
(:mod:`dpr_jax.data.records`) it also *reads* only those questions' records (plus one positive per
filled passage); with ``bucket`` it reads the whole global batch, whose longest sequence fixes the
padded length. The trainer reads record directories through grain instead
(:mod:`dpr_jax.data.loader`: the same batches, :func:`build_group` and :func:`tokenize_rows` as
grain transforms, the bucketed length agreed between processes); this class defines the batches,
builds them from JSON and builds the evaluation batches.

The last incomplete batch of an epoch is dropped (``len(examples) // batch_size`` batches per
epoch): a partial batch would have fewer in-batch negatives and a new shape. The dropped examples
differ from epoch to epoch because the order is reshuffled. Evaluation instead pads the last
batch with weight-0 questions (``valid``), which the loss ignores exactly.

Padding: with ``bucket=None`` every batch is padded to the maximum lengths (one shape per run).
With ``bucket=k`` the padded length is the longest sequence *of the global batch* rounded up to a
multiple of k (few shapes, little padding); every process computes it from the whole global batch
so that all processes agree on the shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from dpr_jax.data.formats import Passage
from dpr_jax.errors import UserError


def ctx_passage(ctx: Any) -> Passage:
    """What the passage tower reads of a biencoder context (a Passage, dict or object with
    ``text`` / ``title``): a Passage of its title and text only, so that batches from JSON and
    from records (which store no ids or scores) are equal."""
    if isinstance(ctx, dict):
        return Passage(ctx["text"], ctx.get("title") or "")
    return Passage(ctx.text, getattr(ctx, "title", "") or "")


@dataclasses.dataclass(frozen=True)
class DataPosition:
    """Where the stream is: the next batch to produce is batch ``batch`` of epoch ``epoch``."""

    epoch: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataPosition:
        return cls(int(d["epoch"]), int(d["batch"]))


@dataclasses.dataclass(frozen=True)
class BatchSpec:
    """What a batch looks like. ``batch_size`` counts questions of the *global* batch."""

    batch_size: int
    n_hard: int = 1
    q_max_len: int = 64
    p_max_len: int = 256
    bucket: int | None = None
    shuffle_hard: bool = True
    seed: int = 0

    @property
    def group_size(self) -> int:
        return 1 + self.n_hard

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.n_hard < 0:
            raise UserError(f"n_hard must be >= 0, got {self.n_hard}")
        if self.q_max_len < 2 or self.p_max_len < 3:
            raise UserError(f"max lengths too small: q {self.q_max_len}, p {self.p_max_len}")


def _rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def build_group(
    ex: Any, pos: Passage, positives: Sequence[Passage], n_hard: int, shuffle: bool,
    rng: np.random.Generator,
) -> list[Passage]:  # fmt: skip
    """[positive, n_hard hard negatives] of example ``ex`` whose positive is ``pos``: its hard
    negatives (``negative_ctxs`` when it has none), shuffled with ``rng`` when ``shuffle``,
    filled up with random ``positives`` of the corpus other than ``pos``."""
    hard = [ctx_passage(c) for c in (ex.hard_negative_ctxs or [])]
    if not hard:  # DPR's hard_neg_fallback
        hard = [ctx_passage(c) for c in (ex.negative_ctxs or [])]
    hard = [p for p in hard if p != pos]
    if shuffle and len(hard) > 1:
        hard = [hard[k] for k in rng.permutation(len(hard))]
    group = [pos] + hard[:n_hard]
    n = len(positives)
    tries = 0
    while len(group) < 1 + n_hard:  # fill with random corpus passages
        cand = positives[int(rng.integers(n))]
        tries += 1
        if cand != pos or tries > 100:
            group.append(cand)
    return group


def tokenize_rows(
    tokenizer, spec: BatchSpec, questions: list[str], groups: list[list[Passage]], valid: list
) -> dict[str, np.ndarray]:
    """The batch of these rows: {"q_ids", "q_mask": (b, Tq) int32, "p_ids", "p_mask": (b*G, Tp)
    int32, "valid": (b,) float32}, padded to the max lengths or, with ``spec.bucket``, to a
    multiple of it above the longest of these rows."""
    q_ids, q_mask = tokenizer.questions(questions, spec.q_max_len, spec.bucket)
    titles = [p.title for grp in groups for p in grp]
    texts = [p.text for grp in groups for p in grp]
    p_ids, p_mask = tokenizer.passages(titles, texts, spec.p_max_len, spec.bucket)
    return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask,
            "valid": np.asarray(valid, np.float32)}  # fmt: skip


class BiencoderBatches:
    """Deterministic, resumable batches from a list of ``BiencoderExample`` s, or from a lazy
    record source (:func:`dpr_jax.data.records.open_biencoder_records`), read row by row.

    ``rows``: the [start, stop) rows of each global batch this process builds (default: all).
    ``train=False`` gives evaluation batches: fixed order, positives and the first hard negatives
    unshuffled, and the last batch padded with ``valid = 0`` questions instead of dropped.
    """

    def __init__(
        self,
        examples: Sequence[Any],
        tokenizer,
        spec: BatchSpec,
        rows: tuple[int, int] | None = None,
        train: bool = True,
        where: str = "examples",
    ):
        # A lazy random-access source (dpr_jax.data.records) brings its own positives and is
        # read record by record; anything else is materialised as a list.
        lazy = getattr(examples, "positives", None) is not None
        self.examples = examples if lazy else list(examples)
        self.tokenizer = tokenizer
        self.spec = spec
        self.train = train
        self.where = where
        b = spec.batch_size
        self.rows = rows or (0, b)
        if not 0 <= self.rows[0] < self.rows[1] <= b:
            raise UserError(f"rows {self.rows} not within the global batch of {b}")
        if lazy:  # every record has a positive (the converter skips those without)
            self.positives = examples.positives
        else:
            for i, ex in enumerate(self.examples):
                if not ex.positive_ctxs:
                    raise UserError(f"{where}: record {i} has no positive_ctxs")
            self.positives = [ctx_passage(ex.positive_ctxs[0]) for ex in self.examples]
        n = len(self.examples)
        if train:
            self.batches_per_epoch = n // b
            if self.batches_per_epoch == 0:
                raise UserError(
                    f"{where}: {n} examples are fewer than one batch of {b} questions "
                    "(the last incomplete batch is dropped in training)"
                )
        else:
            self.batches_per_epoch = -(-n // b)
            if n == 0:
                raise UserError(f"{where}: no examples to evaluate")

    # -- one question ------------------------------------------------------------------------

    def _group(self, idx: int, rng: np.random.Generator) -> list[Passage]:
        spec = self.spec
        return build_group(self.examples[idx], self.positives[idx], self.positives,
                              spec.n_hard, self.train and spec.shuffle_hard, rng)  # fmt: skip

    # -- batches -----------------------------------------------------------------------------

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        if not self.train:
            return np.arange(n)
        return _rng(self.spec.seed, epoch).permutation(n)

    def global_indices(self, epoch: int, batch: int) -> list[int | None]:
        """Example indices of the global batch (None: a padding question, evaluation only)."""
        b = self.spec.batch_size
        if not 0 <= batch < self.batches_per_epoch:
            raise UserError(f"batch {batch} not in [0, {self.batches_per_epoch})")
        order = self.order(epoch)
        idx = [int(i) for i in order[batch * b : (batch + 1) * b]]
        return idx + [None] * (b - len(idx))

    def question_group(
        self, epoch: int, batch: int, row: int, idx: list[int | None] | None = None
    ) -> tuple[str, list[Passage]]:
        """(question, [positive, hard negatives...]) of row ``row`` of global batch (epoch, batch).

        A padding row (evaluation) repeats the batch's first question (its weight is 0).
        """
        idx = self.global_indices(epoch, batch) if idx is None else idx
        i = idx[row] if idx[row] is not None else idx[0]
        if self.train:
            rng = _rng(self.spec.seed, epoch, batch * self.spec.batch_size + row)
        else:
            rng = _rng(self.spec.seed, i)
        return self.examples[i].question, self._group(i, rng)

    def batch(self, epoch: int, batch: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``(epoch, batch)``.

        {"q_ids", "q_mask": (b, Tq) int32, "p_ids", "p_mask": (b*G, Tp) int32, "valid": (b,)
        float32} with b = stop - start rows.
        """
        spec = self.spec
        g = spec.group_size
        start, stop = self.rows
        idx = self.global_indices(epoch, batch)
        questions, groups, valid = [], [], []
        for row, i in enumerate(idx):
            if not (start <= row < stop) and not spec.bucket:
                continue
            question, group = self.question_group(epoch, batch, row, idx)
            questions.append(question)
            groups.append(group)
            valid.append(0.0 if i is None else 1.0)
        out = tokenize_rows(self.tokenizer, spec, questions, groups, valid)
        if spec.bucket:  # one padded length for the whole global batch, then keep our rows
            rows = {"q_ids": (start, stop), "q_mask": (start, stop), "valid": (start, stop),
                    "p_ids": (start * g, stop * g), "p_mask": (start * g, stop * g)}  # fmt: skip
            out = {k: v[rows[k][0] : rows[k][1]] for k, v in out.items()}
        return out

    def next_position(self, pos: DataPosition) -> DataPosition:
        if pos.batch + 1 < self.batches_per_epoch:
            return DataPosition(pos.epoch, pos.batch + 1)
        return DataPosition(pos.epoch + 1, 0)

    def iterate(
        self, start: DataPosition = DataPosition()
    ) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]:
        """Endless (training) stream of (position after this batch, batch) from ``start``."""
        pos = start
        while True:
            nxt = self.next_position(pos)
            yield nxt, self.batch(pos.epoch, pos.batch)
            pos = nxt

    def eval_batches(self) -> Iterator[dict[str, np.ndarray]]:
        """Every example once, in order (evaluation)."""
        for k in range(self.batches_per_epoch):
            yield self.batch(0, k)


__all__ = [
    "BatchSpec",
    "BiencoderBatches",
    "DataPosition",
    "Passage",
    "ctx_passage",
    "build_group",
    "tokenize_rows",
]
