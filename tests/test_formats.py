"""DPR data formats: readers on the real fixtures, round trips, malformed files, atomic writes."""

import gzip
import json

import pytest

from dpr_jax.data.formats import (
    BiencoderExample,
    Passage,
    Question,
    read_biencoder,
    read_passages_tsv,
    read_qas,
    read_reader_predictions,
    read_retrieval_results,
    write_biencoder,
    write_passages_tsv,
    write_qas_tsv,
    write_reader_predictions,
    write_retrieval_results,
)
from dpr_jax.data.questions import read_questions
from dpr_jax.io import atomic_open

# ---------------------------------------------------------------------------------------------
# Passages TSV


def test_read_dpr_style_passages(tmp_path):
    # psgs_w100.tsv as DPR ships it: header, csv-quoted text with doubled quotes
    path = tmp_path / "psgs.tsv"
    path.write_text(
        "id\ttext\ttitle\n"
        '1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n'
        "2\tplain text, no quotes\tSecond\n",
        encoding="utf-8",
    )
    ps = read_passages_tsv(path)
    assert ps == [
        Passage(text='Aaron Aaron ( or ; "Ahärôn") is a prophet', title="Aaron", id="1"),
        Passage(text="plain text, no quotes", title="Second", id="2"),
    ]


@pytest.mark.parametrize("name", ["p.tsv", "p.tsv.gz"])
def test_passages_round_trip(tmp_path, name):
    ps = [
        Passage(text='"Quoted" at the start and "end"', title='Title "x"', id="a-0"),
        Passage(text="tab\tinside and\nnewline", title="", id="a-1"),
        Passage(text="unicode: Beyoncé 東京", title="Tōkyō", id="7"),
    ]
    path = write_passages_tsv(tmp_path / name, ps, config={"made_by": "test"})
    # no field of the format spans lines: the writer stores a line break as a space
    ps[1] = Passage(text="tab\tinside and newline", title="", id="a-1")
    assert read_passages_tsv(path) == ps
    assert json.loads((tmp_path / f"{name}.config.json").read_text()) == {"made_by": "test"}
    if name.endswith(".gz"):
        with gzip.open(path, "rt") as f:
            assert f.readline() == "id\ttext\ttitle\n"


def test_malformed_passages_name_file_and_line(tmp_path):
    path = tmp_path / "broken_psgs.tsv"
    path.write_text("id\ttext\ttitle\n1\tok\tT\n2\tmissing title\n")
    with pytest.raises(ValueError, match=r"broken_psgs\.tsv, line 3: expected 3"):
        read_passages_tsv(path)
    path.write_text("id\ttext\ttitle\n1\tok\tT\n1\tagain\tT\n")
    with pytest.raises(ValueError, match=r"broken_psgs\.tsv, line 3: duplicate passage id '1'"):
        read_passages_tsv(path)
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        read_passages_tsv(tmp_path / "nope.tsv")


# ---------------------------------------------------------------------------------------------
# Questions


def test_read_dpr_qas_tsv(tmp_path):
    path = tmp_path / "nq-test.csv"
    path.write_text(
        "who sings does he love me with reba\t['Linda Davis']\n"
        'where is the capital\t["Paris", "Paris, France"]\tq2\n',
        encoding="utf-8",
    )
    assert read_qas(path) == [
        Question("who sings does he love me with reba", ["Linda Davis"]),
        Question("where is the capital", ["Paris", "Paris, France"], "q2"),
    ]


def test_qas_round_trip(tmp_path):
    qs = [
        Question('it\'s "quoted"\ttabbed?', ["O'Neil", 'say "hi"', "Ünïcode"], "1"),
        Question("second", [], "2"),
    ]
    path = write_qas_tsv(tmp_path / "q.tsv", qs)
    assert read_qas(path) == qs
    first_line = path.read_text(encoding="utf-8").splitlines()[1]
    assert first_line == "second\t[]\t2"  # DPR's layout: a Python list literal


@pytest.mark.parametrize(
    "line,msg",
    [
        ("q\t__import__('os').system('true')\n", "not a list literal"),
        ("q\t'just a string'\n", "list of strings"),
        ("q\t[1, 2]\n", "list of strings"),
        ("only one column\n", "expected 2 or 3"),
    ],
)
def test_malformed_qas_name_file_and_line(tmp_path, line, msg):
    path = tmp_path / "bad_qas.tsv"
    path.write_text("fine\t['a']\n" + line)
    with pytest.raises(ValueError, match=rf"bad_qas\.tsv, line 2: .*{msg}"):
        read_qas(path)


