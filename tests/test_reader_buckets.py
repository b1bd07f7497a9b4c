"""Length-bucketed reader training batches (ReaderTrainConfig.bucket / length_groups).

The reference is the same batch padded to ``max_length``: bucketing must keep every token, span
and mask, change the shape only, and give the same reader loss; length groups must keep each
epoch a permutation of the questions and be a pure function of (seed, epoch, batch size).
Real SQuAD (the Notre Dame article), the MiniLM tokenizer, a tiny random reader.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpr_jax.models.bert import BertConfig
from dpr_jax.reader.data import (
    ReaderInputConfig,
    ReaderTokenizer,
    ReaderTrainData,
    read_reader_examples,
)
from dpr_jax.reader.loss import reader_loss
from dpr_jax.reader.model import Reader, init_reader_params

MAX_LEN = 384  # the article's paragraphs: 124-408 tokens with the question


@pytest.fixture(scope="module")
def setup(data_dir, minilm_dir):
    path = data_dir / "fixtures" / "squad-train-v1.1.University_of_Notre_Dame.official.json"
    examples = read_reader_examples(path, "auto", 4, 0)
    tok = ReaderTokenizer(minilm_dir, ReaderInputConfig(MAX_LEN, 32))
    return examples, tok


def _data(setup, m=2, **kw):
    examples, tok = setup
    return ReaderTrainData(examples, tok, passages_per_question=m, max_negatives=4, seed=3, **kw)


@pytest.mark.parametrize("m", [1, 2])
def test_bucketed_batch_is_the_padded_batch_cut(setup, m):
    full, cut = _data(setup, m), _data(setup, m, bucket=32)
    assert len(full) > 100
    lens = []
    for step in range(full.batches_per_epoch(8)):
        a, b = full.batch(step, 8), cut.batch(step, 8)
        t = b["input_ids"].shape[-1]
        lens.append(t)
        longest = int(a["attention_mask"].sum(-1).max())
        # T: the longest sequence the batch's questions can yield, up to a multiple of 32
        assert t % 32 == 0 or t == MAX_LEN
        assert longest <= t <= MAX_LEN
        assert t - 32 < int(full.lengths[full.question_order(0, 8)[step * 8 : step * 8 + 8]].max())
        for k in ("input_ids", "attention_mask"):
            np.testing.assert_array_equal(b[k], a[k][..., :t])
            assert not a[k][..., t:].any() or k == "input_ids"
        assert (a["attention_mask"][..., t:] == 0).all()
        for k in ("passage_mask", "start_positions", "end_positions", "answer_mask"):
            np.testing.assert_array_equal(b[k], a[k])
        # a process's rows get the global batch's T (every process of a pod agrees on it)
        rows = cut.batch(step, 8, rows=(2, 4))["input_ids"]
        np.testing.assert_array_equal(rows, b["input_ids"][2:4])
    assert min(lens) < MAX_LEN and max(lens) == MAX_LEN  # both kinds of batch met
    assert cut.epoch_lengths(0, 8).tolist() == lens  # what the bench counts is what training pads
    # the per-question bound: its longest sequence over the passages a batch can draw
    tok = setup[1]
    for q, n in zip(cut.questions, cut.lengths):
        cands = [t for t, _ in q.positives] + (q.negatives if m > 1 else [])
        assert n == max(len(tok.sequence(q.q_ids, t).ids) for t in cands)


def test_bucketed_batch_gives_the_same_loss(setup):
    examples, tok = setup
    cfg = BertConfig(vocab_size=tok.tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=512)  # fmt: skip
    params = init_reader_params(cfg, jax.random.PRNGKey(0))
    model = Reader(cfg)

    @jax.jit
    def loss(batch):
        out = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"])
        return reader_loss(out.start_logits, out.end_logits, out.relevance_logits, batch)[0]

    full, cut = _data(setup), _data(setup, bucket=32)
    checked = 0
    for step in range(40):  # batches of 2 questions x 2 passages: many shorter than 384
        a, b = full.batch(step, 2), cut.batch(step, 2)
        if b["input_ids"].shape[-1] == MAX_LEN:
            continue
        a = {k: jnp.asarray(v) for k, v in a.items()}
        b = {k: jnp.asarray(v) for k, v in b.items()}
        np.testing.assert_allclose(float(loss(b)), float(loss(a)), rtol=1e-5)
        checked += 1
    assert checked >= 3


def test_length_groups(setup):
    plain = _data(setup, m=1, bucket=32)
    grouped = _data(setup, m=1, bucket=32, length_groups=4)
    again = _data(setup, m=1, bucket=32, length_groups=4)
    n, b = len(grouped), 8
    nb = grouped.batches_per_epoch(b)
    for epoch in (0, 1):
        order = grouped.question_order(epoch, b)
        assert sorted(order.tolist()) == list(range(n))  # a permutation, nothing lost
        np.testing.assert_array_equal(order, again.question_order(epoch, b))  # pure
        # the same questions as the plain epoch in each group of 4 batches, only reordered
        base = plain.question_order(epoch, b)[: nb * b]
        for g in range(0, nb * b, 4 * b):
            grp = base[g : g + 4 * b]
            got = [i for i in order[: nb * b] if i in set(grp.tolist())]
            assert len(got) == len(grp)
    assert not np.array_equal(grouped.question_order(0, b), grouped.question_order(1, b))
    # batches hold similar lengths: less padding than the plain order's batches
    pad = lambda d: sum(d.batch(s, b)["input_ids"].shape[-1] for s in range(nb))  # noqa: E731
    spread = lambda d, e: np.mean([np.ptp(d.lengths[d.question_order(e, b)[s * b : (s + 1) * b]])
                                   for s in range(nb)])  # fmt: skip  # noqa: E731
    assert spread(grouped, 0) < 0.6 * spread(plain, 0)
    assert pad(grouped) <= pad(plain)
    with pytest.raises(ValueError, match="bucket and length_groups"):
        _data(setup, bucket=-1)


@pytest.mark.slow
def test_bench_reader_lengths_smoke(data_dir, minilm_dir, tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "bench_reader_lengths.py"
    spec = importlib.util.spec_from_file_location("bench_reader_lengths", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    squad = data_dir / "fixtures" / "squad-train-v1.1.University_of_Notre_Dame.official.json"
    out = tmp_path / "lengths.json"
    common = ["--train", str(squad), "--set", "data_format=squad", "--set", "batch_size=8"]
    rc = bench.main([*common, "--tiny", "--steps", "1", "--settings", "0:0,32:0,32:8",
                     "--json", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    plain, cut, grouped = res["settings"]
    n_batches = sum(plain["batches"].values())
    assert plain["batches"] == {"256": n_batches}  # the recipe's max_length, every batch
    for row in (cut, grouped):
        assert sum(row["batches"].values()) == n_batches
        assert all(int(t) % 32 == 0 and int(t) <= 256 for t in row["batches"])
    assert grouped["mean_length"] < cut["mean_length"] <= plain["mean_length"]
    assert set(res["step_s"]) == {t for r in res["settings"] for t in r["batches"]}
    assert "| float32 | 32 | 8 |" in capsys.readouterr().out
    out2 = tmp_path / "matmul.json"
    rc = bench.main([*common, "--tiny", "--steps", "1", "--settings", "32:8",
                     "--matmul-dtype", "float32,bfloat16", "--json", str(out2)])  # fmt: skip
    assert rc == 0
    res2 = json.loads(out2.read_text())
    assert [r["matmul_dtype"] for r in res2["settings"]] == ["float32", "bfloat16"]
    assert set(res2["step_s"]) == {"float32", "bfloat16"}
    assert res2["settings"][0]["batches"] == grouped["batches"]
    assert "| bfloat16 | 32 | 8 |" in capsys.readouterr().out
    for bad in (
        ["--matmul-dtype", "float16"],
        ["--dtype", "bfloat16", "--matmul-dtype", "bfloat16"],
    ):
        with pytest.raises(SystemExit):
            bench.main([*common, "--tiny", *bad])
    assert bench.main([*common, "--tiny", "--set", "matmul_dtype=bfloat16"]) == 2
    assert "--matmul-dtype" in capsys.readouterr().err
    assert bench.main([*common, "--set", "bucket=x", "--tiny"]) == 2
    assert "bucket" in capsys.readouterr().err
    assert bench.main(["--train", str(tmp_path / "missing.json")]) == 2
