"""Per-host bi-encoder training batches through grain (a data source, a sampler sharded by JAX
process, resumable iteration whose state goes in the checkpoint).

The batches are those of :class:`dpr_jax.retriever.batching.BiencoderBatches` (Karpukhin et al.
2020, sec. 3.2: a question, its positive and hard negatives; in-batch negatives come from the
loss), bit for bit, whatever the number of processes; grain does the reading:

* **data source**: the examples, a :class:`dpr_jax.data.records.BiencoderRecords` over
  ``convert-data``'s ArrayRecord files (grain's ``ArrayRecordDataSource``) or a list;
* **sampler** (:class:`BatchOrderSampler`): global sample ``s`` is row ``p*b + j`` of global
  batch ``k``, in the order of epoch ``k // batches_per_epoch`` (a permutation drawn from
  ``(seed, epoch)``, the incomplete last batch dropped), with the per-row random generator of
  ``(seed, epoch, position in the epoch)``;
* **sharding**: ``grain.DataLoader(shard_options=ShardByJaxProcess(drop_remainder=True))``: process
  ``p`` of ``n`` reads samples ``p, p + n, p + 2n, ...``, which the sampler lays out as its rows
  ``[p*b, (p+1)*b)`` of every global batch of ``B = n*b`` questions, the rows
  :func:`dpr_jax.parallel.process_slice` gives it on a :func:`dpr_jax.parallel.make_mesh` mesh. A
  process reads only its questions' records (plus one corpus positive per passage that fills a
  group short of hard negatives);
* **thin transforms** over it, what grain does not know: the hard-negative group of a question
  (a ``RandomMapTransform`` fed the sampler's per-row generator:
  :func:`~dpr_jax.retriever.batching.build_group`) and tokenization of a process's rows
  (``grain.Batch`` with :func:`~dpr_jax.retriever.batching.tokenize_rows`); with ``bucket`` the
  processes then agree on the padded length (one all-gather of two integers per batch);
* **resumption**: the iterator's ``get_state()`` is saved in each training checkpoint by grain's
  orbax handler (``WORKDIR/checkpoints/<step>/loader/process_<i>-of-<n>.json``) and restored
  with it; :meth:`GrainBatches.position_of` reads the :class:`DataPosition` back from a state,
  :meth:`GrainBatches.iterator_at` positions an iterator at one (a checkpoint saved after
  Ctrl-C, one without the loader item) without reading the records before it.

grain reads records on ``READ_THREADS`` threads up to ``read_ahead`` records ahead of the step;
the transforms run in the training process (``worker_count=0``), while the previous step runs on
the devices (:func:`dpr_jax.training.loop.train_and_evaluate` keeps one step in flight).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from dpr_jax.errors import UserError, optional_import
from dpr_jax.retriever.batching import (
    BiencoderBatches,
    DataPosition,
    build_group,
    ctx_passage,
    tokenize_rows,
)


def _grain():
    """grain's API, imported when a loader is first built (the ``records`` extra)."""
    return optional_import("grain.python", "records", "training on ArrayRecord data (grain)")


READ_THREADS = 4
MAX_EPOCHS = 1 << 30  # the sampler's length: endless in practice