def test_read_nq_open_jsonl(tmp_path):
    path = tmp_path / "nq-open.jsonl"
    path.write_text(
        '{"question": "who wrote hamlet", "answer": ["Shakespeare", "William Shakespeare"]}\n'
        "\n"
        '{"question": "q2", "answers": ["x"], "id": 5}\n'
    )
    assert read_qas(path) == [
        Question("who wrote hamlet", ["Shakespeare", "William Shakespeare"]),
        Question("q2", ["x"], "5"),
    ]
    path.write_text('{"question": "ok", "answer": ["a"]}\n{"question": "no answer"}\n')
    with pytest.raises(ValueError, match=r"nq-open\.jsonl, line 2: no 'answer'"):
        read_qas(path)
    path.write_text('{"question": "ok", "answer": ["a"]}\n{"question": \n')
    with pytest.raises(ValueError, match=r"nq-open\.jsonl, line 2: invalid JSON"):
        read_qas(path)


def test_read_squad_questions(data_dir):
    path = data_dir / "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json"
    qs = read_questions(path)
    raw = json.loads(path.read_text())
    n = sum(len(p["qas"]) for a in raw["data"] for p in a["paragraphs"])
    assert len(qs) == n == 269
    first = raw["data"][0]["paragraphs"][0]["qas"][0]
    assert qs[0] == Question(first["question"], ["Saint Bernadette Soubirous"], first["id"])


# ---------------------------------------------------------------------------------------------
# Biencoder JSON


def test_read_biencoder_fixture(data_dir):
    path = data_dir / "fixtures/biencoder-nq-dev.sample.json"
    examples, stats = read_biencoder(path)
    raw = json.loads(path.read_text())
    assert (stats.records, stats.kept, stats.skipped_no_positive) == (5, 5, 0)
    assert [len(e.positive_ctxs) for e in examples] == [len(r["positive_ctxs"]) for r in raw]
    assert [len(e.hard_negative_ctxs) for e in examples] == [
        len(r["hard_negative_ctxs"]) for r in raw
    ]
    e, r = examples[0], raw[0]
    assert e.question == "who sings does he love me with reba"
    assert e.answers == ["Linda Davis"]
    assert e.dataset == "nq_dev_psgs_w100"
    c, rc = e.positive_ctxs[0], r["positive_ctxs"][0]
    assert (c.title, c.text, c.id, c.score) == (rc["title"], rc["text"], "11828866", 1000.0)
    ids = {c.id for e in examples for c in e.positive_ctxs + e.negative_ctxs + e.hard_negative_ctxs}
    assert len(ids) == 751  # the data README's count of distinct passages


@pytest.mark.parametrize("name", ["b.json", "b.jsonl", "b.json.gz", "b.jsonl.gz"])
def test_biencoder_round_trip_and_skip(tmp_path, name):
    keep = BiencoderExample(
        "q1", ["a"], [Passage("pos text", "T", "7", 1.5)], [Passage("neg", "")],
        [Passage("hard", "H", "9", 3.25)], id="x1", dataset="d",
    )  # fmt: skip
    no_pos = BiencoderExample("q2", ["b"], [], [], [Passage("hard only", "H", "3")])
    path = write_biencoder(tmp_path / name, [keep, no_pos])
    examples, stats = read_biencoder(path)
    assert examples == [keep]
    assert (stats.records, stats.kept, stats.skipped_no_positive) == (2, 1, 1)


def test_malformed_biencoder_names_file_and_record(tmp_path):
    good = {"question": "q", "answers": ["a"], "positive_ctxs": [{"title": "t", "text": "x"}]}
    bad = {"question": "q", "answers": ["a"], "positive_ctxs": [{"title": "t"}]}
    path = tmp_path / "broken.json"
    path.write_text(json.dumps([good, good, bad]))
    with pytest.raises(ValueError, match=r"broken\.json, record 2, positive_ctxs\[0\]: .*'text'"):
        read_biencoder(path)
    path = tmp_path / "broken.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, {**good, "answers": "a"}]))
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2: field 'answers'"):
        read_biencoder(path)
    path = tmp_path / "truncated.json"
    path.write_text(json.dumps([good, good])[:-20])
    with pytest.raises(ValueError, match=r"truncated\.json, line 1: invalid JSON"):
        read_biencoder(path)


