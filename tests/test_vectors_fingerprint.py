"""Artifacts match by what they compute (issue 19, item 2).

The fingerprint that ties embeddings, an index and mined negatives to their model covers
everything that changes the vectors: parameters, pooling, normalisation, projection, the rest of
the model config, the tokenizer's bytes and the max length (:func:`vectors_fingerprint`). The
case users reach with README commands: one set of weights converted with ``--pooling cls`` and
``--pooling mean`` has one ``params_sha256`` but computes other vectors, and each is refused
against the other's index. Resumed jobs check their inputs by content, not by path; a BM25 index
is refused against another corpus.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import FOUR_PASSAGES, TWO_QUESTIONS

from dpr_jax.cli import main
from dpr_jax.data.formats import (
    BiencoderExample,
    Passage,
    read_biencoder,
    write_biencoder,
    write_passages_tsv,
    write_qas_tsv,
)
from dpr_jax.io import write_manifest
from dpr_jax.model_dir import MODEL_FORMAT, MODEL_JSON, load_model
from dpr_jax.provenance import ProvenanceError, vectors_fingerprint

PASSAGES = [*FOUR_PASSAGES, Passage("The Nile is a long river in Africa.", "Nile", "p4"),
            Passage("Mozart composed many symphonies.", "Mozart", "p5")]  # fmt: skip
QUESTIONS = TWO_QUESTIONS
ENC = ["--max-length", "32", "--bucket", "8", "--dtype", "float32"]


def _ok(argv):
    assert main([str(a) for a in argv]) == 0, argv


@pytest.fixture(scope="module")
def art(tmp_path_factory, minilm_dir):
    """MiniLM converted twice by `dpr-jax convert` (--pooling cls and mean), each one's
    embeddings and exact index over the same passages."""
    d = tmp_path_factory.mktemp("vectors_fp")
    write_passages_tsv(d / "passages.tsv", PASSAGES)
    write_qas_tsv(d / "qas.tsv", QUESTIONS)
    exs = [BiencoderExample(q.question, q.answers, [PASSAGES[(3 * i) % len(PASSAGES)]], [], []) for i, q in
           enumerate(QUESTIONS * 2)]  # fmt: skip
    write_biencoder(d / "biencoder.json", exs)
    for pooling in ("cls", "mean"):
        _ok(["convert", "--from-hf", minilm_dir, "--out", d / pooling, "--pooling", pooling])
        _ok(["encode", "--model", d / pooling, "--passages", d / "passages.tsv",
             "--out", d / f"emb_{pooling}", *ENC])  # fmt: skip
        _ok(["index", "--embeddings", d / f"emb_{pooling}", "--backend", "exact",
             "--out", d / f"index_{pooling}"])  # fmt: skip
    return d


def _edited(art, name, edit):
    """A copy of the cls model whose model JSON is edited by ``edit(meta)``, its manifest
    regenerated (what a user who edits the JSON and re-seals it makes)."""
    m = art / name
    if not m.exists():
        shutil.copytree(art / "cls", m)
        meta = json.loads((m / MODEL_JSON).read_text())
        edit(meta["model"])
        (m / MODEL_JSON).write_text(json.dumps(meta, indent=2))
        write_manifest(m, MODEL_FORMAT)
    return m


def test_the_fingerprint_covers_what_changes_the_vectors(art, tmp_path):
    cls, mean = art / "cls", art / "mean"
    # the README case: the same weights, so the parameters' hash alone cannot tell them apart
    assert load_model(cls)[3]["params_sha256"] == load_model(mean)[3]["params_sha256"]
    fp = vectors_fingerprint(cls, "passage", 32)
    assert vectors_fingerprint(mean, "passage", 32) != fp
    # the same model under another path, and converted again: the same fingerprint
    shutil.copytree(cls, tmp_path / "copy")
    assert vectors_fingerprint(tmp_path / "copy", "passage", 32) == fp
    # pooling edited in the JSON (manifest regenerated): the mean model's fingerprint exactly
    as_mean = _edited(art, "edited_pooling", lambda m: m.update(pooling="mean"))
    assert vectors_fingerprint(as_mean, "passage", 32) == vectors_fingerprint(mean, "passage", 32)
    heads = _edited(art, "edited_heads", lambda m: m["bert"].update(num_attention_heads=6))
    normed = _edited(art, "edited_normalize", lambda m: m.update(normalize=True))
    for other in (heads, normed):
        assert vectors_fingerprint(other, "passage", 32) != fp
    # the tokenizer's bytes, the max length and the tower
    tok = tmp_path / "tok"
    shutil.copytree(cls, tok)
    with open(tok / "vocab.txt", "a") as f:
        f.write("[planted]\n")
    write_manifest(tok, MODEL_FORMAT)
    assert vectors_fingerprint(tok, "passage", 32) != fp
    assert vectors_fingerprint(cls, "passage", 64) != fp
    assert vectors_fingerprint(cls, "question", 32) != fp
    # what encode and index record
    emb_cfg = json.loads((art / "emb_cls" / "config.json").read_text())
    assert emb_cfg["vectors_fingerprint"] == fp
    index_cfg = json.loads((art / "index_cls" / "index_config.json").read_text())
    assert index_cfg["meta"]["vectors_fingerprint"] == fp
    assert index_cfg["meta"]["passage_max_length"] == 32


@pytest.mark.parametrize("model,index", [("mean", "cls"), ("cls", "mean"),
                                         ("edited_heads", "cls")])  # fmt: skip
def test_retrieve_refuses_a_model_that_computes_other_vectors(art, model, index, capsys):
    if model.startswith("edited"):
        _edited(art, model, lambda m: m["bert"].update(num_attention_heads=6))
    argv = ["retrieve", "--model", art / model, "--index", art / f"index_{index}",
            "--passages", art / "passages.tsv", "--questions", art / "qas.tsv",
            "--out", art / f"r_{model}_{index}.json"]  # fmt: skip
    capsys.readouterr()
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(art / model) in err[0] and "pooling" in err[0], err
    assert not (art / f"r_{model}_{index}.json").exists()
    # the model that made the index is accepted, and retrieves
    argv[2] = art / index
    assert main([str(a) for a in argv]) == 0
    results = json.loads((art / f"r_{model}_{index}.json").read_text())
    assert [len(r["ctxs"]) for r in results] == [len(PASSAGES)] * 2


def test_encode_resume_refuses_another_pooling_and_takes_a_copy(art, tmp_path):
    from dpr_jax.data.formats import read_passages_tsv
    from dpr_jax.embeddings import load_embeddings
    from dpr_jax.retriever.encode import encode_corpus

    psgs = read_passages_tsv(art / "passages.tsv")
    kw = dict(chunk_size=2, batch_size=4, max_length=32, bucket=8, out_dtype="float32",
              show_progress=False, passages_file=art / "passages.tsv")  # fmt: skip
    out = tmp_path / "emb"
    encode_corpus(art / "cls", psgs, out, max_chunks=1, **kw)  # "killed" after one chunk
    with pytest.raises(ValueError, match="config.json: field 'model'"):
        encode_corpus(art / "mean", psgs, out, **kw)
    with pytest.raises(ValueError, match="config.json: field 'model'"):
        encode_corpus(_edited(art, "edited_pooling", lambda m: m.update(pooling="mean")), psgs,
                      out, **kw)  # fmt: skip
    shutil.copytree(art / "cls", tmp_path / "cls_copy")
    encode_corpus(tmp_path / "cls_copy", psgs, out, **kw)
    # other batches than the command's: equal up to float32 rounding
    np.testing.assert_allclose(load_embeddings(out)[1], load_embeddings(art / "emb_cls")[1],
                               atol=1e-5)  # fmt: skip


def _mine(art, out, model="cls", index="index_cls", biencoder="biencoder.json", **kw):
    from dpr_jax.mine import mine_hard_negatives

    return mine_hard_negatives(art / model if isinstance(model, str) else model,
                               art / index if isinstance(index, str) else index,
                               art / "passages.tsv", art / biencoder if isinstance(biencoder, str)
                               else biencoder, out, n=2, depth=6, chunk_size=2,
                               progress=False, **kw)  # fmt: skip


def test_mine_resume_checks_its_inputs_by_content(art, tmp_path):
    from dpr_jax.mine import MineConfigError

    whole = tmp_path / "whole.json"
    assert _mine(art, whole) == whole
    out = tmp_path / "resumed.json"
    assert _mine(art, out, max_chunks=1) is None  # "killed" after one chunk of two
    # another model (the same weights, other pooling), another index, another biencoder file
    for kw, field in ((dict(model="mean", index="index_mean"), "model_fingerprint"),
                      (dict(index="index_mean"), "index_fingerprint")):  # fmt: skip
        with pytest.raises(MineConfigError, match=f"config.json: .*{field}"):
            _mine(art, out, **kw)
    swapped = tmp_path / "biencoder.json"
    exs, _ = read_biencoder(art / "biencoder.json")
    write_biencoder(swapped, exs[::-1])
    with pytest.raises(MineConfigError, match="biencoder_sha256.*another --biencoder"):
        _mine(art, out, biencoder=swapped)
    # the same inputs under other paths: resumed, and equal to the uninterrupted run
    for name in ("cls", "index_cls"):
        shutil.copytree(art / name, tmp_path / name)
    shutil.copy(art / "biencoder.json", tmp_path / "same.json")
    assert _mine(art, out, model=tmp_path / "cls", index=tmp_path / "index_cls",
                 biencoder=tmp_path / "same.json") == out  # fmt: skip
    assert out.read_text() == whole.read_text()


def test_bm25_index_is_refused_against_another_corpus(art, tmp_path, capsys):
    bm25 = tmp_path / "bm25"
    base = ["retrieve", "--mode", "bm25", "--questions", art / "qas.tsv", "--bm25-index", bm25,
            "--out", tmp_path / "r.json"]  # fmt: skip
    _ok([*base, "--passages", art / "passages.tsv"])  # built and saved
    _ok([*base, "--passages", art / "passages.tsv"])  # loaded: the same corpus
    other_ids = write_passages_tsv(tmp_path / "other_ids.tsv",
                                   [Passage(p.text, p.title, "x" + p.id) for p in PASSAGES])  # fmt: skip
    other_text = write_passages_tsv(tmp_path / "other_text.tsv",
                                    [Passage(p.text + " Edited.", p.title, p.id) for p in PASSAGES])  # fmt: skip
    for psg in (other_ids, other_text):
        capsys.readouterr()
        assert main([str(a) for a in [*base, "--passages", psg]]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(psg) in err[0] and str(bm25) in err[0], err
    # an index saved before corpus fingerprints: ids checked, with a warning
    cfg = bm25 / "bm25_config.json"
    cfg.write_text(json.dumps({k: v for k, v in json.loads(cfg.read_text()).items()
                               if k != "corpus_fingerprint"}))  # fmt: skip
    from dpr_jax.data.bm25 import BM25Retriever

    old = BM25Retriever.load(bm25)
    with pytest.warns(UserWarning, match="no corpus fingerprint"):
        with pytest.raises(ProvenanceError, match="lacks passage id 'p0'"):
            old.check_corpus([Passage(p.text, p.title, "x" + p.id) for p in PASSAGES],
                             other_ids, bm25)  # fmt: skip
    assert Path(bm25).is_dir()
