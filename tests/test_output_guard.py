"""No command and no API call deletes or replaces what it did not create (issue 19, item 1).

One row per (command, output path): an output that is (or contains, or lies inside) an input of
the same command, that holds another kind of artifact, that lies inside an artifact, or that is
a non-empty directory of other files, or that is an existing file holding something other than
the command writes (a biencoder file given as retrieval results' --out, a text file, ...) is
refused before any work, with one line naming both paths, exit 2, and the victim's bytes
unchanged (:func:`dpr_jax.io.check_output`). The same kind of artifact or file at the output path
is still replaced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FOUR_PASSAGES, TWO_QUESTIONS

from dpr_jax.cli import main
from dpr_jax.data.formats import (
    BiencoderExample,
    write_biencoder,
    write_passages_tsv,
    write_qas_tsv,
)
from dpr_jax.io import OutputPathError

PASSAGES, QUESTIONS = FOUR_PASSAGES, TWO_QUESTIONS


@pytest.fixture(scope="module")
def art(tmp_path_factory, tiny_biencoder_dir):
    """Every kind of input and artifact the rows need, made by the commands themselves."""
    d = tmp_path_factory.mktemp("guard")
    write_passages_tsv(d / "passages.tsv", PASSAGES)
    write_qas_tsv(d / "qas.tsv", QUESTIONS)
    ex = BiencoderExample(QUESTIONS[0].question, ["Paris"], [PASSAGES[0]], [], [PASSAGES[1]])
    write_biencoder(d / "biencoder.json", [ex])
    assert main(["encode", "--model", str(tiny_biencoder_dir), "--passages",
                 str(d / "passages.tsv"), "--out", str(d / "emb"), "--bucket", "8",
                 "--max-length", "16"]) == 0  # fmt: skip
    assert main(["index", "--embeddings", str(d / "emb"), "--backend", "exact",
                 "--out", str(d / "index")]) == 0  # fmt: skip
    assert main(["retrieve", "--mode", "bm25", "--passages", str(d / "passages.tsv"),
                 "--questions", str(d / "qas.tsv"), "--out", str(d / "results.json"),
                 "--k", "2"]) == 0  # fmt: skip
    (d / "notes").mkdir()
    (d / "notes" / "precious.txt").write_text("not an artifact")
    return {"dir": d, "model": Path(tiny_biencoder_dir), "emb": d / "emb", "index": d / "index",
            "passages": d / "passages.tsv", "qas": d / "qas.tsv", "results": d / "results.json",
            "biencoder": d / "biencoder.json", "notes": d / "notes"}  # fmt: skip


def _digest(path: Path) -> str:
    """sha256 over a file's bytes, or over every file (relative name + bytes) of a directory."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        h.update(str(p.relative_to(path.parent if path.is_file() else path)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def _api_passages_over_qas(a):
    write_passages_tsv(a["qas"], PASSAGES)


def _api_qas_over_passages(a):
    write_qas_tsv(a["passages"], QUESTIONS)


def _api_biencoder_over_results(a):
    ex = BiencoderExample(QUESTIONS[0].question, ["Paris"], [PASSAGES[0]], [], [])
    write_biencoder(a["results"], [ex])


def _api_results_over_biencoder(a):
    from dpr_jax.data.formats import write_retrieval_results

    write_retrieval_results(a["biencoder"], [{"question": "q", "answers": [], "ctxs": []}])


def _api_index_over_model(a):
    from dpr_jax.index import build_index

    emb = np.eye(4, dtype=np.float32)
    build_index("exact", emb, ["a", "b", "c", "d"]).save(a["model"])


