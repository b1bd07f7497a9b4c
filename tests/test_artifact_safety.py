"""Artifacts are safe, whole and chained by content (dpr_jax.io, dpr_jax.provenance).

No code runs from data (ScaNN's pickle is refused), every file is checked against a manifest,
embeddings and indexes record the model and the passages they came from, nothing partial is
used as complete, and no command deletes its inputs or leaves its output path missing.
"""

import json
import os
import pickle
import shutil
from collections import namedtuple
from pathlib import Path

import jax
import numpy as np
import pytest

from dpr_jax import io
from dpr_jax.embeddings import EmbeddingsIncompleteError, EmbeddingWriter, load_embeddings
from dpr_jax.index import build_index, load_index
from dpr_jax.index.base import IndexIntegrityError
from dpr_jax.model_dir import ModelIntegrityError, add_manifest, load_model, save_model
from dpr_jax.provenance import ProvenanceError, check_model, check_passages

Psg = namedtuple("Psg", "id text title")


# -- io: manifests, directory replacement, output paths ------------------------------------------


def test_manifest_refuses_unlisted_altered_and_missing_files_by_name(tmp_path):
    d = tmp_path / "art"
    (d / "sub").mkdir(parents=True)
    (d / "a.bin").write_bytes(b"\x00" * 100)
    (d / "sub" / "b.txt").write_text("hello")
    m = io.write_manifest(d, "test/1")
    assert set(m["files"]) == {"a.bin", "sub/b.txt"}
    assert m["files"]["sub/b.txt"]["sha256"] == io.sha256_file(d / "sub" / "b.txt")
    io.verify_manifest(d)

    (d / "sub" / "planted.py").write_text("import os")
    with pytest.raises(io.IntegrityError, match=r"planted\.py: not listed"):
        io.verify_manifest(d)
    (d / "sub" / "planted.py").unlink()

    (d / "a.bin").write_bytes(b"\x00" * 99 + b"\x01")  # same size, one byte changed
    with pytest.raises(io.IntegrityError, match=r"a\.bin: sha256 checksum mismatch"):
        io.verify_manifest(d)
    io.verify_manifest(d, checksums=False)  # sizes only
    (d / "a.bin").unlink()
    with pytest.raises(io.IntegrityError, match=r"a\.bin: listed .* but missing"):
        io.verify_manifest(d)
    (d / "manifest.json").unlink()
    with pytest.raises(io.IntegrityError, match="manifest.json: missing"):
        io.verify_manifest(d)


@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_never_leaves_the_path_missing(tmp_path, monkeypatch, exchange):
    if exchange and not io.exchange_paths(*_two_dirs(tmp_path / "probe")):
        pytest.skip("renameat2(RENAME_EXCHANGE) unsupported on this file system")
    if not exchange:
        monkeypatch.setattr(io, "exchange_paths", lambda a, b: False)
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "v").write_text("old")
    tmp = io.temp_dir_for(dest)
    (tmp / "v").write_text("new")
    seen = []
    real_rmtree, real_rename = shutil.rmtree, os.rename

    def rmtree(path, *a, **k):  # the old copy is deleted only once dest holds the new one
        seen.append(("rmtree", (dest / "v").read_text()))
        real_rmtree(path, *a, **k)

    def rename(a, b):
        seen.append(("rename", dest.exists()))
        real_rename(a, b)

    monkeypatch.setattr(io.shutil, "rmtree", rmtree)
    monkeypatch.setattr(io.os, "rename", rename)
    io.replace_dir(tmp, dest)
    assert (dest / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "probe") == ["out"]
    if exchange:  # one system call: no rename at all, the path always existed
        assert seen == [("rmtree", "new")]
    else:  # the documented fallback: two renames
        assert seen[-1] == ("rmtree", "new") and len(seen) == 3


def _two_dirs(root):
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    return root / "a", root / "b"


def test_check_output_path(tmp_path):
    src = tmp_path / "runs" / "model"
    src.mkdir(parents=True)
    for bad in (src, tmp_path / "runs", tmp_path, src / "hf"):
        with pytest.raises(ValueError, match="input"):
            io.check_output_path(bad, [src])
    rel = os.path.relpath(src)  # the same directory by a relative path
    with pytest.raises(ValueError, match="is the input"):
        io.check_output_path(rel, [src])
    io.check_output_path(tmp_path / "runs" / "model-hf", [src])
    io.check_output_path(tmp_path / "x.npy", [tmp_path / "q.tsv"])


# -- ScaNN: no pickle, no unlisted file ----------------------------------------------------------


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _gaussian(n=300, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, dim)).astype(np.float32)
    return emb, np.array([f"doc{i}" for i in range(n)])


