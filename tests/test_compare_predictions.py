"""scripts/compare_predictions.py: two prediction files, counts checked by hand."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import compare_predictions  # noqa: E402


def _pred(question, gold, answers):
    return {"question": question, "gold_answers": gold, "predictions": [
        {"top_k": k, "prediction": {"text": t, "score": 1.0, "relevance_score": 0.0,
                                    "passage_idx": i, "passage": "p"}}
        for k, (t, i) in answers.items()]}  # fmt: skip


def test_counts_by_hand(tmp_path, capsys):
    a = [_pred("q1", ["Paris"], {1: ("Paris", 0), 5: ("Paris", 0)}),
         _pred("q2", ["1981"], {1: ("1983", 1), 5: ("1981", 2)})]  # fmt: skip
    b = [_pred("q1", ["Paris"], {1: ("Paris", 0), 5: ("Lyon", 3)}),
         _pred("q2", ["1981"], {1: ("1981", 1), 5: ("1981", 2)})]  # fmt: skip
    rows = compare_predictions.compare(a, b)
    assert rows[1] == dict(questions=2, em_a=1, em_b=2, f1_a=1.0, f1_b=2.0, same_answer=1,
                           same_passage=2, only_a=0, only_b=1)  # fmt: skip
    assert rows[5] == dict(questions=2, em_a=2, em_b=1, f1_a=2.0, f1_b=1.0, same_answer=1,
                           same_passage=1, only_a=1, only_b=0)  # fmt: skip
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b[:1]))
    assert compare_predictions.main([str(pa), str(pb)]) == 2  # different question counts
    assert "hold 2 and 1 questions" in capsys.readouterr().err
