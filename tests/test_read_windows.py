"""Reading a passage longer than one sequence in overlapping windows
(:meth:`dpr_jax.reader.data.ReaderTokenizer.windows`, :func:`dpr_jax.reader.span.merge_windows`):
against each window built here by hand from the Hugging Face tokenizer's own word pieces and run
through the reader alone, with the max-context rule written out token by token; the windows
cover the text with the overlap asked for; ``window_overlap=None`` cuts the text as DPR does."""

import json

import jax
import numpy as np
import pytest
from transformers import AutoTokenizer

from dpr_jax.data.formats import Passage
from dpr_jax.errors import UsageError, UserError
from dpr_jax.models.bert import BertConfig
from dpr_jax.reader.data import ReaderInputConfig
from dpr_jax.reader.model import Reader, init_reader_params
from dpr_jax.reader.span import ReaderPredictor

TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=512)  # fmt: skip


@pytest.fixture(scope="module")
def reader():
    cfg = BertConfig(**TINY_BERT)
    params = init_reader_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(  # heads with real signal: random logits, not ~0
        lambda x: np.asarray(x) + 0.2 * np.random.default_rng(1).standard_normal(x.shape), params
    )
    return cfg, params


def _paragraphs(data_dir, n):
    path = data_dir / "fixtures" / "squad-train-v1.1.University_of_Notre_Dame.official.json"
    paras = json.loads(path.read_text())["data"][0]["paragraphs"]
    return [(p["qas"][0]["question"], p["context"]) for p in paras[:n]]


def test_windows_against_each_window_read_alone(data_dir, minilm_dir, reader):
    cfg, params = reader
    hf = AutoTokenizer.from_pretrained(str(minilm_dir))
    inp, overlap, title = ReaderInputConfig(64, 16), 12, "Notre Dame"
    pred = ReaderPredictor(params, cfg, minilm_dir, inp, batch_size=8, window_overlap=overlap)
    cut = ReaderPredictor(params, cfg, minilm_dir, inp, batch_size=8, window_overlap=None)
    model = Reader(cfg)
    cls, sep = hf.cls_token_id, hf.sep_token_id
    paras = _paragraphs(data_dir, 3)
    qs, ps = (
        [q for q, _ in paras],
        [[Passage(c, title), Passage("short.", title)] for _, c in paras],
    )
    logits, _ = pred.passage_logits(qs, ps)
    cut_logits, _ = cut.passage_logits(qs, ps)
    for (q, text), got, short in zip(paras, logits, cut_logits):
        q_ids = hf(q, add_special_tokens=False)["input_ids"][:16]
        t_ids = hf(title, add_special_tokens=False)["input_ids"]
        x_ids = hf(text, add_special_tokens=False)["input_ids"]
        head = [cls, *q_ids, sep, *t_ids, sep]
        room = 64 - len(head)
        assert len(x_ids) > 2 * room  # several windows
        # windows by hand: every `room - overlap` tokens, the last one ending at the text's end
        starts = list(range(0, len(x_ids) - room, room - overlap)) + [len(x_ids) - room]
        reads = []
        for a in starts:
            ids = np.array([head + x_ids[a : a + room]], np.int32)
            out = model.apply({"params": params}, ids[:, None], np.ones_like(ids)[:, None])
            sl = slice(len(head), len(head) + room)
            reads.append((a, float(out.relevance_logits[0, 0]), np.asarray(out.start_logits[0, 0, sl]),
                          np.asarray(out.end_logits[0, 0, sl])))  # fmt: skip
        want_start, want_end = np.zeros(len(x_ids)), np.zeros(len(x_ids))
        for j in range(len(x_ids)):  # the window where token j has the most context
            have = [(min(j - a, a + room - 1 - j), -i) for i, (a, *_) in enumerate(reads)
                    if a <= j < a + room]  # fmt: skip
            i = -max(have)[1]  # a tie: the earlier window
            a, _, st, en = reads[i]
            want_start[j], want_end[j] = st[j - a], en[j - a]
        long, one = got
        assert len(long.start) == len(x_ids)
        np.testing.assert_allclose(long.start, want_start, atol=2e-4)
        np.testing.assert_allclose(long.end, want_end, atol=2e-4)
        assert long.relevance == pytest.approx(max(r[1] for r in reads), abs=2e-4)
        # DPR's cut: the first window alone; a passage that fits is read once either way
        assert len(short[0].start) == room
        np.testing.assert_allclose(short[0].start, reads[0][2], atol=2e-4)
        np.testing.assert_allclose(one.start, short[1].start, atol=2e-5)
        assert one.relevance == pytest.approx(short[1].relevance, abs=2e-5)
    # answers can come from past the cut: each character offset lies inside the passage text
    preds = pred.predict(qs, ps, top_k=(2,))
    assert all(0 <= p.predictions[2].start_char < p.predictions[2].end_char <= len(c)
               for p, (_, c) in zip(preds, paras))  # fmt: skip


def test_window_starts(minilm_dir):
    """The windows of a text of n tokens: consecutive, overlapping by the overlap asked for (more
    for the last, which ends at the text's end), covering every token once or more."""
    from dpr_jax.reader.data import ReaderTokenizer

    tok = ReaderTokenizer(AutoTokenizer.from_pretrained(str(minilm_dir)), ReaderInputConfig(40, 8))
    q = tok.question_ids(["who?"])[0]
    for words, overlap in ((5, 4), (60, 0), (60, 10), (200, 29)):
        (pt,) = tok.passage_tokens([Passage(" ".join(["alpha"] * words), "t")])
        wins = tok.windows(q, pt, overlap)
        spans = [(a, a + s.text_len) for s, a in wins]
        n = len(pt.text_ids)
        assert spans[0][0] == 0 and spans[-1][1] == n
        room = wins[0][0].text_len
        assert all(b - a == room for a, b in spans)
        for (a0, b0), (a1, _) in zip(spans, spans[1:]):
            assert b0 - a1 >= overlap and (a1 - a0 == room - overlap or a1 + room == n)
        if n <= room:
            assert len(wins) == 1
    with pytest.raises(UserError, match="overlap must be >= 0"):
        tok.windows(q, pt, -1)


def test_overlap_over_half_a_sequence_refused(minilm_dir, reader, tmp_path):
    """An overlap over half of max_length would move windows on by a token or so (a
    1,000-token passage read as hundreds of sequences): one line, before anything is read; the
    CLI also refuses ``--truncate`` with ``--window-overlap`` (the cut reads no windows)."""
    from dpr_jax.cli.read import cli_main

    cfg, params = reader
    inp = ReaderInputConfig(64, 16)
    ReaderPredictor(params, cfg, minilm_dir, inp, batch_size=8, window_overlap=32)
    # the default is 64, or half of a shorter reader's max_length (never refused)
    assert ReaderPredictor(params, cfg, minilm_dir, inp, batch_size=8).window_overlap == 32
    long = ReaderInputConfig(256, 32)
    assert ReaderPredictor(params, cfg, minilm_dir, long, batch_size=8).window_overlap == 64
    for bad in (33, 300):
        with pytest.raises(UserError, match=rf"window_overlap {bad} tokens: at most 32 .*64"):
            ReaderPredictor(params, cfg, minilm_dir, inp, batch_size=8, window_overlap=bad)
    results = tmp_path / "r.json"
    results.write_text("[]")
    with pytest.raises(UsageError, match="--truncate: not allowed with argument --window-overlap"):
        cli_main(["--model", str(tmp_path), "--results", str(results),
                  "--window-overlap", "64", "--truncate"])  # fmt: skip