def test_planted_scann_pickle_is_refused_and_never_unpickled(tmp_path):
    pytest.importorskip("scann")
    emb, ids = _gaussian()
    path = build_index("scann-bf", emb, ids, num_threads=1).save(tmp_path / "idx")
    assert not list(path.rglob("*.pkl"))
    q = emb[:5] + 0.01
    want = ids[np.argsort(-(q @ emb.T), axis=1)[:, :3]]
    _, got = load_index(path).search(q, 3)  # loads without ScaNN's pickle path
    np.testing.assert_array_equal(got, want)

    marker = tmp_path / "PWNED"
    planted = path / "scann" / "scann_docids.pkl"
    planted.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(IndexIntegrityError, match=r"scann_docids\.pkl: not listed"):
        load_index(path)
    with pytest.raises(ValueError, match=r"scann_docids\.pkl: a pickle"):  # even if listed
        io.write_manifest(path, "dpr-jax-index/1")
        load_index(path)
    assert not marker.exists()


# -- model directories: checksums, config checks, fingerprints -----------------------------------


def _tiny_model(tmp_path, name="m", seed=0, heads=4):
    from dpr_jax.models.bert import BertConfig
    from dpr_jax.retriever.model import EncoderConfig, init_biencoder_params

    bert = BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=heads,
        intermediate_size=20,
        max_position_embeddings=32,
    )
    cfg = EncoderConfig(bert)
    params = init_biencoder_params(cfg, jax.random.PRNGKey(seed))
    return save_model(tmp_path / name, params, "biencoder", cfg), params


def _largest_param_file(model_dir):
    return max((p for p in (model_dir / "params").rglob("*") if p.is_file()),
               key=lambda p: p.stat().st_size)  # fmt: skip


def test_model_dir_checksums_refuse_flipped_bytes_edits_and_planted_files(tmp_path):
    m, params = _tiny_model(tmp_path)
    _, _, loaded, meta = load_model(m)
    assert meta["params_sha256"] == io.fingerprint_arrays(params)
    manifest = json.loads((m / "manifest.json").read_text())
    assert "dpr_jax_model.json" in manifest["files"]
    assert any(k.startswith("params/") for k in manifest["files"])

    f = _largest_param_file(m)
    good = f.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    f.write_bytes(bytes(bad))
    with pytest.raises(ModelIntegrityError, match=rf"{f.name}: sha256 checksum mismatch"):
        load_model(m)
    f.write_bytes(good)

    cfg_path = m / "dpr_jax_model.json"
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace('"num_attention_heads": 4', '"num_attention_heads": 2'))
    with pytest.raises(ModelIntegrityError, match=r"dpr_jax_model\.json: .*checksum"):
        load_model(m)
    assert '"pooling": "cls"' in text
    cfg_path.write_text(text.replace('"pooling": "cls"', '"pooling": "mean"'))
    with pytest.raises(ModelIntegrityError, match=r"dpr_jax_model\.json"):
        load_model(m)
    cfg_path.write_text(text)

    (m / "params" / "evil.txt").write_text("x")
    with pytest.raises(ModelIntegrityError, match=r"evil\.txt: not listed"):
        load_model(m)
    (m / "params" / "evil.txt").unlink()
    load_model(m)


def test_old_model_dir_without_manifest_is_refused_with_the_way_out(tmp_path):
    m, params = _tiny_model(tmp_path)
    (m / "manifest.json").unlink()
    meta = json.loads((m / "dpr_jax_model.json").read_text())
    del meta["params_sha256"]
    (m / "dpr_jax_model.json").write_text(json.dumps(meta))
    with pytest.raises(ModelIntegrityError, match="add-manifest"):
        load_model(m)
    add_manifest(m)
    assert load_model(m)[3]["params_sha256"] == io.fingerprint_arrays(params)