# (name, argv or API call, the output path, the victim, exit code); {key} = a path of `art`
MODEL, IDX, EMB, PSG, QAS = "{model}", "{index}", "{emb}", "{passages}", "{qas}"
RES, BIE, NOTES = "{results}", "{biencoder}", "{notes}"
DENSE = ["--model", MODEL, "--index", IDX]
ROWS = [
    ("index --out a model", ["index", "--embeddings", EMB, "--backend", "exact", "--out", MODEL],
     MODEL, MODEL),
    ("index --out its embeddings", ["index", "--embeddings", EMB, "--backend", "exact",
     "--out", EMB], EMB, EMB),
    ("index --out files that are no artifact", ["index", "--embeddings", EMB, "--backend",
     "exact", "--out", NOTES], NOTES, NOTES),
    ("build_index().save(model dir)", _api_index_over_model, MODEL, MODEL),
    ("encode --out a model", ["encode", "--model", MODEL, "--passages", PSG, "--out", MODEL],
     MODEL, MODEL),
    ("encode --out an index", ["encode", "--model", MODEL, "--passages", PSG, "--out", IDX],
     IDX, IDX),
    ("encode --questions --out an index", ["encode", "--model", MODEL, "--questions", QAS,
     "--out", IDX], IDX, IDX),
    ("retrieve --out = --passages", ["retrieve", *DENSE, "--passages", PSG, "--questions", QAS,
     "--out", PSG], PSG, PSG),
    ("retrieve --out = --questions", ["retrieve", *DENSE, "--passages", PSG, "--questions", QAS,
     "--out", QAS], QAS, QAS),
    ("retrieve --out inside a model", ["retrieve", "--mode", "bm25", "--passages", PSG,
     "--questions", QAS, "--out", MODEL + "/results.json"], MODEL + "/results.json", MODEL),
    ("evaluate --json = --results", ["evaluate", "--results", RES, "--json", RES], RES, RES),
    ("read --out = --results", ["read", "--model", MODEL, "--results", RES, "--out", RES],
     RES, RES),
    ("ask --out = --questions", ["ask", "--questions", QAS, "--out", QAS, "--retriever", MODEL,
     "--index", IDX, "--passages", PSG, "--reader", MODEL], QAS, QAS),
    ("mine --out = --biencoder", ["mine", "--biencoder", BIE, "--out", BIE, *DENSE,
     "--passages", PSG], BIE, BIE),
    ("mine --out = --model", ["mine", "--biencoder", BIE, "--out", MODEL, *DENSE,
     "--passages", PSG], MODEL, MODEL),
    ("prepare-squad --out another artifact", ["prepare-squad", "--squad", "{dir}/squad.json",
     "--out", EMB], EMB, EMB),
    ("prepare-squad --out files that are no artifact", ["prepare-squad", "--squad",
     "{dir}/squad.json", "--out", NOTES], NOTES, NOTES),
    ("convert --to-hf --out an index", ["convert", "--to-hf", MODEL, "--out", IDX,
     "--overwrite"], IDX, IDX),
    ("convert --from-hf --out an index", ["convert", "--from-hf", MODEL, "--out", IDX,
     "--overwrite"], IDX, IDX),
    ("convert-data --out an index", ["convert-data", "--biencoder", BIE, "--out", IDX,
     "--overwrite"], IDX, IDX),
    # a file that is no input but holds something other than the command writes
    ("retrieve --out a biencoder file", ["retrieve", "--mode", "bm25", "--passages", PSG,
     "--questions", QAS, "--out", BIE], BIE, BIE),
    ("retrieve --out a text file", ["retrieve", "--mode", "bm25", "--passages", PSG,
     "--questions", QAS, "--out", NOTES + "/precious.txt"], NOTES + "/precious.txt",
     NOTES + "/precious.txt"),
    ("mine --out retrieval results", ["mine", "--biencoder", BIE, "--out", RES, *DENSE,
     "--passages", PSG], RES, RES),
    ("evaluate --json the passages", ["evaluate", "--results", RES, "--json", PSG], PSG, PSG),
    ("read --out a biencoder file", ["read", "--model", MODEL, "--results", RES, "--out", BIE],
     BIE, BIE),
    ("ask --out retrieval results", ["ask", "--questions", QAS, "--out", RES, "--retriever",
     MODEL, "--index", IDX, "--passages", PSG, "--reader", MODEL], RES, RES),
    ("encode --questions --out retrieval results", ["encode", "--model", MODEL, "--questions",
     QAS, "--out", RES], RES, RES),
    ("plot --out the qas", ["plot", "{dir}", "--out", QAS], QAS, QAS),
    ("plan --json the biencoder file", ["plan", "--config", "{dir}/train.json", "--topology",
     "v5e:2x2", "--json", BIE], BIE, BIE),
    ("write_passages_tsv(qas)", _api_passages_over_qas, QAS, QAS),
    ("write_qas_tsv(passages)", _api_qas_over_passages, PSG, PSG),
    ("write_biencoder(results)", _api_biencoder_over_results, RES, RES),
    ("write_retrieval_results(biencoder)", _api_results_over_biencoder, BIE, BIE),
]  # fmt: skip


def _fill(x, a):
    return x.format(**{k: str(v) for k, v in a.items()})


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_refused_before_any_work_and_the_victim_is_intact(art, row, capsys):
    _, call, out, victim = row
    out, victim = Path(_fill(out, art)), Path(_fill(victim, art))
    before = _digest(victim)
    listing = sorted(p.name for p in art["dir"].iterdir())
    capsys.readouterr()
    if callable(call):
        with pytest.raises(OutputPathError) as e:
            call(art)
        err = str(e.value)
    else:
        assert main([_fill(x, art) for x in call]) == 2
        err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(out) in lines[0] and str(victim) in lines[0], lines[0]
    assert _digest(victim) == before
    assert sorted(p.name for p in art["dir"].iterdir()) == listing  # nothing left behind