class BatchOrderSampler:
    """grain ``Sampler``: the global sample order of ``batches`` (a training
    :class:`BiencoderBatches`) laid out for ``shard_count`` processes (see the module doc)."""

    def __init__(self, batches: BiencoderBatches, shard_count: int):
        b_global = batches.spec.batch_size
        if b_global % shard_count:
            raise UserError(
                f"batch_size {b_global} is not divisible by the {shard_count} processes"
            )
        self.batches = batches
        self.shard_count = shard_count
        self.rows = b_global // shard_count
        self.epoch_size = batches.batches_per_epoch * b_global
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._metadata = _grain().RecordMetadata

    def __len__(self) -> int:
        return self.epoch_size * MAX_EPOCHS

    def __repr__(self) -> str:  # grain checks a restored iterator's sampler by its repr
        spec = self.batches.spec
        return (
            f"BatchOrderSampler(records={len(self.batches.examples)}, "
            f"batch_size={spec.batch_size}, shard_count={self.shard_count}, seed={spec.seed})"
        )

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:  # grain's reader threads ask for neighbouring samples
            order = self._orders.get(epoch)
            if order is None:
                order = self.batches.order(epoch)
                self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
                self._orders[epoch] = order
            return order

    def __getitem__(self, index: int):
        if not 0 <= index < len(self):
            raise IndexError(index)
        p, i = index % self.shard_count, index // self.shard_count
        k, j = divmod(i, self.rows)  # process p's row j of global batch k
        epoch, batch = divmod(k, self.batches.batches_per_epoch)
        pos = batch * self.batches.spec.batch_size + p * self.rows + j  # its place in the epoch
        seed = self.batches.spec.seed
        return self._metadata(
            index=index,
            record_key=int(self._order(epoch)[pos]),
            rng=np.random.default_rng([seed, epoch, pos]),  # BiencoderBatches.question_group's
        )


def _random_map(fn: Callable[[Any, np.random.Generator], Any]):
    """``fn(element, rng)`` as a grain ``RandomMapTransform``, fed the sampler's generators."""

    class RandomMap(_grain().RandomMapTransform):
        def random_map(self, element, rng: np.random.Generator):
            return fn(element, rng)

    return RandomMap()


class QuestionGroup:
    """example -> (question, [positive, hard negatives...]): hard-negative sampling, with the
    sampler's per-row generator (a ``RandomMapTransform`` of the loader)."""

    def __init__(self, batches: BiencoderBatches):
        self.batches = batches

    def __call__(self, example, rng: np.random.Generator):
        spec = self.batches.spec
        pos = ctx_passage(example.positive_ctxs[0])
        group = build_group(
            example, pos, self.batches.positives, spec.n_hard, spec.shuffle_hard, rng
        )
        return example.question, group


class TokenizeRows:
    """``grain.Batch``'s batch_fn: a process's rows -> its arrays of the batch."""

    def __init__(self, batches: BiencoderBatches):
        self.batches = batches

    def __call__(self, rows: list[tuple[str, list]]) -> dict[str, np.ndarray]:
        b = self.batches
        return tokenize_rows(
            b.tokenizer, b.spec, [q for q, _ in rows], [g for _, g in rows], [1.0] * len(rows)
        )


