"""Span decoding, answer labelling and the reader loss against hand-computed / brute-force values."""

import itertools
import math

import jax.numpy as jnp
import numpy as np
import pytest

from dpr_jax.data.formats import Passage
from dpr_jax.reader.data import (
    ReaderExample,
    ReaderInputConfig,
    ReaderTokenizer,
    ReaderTrainData,
    find_answer_spans,
)
from dpr_jax.reader.loss import reader_loss
from dpr_jax.reader.span import NO_ANSWER, ReaderPredictor, best_spans, extend_to_words

TINY_BERT = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=37, max_position_embeddings=512)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# best_spans on hand-made logits


def test_best_span_is_the_argmax_within_the_length_limit():
    start = np.array([0.0, 5.0, 0.0, 0.0])
    end = np.array([0.0, 0.0, 0.0, 7.0])
    assert best_spans(start, end, max_answer_length=3) == [(1, 3, 12.0)]
    # length 3 is over a limit of 2: the best allowed spans score 7 ((2,3) and (3,3)); the tie
    # goes to the earlier start
    assert best_spans(start, end, max_answer_length=2) == [(2, 3, 7.0)]
    # end before start is never a candidate
    assert best_spans(np.array([0.0, 9.0]), np.array([9.0, 0.0]), 5)[0][:2] in [(0, 0), (1, 1)]
    assert best_spans(np.zeros(0), np.zeros(0)) == []


def test_best_spans_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(80):
        n, length, top = int(rng.integers(1, 30)), int(rng.integers(1, 6)), 1 + trial % 3
        if trial >= 60:  # past _ranked's partition (64 a span), and spans that overlap a lot
            n, length, top = int(rng.integers(150, 300)), 10, int(rng.integers(2, 12))
        s, e = rng.normal(size=n), rng.normal(size=n)
        if trial % 2:  # small integers: many ties, which go to the earlier, shorter span
            s, e = rng.integers(-2, 3, size=n).astype(float), rng.integers(-2, 3, size=n) * 1.0
        got = best_spans(s, e, length, top)
        cands = sorted(
            ((i, j, s[i] + e[j]) for i in range(n) for j in range(i, min(n, i + length))),
            key=lambda c: -c[2],
        )
        want = []
        for i, j, sc in cands:  # greedy: best first, skip any overlap
            if all(j < a or b < i for a, b, _ in want):
                want.append((i, j, sc))
            if len(want) == top:
                break
        assert [(a, b) for a, b, _ in got] == [(a, b) for a, b, _ in want], trial
        np.testing.assert_allclose([c[2] for c in got], [c[2] for c in want])
        for a, b, _ in got:
            assert b - a + 1 <= length


def test_best_spans_do_not_overlap():
    # scores: (2,3)=20, (3,3)=19, (3,4)=19, (2,2)=15, (1,2)=14 all overlap (2,3); then (4,4)=10
    # and (1,1)=9. (DPR's nested-only check would accept (3,4).)
    start = np.array([1.0, 9.0, 10.0, 9.0, 0.0])
    end = np.array([1.0, 0.0, 5.0, 10.0, 10.0])
    spans = best_spans(start, end, max_answer_length=2, top_spans=3)
    assert spans == [(2, 3, 20.0), (4, 4, 10.0), (1, 1, 9.0)]
    for (a1, b1, _), (a2, b2, _) in itertools.combinations(spans, 2):
        assert b1 < a2 or b2 < a1


def test_spans_extend_to_whole_words():
    # tokens: the cat ##ap ##ult ##s of ; best raw span is (2, 3) = "##ap ##ult"
    subword = np.array([False, False, True, True, True, False])
    start = np.array([0, 0, 5, 0, 0, 0], float)
    end = np.array([0, 0, 0, 5, 0, 0], float)
    assert best_spans(start, end, 10, 1, subword)[0][:2] == (1, 4)
    assert extend_to_words(4, 4, subword) == (1, 4)
    assert extend_to_words(0, 0, subword) == (0, 0)
    assert extend_to_words(5, 5, subword) == (5, 5)
    # one word of 200 pieces: every span extends to all of it, so one span and no other (every
    # candidate read, past _ranked's partition); tied logits: the earliest, shortest first
    one_word = np.arange(200) > 0
    rng = np.random.default_rng(1)
    spans = best_spans(rng.normal(size=200), rng.normal(size=200), 10, 3, one_word)
    assert [sp[:2] for sp in spans] == [(0, 199)]
    assert best_spans(np.zeros(200), np.zeros(200), 10, 4) == [(k, k, 0.0) for k in range(4)]