def test_the_same_kind_is_still_replaced(art, capsys):
    """An index over an index, results over results, a model over a model: replaced."""
    from dpr_jax.index import load_index
    from dpr_jax.model_dir import load_model, save_model

    d = art["dir"]
    old = _digest(art["index"])
    assert main(["index", "--embeddings", str(art["emb"]), "--backend", "faiss-flat",
                 "--out", str(art["index"])]) == 0  # fmt: skip
    assert _digest(art["index"]) != old and load_index(art["index"]).backend == "faiss-flat"

    res = d / "again.json"
    res.write_text("[]\n")
    assert main(["retrieve", "--mode", "bm25", "--passages", str(art["passages"]),
                 "--questions", str(art["qas"]), "--out", str(res), "--k", "1"]) == 0  # fmt: skip
    assert [len(r["ctxs"]) for r in json.loads(res.read_text())] == [1, 1]

    copy = d / "model_copy"
    _, config, params, _ = load_model(art["model"])
    save_model(copy, params, "biencoder", config)
    save_model(copy, params, "biencoder", config)  # a model directory over a model directory
    assert load_model(copy)[3]["params_sha256"] == load_model(art["model"])[3]["params_sha256"]


def test_a_file_of_what_the_command_writes_is_replaced(art, tmp_path, capsys):
    """An existing file is replaced when it holds what the command writes (told from its first
    bytes, compressed or not) or nothing; refused when it cannot be read."""
    d = tmp_path
    qas = d / "q.tsv"
    write_qas_tsv(qas, QUESTIONS)
    write_qas_tsv(qas, QUESTIONS[:1])  # qas over qas
    assert len(qas.read_text().splitlines()) == 1
    for name in ("q.tsv.xz", "q.tsv.bz2"):
        write_qas_tsv(d / name, QUESTIONS)
        write_qas_tsv(d / name, QUESTIONS)  # xz / bzip2 qas over the same
    psg = d / "p.tsv.gz"
    write_passages_tsv(psg, PASSAGES)
    write_passages_tsv(psg, PASSAGES[:2])  # compressed passages over compressed passages
    ex = BiencoderExample(QUESTIONS[0].question, ["Paris"], [PASSAGES[0]], [], [PASSAGES[1]])
    bie = d / "b.jsonl"
    bie.write_text("")  # empty: replaced
    write_biencoder(bie, [ex])
    write_biencoder(bie, [ex, ex])
    assert len(bie.read_text().splitlines()) == 2

    metrics = d / "metrics.json"
    for k in ("1", "2"):
        assert main(["evaluate", "--results", str(art["results"]), "--ks", k,
                     "--json", str(metrics)]) == 0  # fmt: skip
    assert list(json.loads(metrics.read_text())["top_k_accuracy"]) == ["2"]
    vecs = d / "q.npy"
    for _ in range(2):
        assert main(["encode", "--model", str(art["model"]), "--questions", str(art["qas"]),
                     "--out", str(vecs)]) == 0  # fmt: skip
    assert np.load(vecs).shape[0] == len(QUESTIONS)

    bad = d / "r.json.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00broken")  # a damaged gzip file is nobody's output
    capsys.readouterr()
    assert main(["retrieve", "--mode", "bm25", "--passages", str(art["passages"]),
                 "--questions", str(art["qas"]), "--out", str(bad)]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unreadable" in err, err
    assert bad.read_bytes() == b"\x1f\x8b\x08\x00broken"


@pytest.mark.parametrize("suffix", [".png", ".pdf", ".svg"])
def test_pictures_are_told_by_their_suffix(tmp_path, suffix):
    """What matplotlib writes for a suffix is recognised as a picture; text is not."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dpr_jax.io import IMAGE

    path = tmp_path / f"f{suffix}"
    fig = plt.figure()
    fig.savefig(path)
    plt.close(fig)
    head = path.read_bytes()[:65536]
    assert IMAGE.holds(head, path)
    assert not IMAGE.holds(b"id\ttext\ttitle\n", path)
    other = ".pdf" if suffix != ".pdf" else ".png"
    assert not IMAGE.holds(head, path.with_suffix(other))  # a PNG named .pdf is not a PDF


def test_a_device_is_never_an_output(art, capsys):
    """Outputs are written beside their path and renamed over it: /dev/null would be replaced
    by a file. Refused in one line, the device left as it is."""
    import stat

    assert main(["evaluate", "--results", str(art["results"]), "--json", "/dev/null"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/dev/null" in err[0] and "no regular file" in err[0], err
    assert stat.S_ISCHR(Path("/dev/null").stat().st_mode)