def test_config_that_does_not_fit_the_parameters_is_refused(tmp_path):
    m, _ = _tiny_model(tmp_path)
    (m / "manifest.json").unlink()  # a config edited by hand, then re-manifested
    meta = json.loads((m / "dpr_jax_model.json").read_text())
    meta["model"]["bert"]["num_attention_heads"] = 3
    (m / "dpr_jax_model.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="16 is not a multiple of num_attention_heads 3"):
        add_manifest(m)
    meta["model"]["bert"]["num_attention_heads"] = 2  # divides: shapes equal, vectors differ
    (m / "dpr_jax_model.json").write_text(json.dumps(meta))
    add_manifest(m)  # a trusted re-manifest takes the files as they are ...
    meta = json.loads((m / "dpr_jax_model.json").read_text())
    meta["model"]["bert"]["hidden_size"] = 8
    (m / "dpr_jax_model.json").write_text(json.dumps(meta))
    io.write_manifest(m, "dpr-jax-model/1")
    with pytest.raises(ValueError, match="has shape"):  # ... but never a shape mismatch
        load_model(m)


def test_params_fingerprint_is_content_not_path(tmp_path):
    a, params = _tiny_model(tmp_path, "a", seed=0)
    b, _ = _tiny_model(tmp_path, "b", seed=0)
    c, _ = _tiny_model(tmp_path, "c", seed=1)
    fa, fb, fc = (load_model(x)[3]["params_sha256"] for x in (a, b, c))
    assert fa == fb != fc
    # replacing a model at the same path: the path never disappears, the identity changes
    save_model(a, load_model(c)[2], "biencoder", load_model(c)[1])
    assert load_model(a)[3]["params_sha256"] == fc
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


# -- embeddings and indexes: content chaining, completeness --------------------------------------


def _corpus(n=7, word="river"):
    return [Psg(f"p{i}", f"the {word} flows {i} times", f"T{i}") for i in range(n)]


def test_encode_resume_is_chained_to_model_and_passages_content(tiny_biencoder_dir, tmp_path):
    from dpr_jax.retriever.encode import encode_corpus

    passages = _corpus()
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text("".join(f"{p.id}\t{p.text}\t{p.title}\n" for p in passages))
    kw = dict(chunk_size=2, batch_size=4, max_length=16, bucket=8, out_dtype="float32",
              show_progress=False, passages_file=tsv)  # fmt: skip
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        encode_corpus(tiny_biencoder_dir, passages, tmp_path / "emb", chunk_size=0,
                      **{k: v for k, v in kw.items() if k != "chunk_size"})  # fmt: skip
    emb = tmp_path / "emb"
    encode_corpus(tiny_biencoder_dir, passages, emb, shard=0, num_shards=2, **kw)
    cfg = json.loads((emb / "config.json").read_text())
    assert cfg["model_fingerprint"] == load_model(tiny_biencoder_dir)[3]["params_sha256"]
    assert cfg["passages_sha256"] == io.sha256_file(tsv)
    assert cfg["passages_fingerprint"] == io.fingerprint_passages(passages)

    # shard 0 of 2 is not a corpus
    with pytest.raises(EmbeddingsIncompleteError, match="shard 1 of 2 was never encoded"):
        load_embeddings(emb)

    # another model at the same path: refused
    other = tmp_path / "other_model"
    shutil.copytree(tiny_biencoder_dir, other)
    _, config, params, _ = load_model(other)
    save_model(other, jax.tree.map(lambda x: x * 1.5, params), "biencoder", config,
               tokenizer=tiny_biencoder_dir)  # fmt: skip
    with pytest.raises(ValueError, match="model_fingerprint.*other parameters"):
        encode_corpus(other, passages, emb, shard=1, num_shards=2, **kw)
    # edited passages: refused
    edited = _corpus(word="RIVER")
    tsv2 = tmp_path / "psgs2.tsv"
    tsv2.write_text("".join(f"{p.id}\t{p.text}\t{p.title}\n" for p in edited))
    with pytest.raises(ValueError, match=r"field .passages_.*other passages"):
        encode_corpus(tiny_biencoder_dir, edited, emb, shard=1, num_shards=2,
                      **{**kw, "passages_file": tsv2})  # fmt: skip
    # the same model by a relative path: accepted, and the result equals one uninterrupted run
    rel = os.path.relpath(tiny_biencoder_dir)
    encode_corpus(rel, passages, emb, shard=1, num_shards=2, **kw)
    ids, vecs = load_embeddings(emb)
    assert ids.tolist() == [p.id for p in passages]
    whole = tmp_path / "whole"
    encode_corpus(tiny_biencoder_dir, passages, whole, **kw)
    np.testing.assert_array_equal(vecs, load_embeddings(whole)[1])

    with pytest.raises(ValueError, match="no passages"):
        encode_corpus(tiny_biencoder_dir, [], tmp_path / "e0", **kw)
    with pytest.raises(ValueError, match="is the input"):
        encode_corpus(tiny_biencoder_dir, passages, tiny_biencoder_dir, **kw)


def _write_emb(d, ids, emb, num_shards=1, chunk=4, **extra):
    """An encode-like directory: num_chunks per shard, shards of contiguous rows."""
    per = -(-len(ids) // num_shards)
    for s in range(num_shards):
        lo, hi = s * per, min(len(ids), (s + 1) * per)
        n_chunks = -(-(hi - lo) // chunk)
        cfg = {"model_fingerprint": "f" * 64, "passages_sha256": None, "dim": emb.shape[1],
               "dtype": "float32", "num_chunks": n_chunks, **extra}  # fmt: skip
        w = EmbeddingWriter(d, shard=s, num_shards=num_shards, config=cfg)
        for c in range(n_chunks):
            a = lo + c * chunk
            b = min(hi, a + chunk)
            w.write_chunk(c, ids[a:b], emb[a:b])


def test_index_refuses_partial_embeddings_unless_allowed(tmp_path, capsys):
    from dpr_jax.cli.index import cli_main

    emb, ids = _gaussian(n=30, dim=8)
    full = tmp_path / "full"
    _write_emb(full, ids, emb, num_shards=2)
    assert load_embeddings(full)[0].tolist() == ids.tolist()

    killed = tmp_path / "killed"  # shard 1 killed after its first chunk
    shutil.copytree(full, killed)
    for p in killed.glob("*-001-00000[12]*"):
        p.unlink()
    half = tmp_path / "half"  # shard 0 of 2 only
    shutil.copytree(full, half)
    for p in half.glob("*-001*"):
        p.unlink()
    (half / "emb-001-000000.npy").write_bytes(b"half-written")  # a chunk killed mid-write
    argv = ["--backend", "faiss-flat", "--threads", "1", "--out"]
    for d, match in [(killed, r"shard 1 lacks chunks \[1, 2\] of 4"),
                     (half, r"emb-001-000000\.npy: left by an unfinished chunk")]:  # fmt: skip
        with pytest.raises(EmbeddingsIncompleteError, match=match):
            cli_main([*argv, str(tmp_path / "idx"), "--embeddings", str(d)])
        assert not (tmp_path / "idx").exists()
    with pytest.warns(UserWarning, match="finished chunks only"):
        assert cli_main([*argv, str(tmp_path / "idx"), "--embeddings", str(killed),
                         "--allow-partial"]) == 0  # fmt: skip
    index = load_index(tmp_path / "idx")
    assert index.meta["allow_partial"] is True and "lacks chunks [1, 2]" in index.meta["partial"][0]
    assert index.size == 15 + 4 + 3

    (full / "notes.txt").write_text("x")  # an unknown file is refused by name
    with pytest.raises(ValueError, match=r"notes\.txt: not a file of an embeddings directory"):
        load_embeddings(full)
    (full / "notes.txt").unlink()
    # a training workdir (its own config.json, checkpoints/) is not taken for an encoding
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text(json.dumps({"config": {}, "resolved": {}}))
    with pytest.raises(ValueError, match=r"run: not an embeddings directory \(a training workdir"):
        load_embeddings(workdir)
    with pytest.raises(FileNotFoundError, match=r"config\.json: not found \(not an embeddings dir"):
        load_embeddings(tmp_path / "killed" / "..")
    with pytest.raises(ValueError, match="is the input"):  # never write over the input
        cli_main([*argv, str(full), "--embeddings", str(full)])
    other = tmp_path / "other"
    _write_emb(other, np.array([f"x{i}" for i in range(4)]), emb[:4], model_fingerprint="0" * 64)
    with pytest.raises(ProvenanceError, match="one index holds the vectors of one model"):
        cli_main([*argv, str(tmp_path / "idx2"), "--embeddings", str(full), str(other)])


def test_retrieve_refuses_another_model_or_corpus_before_encoding(
    tiny_biencoder_dir, tmp_path, monkeypatch
):
    from dpr_jax.retriever.encode import TowerEncoder
    from dpr_jax.search import DenseRetriever

    passages = _corpus()
    tsv = tmp_path / "psgs.tsv"
    tsv.write_text("".join(f"{p.id}\t{p.text}\t{p.title}\n" for p in passages))
    fp = load_model(tiny_biencoder_dir)[3]["params_sha256"]
    emb, _ = _gaussian(n=len(passages), dim=32)
    index = build_index("faiss-flat", emb, [p.id for p in passages])
    index.meta = {"model_fingerprint": "0" * 64,
                  "passages": [{"sha256": io.sha256_file(tsv),
                                "fingerprint": io.fingerprint_passages(passages)}]}  # fmt: skip
    path = index.save(tmp_path / "idx")

    def no_encoding(*a, **k):
        raise AssertionError("a question was encoded")

    monkeypatch.setattr(TowerEncoder, "encode", no_encoding)
    # an index with the parameters' hash alone (older dpr-jax): checked by it, with a warning
    with pytest.warns(UserWarning, match="older dpr-jax"):
        with pytest.raises(ProvenanceError, match="not those of the model that encoded"):
            DenseRetriever(tiny_biencoder_dir, path)
    index.meta["model_fingerprint"] = fp
    with pytest.warns(UserWarning, match="pooling, normalisation, projection and tokenizer"):
        check_model(index, fp, tiny_biencoder_dir)

    check_passages(index, tsv, passages)  # the same bytes
    with_header = tmp_path / "with_header.tsv"  # other bytes, the same passages
    with_header.write_text("id\ttext\ttitle\n" + tsv.read_text())
    check_passages(index, with_header, passages)
    edited = tmp_path / "edited.tsv"
    edited.write_text(tsv.read_text().replace("river", "RIVER"))
    with pytest.raises(ProvenanceError, match="edited.tsv: not the passages"):
        check_passages(index, edited, _corpus(word="RIVER"))


def test_convert_refuses_out_that_would_delete_its_source(tiny_biencoder_dir, tmp_path, capsys):
    from dpr_jax.cli import main

    src = tmp_path / "par" / "m"
    shutil.copytree(tiny_biencoder_dir, src)
    for out in (src, src.parent, src / "hf"):
        assert main(["convert", "--to-hf", str(src), "--out", str(out), "--overwrite"]) == 2
        assert "input" in capsys.readouterr().err
        load_model(src)  # intact, manifest and all


def test_a_training_run_stopped_by_bad_input_leaves_no_workdir(tmp_path, capsys):
    """A run refused before it writes anything removes what it created (the workdir, its lock
    file and checkpoints folder) and nothing else: a workdir that existed stays, with its files."""
    from conftest import REPO

    from dpr_jax.cli import main

    bad = tmp_path / "train.json"
    bad.write_text("")
    given = tmp_path / "given"
    given.mkdir()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    config = str(REPO / "configs" / "reader_tiny.py")
    for workdir in (tmp_path / "new" / "run", given, kept):
        rc = main(
            ["train-reader", "--config", config, "--train", str(bad), "--workdir", str(workdir)]
        )
        assert rc == 2 and "train.json, line 1: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()  # nor the folder made for it
    assert given.is_dir() and not any(given.iterdir())
    assert sorted(p.name for p in kept.iterdir()) == ["notes.txt"]
    assert (kept / "notes.txt").read_text() == "mine"


def test_an_index_path_given_a_model_names_what_it_holds(tiny_biencoder_dir):
    """``load_index`` (``--index``) of a model directory says it is one, instead of reporting
    the model's manifest as a damaged index's."""
    with pytest.raises(IndexIntegrityError) as info:
        load_index(tiny_biencoder_dir)
    assert str(info.value) == (
        f"{tiny_biencoder_dir}: a model directory (see {tiny_biencoder_dir}/manifest.json), not an "
        "index directory"
    )


def test_a_training_workdir_never_lies_in_a_model_or_index(tiny_biencoder_dir, tmp_path, capsys):
    """A run given a model, an index or a folder inside one as its --workdir is refused before
    it writes a file (it used to train, then write config, metrics and checkpoints there, and
    fail at the export); a file as --workdir is named as one."""
    from conftest import REPO

    from dpr_jax.cli import main

    model = tmp_path / "model"
    shutil.copytree(tiny_biencoder_dir, model)
    emb, ids = _gaussian(n=20, dim=8)
    _write_emb(tmp_path / "emb", ids, emb)
    build_index("exact", tmp_path / "emb").save(tmp_path / "index")
    (tmp_path / "file.txt").write_text("x")
    before = {p: sorted(map(str, p.rglob("*"))) for p in (model, tmp_path / "index")}
    reader = ["train-reader", "--config", str(REPO / "configs" / "reader_tiny.py")]
    cases = [
        (reader, model, f"is the model directory {model}"),
        (reader, model / "sub", f"lies inside the model directory {model}"),
        (reader, tmp_path / "index", f"is the index directory {tmp_path / 'index'}"),
        (reader, tmp_path / "file.txt", "is a file, not a directory"),
        (["train", "--config", str(REPO / "configs" / "tiny.py"), "--eval-only"], model, "is the"),
    ]
    for argv, workdir, said in cases:
        assert main([*argv, "--workdir", str(workdir)]) == 2
        assert f"--workdir {workdir} {said}" in capsys.readouterr().err
    assert before == {p: sorted(map(str, p.rglob("*"))) for p in before}
    assert (tmp_path / "file.txt").read_text() == "x"
