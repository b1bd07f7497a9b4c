"""`dpr-jax mine`: hard negatives from a dense retriever. Checked against hand-made rankings (a
deterministic stand-in retriever) and DPR's has_answer: positives and answer-bearing passages are
never negatives, the rest keep rank order, skip/sample follow the seeded reference; sharded runs,
resumed runs and uninterrupted runs write the same file; and the command runs end to end with a
real (tiny) model and an exact index."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from dpr_jax.data.formats import (
    BiencoderExample,
    Passage,
    read_biencoder,
    write_biencoder,
    write_passages_tsv,
)
from dpr_jax.evaluate import has_answer
from dpr_jax.mine import MineConfigError, merge_parts, mine_hard_negatives, parts_dir

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi".split()


def _corpus(n=40) -> list[Passage]:
    rs = np.random.RandomState(0)
    return [
        Passage(text=" ".join(rs.choice(WORDS, 12)) + f" number{i}", title=f"T{i % 5}", id=f"p{i}")
        for i in range(n)
    ]


class RankedRetriever:
    """Scores every passage with a hash of (question, passage id): deterministic, needs no model,
    the same for any batch of questions."""

    def __init__(self, passages):
        self.ids = [p.id for p in passages]
        self.calls = 0

    def score(self, q: str, pid: str) -> float:
        return zlib.crc32(f"{q}|{pid}".encode()) / 2**32

    def search(self, questions, k):
        self.calls += 1
        scores = np.array([[self.score(q, pid) for pid in self.ids] for q in questions])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        ids = np.array(self.ids, dtype=object)[order]
        return np.take_along_axis(scores, order, 1), ids


def _examples(passages, n=23) -> list[BiencoderExample]:
    out = []
    for i in range(n):
        pos = passages[(3 * i) % len(passages)]
        answer = pos.text.split()[-1]  # "number<j>": a token of its own passage only
        out.append(
            BiencoderExample(
                f"question {i}?",
                [answer],
                [Passage(pos.text, pos.title, pos.id)],
                hard_negative_ctxs=[Passage(f"bm25 negative {i}", "B", f"bm{i}")],
                id=f"q{i}",
            )  # fmt: skip
        )
    return out


@pytest.fixture()
def data(tmp_path):
    passages = _corpus()
    examples = _examples(passages)
    path = tmp_path / "train.biencoder.json"
    write_biencoder(path, examples)
    return passages, examples, path


def _mine(data, out, **kw):
    passages, _, path = data
    kw.setdefault("retriever", RankedRetriever(passages))
    kw.setdefault("progress", False)
    return mine_hard_negatives(None, None, passages, path, out, **kw)


def _reference(passages, ex, retriever, n, skip=0, depth=100, sample=False, seed=0, idx=0):
    """Brute force: rank every passage, drop positives and answer-bearing ones, skip, take."""
    ranked = sorted(passages, key=lambda p: -retriever.score(ex.question, p.id))[:depth]
    pos = {c.id for c in ex.positive_ctxs}
    cands = [p.id for p in ranked if p.id not in pos and not has_answer(ex.answers, p.text)]
    cands = cands[skip:]
    if sample and len(cands) > n:
        pick = np.sort(np.random.default_rng([seed, idx]).choice(len(cands), n, replace=False))
        return [cands[i] for i in pick]
    return cands[:n]


def test_answer_aware_exclusion_and_rank_order(tmp_path):
    passages = [
        Passage(text="the capital is Paris today", title="France", id="a"),  # answer
        Passage(text="nothing to see here", title="X", id="b"),
        Passage(text="PARIS, the city", title="Y", id="c"),  # answer (case-insensitive tokens)
        Passage(text="Parisian cafes are nice", title="Z", id="d"),  # not the token "paris"
        Passage(text="gold passage text", title="Gold", id="e"),  # the positive, by id
        Passage(
            text="gold passage  text", title="Gold", id="f"
        ),  # the positive's text without an id
        Passage(text="plain negative", title="W", id="g"),
    ]
    ex = BiencoderExample("where?", ["Paris"], [Passage("gold passage text", "Gold", "e")], id="q0")
    ex2 = BiencoderExample("where?", ["Paris"], [Passage("gold passage text", "Gold")], id="q1")
    path = tmp_path / "in.json"
    write_biencoder(path, [ex, ex2])

    class Fixed:
        def search(self, questions, k):
            ids = np.array([["a", "b", "c", "d", "e", "f", "g"]] * len(questions), dtype=object)
            return np.tile(np.arange(7, 0, -1.0), (len(questions), 1))[:, :k], ids[:, :k]

    out = tmp_path / "out.json"
    got = mine_hard_negatives(None, None, passages, path, out, n=10, retriever=Fixed(),
                              progress=False)  # fmt: skip
    assert got == out
    recs, _ = read_biencoder(out)
    # by id: e dropped; f has the positive's title + text (whitespace aside): dropped as well
    assert [c.id for c in recs[0].hard_negative_ctxs] == ["b", "d", "g"]
    assert [c.score for c in recs[0].hard_negative_ctxs] == [6.0, 4.0, 1.0]
    assert [c.id for c in recs[1].hard_negative_ctxs] == ["b", "d", "g"]  # no id: by text
    assert recs[0].positive_ctxs == ex.positive_ctxs and recs[0].answers == ["Paris"]
    counts = json.loads((tmp_path / "out.json.config.json").read_text())["counts"]
    assert counts == dict(questions=2, retrieved=14, dropped_positive=4, dropped_answer=4,
                          mined=6, short=2)  # fmt: skip
    # regex matching (CuratedTREC): "Paris(ian)?" also matches d
    out2 = tmp_path / "out2.json"
    ex3 = BiencoderExample("where?", ["Paris(ian)?"], ex.positive_ctxs, id="q")
    write_biencoder(path, [ex3])
    mine_hard_negatives(None, None, passages, path, out2, n=10, retriever=Fixed(),
                        match="regex", progress=False)  # fmt: skip
    assert [c.id for c in read_biencoder(out2)[0][0].hard_negative_ctxs] == ["b", "g"]
    # skipping every retrieved passage would mine nothing: refused, nothing written
    out3 = tmp_path / "out3.json"
    for sample in (False, True):
        with pytest.raises(ValueError, match=r"skip 7 >= depth 7: every retrieved passage"):
            mine_hard_negatives(None, None, passages, path, out3, n=1, skip=7, depth=7,
                                sample=sample, retriever=Fixed(), progress=False)  # fmt: skip
    assert not out3.exists() and not (tmp_path / "out3.json.parts").exists()


@pytest.mark.parametrize(
    "kw", [dict(n=5), dict(n=4, skip=3), dict(n=3, skip=1, sample=True, seed=7), dict(n=6, depth=9)]
)
def test_matches_brute_force_and_positives_are_never_negatives(data, tmp_path, kw):
    passages, examples, _ = data
    out = tmp_path / "mined.json"
    assert _mine(data, out, chunk_size=5, **kw) == out
    recs, _ = read_biencoder(out)
    assert [r.question for r in recs] == [e.question for e in examples]
    ref = RankedRetriever(passages)
    by_id = {p.id: p for p in passages}
    for i, (r, ex) in enumerate(zip(recs, examples)):
        got = [c.id for c in r.hard_negative_ctxs]
        assert got == _reference(passages, ex, ref, idx=i, **kw)
        assert not {c.id for c in ex.positive_ctxs} & set(got)
        assert not any(has_answer(ex.answers, by_id[g].text) for g in got)
        assert [c.text for c in r.hard_negative_ctxs] == [by_id[g].text for g in got]
    assert any(len(r.hard_negative_ctxs) for r in recs)


def test_existing_negatives_appended(data, tmp_path):
    _, examples, _ = data
    out = tmp_path / "mixed.json"
    _mine(data, out, n=2, existing="append")
    for r, ex in zip(read_biencoder(out)[0], examples):
        assert len(r.hard_negative_ctxs) == 3
        assert r.hard_negative_ctxs[2] == ex.hard_negative_ctxs[0]  # BM25's, after the mined


def test_sharded_equals_unsharded(data, tmp_path):
    whole = tmp_path / "whole.json"
    _mine(data, whole, n=4, skip=1, sample=True, chunk_size=4)
    sharded = tmp_path / "sharded.json"
    done = [_mine(data, sharded, n=4, skip=1, sample=True, chunk_size=4, shard=i, num_shards=3)
            for i in (2, 0, 1)]  # fmt: skip
    assert done[:2] == [None, None] and done[2] == sharded  # the last shard merges
    assert sharded.read_text() == whole.read_text()


def test_resumed_equals_uninterrupted(data, tmp_path):
    passages = data[0]
    whole = tmp_path / "whole.json"
    _mine(data, whole, n=5, chunk_size=4)
    out = tmp_path / "resumed.json"
    r = RankedRetriever(passages)
    assert _mine(data, out, n=5, chunk_size=4, max_chunks=2, retriever=r) is None  # "killed"
    assert not out.exists() and r.calls == 2
    # a half-written chunk (killed while writing) is a hidden temp file, never a finished one
    (parts_dir(out) / ".chunk-000002.jsonl.deadbeef.tmp").write_text('[{"question"')
    with pytest.raises(FileNotFoundError, match="4 of 6 chunks are not finished"):
        merge_parts(out)
    r = RankedRetriever(passages)
    assert _mine(data, out, n=5, chunk_size=4, retriever=r) == out
    assert r.calls == 4  # only the unfinished chunks were retrieved again
    assert out.read_text() == whole.read_text()
    # other settings on the same output are refused, naming the file
    with pytest.raises(MineConfigError, match=r"resumed.json.parts/config.json: .* n=5, .* n=6"):
        _mine(data, out, n=6, chunk_size=4)


def test_cli_end_to_end_with_a_real_model(tiny_biencoder_dir, tmp_path, capsys):
    """Tiny model + exact index through `dpr-jax encode/index/mine`, 2 shards == 1 shard, and
    the mined negatives are the brute-force top passages that are neither positive nor answer."""
    from dpr_jax.cli import main
    from dpr_jax.embeddings import load_embeddings
    from dpr_jax.retriever.encode import TowerEncoder

    passages = _corpus(30)
    psg = write_passages_tsv(tmp_path / "psgs.tsv", passages)
    examples = _examples(passages, 10)
    bi = tmp_path / "train.json"
    write_biencoder(bi, examples)
    model = str(tiny_biencoder_dir)
    assert main(["encode", "--model", model, "--passages", str(psg), "--out",
                 str(tmp_path / "emb"), "--dtype", "float32"]) == 0  # fmt: skip
    assert main(["index", "--embeddings", str(tmp_path / "emb"), "--backend", "exact",
                 "--out", str(tmp_path / "idx")]) == 0  # fmt: skip
    base = ["mine", "--model", model, "--index", str(tmp_path / "idx"), "--passages", str(psg),
            "--biencoder", str(bi), "--n", "3", "--depth", "20", "--chunk-size", "3"]  # fmt: skip
    assert main([*base, "--out", str(tmp_path / "one.json")]) == 0
    for i in (0, 1):
        assert main([*base, "--out", str(tmp_path / "two.json"), "--shard", f"{i}/2"]) == 0
    one, _ = read_biencoder(tmp_path / "one.json")
    two, _ = read_biencoder(tmp_path / "two.json")
    assert [[c.id for c in r.hard_negative_ctxs] for r in one] == [
        [c.id for c in r.hard_negative_ctxs] for r in two
    ]
    for a, b in zip(one, two):
        np.testing.assert_allclose([c.score for c in a.hard_negative_ctxs],
                                   [c.score for c in b.hard_negative_ctxs], atol=2e-4)  # fmt: skip
    # brute force: question vectors . passage vectors, exclusions by hand
    ids, emb = load_embeddings(tmp_path / "emb")
    # the question encoder as DenseRetriever builds it (same batches, same padding)
    q = TowerEncoder(model, "question", 64, 64, bucket=16).encode([e.question for e in examples])
    scores = q @ np.asarray(emb, np.float32).T
    text = {p.id: p.text for p in passages}
    for r, ex, row in zip(one, examples, scores):
        ranked = [str(ids[j]) for j in np.argsort(-row, kind="stable")[:20]]
        want = [pid for pid in ranked
                if pid != ex.positive_ctxs[0].id and not has_answer(ex.answers, text[pid])][:3]  # fmt: skip
        assert [c.id for c in r.hard_negative_ctxs] == want
    # a user mistake: one line, exit 2
    capsys.readouterr()
    assert main([*base, "--out", str(tmp_path / "one.json"), "--n", "4"]) == 2
    assert "config.json" in capsys.readouterr().err
