"""Questions without gold answers: kept and counted as misses by retrieve, evaluate, read and ask
(DPR's convention; see dpr_jax/evaluate.py's module docstring).

The same two questions go through each command's library function: "q-hit" has the answer "mat"
and is answered / retrieved correctly; "q-none" has no gold answers (and its passage and
predicted answer would match anything a lenient scorer accepted). Every command must report
1 hit out of 2 questions, and count 1 question without answers where it reports counts.
"""

from __future__ import annotations

import json

import numpy as np

from dpr_jax.cli.evaluate import cli_main as evaluate_main
from dpr_jax.data.formats import Passage, Question, read_retrieval_results
from dpr_jax.evaluate import (
    count_without_answers,
    exact_match_score,
    f1_score,
    results_for,
    top_k_accuracy,
)
from dpr_jax.reader.span import QuestionPrediction, SpanPrediction, evaluate_predictions

QUESTIONS = [Question("where did the cat sit?", ["mat"]), Question("what is it?", [])]
PASSAGES = {
    "1": Passage(text="the cat sat on the mat", title="Cats", id="1"),
    "2": Passage(text="", title="Empty", id="2"),
}


def test_retrieve_keeps_them_with_every_has_answer_false():
    scores = np.array([[2.0, 1.0], [2.0, 1.0]], np.float32)
    ids = [["1", "2"], ["1", "2"]]
    out = results_for(QUESTIONS, scores, ids, PASSAGES)
    assert [r["question"] for r in out] == [q.question for q in QUESTIONS]
    assert [c["has_answer"] for c in out[0]["ctxs"]] == [True, False]
    assert [c["has_answer"] for c in out[1]["ctxs"]] == [False, False]  # even the empty text
    assert out[1]["answers"] == []


def test_evaluate_counts_them_as_misses(tmp_path, capsys):
    ctxs = [{"id": "1", "title": "Cats", "text": "the cat sat on the mat", "score": 2.0}]
    results = [{"question": q.question, "answers": q.answers, "ctxs": ctxs} for q in QUESTIONS]
    assert top_k_accuracy(results, (1,)) == {1: 0.5}
    assert top_k_accuracy(results, (1,), recompute=True) == {1: 0.5}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert len(read_retrieval_results(path)) == 2  # the reader keeps them too
    assert (
        evaluate_main(["--results", str(path), "--ks", "1", "--json", str(tmp_path / "m.json")])
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["questions"] == 2 and metrics["questions_without_answers"] == 1
    assert metrics["top_k_accuracy"] == {"1": 0.5}
    assert "1 questions have no gold answers: kept and counted as misses" in capsys.readouterr().out


def test_read_scores_them_em_0_f1_0():
    def pred(text):
        return {1: SpanPrediction(text, 1.0, 1.0, 0, "the cat sat on the mat")}

    preds = [
        QuestionPrediction(QUESTIONS[0].question, ("mat",), pred("the mat")),
        QuestionPrediction(QUESTIONS[1].question, (), pred("")),  # "" vs nothing: not a hit
    ]
    assert evaluate_predictions(preds) == {
        1: {"em": 0.5, "f1": 0.5, "questions": 2, "questions_without_answers": 1}
    }


def test_ask_scores_them_em_0_f1_0():
    # dpr-jax ask (dpr_jax/pipeline.py) averages exact_match_score / f1_score over all questions
    answers = ["the mat", ""]
    em = [exact_match_score(a, q.answers) for a, q in zip(answers, QUESTIONS)]
    f1 = [f1_score(a, q.answers) for a, q in zip(answers, QUESTIONS)]
    assert em == [1.0, 0.0] and f1 == [1.0, 0.0]
    assert count_without_answers(q.answers for q in QUESTIONS) == 1