# ---------------------------------------------------------------------------------------------
# Retrieval results and reader predictions


def test_retrieval_results_round_trip(tmp_path):
    results = [
        {"question": "q", "answers": ["a"], "ctxs": [
            {"id": 12, "title": "T", "text": "x a", "score": 3.5, "has_answer": True},
            {"id": "13", "title": "U", "text": "y", "score": float("-inf")}]},
    ]  # fmt: skip
    path = write_retrieval_results(tmp_path / "r.json", results, config={"k": 2})
    raw = json.loads(path.read_text())  # plain DPR JSON
    assert raw[0]["ctxs"][0] == {"id": "12", "title": "T", "text": "x a", "score": 3.5,
                                 "has_answer": True}  # fmt: skip
    assert raw[0]["ctxs"][1]["score"] is None and "has_answer" not in raw[0]["ctxs"][1]
    back = read_retrieval_results(path)
    assert back[0]["ctxs"][0]["id"] == "12" and back[0]["ctxs"][0]["has_answer"] is True
    assert back[0]["ctxs"][1]["score"] != back[0]["ctxs"][1]["score"]  # NaN for "no score"
    # DPR sometimes writes scores as strings
    raw[0]["ctxs"][0]["score"] = "80.5"
    path.write_text(json.dumps(raw))
    assert read_retrieval_results(path)[0]["ctxs"][0]["score"] == 80.5
    raw[0]["ctxs"][0]["has_answer"] = "yes"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"r\.json, record 0, ctxs\[0\]: field 'has_answer'"):
        read_retrieval_results(path)


def test_reader_predictions_round_trip(tmp_path):
    preds = [{
        "question": "who?", "gold_answers": ["Linda Davis"],
        "predictions": [{"top_k": 50, "prediction": {
            "text": "Linda Davis", "score": 12.5, "relevance_score": 3.0, "passage_idx": 0,
            "passage": "recorded by linda davis"}}],
    }]  # fmt: skip
    path = write_reader_predictions(tmp_path / "pred.json", preds)
    assert json.loads(path.read_text()) == preds
    assert read_reader_predictions(path) == preds
    bad = json.loads(json.dumps(preds))
    del bad[0]["predictions"][0]["prediction"]["passage_idx"]
    with pytest.raises(ValueError, match=r"prediction 0, predictions\[0\]: .*passage_idx"):
        write_reader_predictions(tmp_path / "pred2.json", bad)


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "passages.tsv"
    write_passages_tsv(path, [Passage(text="old", title="T", id="1")])
    before = path.read_bytes()

    def exploding():
        yield Passage(text="new", title="T", id="2")
        raise RuntimeError("crash in the middle of writing")

    with pytest.raises(RuntimeError, match="crash"):
        write_passages_tsv(path, exploding())
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passages.tsv"]
    with pytest.raises(KeyError):
        with atomic_open(tmp_path / "new.txt") as f:
            f.write("partial")
            raise KeyError("boom")
    assert not (tmp_path / "new.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["passages.tsv"]


def test_one_passage_reader_for_every_format(tmp_path, data_dir):
    """read_passages (what encode, retrieve, mine, ask and QAPipeline read) gives the same
    passages from a TSV, from SQuAD JSON (prepare-squad's chunks and ids) and from DPR JSON
    (a biencoder file's distinct contexts, by id, in order of first appearance)."""
    from dpr_jax.data.corpus import read_passages
    from dpr_jax.data.squad import load_squad, squad_passages

    squad = data_dir / "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json"
    from_squad = read_passages(squad)
    assert from_squad == squad_passages(load_squad(squad)) and len(from_squad) > 10
    tsv = tmp_path / "p.tsv"
    write_passages_tsv(tsv, from_squad)
    assert read_passages(tsv) == read_passages_tsv(tsv) == from_squad
    a, b, c = from_squad[:3]
    records = [
        BiencoderExample("q1", ["x"], [a], [b], [c]),
        BiencoderExample("q2", ["y"], [b], [], [a, c]),
    ]
    path = tmp_path / "b.json"
    write_biencoder(path, records)
    assert [p.id for p in read_passages(path)] == [a.id, b.id, c.id]
    assert read_passages(path)[1] == b
    write_biencoder(path, [BiencoderExample("q", ["x"], [Passage("t", "T")])])
    with pytest.raises(ValueError, match=r"b\.json: a context has no passage_id"):
        read_passages(path)
