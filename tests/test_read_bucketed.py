"""Length-bucketed reading (:class:`dpr_jax.reader.span.ReaderPredictor`, ``bucket > 0``) gives the
logits and answers of the unbucketed path (every sequence padded to ``max_length`` in one fixed
batch shape, ``bucket=0``), with a tiny random reader on real SQuAD paragraphs of many lengths,
while running smaller shapes."""

import json

import jax
import numpy as np

from dpr_jax.data.formats import Passage
from dpr_jax.models.bert import BertConfig
from dpr_jax.reader.data import ReaderInputConfig
from dpr_jax.reader.model import init_reader_params
from dpr_jax.reader.span import ReaderPredictor

TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=512)  # fmt: skip


def _questions(data_dir):
    path = data_dir / "fixtures" / "squad-train-v1.1.University_of_Notre_Dame.official.json"
    paras = json.loads(path.read_text())["data"][0]["paragraphs"]
    rng = np.random.default_rng(0)
    qs, ps = [], []
    for i in range(5):
        qs.append(paras[i]["qas"][0]["question"])
        # passages of 3 to ~120 words, so lengths spread over several buckets (and past 128)
        ps.append([Passage(" ".join(paras[j]["context"].split()[: int(rng.integers(3, 120))]),
                           "Notre Dame") for j in rng.choice(len(paras), 7, replace=False)])  # fmt: skip
    ps[1].append(Passage("", "an empty passage"))
    return qs, ps


def test_bucketed_reading_equals_padding_to_max_length(data_dir, minilm_dir):
    cfg = BertConfig(**TINY_BERT)
    params = init_reader_params(cfg, jax.random.PRNGKey(0))
    params = jax.tree.map(  # heads with real signal: random logits, not ~0
        lambda x: np.asarray(x) + 0.2 * np.random.default_rng(1).standard_normal(x.shape), params
    )
    inp = ReaderInputConfig(128, 24)
    qs, ps = _questions(data_dir)
    shapes = {}
    got = {}
    for bucket in (0, 16):
        pred = ReaderPredictor(
            params, cfg, minilm_dir, inp, batch_size=16, bucket=bucket, window_overlap=None
        )  # cut at 128 tokens: one sequence a passage
        forward = pred._forward

        def spy(p, ids, mask, forward=forward, bucket=bucket):
            shapes.setdefault(bucket, []).append(ids.shape)
            return forward(p, ids, mask)

        pred._forward = spy
        got[bucket] = (pred.passage_logits(qs, ps)[0], pred.predict(qs, ps, top_k=(1, 3, 8)))
    (ref_logits, ref_preds), (logits, preds) = got[0], got[16]
    for ref_q, q in zip(ref_logits, logits):
        for a, b in zip(ref_q, q):
            assert len(a.start) == len(b.start)
            np.testing.assert_allclose(b.relevance, a.relevance, atol=2e-5)
            np.testing.assert_allclose(b.start, a.start, atol=2e-5)
            np.testing.assert_allclose(b.end, a.end, atol=2e-5)
    # the same answers (scores equal up to float32 rounding of differently shaped matmuls)
    key = lambda sp: (sp.text, sp.passage_idx, sp.start_char, sp.end_char)
    for p, r in zip(preds, ref_preds):
        assert p.predictions.keys() == r.predictions.keys()
        for k in p.predictions:
            assert key(p.predictions[k]) == key(r.predictions[k])
            np.testing.assert_allclose(p.predictions[k].score, r.predictions[k].score, atol=5e-5)
    assert all(s == (16, 1, 128) for s in shapes[0])
    # 36 sequences: 16 + 16 + 4 rows (padded to 8), each batch as long as its longest sequence
    # rounded up to 16 tokens; the shortest batch is much shorter than max_length
    small = shapes[16][: len(shapes[16]) // 2]
    assert [s[0] for s in small] == [16, 16, 8]
    assert all(s[2] % 16 == 0 and s[2] <= 128 for s in small)
    assert small[-1][2] <= 64 and small[0][2] >= small[1][2] >= small[2][2]