# ---------------------------------------------------------------------------------------------
# The predictor's passage handling, with hand-made logits instead of a model


class FakeForward:
    """Stands in for the jitted reader: logits 100 on every question/title/padding position,
    ``text_logits[pair]`` on the passage text, relevance ``rel[pair]``."""

    def __init__(self, predictor, text_logits, rel):
        self.p, self.text_logits, self.rel, self.calls = predictor, text_logits, rel, 0

    def __call__(self, params, ids, mask):
        b, _, t = ids.shape
        start = np.full((b, 1, t), 100.0, np.float32)
        end = np.full((b, 1, t), 100.0, np.float32)
        rel = np.full((b, 1), -100.0, np.float32)
        for r in range(b):
            k = self.calls + r
            if k >= len(self.rel):
                break
            sep = np.flatnonzero(ids[r, 0] == self.p.tokenizer.sep_id)[1]  # after the title
            s, e = self.text_logits[k]
            start[r, 0, sep + 1 : sep + 1 + len(s)] = s
            end[r, 0, sep + 1 : sep + 1 + len(e)] = e
            rel[r, 0] = self.rel[k]
        self.calls += b
        return start, end, rel


@pytest.fixture(scope="module")
def predictor(minilm_dir):
    from dpr_jax.models.bert import BertConfig

    # bucket=0: pairs in their own order (the fake forward counts them); length-bucketed
    # batches are compared with this path in tests/test_read_bucketed.py
    return ReaderPredictor({}, BertConfig(**TINY_BERT), minilm_dir,
                           ReaderInputConfig(64, 16), batch_size=8, bucket=0)  # fmt: skip


def test_prediction_stays_in_passage_text_and_follows_relevance(predictor):
    q = "Where is the Golden Dome of Notre Dame?"
    passages = [
        Passage("", "Empty"),  # scored, yields no span
        Passage("The Golden Dome sits atop the Main Building.", "Notre Dame"),
        Passage("Notre Dame's Main Building has a Golden Dome.", "Notre Dame"),
    ]
    toks = predictor.tokenizer.passage_tokens(passages)
    n1, n2 = len(toks[1].text_ids), len(toks[2].text_ids)
    s1, e1 = np.zeros(n1), np.zeros(n1)
    s1[6], e1[7] = 5, 5  # "Main Building" in passage 1 (tokens 6, 7)
    s2, e2 = np.zeros(n2), np.zeros(n2)
    s2[0], e2[3] = 3, 3  # "Notre Dame's" in passage 2 (notre dame ' s)
    fake = FakeForward(predictor, [(np.zeros(0), np.zeros(0)), (s1, e1), (s2, e2)],
                       rel=[9.0, 2.0, 1.0])  # fmt: skip
    predictor._forward = fake
    (pred,) = predictor.predict([q], [passages], top_k=(1, 3))
    # k=1: only the empty passage -> no answer; k=3: the empty passage is the most relevant but
    # yields no span, passage 1 is next. Question/title/padding logits (100) are never used.
    assert pred.predictions[1] == NO_ANSWER
    p3 = pred.predictions[3]
    assert (p3.passage_idx, p3.text, p3.score, p3.relevance_score) == (1, "Main Building", 10, 2)
    assert passages[1].text[p3.start_char : p3.end_char] == "Main Building"

    # Relevance decides: passage 2 more relevant than passage 1; its answer keeps the original
    # casing and the apostrophe from the text.
    predictor._forward = FakeForward(predictor, fake.text_logits, rel=[-5.0, 1.0, 2.0])
    (pred,) = predictor.predict([q], [passages], top_k=(3,))
    assert (pred.predictions[3].passage_idx, pred.predictions[3].text) == (2, "Notre Dame's")


