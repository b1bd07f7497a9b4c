"""ArrayRecord bi-encoder data (dpr_jax.data.records): streamed conversion, batches equal to the
JSON path's, and a process reads only the records of its rows."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("array_record", reason="pip install 'dpr-jax[records]'")

from dpr_jax.cli import main as dpr_jax_main  # noqa: E402
from dpr_jax.data.records import (  # noqa: E402
    iter_json_records,
    open_biencoder_records,
)
from dpr_jax.retriever.batching import BatchSpec, BiencoderBatches, DataPosition, ctx_passage  # noqa: E402
from dpr_jax.retriever.task import read_examples  # noqa: E402


def _ctx(k: int, j: int, title: bool = True) -> dict:
    d = {
        "text": f"passage {j} about topic {k} " + "word " * ((k * 7 + j) % 23),
        "passage_id": f"{k}-{j}",
    }
    if title:
        d["title"] = f"Title {k % 5}"
    return d


def _records(n: int = 41) -> list[dict]:
    """Biencoder records exercising every branch of the batch builder: hard negatives (0..3),
    the negative_ctxs fallback, no negatives at all (filled from the corpus), a record without
    positives (skipped), scores, ids, unicode, and floats."""
    out = []
    for k in range(n):
        rec = {
            "dataset": "synthetic",
            "question": f"question {k} ünïcode?",
            "answers": [f"answer {k}"],
            "positive_ctxs": [dict(_ctx(k, 0), score=1.5e3 + k)] if k % 13 != 7 else [],
            "negative_ctxs": [_ctx(k, 10 + j, title=j % 2 == 0) for j in range(k % 3)],
            "hard_negative_ctxs": [_ctx(k, 20 + j) for j in range((k // 2) % 4)],
        }
        if k % 4 == 1:
            rec["id"] = k
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory, data_dir):
    """The NQ fixture's records followed by synthetic ones: JSON list, and its record dir."""
    tmp = tmp_path_factory.mktemp("records")
    nq = json.loads((data_dir / "fixtures" / "biencoder-nq-dev.sample.json").read_text())
    recs = nq + _records()
    src = tmp / "train.json"
    src.write_text(json.dumps(recs, indent=2, ensure_ascii=False))
    out = tmp / "train.records"
    assert dpr_jax_main(["convert-data", "--biencoder", str(src), "--out", str(out)]) == 0
    return recs, src, out


@pytest.fixture(scope="module")
def tokenizer(minilm_dir):
    from dpr_jax.data.tokenize import DPRTokenizer

    return DPRTokenizer(minilm_dir)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 20])
