"""ArrayRecord training data through grain (dpr_jax.data.loader): each shard's batches equal the
JSON path's rows (BiencoderBatches, the reference), a shard reads only its own records, the
iterator state round-trips, and a training run stopped and resumed from the grain state saved
in its checkpoint ends bit-identical to an uninterrupted one.

Shards are simulated in one process with ``grain.ShardOptions(p, n)`` (the two-process test is
tests/test_multihost_cli.py); their bucketed lengths are agreed through a thread barrier that
stands in for the all-gather between processes."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("array_record", reason="pip install 'dpr-jax[records]'")
grain = pytest.importorskip("grain.python", reason="pip install 'dpr-jax[records]'")

from test_records import _records  # noqa: E402

from dpr_jax.cli import main as dpr_jax_main  # noqa: E402
from dpr_jax.data.loader import READ_THREADS, GrainBatches  # noqa: E402
from dpr_jax.data.records import open_biencoder_records  # noqa: E402
from dpr_jax.retriever.batching import (  # noqa: E402
    BatchSpec,
    BiencoderBatches,
    DataPosition,
    ctx_passage,
)
from dpr_jax.retriever.task import read_examples  # noqa: E402

B = 8  # global batch
STEPS = 11  # 5 batches per epoch: across two epoch boundaries


@pytest.fixture(scope="module")
def data(tmp_path_factory, data_dir):
    """The NQ fixture's records followed by synthetic ones (every branch of the group builder):
    a JSON list and its record directory."""
    tmp = tmp_path_factory.mktemp("grain")
    nq = json.loads((data_dir / "fixtures" / "biencoder-nq-dev.sample.json").read_text())
    src = tmp / "train.json"
    src.write_text(json.dumps(nq + _records(), ensure_ascii=False))
    out = tmp / "train.records"
    assert dpr_jax_main(["convert-data", "--biencoder", str(src), "--out", str(out)]) == 0
    return src, out


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from dpr_jax.data.tokenize import DPRTokenizer

    return DPRTokenizer(minilm_dir)


def _rows(p: int, n: int) -> tuple[int, int]:
    b = B // n
    return p * b, (p + 1) * b


def _grain(source, tokenizer, spec, p, n, **kw) -> GrainBatches:
    batches = BiencoderBatches(source, tokenizer, spec, _rows(p, n))
    return GrainBatches(batches, grain.ShardOptions(p, n, drop_remainder=True), **kw)


class _ThreadAllGather:
    """The maximum over ``n`` threads' values, like the all-gather between processes."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n)
        self.values: dict[int, np.ndarray] = {}

    def __call__(self, lengths: np.ndarray) -> np.ndarray:
        self.values[threading.get_ident()] = lengths
        self.barrier.wait()
        out = np.max(list(self.values.values()), axis=0)
        self.barrier.wait()  # everyone has read before the next batch's values
        return out


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("source", ["records", "json"])
@pytest.mark.parametrize("bucket", [None, 16])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_each_shard_equals_the_json_path_rows(data, tokenizer, minilm_dir, source, bucket, n):
    """Shard p of n gives rows [p*B/n, (p+1)*B/n) of every global batch of the JSON path, bit
    for bit, with the same positions; bucketed batches are padded to the global batch's
    length, which the shards agree on."""
    src, out = data
    spec = BatchSpec(batch_size=B, n_hard=2, q_max_len=32, p_max_len=64, bucket=bucket, seed=5)
    agree = _ThreadAllGather(n)
    got: dict[int, list] = {}

    def run(p: int) -> None:  # one shard, as one process: its own source and tokenizer
        from dpr_jax.data.tokenize import DPRTokenizer

        examples = open_biencoder_records(out) if source == "records" else read_examples(src)
        stream = _grain(examples, DPRTokenizer(minilm_dir), spec, p, n, agree=agree).iterate()
        got[p] = [next(stream) for _ in range(STEPS)]

    threads = [threading.Thread(target=run, args=(p,)) for p in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(got) == list(range(n))
    for p in range(n):
        ref = BiencoderBatches(read_examples(src), tokenizer, spec, _rows(p, n))
        assert ref.batches_per_epoch == 5
        for (pos_r, b_r), (pos_g, b_g) in zip(ref.iterate(), got[p], strict=False):
            assert pos_g == pos_r
            _assert_batches_equal(b_g, b_r)
    if bucket:  # the padded lengths vary from batch to batch: bucketing is exercised
        assert len({(b["q_ids"].shape[1], b["p_ids"].shape[1]) for _, b in got[0]}) > 1


def _own_keys(ref: BiencoderBatches, p: int, n: int, batches: int) -> list[int]:
    """Record keys of shard p's rows of the first global batches, in order."""
    start, stop = _rows(p, n)
    pos, keys = DataPosition(), []
    for _ in range(batches):
        keys += ref.global_indices(pos.epoch, pos.batch)[start:stop]
        pos = ref.next_position(pos)
    return keys


def _count_reads(records) -> list[int]:
    """Record the keys ``records`` reads from its questions file."""
    read: list[int] = []
    source = records._records
    plain = source.read
    source.read = lambda i: (read.append(i), plain(i))[1]
    return read


def test_a_shard_reads_only_its_records(data, tokenizer):
    """Shard p of 2 reads its rows' question records: those of the consumed batches and at most
    the read-ahead of later ones, each once, never another shard's; the positives file only
    for passages that fill groups short of hard negatives."""
    src, out = data
    spec = BatchSpec(batch_size=B, n_hard=3, q_max_len=16, p_max_len=32, seed=11)
    ref = BiencoderBatches(read_examples(src), tokenizer, spec)
    for p in range(2):
        records = open_biencoder_records(out)
        read = _count_reads(records)
        loader = _grain(records, tokenizer, spec, p, 2, read_ahead=4)
        stream = loader.iterate()
        for _ in range(STEPS):
            next(stream)
        b = B // 2
        consumed = STEPS * b
        own = _own_keys(ref, p, 2, STEPS + 3)
        # (a record repeated back to back, across an epoch boundary, is read once)
        assert consumed - 2 <= len(read) <= consumed + 4 + READ_THREADS
        assert set(own[:consumed]) <= set(read) <= set(own[: consumed + 4 + READ_THREADS])
        assert records.records_read == len(read)
        fills = 0  # passages our consumed rows borrow from the corpus
        for i in _own_keys(ref, p, 2, STEPS):
            ex = ref.examples[i]
            own = ctx_passage(ex.positive_ctxs[0])
            hard = [ctx_passage(c) for c in (ex.hard_negative_ctxs or ex.negative_ctxs)]
            fills += max(0, spec.n_hard - len([x for x in hard if x != own]))
        # one read per fill candidate; a candidate equal to the row's own positive (chance
        # 1/43) is drawn again
        assert fills > 0 and fills <= records.positives_read <= 2 * fills + 2


def test_iterator_state_resumes_without_rereading(data, tokenizer):
    """The live iterator's grain state after k batches is the state iterator_at(position)
    builds; a fresh loader set to it continues with the batches the first one goes on to give,
    reading no record of the batches before it."""
    _, out = data
    spec = BatchSpec(batch_size=B, n_hard=2, q_max_len=16, p_max_len=32, seed=7)
    first = _grain(open_biencoder_records(out), tokenizer, spec, 1, 2)
    stream = first.iterate()
    for _ in range(7):
        pos, _ = next(stream)
    assert pos == DataPosition(1, 2)
    live = first.checkpoint_item(pos)
    assert live is first._live and first.position_of(live) == pos
    state = live.get_state()
    assert json.loads(state) == json.loads(first.iterator_at(pos).get_state())
    assert json.loads(state)["last_seen_indices"] == {"0": 7 * B - 1}  # global sample index
    want = [next(stream) for _ in range(5)]

    records = open_biencoder_records(out)
    read = _count_reads(records)
    second = _grain(records, tokenizer, spec, 1, 2)
    it = second.iterator_at(None)
    it.set_state(state)
    second.resume(it)
    got = [x for x, _ in zip(second.iterate(pos), range(5))]
    for (pos_w, b_w), (pos_g, b_g) in zip(want, got, strict=True):
        assert pos_g == pos_w
        _assert_batches_equal(b_g, b_w)
    # it read the records of its rows from the position on (and the read-ahead), each once
    ref = BiencoderBatches(read_examples(str(data[0])), tokenizer, spec)
    ahead = 5 * 4 + 2 * 4 + READ_THREADS
    assert 5 * 4 - 2 <= len(read) <= ahead
    own = _own_keys(ref, 1, 2, 7 + 9)
    assert set(own[7 * 4 : 12 * 4]) <= set(read) <= set(own[7 * 4 : 7 * 4 + ahead])
    # a state of another layout (shard 0's) is no position of shard 1
    other = _grain(open_biencoder_records(out), tokenizer, spec, 0, 2).iterator_at(pos)
    with pytest.raises(ValueError, match="not a sample of shard 1"):
        second.position_of(other)


def _losses(work: Path) -> dict[int, float]:
    recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["split"] == "train"}