def test_long_question_is_truncated_not_the_passage(predictor):
    q = " ".join(["why"] * 200)
    p = Passage("Saint Bernadette Soubirous.", "Grotto")
    (q_ids,) = predictor.tokenizer.question_ids([q])
    assert len(q_ids) == 16  # max_question_length
    seq = predictor.tokenizer.sequence(q_ids, predictor.tokenizer.passage_tokens([p])[0])
    (pt,) = predictor.tokenizer.passage_tokens([p])
    assert len(seq.ids) <= 64 and seq.text_len == len(pt.text_ids)
    n = seq.text_len
    s, e = np.zeros(n), np.zeros(n)
    s[0], e[n - 2] = 1, 1  # up to the token before "."
    predictor._forward = FakeForward(predictor, [(s, e)], rel=[0.0])
    (pred,) = predictor.predict([q], [[p]], top_k=(1,))
    assert pred.predictions[1].text == "Saint Bernadette Soubirous"


def test_input_config_rejects_no_room_for_text():
    with pytest.raises(ValueError, match="no room for passage text"):
        ReaderInputConfig(max_length=20, max_question_length=18)


# ---------------------------------------------------------------------------------------------
# Answer positions


def test_answer_positions_every_occurrence(minilm_dir):
    tok = ReaderTokenizer(minilm_dir, ReaderInputConfig(128, 16))
    text = "Notre Dame is a catholic university. The Notre Dame campus has a cat, not catapults."
    (pt,) = tok.passage_tokens([Passage(text, "ND")])
    words = tok.tok.convert_ids_to_tokens(pt.text_ids.tolist())
    assert words[:2] == ["notre", "dame"] and words[8:10] == ["notre", "dame"]
    spans = find_answer_spans(pt.text_ids, tok.answer_ids(["Notre Dame", "cat"]), pt.subword)
    cat = words.index("cat")
    assert "##ap" in words  # "catapults" starts with the piece "cat" but is not a match
    assert spans == [(0, 1), (8, 9), (cat, cat)]
    for s, e in spans:
        assert text[pt.offsets[s, 0] : pt.offsets[e, 1]] in ("Notre Dame", "cat")
    assert find_answer_spans(pt.text_ids, tok.answer_ids(["", "Purdue"]), pt.subword) == []

    # In a training batch the spans are sequence positions of the positive (passage 0).
    ex = ReaderExample("Which university?", ("Notre Dame",),
                       (Passage(text, "ND", has_answer=True),
                        Passage("", "empty negative", has_answer=False)))  # fmt: skip
    data = ReaderTrainData([ex], tok, passages_per_question=3, max_answers=4)
    b = data.batch(0, 1)
    assert b["answer_mask"][0].tolist() == [1, 1, 0, 0]
    assert b["passage_mask"][0].tolist() == [1, 1, 0]  # empty negative kept, third slot padding
    ids = b["input_ids"][0, 0]
    for s, e in zip(b["start_positions"][0][:2], b["end_positions"][0][:2]):
        assert tok.tok.convert_ids_to_tokens(ids[s : e + 1].tolist()) == ["notre", "dame"]


# ---------------------------------------------------------------------------------------------
# The loss


