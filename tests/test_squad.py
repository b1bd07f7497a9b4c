"""SQuAD -> DPR preparation on the official Notre Dame article (real answer offsets)."""

import json
from pathlib import Path

import pytest

from dpr_jax.cli import prepare_squad
from dpr_jax.data import squad
from dpr_jax.data.formats import read_biencoder, read_passages_tsv, read_qas
from dpr_jax.evaluate import has_answer

FIXTURE = "fixtures/squad-train-v1.1.University_of_Notre_Dame.official.json"


def test_chunk_paragraph_balanced_and_fixed():
    words = [f"w{i}" for i in range(250)]
    context = "  ".join(words[:10]) + "\n" + " ".join(words[10:])
    balanced = squad.chunk_paragraph(context)
    fixed = squad.chunk_paragraph(context, chunking="fixed")
    assert [len(t.split()) for t, _, _ in balanced] == [84, 83, 83]
    assert [len(t.split()) for t, _, _ in fixed] == [100, 100, 50]
    for chunks in (balanced, fixed):
        assert " ".join(t for t, _, _ in chunks).split() == words  # nothing lost or repeated
        for text, s, e in chunks:  # offsets point at the chunk in the original context
            assert context[s:e].split() == text.split()
            assert context[s:e] == context[s:e].strip()
    assert squad.chunk_paragraph("   ") == []
    assert squad.chunk_paragraph("a b", words=100) == [("a b", 0, 3)]


def test_split_articles_is_seeded_and_disjoint():
    train, val = squad.split_articles(442, 0.1, seed=0)
    assert len(val) == 44 and len(train) == 398
    assert not set(train) & set(val) and set(train) | set(val) == set(range(442))
    assert (train, val) == squad.split_articles(442, 0.1, seed=0)
    assert val != squad.split_articles(442, 0.1, seed=1)[1]
    assert squad.split_articles(5, 0.01, seed=0)[1] != []  # at least one when fraction > 0
    assert squad.split_articles(5, 0.0, seed=0) == ([0, 1, 2, 3, 4], [])
    with pytest.raises(ValueError):
        squad.split_articles(5, 1.0)


@pytest.fixture(scope="module")
def five_articles(data_dir, tmp_path_factory) -> Path:
    """The official Notre Dame article cut into 5 'articles' of 11 paragraphs (same text)."""
    raw = json.loads((data_dir / FIXTURE).read_text())
    paragraphs = raw["data"][0]["paragraphs"]
    assert len(paragraphs) == 55
    data = [{"title": f"Notre_Dame_{i}", "paragraphs": paragraphs[11 * i : 11 * (i + 1)]}
            for i in range(5)]  # fmt: skip
    path = tmp_path_factory.mktemp("squad") / "nd5.json"
    path.write_text(json.dumps({"data": data, "version": "1.1"}))
    return path


