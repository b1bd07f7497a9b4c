"""No command and no API call deletes or replaces what it did not create (issue 19, item 1).

One row per (command, output path): an output that is (or contains, or lies inside) an input of
the same command, that holds another kind of artifact, that lies inside an artifact, or that is
a non-empty directory of other files is refused before any work, with one line naming both
paths, exit 2, and the victim's bytes unchanged (:func:`dpr_jax.io.check_output`). The same kind
of artifact at the output path is still replaced.
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