def test_mml_loss_hand_computed():
    ln = math.log
    # Question 0: positive passage tokens 0..3 real, token 4 padding (huge logits, masked);
    # P_start = [1, 2, 1, 1]/5, P_end = [1, 1, 3, 1]/6; gold spans (1,2) and (0,3):
    # sum_k P_s P_e = 2/5*3/6 + 1/5*1/6 = 7/30. Relevance [ln 3, 0, (padding slot) 50]:
    # P(positive) = 3/4. Loss = -ln(7/30) - ln(3/4) = -ln(7/40).
    start = np.zeros((2, 3, 5), np.float32)
    end = np.zeros((2, 3, 5), np.float32)
    start[0, 0] = [0, ln(2), 0, 0, 50]
    end[0, 0] = [0, 0, ln(3), 0, 50]
    rel = np.array([[ln(3), 0, 50], [7, 1, 2]], np.float32)
    mask = np.ones((2, 3, 5), np.int32)
    mask[0, :, 4] = 0
    batch = {
        "attention_mask": mask,
        "passage_mask": np.array([[1, 1, 0], [1, 1, 1]], np.float32),
        "start_positions": np.array([[1, 0, 3], [0, 0, 0]], np.int32),
        "end_positions": np.array([[2, 3, 3], [0, 0, 0]], np.int32),
        "answer_mask": np.array([[1, 1, 0], [1, 0, 0]], np.float32),
        "question_mask": np.array([1, 0], np.float32),  # question 1 is padding
    }
    loss, m = reader_loss(jnp.asarray(start), jnp.asarray(end), jnp.asarray(rel), batch)
    np.testing.assert_allclose(float(loss), -ln(7 / 40), rtol=1e-6)
    np.testing.assert_allclose(float(m["span_loss"]), -ln(7 / 30), rtol=1e-6)
    np.testing.assert_allclose(float(m["select_loss"]), -ln(3 / 4), rtol=1e-6)
    assert float(m["select_acc"]) == 1.0 and float(m["questions"]) == 1.0

    # Same as DPR's _calc_mml over per-span CE_start + CE_end losses.
    ps = np.exp(start[0, 0, :4]) / np.exp(start[0, 0, :4]).sum()
    pe = np.exp(end[0, 0, :4]) / np.exp(end[0, 0, :4]).sum()
    ce = np.array([-ln(ps[1]) - ln(pe[2]), -ln(ps[0]) - ln(pe[3])])
    np.testing.assert_allclose(float(m["span_loss"]), -ln(np.exp(-ce).sum()), rtol=1e-6)


def test_reader_examples_from_dpr_files(tmp_path, data_dir):
    from dpr_jax.data.formats import write_retrieval_results
    from dpr_jax.evaluate import has_answer
    from dpr_jax.reader.data import read_reader_examples

    results = [{
        "question": "who wrote hamlet?", "answers": ["Shakespeare"],
        "ctxs": [
            {"id": "1", "title": "Globe", "text": "A theatre in London.", "score": 9.0,
             "has_answer": False},
            {"id": "2", "title": "Hamlet", "text": "Hamlet is a play by William Shakespeare.",
             "score": 8.0},  # has_answer absent: computed with DPR's has_answer
            {"id": "3", "title": "", "text": "", "score": 7.0, "has_answer": False},
        ],
    }]  # fmt: skip
    path = write_retrieval_results(tmp_path / "results.json", results)
    (ex,) = read_reader_examples(path)  # format detected from the content
    assert [(p.id, p.has_answer) for p in ex.passages] == [("1", False), ("2", True), ("3", False)]
    assert ex.answers == ("Shakespeare",)

    nq = data_dir / "fixtures" / "biencoder-nq-dev.sample.json"
    exs = read_reader_examples(nq)
    assert len(exs) == 5
    for e in exs:  # positives first, then hard and random negatives
        flags = [p.has_answer for p in e.passages]
        n_pos = flags.count(True)
        assert n_pos >= 1 and flags == [True] * n_pos + [False] * (len(flags) - n_pos)

    squad = data_dir / "fixtures" / "squad-train-v1.1.University_of_Notre_Dame.official.json"
    exs = read_reader_examples(squad, max_negatives=3)
    assert len(exs) == 269
    for e in exs[:20]:  # the gold paragraph, then other paragraphs without an answer
        assert e.passages[0].has_answer and not any(p.has_answer for p in e.passages[1:])
        assert len(e.passages) == 4 and len({p.id for p in e.passages}) == 4
        assert not any(has_answer(e.answers, p.text) for p in e.passages[1:])
    with pytest.raises(FileNotFoundError):
        read_reader_examples(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"question": "q", "answers": ["a"]}]')
    with pytest.raises(ValueError, match="bad.json"):
        read_reader_examples(bad)


# ---------------------------------------------------------------------------------------------
# Answer selection across passages


def _word_passage(text):
    words = text.split()
    offsets, pos = [], 0
    for w in words:
        pos = text.index(w, pos)
        offsets.append((pos, pos + len(w)))
        pos += len(w)
    return Passage(text, "t"), np.array(offsets, np.int32), np.zeros(len(words), bool)


