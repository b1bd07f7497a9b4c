"""Questions from tensorflow-datasets, with tfds' own mock data (no TensorFlow, no network)."""

import tempfile

import numpy as np
import pytest

from dpr_jax.data.formats import Question
from dpr_jax.data.tfds_source import load_tfds_questions

tfds = pytest.importorskip("tensorflow_datasets", reason="pip install 'dpr-jax[tfds]'")

# dataset, split, (question feature, answers feature path)
CASES = [
    ("natural_questions_open", "validation", ("answer",)),
    ("trivia_qa/rc.nocontext", "validation", ("answer", "aliases")),
    ("web_questions", "test", ("answers",)),
]


@pytest.fixture(autouse=True)
def system_tmp(tmp_path, monkeypatch):
    """tfds' own temporary directories (and this module's direct tfds calls) go under tmp_path."""
    where = tmp_path / "system_tmp"
    where.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(where))
    return where


def test_reading_leaves_no_tfds_temp_dirs(tmp_path, system_tmp):
    """A builder over an unprepared data_dir makes a /tmp/tmp*tfds that tfds never removes
    (its GCS metadata lookup); dpr-jax's reading removes it (and only it)."""
    mine = system_tmp / "someone_elses"
    mine.mkdir()
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        tfds.data_source("trivia_qa/rc.nocontext", split="validation", data_dir=str(tmp_path / "a"))
        leaked = sorted(p.name for p in system_tmp.iterdir() if p.name.endswith("tfds"))
        assert leaked, "tfds no longer leaks: _own_tempdir can go"
        for name in leaked:
            (system_tmp / name).rmdir()
        qs = load_tfds_questions("trivia_qa/rc.nocontext", "validation", data_dir=tmp_path / "b")
    assert len(qs) == 3
    assert [p.name for p in system_tmp.iterdir()] == ["someone_elses"]
    assert tempfile.gettempdir() == str(system_tmp)


def _get(ex, path):
    for key in path:
        ex = ex[key]
    return ex


@pytest.mark.parametrize("name,split,answers_path", CASES)
def test_mocked_datasets_in_data_source_mode(name, split, answers_path, tmp_path):
    """tfds generates random examples from each builder's real feature spec (USE_CODE)."""
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        qs = load_tfds_questions(name, split, data_dir=tmp_path)
        source = tfds.data_source(name, split=split, data_dir=str(tmp_path))
        assert len(qs) == len(source) == 3
        for i, q in enumerate(qs):
            ex = source[i]
            assert isinstance(q, Question) and isinstance(q.question, str)
            assert q.question == str(ex["question"])
            assert q.answers == [str(a) for a in _get(ex, answers_path)]
            assert all(isinstance(a, str) for a in q.answers)
            if name.startswith("trivia_qa"):
                assert q.id == str(ex["question_id"])
            else:
                assert q.id == f"{split}-{i}"
        assert len(load_tfds_questions(name, split, data_dir=tmp_path, limit=2)) == 2


def test_bytes_features_and_trivia_fallbacks(tmp_path):
    """Real ArrayRecord sources may give bytes; TriviaQA test examples have no aliases."""
    examples = [
        {"question": b"who wrote hamlet?", "question_id": b"tq1",
         "answer": {"aliases": np.array([b"Shakespeare", b"Bard"], dtype=object),
                    "normalized_aliases": np.array([b"shakespeare"], dtype=object),
                    "value": b"William Shakespeare"}},
        {"question": "caf\u00e9 question".encode(), "question_id": "tq2",
         "answer": {"aliases": np.array([], dtype=object), "normalized_aliases": [],
                    "value": b"Solo Value"}},
        {"question": "test-split question", "question_id": "tq3",
         "answer": {"aliases": [], "normalized_aliases": [], "value": "<unk>"}},
    ]  # fmt: skip

    def as_data_source(self, split, **kwargs):
        return examples

    with tfds.testing.mock_data(as_data_source_fn=as_data_source):
        qs = load_tfds_questions("trivia_qa/rc.nocontext", "validation", data_dir=tmp_path)
        norm = load_tfds_questions("trivia_qa/rc.nocontext", "validation", data_dir=tmp_path,
                                   answers="normalized_aliases")  # fmt: skip
    assert qs == [
        Question("who wrote hamlet?", ["Shakespeare", "Bard"], "tq1"),
        Question("caf\u00e9 question", ["Solo Value"], "tq2"),
        Question("test-split question", [], "tq3"),
    ]
    assert norm[0].answers == ["shakespeare"]


def test_unsupported_dataset_and_option():
    with pytest.raises(ValueError, match="unsupported tfds dataset"):
        load_tfds_questions("mnist")
    with pytest.raises(ValueError, match="only trivia_qa"):
        load_tfds_questions("web_questions", answers="aliases")


def test_read_questions_spec_dispatch(tmp_path):
    """One reader for the CLI and the API: `tfds:<name>/<split>` or a qas file."""
    import dpr_jax
    from dpr_jax.data.formats import write_qas_tsv

    assert dpr_jax.read_questions is dpr_jax.data.questions.read_questions
    with tfds.testing.mock_data(num_examples=3, policy=tfds.testing.MockPolicy.USE_CODE):
        spec = "tfds:trivia_qa/rc.nocontext/validation"
        got = dpr_jax.read_questions(spec, data_dir=tmp_path)
        first = dpr_jax.read_questions(spec, data_dir=tmp_path, limit=2)
        want = load_tfds_questions("trivia_qa/rc.nocontext", "validation", data_dir=tmp_path)
    assert got == want and first == want[:2] and len(want) == 3
    qas = write_qas_tsv(tmp_path / "q.tsv", [Question("who?", ["me"])])
    assert (
        dpr_jax.read_questions(qas)
        == dpr_jax.read_questions(str(qas))
        == [Question("who?", ["me"])]
    )
