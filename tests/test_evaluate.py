"""DPR's has_answer, SQuAD EM/F1, top-k accuracy and ANN recall against hand-computed values."""

import json
import unicodedata

import numpy as np
import pytest

from dpr_jax.cli.evaluate import cli_main
from dpr_jax.data.formats import write_retrieval_results
from dpr_jax.evaluate import (
    AnswerMatcher,
    ann_recall,
    exact_match_score,
    f1_score,
    has_answer,
    normalize_answer,
    simple_tokenize,
    top_k_accuracy,
)

# ---------------------------------------------------------------------------------------------
# has_answer, string mode (DPR's SimpleTokenizer semantics)

STRING_CASES = [
    # (answers, text, expected, why)
    (["cat"], "The cat sat on the mat.", True, "plain token"),
    (["cat"], "The category is large.", False, "no sub-word match"),
    (["cat"], "A bobcat.", False, "no sub-word match at the end of a word"),
    (["PARIS"], "paris is the capital", True, "case-insensitive"),
    (["Linda Davis"], "recorded by Reba McEntire and Linda Davis.", True, "multi-token + period"),
    (["Davis Linda"], "recorded by Reba McEntire and Linda Davis.", False, "token order matters"),
    (["Linda  Davis"], "Linda\nDavis", True, "whitespace is not a token"),
    (["Saint Bernadette"], "to Saint-Bernadette in 1858", False, "'-' is a token of its own"),
    (["Saint-Bernadette"], "to Saint - Bernadette in 1858", True, "same tokens, other spacing"),
    (["U.S."], "the U.S. army", True, "punctuation tokens"),
    (["US"], "the U.S. army", False, "U.S. is u . s ."),
    (["1858"], "appeared in 1858.", True, "number"),
    (["185"], "appeared in 1858.", False, "number prefix"),
    (["$5"], "it cost $5 then", True, "symbol token"),
    (["zzz", "mat"], "The cat sat on the mat.", True, "any of the answers"),
    ([], "The cat sat on the mat.", False, "no answers"),
    ([""], "anything", True, "DPR quirk: an answer without tokens matches everything"),
]


@pytest.mark.parametrize("answers,text,expected,why", STRING_CASES)
def test_has_answer_string(answers, text, expected, why):
    assert has_answer(answers, text) is expected, why
    matcher = AnswerMatcher()
    assert matcher.match(matcher.answer_keys(answers), text) is expected, why


def test_has_answer_accents_follow_dpr_nfd():
    composed = "Beyonc\u00e9"  # é as one code point
    decomposed = unicodedata.normalize("NFD", composed)  # e + combining acute
    assert composed != decomposed
    # NFD makes both spellings the same token sequence, in any case
    assert has_answer([composed], f"Songs by {decomposed.upper()} in 2003")
    assert has_answer([decomposed], f"Songs by {composed} in 2003")
    # ... but accents are not stripped: the combining mark stays in the token (\p{M})
    assert not has_answer(["Beyonce"], f"Songs by {composed}")
    assert not has_answer([composed], "Songs by Beyonce")
    assert simple_tokenize(unicodedata.normalize("NFD", composed)) == [decomposed.lower()]


def test_has_answer_single_string_is_rejected():
    with pytest.raises(TypeError):
        has_answer("cat", "the cat")
    with pytest.raises(ValueError, match="match_type"):
        has_answer(["cat"], "the cat", match_type="fuzzy")


def test_has_answer_regex_mode():
    assert has_answer([r"colou?r"], "The COLOR red", "regex")  # IGNORECASE
    assert has_answer([r"^abc"], "x\nabc", "regex")  # MULTILINE
    assert not has_answer([r"^abc"], "x abc", "regex")
    assert has_answer([r"cat"], "category", "regex")  # regex is a substring search
    assert not has_answer([r"(unclosed"], "(unclosed", "regex")  # invalid pattern: no match
    assert has_answer(["Beyonc\u00e9"], unicodedata.normalize("NFD", "Beyonc\u00e9"), "regex")
    assert has_answer([r"\d{4}"], "in 1858", "regex")