def _allgather_max(lengths: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return lengths
    return np.asarray(multihost_utils.process_allgather(lengths)).reshape(-1, len(lengths)).max(0)


class GrainBatches:
    """This process's training batches of ``batches`` through a ``grain.DataLoader``: the same
    arrays as ``batches.batch(epoch, batch)`` over the rows of shard ``shard_options`` (default
    ``ShardByJaxProcess``), and the same ``iterate`` / ``next_position`` interface.

    ``agree``: the padded (question, passage) lengths of a bucketed batch over all processes from
    this one's (default: the maximum over an all-gather)."""

    def __init__(
        self,
        batches: BiencoderBatches,
        shard_options=None,
        read_ahead: int | None = None,
        agree: Callable[[np.ndarray], np.ndarray] = _allgather_max,
    ):
        if not batches.train:
            raise ValueError("GrainBatches serves training batches (evaluation pads its last)")
        self.batches = batches
        self.spec = batches.spec
        self.batches_per_epoch = batches.batches_per_epoch
        grain = _grain()
        shard = shard_options or grain.ShardByJaxProcess(drop_remainder=True)
        self.shard_index, self.shard_count = shard.shard_index, shard.shard_count
        self.sampler = BatchOrderSampler(batches, self.shard_count)
        b = self.sampler.rows
        rows = (self.shard_index * b, (self.shard_index + 1) * b)
        if batches.rows != rows:
            raise ValueError(
                f"process rows {batches.rows} are not shard {self.shard_index} of "
                f"{self.shard_count} (rows {rows}): build the mesh with make_mesh"
            )
        self.rows = rows
        self.agree = agree
        self.loader = grain.DataLoader(
            data_source=batches.examples,
            sampler=self.sampler,
            operations=[
                _random_map(QuestionGroup(batches)),
                grain.Batch(b, drop_remainder=True, batch_fn=TokenizeRows(batches)),
            ],
            shard_options=shard,
            worker_count=0,
            read_options=grain.ReadOptions(
                num_threads=READ_THREADS, prefetch_buffer_size=read_ahead or 2 * b
            ),
        )
        self._live = None  # the iterator of the running iterate()
        self._resumed = None  # an iterator restored from a checkpoint, for the next iterate()

    def next_position(self, pos: DataPosition) -> DataPosition:
        return self.batches.next_position(pos)

    # -- iterator states ---------------------------------------------------------------------

    def _local_count(self, position: DataPosition) -> int:
        """Samples this process has read before ``position``."""
        return (position.epoch * self.batches_per_epoch + position.batch) * self.sampler.rows

    def position_of(self, iterator) -> DataPosition:
        """The position of the next batch ``iterator`` (of :attr:`loader`) produces."""
        state = json.loads(iterator.get_state())
        last = int(state["last_seen_indices"]["0"])  # the global sample index last read
        n, p = self.shard_count, self.shard_index
        if (last - p) % n:
            raise UserError(f"loader state {last} is not a sample of shard {p} of {n}")
        k, r = divmod((last - p) // n + 1, self.sampler.rows)
        if r:
            raise UserError(f"loader state {last} is not at a batch boundary")
        return DataPosition(*divmod(k, self.batches_per_epoch))

    def iterator_at(self, position: DataPosition | None = None):
        """A fresh iterator of :attr:`loader` whose next batch is ``position``'s (None: the
        first), positioned through grain's ``set_state`` without reading earlier records."""
        it = iter(self.loader)
        if position is not None and self._local_count(position):
            state = json.loads(it.get_state())
            n, p = self.shard_count, self.shard_index
            state["last_seen_indices"] = {"0": p - n + self._local_count(position) * n}
            it.set_state(json.dumps(state).encode())
        return it

    def resume(self, iterator) -> None:
        """Continue the next :meth:`iterate` from ``iterator`` (restored from a checkpoint)."""
        self._resumed = iterator

    def checkpoint_item(self, position: DataPosition):
        """The iterator whose state a checkpoint at ``position`` saves: the running one when it
        is there (it is, between two steps), else one positioned there."""
        live = self._live
        if live is not None and self.position_of(live) == position:
            return live
        return self.iterator_at(position)

    # -- batches -----------------------------------------------------------------------------

    def _pad(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bucketed batches: pad to the lengths all processes agree on."""
        if not self.spec.bucket:
            return batch
        tq, tp = (int(t) for t in self.agree(np.array([batch["q_ids"].shape[1],
                                                       batch["p_ids"].shape[1]])))  # fmt: skip
        pad_id = self.batches.tokenizer.tok.pad_token_id
        out = dict(batch)
        for key, t, fill in (("q_ids", tq, pad_id), ("q_mask", tq, 0), ("p_ids", tp, pad_id),
                             ("p_mask", tp, 0)):  # fmt: skip
            x = batch[key]
            out[key] = np.pad(x, ((0, 0), (0, t - x.shape[1])), constant_values=fill)
        return out

    def iterate(
        self, start: DataPosition | None = None
    ) -> Iterator[tuple[DataPosition, dict[str, np.ndarray]]]:
        """Endless stream of (position after this batch, this process's batch) from ``start``
        (default: the first batch)."""
        start = DataPosition() if start is None else start
        it, self._resumed = self._resumed or self.iterator_at(start), None
        at = self.position_of(it)
        if at != start:
            raise UserError(f"the data loader is at {at}, the run at {start}")
        self._live = it
        pos = start
        while True:
            batch = next(it)
            pos = self.next_position(pos)
            yield pos, self._pad(batch)


__all__ = ["BatchOrderSampler", "GrainBatches", "QuestionGroup", "TokenizeRows"]