def test_streaming_parser_equals_json_load(tmp_path, chunk):
    recs = _records(12) + [{"question": "x", "n": 12345, "f": -1.5e-7, "t": True, "z": None}]
    path = tmp_path / "a.json"
    path.write_text("  \n" + json.dumps(recs, indent=1) + "\n")
    assert [r for _, r in iter_json_records(path, chunk_chars=chunk)] == recs
    compact = tmp_path / "b.json.gz"  # no whitespace at all, gzipped
    with gzip.open(compact, "wt", encoding="utf-8") as f:
        f.write(json.dumps(recs, separators=(",", ":")))
    assert [r for _, r in iter_json_records(compact, chunk_chars=chunk)] == recs
    lines = tmp_path / "c.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert [r for _, r in iter_json_records(lines, chunk_chars=chunk)] == recs
    empty = tmp_path / "d.json"
    empty.write_text("[ ]")
    assert list(iter_json_records(empty, chunk_chars=chunk)) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ('[{"question": "a"}, {"question": ', "record 1: invalid JSON"),
        ('[{"question": "a"} {"question": "b"}]', "after record 0: expected ',' or ']'"),
        ('[{"question": "a"},', "record 1: the file ends inside the JSON list"),
        ('[{"question": "a"}] x', "unexpected data after the end"),
        ("oops", "expected a JSON list or JSON lines"),
    ],
)
def test_streaming_parser_names_file_and_record(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as e:
        list(iter_json_records(path, chunk_chars=5))
    assert str(path) in str(e.value)


def test_converted_examples_equal_read_biencoder(data):
    recs, src, out = data
    meta = json.loads((out / "meta.json").read_text())
    skipped = sum(1 for r in recs if not r["positive_ctxs"])
    assert skipped == 3 and meta["skipped_no_positive"] == skipped
    assert meta["records"] == len(recs) - skipped
    from_json = read_examples(str(src))
    from_dir = read_examples(str(out))
    assert len(from_dir) == len(from_json) == meta["records"]
    assert list(from_dir) == from_json
    # the dev path: a seeded shuffle, then the first `limit` (views, nothing read eagerly)
    assert list(read_examples(str(out), 17, shuffle_seed=3)) == read_examples(
        str(src), 17, shuffle_seed=3
    )
    view = read_examples(str(out), 17, shuffle_seed=3)
    ref = read_examples(str(src), 17, shuffle_seed=3)
    assert list(view.positives) == [ctx_passage(ex.positive_ctxs[0]) for ex in ref]


def _assert_batches_equal(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("bucket", [None, 16])
@pytest.mark.parametrize("rows", [None, (0, 4), (4, 8)])
def test_batches_equal_the_json_path(data, tokenizer, bucket, rows):
    _, src, out = data
    spec = BatchSpec(batch_size=8, n_hard=2, q_max_len=16, p_max_len=32, bucket=bucket, seed=5)
    ref = BiencoderBatches(read_examples(str(src)), tokenizer, spec, rows)
    got = BiencoderBatches(open_biencoder_records(out), tokenizer, spec, rows)
    assert got.batches_per_epoch == ref.batches_per_epoch == 5
    n = 2 * ref.batches_per_epoch + 1  # across two epoch boundaries (reshuffled orders)
    for (pos_r, b_r), (pos_g, b_g), _ in zip(ref.iterate(), got.iterate(), range(n)):
        assert pos_r == pos_g
        _assert_batches_equal(b_r, b_g)
    # evaluation batches: fixed order, last batch padded with weight-0 rows
    dev_r = BiencoderBatches(
        read_examples(str(src), 0, "dev_path", 1), tokenizer, spec, rows, False
    )
    dev_g = BiencoderBatches(
        read_examples(str(out), 0, "dev_path", 1), tokenizer, spec, rows, False
    )
    for b_r, b_g in zip(dev_r.eval_batches(), dev_g.eval_batches(), strict=True):
        _assert_batches_equal(b_r, b_g)


def test_a_process_reads_only_its_rows(data, tokenizer):
    """Rows [4, 8) of each global batch of 8: exactly those questions' records are read (each
    once), plus their own positives and one positive per filled passage; never another row's."""
    _, src, out = data
    spec = BatchSpec(batch_size=8, n_hard=3, q_max_len=16, p_max_len=32, seed=11)
    ref = BiencoderBatches(read_examples(str(src)), tokenizer, spec)
    records = open_biencoder_records(out)
    read: list[int] = []
    source = records._records
    plain_read = source.read
    source.read = lambda i: (read.append(i), plain_read(i))[1]
    mine = BiencoderBatches(records, tokenizer, spec, (4, 8))
    pos = DataPosition()
    for _ in range(7):  # across the epoch boundary
        start_reads, start_pos = len(read), records.positives_read
        mine.batch(pos.epoch, pos.batch)
        rows = ref.global_indices(pos.epoch, pos.batch)
        assert read[start_reads:] == rows[4:8]  # each of our questions once, no other
        fills = 0
        for row in range(4, 8):  # passages our rows had to borrow from the corpus
            ex = ref.examples[rows[row]]
            own = ctx_passage(ex.positive_ctxs[0])
            hard = [ctx_passage(c) for c in (ex.hard_negative_ctxs or ex.negative_ctxs)]
            fills += max(0, spec.n_hard - len([p for p in hard if p != own]))
        # one read for each row's own positive, one per fill candidate (a candidate equal to
        # the row's own positive, chance 1/43, is drawn again)
        extra = records.positives_read - start_pos - 4
        assert fills <= extra <= 2 * fills + 2
        pos = mine.next_position(pos)
    assert records.records_read == len(read) == 7 * 4


def test_convert_refuses_existing_output_and_missing_input(tmp_path, data):
    _, src, out = data
    assert dpr_jax_main(["convert-data", "--biencoder", str(src), "--out", str(out)]) == 2
    assert dpr_jax_main(["convert-data", "--biencoder", str(tmp_path / "no.json"),
                         "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    with pytest.raises(FileNotFoundError, match="convert-data"):
        open_biencoder_records(tmp_path)


@pytest.mark.slow
def test_training_on_records_equals_training_on_json(data, tmp_path, minilm_dir):
    """train_path = the record directory trains exactly as the JSON file (same losses, same
    exported parameters, bit for bit): same batches, same step."""
    import jax
    from flax.traverse_util import flatten_dict

    from dpr_jax.model_dir import load_model
    from dpr_jax.retriever.task import load_config, train_and_evaluate

    _, src, out = data
    results = []
    for path in (src, out):
        sets = [f"train_path={path}", "dev_path=", "batch_size=8", "num_steps=3", "log_every=1"]
        config = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny.py", sets)
        work = tmp_path / Path(path).name
        train_and_evaluate(config, work)
        recs = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in recs if r["split"] == "train"]
        params = flatten_dict(jax.device_get(load_model(work, "biencoder")[2]))
        results.append((losses, params))
    (l_json, p_json), (l_rec, p_rec) = results
    assert len(l_json) == 3 and l_rec == l_json
    assert sorted(p_rec) == sorted(p_json)
    for k in p_json:
        np.testing.assert_array_equal(p_rec[k], p_json[k], err_msg="/".join(k))