def _select(texts, rels, starts, ends, k, selection, per=1):
    from dpr_jax.reader.span import PassageLogits, select_predictions

    ps, offs, subs = zip(*[_word_passage(t) for t in texts])
    lg = [PassageLogits(r, np.array(s, float), np.array(e, float))
          for r, s, e in zip(rels, starts, ends)]  # fmt: skip
    return select_predictions(ps, offs, subs, lg, (k,), 3, selection, per)[k]


def test_selection_rules_by_hand():
    texts = ["alpha beta gamma", "Main Building here", "the Main Building"]
    starts = [[3, 0, 0], [2, 0, 0], [0, 2, 0]]
    ends = [[3, 0, 0], [0, 2, 0], [0, 0, 2]]
    rels = [1.3, 1.0, 1.0]
    sm = lambda x: np.exp(x) / np.exp(x).sum()
    p_rel = sm(np.array(rels))
    p_alpha = p_rel[0] * sm(np.array(starts[0]))[0] * sm(np.array(ends[0]))[0]  # 0.333
    p_main = p_rel[1] * sm(np.array(starts[1]))[0] * sm(np.array(ends[1]))[1]  # 0.185 each
    assert p_main < p_alpha < 2 * p_main  # the case the rules disagree on
    assert _select(texts, rels, starts, ends, 3, "dpr").text == "alpha"  # most relevant passage
    assert _select(texts, rels, starts, ends, 3, "joint").text == "alpha"
    summed = _select(texts, rels, starts, ends, 3, "sum")
    assert (summed.text, summed.passage_idx) == ("Main Building", 1)  # first of two equal
    assert _select(texts, rels, starts, ends, 1, "sum").text == "alpha"  # k=1: passage 0 alone

    # a most relevant passage with a diffuse span: DPR keeps it, the joint score does not
    starts[0], ends[0], rels = [0.5, 0, 0], [0.5, 0, 0], [1.1, 1.0, -5.0]
    assert _select(texts, rels, starts, ends, 3, "dpr").text == "alpha"
    assert _select(texts, rels, starts, ends, 3, "joint").text == "Main Building"
    with pytest.raises(ValueError, match="selection"):
        _select(texts, rels, starts, ends, 3, "vote")


def test_joint_reads_all_passages_at_once_as_one_at_a_time(monkeypatch):
    """``joint`` finds every passage's best span and normaliser in one padded argmax
    (``_best_span_each``); the same answers, spans and scores as reading the passages one at a
    time with :func:`best_spans` (the fallback past ``_BATCHED_SPAN_SCORES``), over passages of
    different lengths, empty ones, subword pieces and tied span scores within a passage."""
    from dpr_jax.reader import span
    from dpr_jax.reader.span import PassageLogits, select_predictions

    rng = np.random.default_rng(3)
    for trial in range(40):
        p = int(rng.integers(1, 12))
        lens = [int(rng.integers(0 if trial % 4 == 0 else 1, 40)) for _ in range(p)]
        ps = [Passage(" ".join(f"w{j}" for j in range(n)), "t") for n in lens]
        offs = [np.array([(3 * j, 3 * j + 2) for j in range(n)], np.int32).reshape(-1, 2)
                for n in lens]  # fmt: skip
        subs = [rng.random(n) < 0.3 for n in lens]
        ints = trial % 2  # small integers: tied spans within a passage
        draw = (lambda n: rng.integers(-2, 3, n) * 1.0) if ints else (lambda n: rng.normal(size=n))
        lg = [PassageLogits(float(rng.normal()), draw(n), draw(n)) for n in lens]
        top_k, length = (1, 3, 20), int(rng.integers(1, 12))
        batched = select_predictions(ps, offs, subs, lg, top_k, length, "joint")
        with monkeypatch.context() as m:
            m.setattr(span, "_BATCHED_SPAN_SCORES", 0)
            assert span._best_span_each(lg, length) is None or max(lens) == 0
            single = select_predictions(ps, offs, subs, lg, top_k, length, "joint")
        assert batched == single, trial
        assert any(b.text for b in batched.values()) == (max(lens[: max(top_k)]) > 0)