def test_matcher_equals_has_answer_on_dpr_fixture(data_dir):
    """On DPR's own NQ records: positives contain the answer, random negatives never do."""
    recs = json.loads((data_dir / "fixtures/biencoder-nq-dev.sample.json").read_text())
    matcher = AnswerMatcher()
    hard_hits = []
    for r in recs:
        keys = matcher.answer_keys(r["answers"])
        for kind in ("positive_ctxs", "negative_ctxs", "hard_negative_ctxs"):
            for c in r[kind]:
                ref = has_answer(r["answers"], c["text"])
                assert matcher.match(keys, c["text"], key=c["passage_id"]) is ref
                if kind == "positive_ctxs":
                    assert ref, (r["question"], c["text"][:80])
                elif kind == "negative_ctxs":
                    assert not ref
                elif ref:
                    hard_hits.append((r["answers"], c["text"]))
    # DPR's mining missed one: "Eli (1987–2002)" holds 2002 between an en dash and ")".
    assert len(hard_hits) == 1 and hard_hits[0][0] == ["2002"]
    assert "(1987\u20132002)" in hard_hits[0][1]


# ---------------------------------------------------------------------------------------------
# SQuAD v1.1 EM / F1


def test_normalize_answer():
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("theatre") == "theatre"  # articles only as whole words


def test_exact_match_and_f1_hand_computed():
    assert exact_match_score("The Eiffel Tower!", ["eiffel tower"]) == 1.0
    assert exact_match_score("Eiffel", ["eiffel tower", "tower"]) == 0.0
    # pred "cat sat on mat" vs gold "cat on mat": P = 3/4, R = 1 -> F1 = 6/7
    assert f1_score("the cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    # max over golds: vs "broncos" P=1/2 R=1 -> 2/3; vs "denver broncos team" P=1 R=2/3 -> 0.8
    assert f1_score("Denver Broncos", ["Broncos", "Denver Broncos team"]) == pytest.approx(0.8)
    # bag of tokens: x x y vs x y y share one x and one y: P = R = 2/3
    assert f1_score("x x y", "x y y") == pytest.approx(2 / 3)
    assert f1_score("abc", "xyz") == 0.0
    assert f1_score("", "xyz") == 0.0
    assert f1_score("the", "the") == 0.0  # v1.1: both normalise to nothing -> 0
    assert f1_score("x", []) == 0.0  # no gold answers: a miss (see test_no_gold.py)


# ---------------------------------------------------------------------------------------------
# Top-k accuracy and ANN recall


RESULTS = [
    {"question": "q1", "answers": ["cat"], "ctxs": [
        {"id": "1", "text": "dog", "has_answer": False},
        {"id": "2", "text": "the cat", "has_answer": True},
        {"id": "3", "text": "bird", "has_answer": False}]},
    {"question": "q2", "answers": ["fox"], "ctxs": [
        {"id": "4", "text": "a", "has_answer": False},
        {"id": "5", "text": "b", "has_answer": False},
        {"id": "6", "text": "c", "has_answer": False}]},
    {"question": "q3", "answers": ["owl"], "ctxs": [{"id": "7", "text": "owl", "has_answer": True}]},
]  # fmt: skip


def test_top_k_accuracy_hand_computed():
    acc = top_k_accuracy(RESULTS, ks=(1, 2, 3, 100))
    assert acc == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(2 / 3),
                   100: pytest.approx(2 / 3)}  # fmt: skip
    for bad in (0, -1, 2.5, True):  # no top-0 (it read as 0.0, a figure of nothing)
        with pytest.raises(ValueError, match=rf"needs k >= 1 \(whole numbers\), got {bad!r}"):
            top_k_accuracy(RESULTS, ks=(1, bad))
    assert top_k_accuracy(RESULTS, ks=(np.int64(2),)) == {2: pytest.approx(2 / 3)}


def test_top_k_accuracy_recomputes_missing_and_trusts_stored():
    no_flags = [
        {**r, "ctxs": [{k: v for k, v in c.items() if k != "has_answer"} for c in r["ctxs"]]}
        for r in RESULTS
    ]
    assert top_k_accuracy(no_flags, ks=(1, 2)) == top_k_accuracy(RESULTS, ks=(1, 2))
    lying = json.loads(json.dumps(RESULTS))
    lying[1]["ctxs"][0]["has_answer"] = True  # stored flags are trusted ...
    assert top_k_accuracy(lying, ks=(1,))[1] == pytest.approx(2 / 3)
    # ... unless recompute
    assert top_k_accuracy(lying, ks=(1,), recompute=True)[1] == pytest.approx(1 / 3)