@pytest.fixture(scope="module")
def prepared(five_articles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "out"
    rc = prepare_squad.cli_main(["--squad", str(five_articles), "--out", str(out), "--val-fraction",
                         "0.4", "--seed", "3", "--hard-negatives", "5", "--no-progress"])  # fmt: skip
    assert rc == 0
    return out


def test_prepare_outputs_are_consistent(prepared, five_articles):
    cfg = json.loads((prepared / "config.json").read_text())
    assert cfg["options"]["seed"] == 3 and cfg["source"]["path"] == str(five_articles)
    raw = json.loads(five_articles.read_text())["data"]
    titles = {}
    for split in ("train", "dev"):
        passages = read_passages_tsv(prepared / f"{split}.passages.tsv")
        by_id = {p.id: p for p in passages}
        titles[split] = {p.title for p in passages}
        assert titles[split] == set(cfg["splits"][split]["article_titles"])
        assert all(len(p.text.split()) <= 100 for p in passages)
        # every word of every paragraph of the split's articles is in exactly one passage
        arts = [raw[[a["title"] for a in raw].index(t)] for t in sorted(titles[split])]
        want = sorted(w for a in arts for p in a["paragraphs"] for w in p["context"].split())
        assert sorted(w for p in passages for w in p.text.split()) == want

        examples, stats = read_biencoder(prepared / f"{split}.biencoder.json")
        questions = read_qas(prepared / f"{split}.qas.tsv")
        s = cfg["splits"][split]
        assert len(questions) == s["questions"] == sum(len(p["qas"]) for a in arts
                                                       for p in a["paragraphs"])  # fmt: skip
        assert len(examples) == s["kept"] == s["questions"] - s["skipped_no_positive"]
        assert stats.skipped_no_positive == 0
        for e in examples:
            assert e.positive_ctxs and e.positive_ctxs[0].id in by_id
            for c in e.positive_ctxs:
                assert has_answer(e.answers, c.text), (e.question, c.text)
            assert 0 < len(e.hard_negative_ctxs) <= 5
            for c in e.hard_negative_ctxs:
                assert c.id in by_id and by_id[c.id].text == c.text  # from the split's corpus
                assert not has_answer(e.answers, c.text), (e.question, c.text)
            assert [c.score for c in e.hard_negative_ctxs] == sorted(
                (c.score for c in e.hard_negative_ctxs), reverse=True
            )
    assert titles["train"] and titles["dev"] and not titles["train"] & titles["dev"]
    assert len(titles["dev"]) == 2  # round(0.4 * 5)


def test_positive_is_the_answer_start_chunk_and_skips_straddlers(prepared, five_articles):
    raw = json.loads(five_articles.read_text())["data"]
    skipped = 0
    for split in ("train", "dev"):
        for line in (prepared / f"{split}.questions.jsonl").read_text().splitlines():
            q = json.loads(line)
            context = raw[q["article"]]["paragraphs"][q["paragraph"]]["context"]
            start, answer = q["answer_starts"][0], q["answers"][0]
            assert context[start : start + len(answer)] == answer  # official offsets
            chunks = squad.chunk_paragraph(context)
            ends = [e for _, _, e in chunks]
            straddles = any(start < e < start + len(answer) for e in ends[:-1])
            if not q["positive_ids"]:
                skipped += 1
                assert straddles, q  # in this article only boundary-straddling answers fail
                continue
            first = int(q["positive_ids"][0].split("-")[2])
            _, s, e = chunks[first]
            if not straddles:
                assert s <= start < e  # the chunk holding the annotated occurrence comes first
    assert skipped == 3


def test_prepare_is_deterministic(prepared, five_articles, tmp_path):
    again = tmp_path / "again"
    squad.prepare_squad(five_articles, again, val_fraction=0.4, seed=3, hard_negatives=5,
                        progress=False, log=lambda m: None)  # fmt: skip
    for name in ("train.biencoder.json", "dev.biencoder.json", "train.passages.tsv",
                 "dev.qas.tsv", "dev.questions.jsonl"):  # fmt: skip
        assert (again / name).read_bytes() == (prepared / name).read_bytes(), name


def test_positive_answer_start_fallback(five_articles, tmp_path):
    cfg = squad.prepare_squad(five_articles, tmp_path / "o", val_fraction=0.0, hard_negatives=0,
                              positive="answer_start", save_bm25=False, progress=False,
                              log=lambda m: None)  # fmt: skip
    s = cfg["splits"]["train"]
    assert s["questions"] == s["kept"] == 269 and s["positive_from_answer_start"] == 3


def test_real_squad_first_articles(data_dir, tmp_path):
    cfg = squad.prepare_squad(data_dir / "squad/train-v1.1.json", tmp_path, val_fraction=0.5,
                              max_articles=2, hard_negatives=3, save_bm25=False,
                              progress=False, log=lambda m: None)  # fmt: skip
    assert cfg["source"]["articles"] == 442
    assert cfg["splits"]["train"]["articles"] == cfg["splits"]["dev"]["articles"] == 1
    files = [tmp_path / f"{s}.passages.tsv" for s in ("train", "dev")]
    ids = {p.id for f in files for p in read_passages_tsv(f)}
    assert {i.split("-")[0] for i in ids} == {"0", "1"}


def test_load_squad_errors_and_resolution(tmp_path, monkeypatch, data_dir):
    bad = tmp_path / "bad_squad.json"
    bad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [{"qas": []}]}]}))
    with pytest.raises(ValueError, match=r"bad_squad\.json: data\[0\]\.paragraphs\[0\]: missing "
                       "field 'context'"):  # fmt: skip
        squad.load_squad(bad)
    qa = {"question": "q", "id": "1", "answers": [{"text": "c", "answer_start": "0"}]}
    paragraph = {"context": "c", "qas": [qa]}
    bad.write_text(json.dumps({"data": [{"title": "T", "paragraphs": [paragraph]}]}))
    with pytest.raises(ValueError, match=r"qas\[0\]\.answers\[0\]\.answer_start: expected int"):
        squad.load_squad(bad)

    real = data_dir / FIXTURE
    monkeypatch.setenv("DPR_JAX_SQUAD", str(real))
    assert squad.resolve_squad_path() == real
    monkeypatch.delenv("DPR_JAX_SQUAD")
    monkeypatch.setenv("DPR_JAX_DATA", str(data_dir))
    assert squad.resolve_squad_path() == data_dir / "squad/train-v1.1.json"
    monkeypatch.setenv("DPR_JAX_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(squad, "REPO_DATA_DIR", tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="SQuAD dev not found"):
        squad.resolve_squad_path(split="dev", cache_dir=tmp_path / "cache", download=False)
    cached = tmp_path / "cache/squad/dev-v1.1.json"
    cached.parent.mkdir(parents=True)
    cached.write_text(real.read_text())
    assert squad.resolve_squad_path(split="dev", cache_dir=tmp_path / "cache") == cached
    assert squad.squad_passages(squad.load_squad(cached))[0].id == "0-0-0"