def _params(work: Path) -> dict:
    import jax
    from flax.traverse_util import flatten_dict

    from dpr_jax.model_dir import load_model

    return flatten_dict(jax.device_get(load_model(work / "model", "biencoder")[2]))


@pytest.mark.slow
def test_stopped_and_resumed_training_on_records_is_bit_identical(
    data, tmp_path, minilm_dir, monkeypatch
):
    """Training on the record directory, stopped at step 3 and resumed from the grain state in
    checkpoint 3, ends with the uninterrupted run's losses and parameters bit for bit; the
    resume reads that state (a state at another position is refused as damage), and a
    checkpoint without it resumes from its data position alone. Ctrl-C while the loader is a
    batch ahead of the finished steps saves the loader state of the last finished step (5)."""
    from dpr_jax.errors import Interrupted
    from dpr_jax.io import write_manifest
    from dpr_jax.retriever.task import load_config, train_and_evaluate
    from dpr_jax.training.checkpoints import CheckpointError

    _, out = data
    sets = [f"train_path={out}", "dev_path=", f"batch_size={B}", "num_steps=6", "log_every=1",
            "checkpoint_every=2", "dropout=0.1"]  # fmt: skip
    config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py", sets)
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    train_and_evaluate(config, full)
    train_and_evaluate(dataclasses.replace(config, stop_at_step=3), stopped)
    loader_dir = stopped / "checkpoints" / "3" / "loader"
    state = json.loads((loader_dir / "process_0-of-1.json").read_text())
    assert state["last_seen_indices"] == {"0": 3 * B - 1}  # 3 batches of 8 read
    assert state["sampler"] == f"BatchOrderSampler(records=43, batch_size={B}, " \
                               f"shard_count=1, seed={config.seed})"  # fmt: skip
    damaged, no_loader = tmp_path / "damaged", tmp_path / "no_loader"
    shutil.copytree(stopped, damaged)
    shutil.copytree(stopped, no_loader)
    train_and_evaluate(config, stopped)

    want, got = _losses(full), _losses(stopped)
    assert sorted(want) == list(range(1, 7)) and got == want
    p_full, p_res = _params(full), _params(stopped)
    assert sorted(p_res) == sorted(p_full)
    for k in p_full:
        np.testing.assert_array_equal(p_res[k], p_full[k], err_msg="/".join(k))

    # the loader state is what the resume reads: one batch further is refused
    ckpt = damaged / "checkpoints" / "3"
    state["last_seen_indices"] = {"0": 4 * B - 1}
    (ckpt / "loader" / "process_0-of-1.json").write_text(json.dumps(state))
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt, "dpr-jax training checkpoint")
    with pytest.raises(CheckpointError, match=r"data loader is at \{'epoch': 0, 'batch': 4\}"):
        train_and_evaluate(config, damaged)
    # a checkpoint without the loader item (Ctrl-C's) resumes at its data position
    ckpt = no_loader / "checkpoints" / "3"
    shutil.rmtree(ckpt / "loader")
    (ckpt / "manifest.json").unlink()
    write_manifest(ckpt, "dpr-jax training checkpoint")
    train_and_evaluate(config, no_loader)
    assert _losses(no_loader) == want
    p_nl = _params(no_loader)
    for k in p_full:
        np.testing.assert_array_equal(p_nl[k], p_full[k], err_msg="/".join(k))

    # Ctrl-C while fetching the 6th batch: the live iterator has read it, 5 steps are done
    real_iterate = GrainBatches.iterate

    def iterate(self, start=None):
        for k, item in enumerate(real_iterate(self, start)):
            if k == 5:
                raise KeyboardInterrupt
            yield item

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(GrainBatches, "iterate", iterate)
    with pytest.raises(Interrupted):
        train_and_evaluate(config, interrupted)
    monkeypatch.setattr(GrainBatches, "iterate", real_iterate)
    saved = json.loads((interrupted / "checkpoints" / "5" / "loader" / "process_0-of-1.json")
                       .read_text())  # fmt: skip
    assert saved["last_seen_indices"] == {"0": 5 * B - 1}  # step 5's, not the live 6 * B - 1
    train_and_evaluate(config, interrupted)
    assert _losses(interrupted) == want
    p_int = _params(interrupted)
    for k in p_full:
        np.testing.assert_array_equal(p_int[k], p_full[k], err_msg="/".join(k))