def test_ann_recall_hand_computed():
    approx = [["a", "b", "c"], ["x", "y", "z"]]
    exact = [["a", "c", "d"], ["x", "w", "v"]]
    assert ann_recall(approx, exact, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert ann_recall(approx, exact, 1) == 1.0
    assert ann_recall([["b", "a"]], [["a", ""]], 2) == 1.0  # padding ignored
    with pytest.raises(ValueError):
        ann_recall(approx, exact[:1], 1)


def test_cli_prints_table_and_ann_recall(tmp_path, capsys):
    res = tmp_path / "res.json"
    write_retrieval_results(res, RESULTS)
    exact = json.loads(json.dumps(RESULTS))
    exact[0]["ctxs"][0]["id"] = "99"  # exact top-1 of q1 differs
    ex = tmp_path / "exact.json"
    write_retrieval_results(ex, exact)
    out_json = tmp_path / "metrics.json"
    assert cli_main(["--results", str(res), "--ks", "1,2", "--exact-results", str(ex),
                     "--json", str(out_json)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "top-1" in out and " 33.33%" in out and " 66.67%" in out
    # recall@1: q1 0, q2 1, q3 1 -> 2/3; recall@2: q1 1/2, others 1 -> 5/6
    assert "recall@1" in out and "recall@2" in out and " 83.33%" in out
    metrics = json.loads(out_json.read_text())
    assert metrics["ann_recall"]["2"] == pytest.approx(5 / 6)


def test_cli_rejects_malformed_results(tmp_path):
    bad = tmp_path / "bad_results.json"
    bad.write_text(json.dumps([{"question": "q", "answers": ["a"], "ctxs": [{"text": "t"}]}]))
    with pytest.raises(ValueError, match=r"bad_results\.json, record 0, ctxs\[0\]: missing"):
        cli_main(["--results", str(bad)])
    other = tmp_path / "other.json"
    write_retrieval_results(other, [{**RESULTS[0], "question": "different"}] + RESULTS[1:])
    res = tmp_path / "res.json"
    write_retrieval_results(res, RESULTS)
    with pytest.raises(ValueError, match="other.json: question 0"):
        cli_main(["--results", str(res), "--exact-results", str(other)])


def test_simple_tokenize_equals_dpr_finditer():
    from dpr_jax.data.answers import _TOKEN_RE

    text = unicodedata.normalize(
        "NFD", 'Beyoncé\'s 2003\u2013album "Dangerously" (U.S.) cost $5,000!\t東京 ½ x\u200by\x85'
    )
    dpr = [m.group() for m in _TOKEN_RE.finditer(text)]  # SimpleTokenizer.tokenize(...).words()
    assert simple_tokenize(text, uncased=False) == dpr
    assert simple_tokenize(text) == [w.lower() for w in dpr]
    assert "\u2013" in dpr and "½" in dpr and "(" in dpr


def test_results_for_flags_equal_has_answer():
    """dpr_jax.evaluate.results_for (cached matching) flags every ctx as has_answer does."""
    from types import SimpleNamespace as NS

    from dpr_jax.evaluate import results_for

    texts = ["Paris is the capital of France.", "The café in São Paulo", "U.S. history",
             "no answer here", "Beyoncé's 2003 debut album", "a 10,000-seat arena"]  # fmt: skip
    passages = {str(i): NS(title=f"t{i}", text=t) for i, t in enumerate(texts)}
    questions = [NS(question="q1", answers=["Paris", "France"]), NS(question="q2", answers=["cafe"]),
                 NS(question="q3", answers=["U.S.", "Beyonce"]), NS(question="q4", answers=["10,000"])]  # fmt: skip
    ids = np.array([["0", "1", "2", "3", "4", "5"]] * 4)
    scores = np.tile(np.arange(6, 0, -1, dtype=np.float32), (4, 1))
    for match in ("string", "regex"):
        res = results_for(questions, scores, ids, passages, match)
        got = [[c["has_answer"] for c in r["ctxs"]] for r in res]
        want = [[has_answer(q.answers, t, match) for t in texts] for q in questions]
        assert got == want
    assert sum(map(sum, got)) >= 4  # the cases are not all misses
    from dpr_jax.errors import UserError

    with pytest.raises(UserError, match="not in the passages file"):
        results_for(questions[:1], scores[:1, :1], np.array([["99"]]), passages)
