"""No code from a model or tokenizer directory ever runs (issue 19, item 3).

A model directory made by dpr-jax into which a hostile user plants an ``auto_map`` (in
tokenizer_config.json, and in config.json with a custom ``model_type``) naming a planted ``.py``
file whose import writes a marker. Every way dpr-jax loads a tokenizer (the ``DPRTokenizer``
class, ``checkpoint.load_tokenizer``, ``dpr-jax encode`` in process and as a subprocess with stdin
closed, and in process with a user who would answer "y") either uses transformers' built-in class or refuses with one line; the marker never
appears and nothing asks "[y/N]".
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys

import pytest

from dpr_jax import io as dio
from dpr_jax.cli import main
from dpr_jax.data.tokenize import DPRTokenizer
from dpr_jax.errors import UserError
from dpr_jax.model_dir import MODEL_FORMAT, load_tokenizer

EVIL = """\
import pathlib
pathlib.Path({marker!r}).write_text("code from the model directory ran")
from transformers import BertConfig, BertTokenizerFast
class EvilTokenizer(BertTokenizerFast):
    pass
class EvilConfig(BertConfig):
    model_type = "evil"
"""


def _plant(model_dir, marker, config_too: bool):
    """auto_map -> evil.py in tokenizer_config.json (and config.json); the manifest is
    regenerated, as a user who edits files and re-lists them would."""
    (model_dir / "evil.py").write_text(EVIL.format(marker=str(marker)))
    tok_map = {"AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"]}
    p = model_dir / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg["auto_map"] = tok_map
    if config_too:  # nothing built-in left to fall back on
        cfg.pop("tokenizer_class", None)
        (model_dir / "config.json").write_text(
            json.dumps({"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig",
                                                           **tok_map}})
        )  # fmt: skip
    p.write_text(json.dumps(cfg))
    dio.write_manifest(model_dir, MODEL_FORMAT)


@pytest.fixture(params=["tokenizer_config", "config_too"])
def planted(request, tiny_biencoder_dir, tmp_path, monkeypatch):
    model = tmp_path / "model"
    shutil.copytree(tiny_biencoder_dir, model)
    marker = tmp_path / "MARKER"
    _plant(model, marker, config_too=request.param == "config_too")

    prompts = []

    def careless_user(prompt=""):  # answers yes to anything, as a hurried user would
        prompts.append(prompt)
        return "y"

    monkeypatch.setattr("builtins.input", careless_user)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    yield model, marker, request.param == "config_too"
    assert not prompts, f"dpr-jax let transformers ask: {prompts}"
    assert not marker.exists(), "code planted in the model directory ran"


def _load_or_refused(load, model, refused: bool):
    if refused:
        with pytest.raises(UserError, match=r"tokenizer_config.json: 'auto_map' asks to run"):
            load(model)
    else:
        tok = load(model)
        assert type(tok.tok).__module__.startswith("transformers.")
        assert tok.questions(["who is here?"])[0].shape[0] == 1


def _one_error_line(err: str) -> None:
    """The error contract: one line ``dpr-jax encode: <file>: ...``, last, and no traceback
    (progress lines and transformers' own warnings may come before it)."""
    lines = err.strip().splitlines()
    assert [ln for ln in lines if ln.startswith("dpr-jax ")] == lines[-1:], err
    assert "tokenizer_config.json: 'auto_map' asks to run" in lines[-1]
    assert "Traceback" not in err


def test_tokenizer_loaders_never_run_planted_code(planted):
    model, marker, refused = planted
    _load_or_refused(DPRTokenizer, model, refused)
    _load_or_refused(load_tokenizer, model, refused)
    assert not marker.exists()


def test_encode_never_runs_planted_code(planted, tmp_path, capsys):
    model, marker, refused = planted
    passages = tmp_path / "p.tsv"
    passages.write_text("id\ttext\ttitle\n1\tthe river runs\tRiver\n")
    argv = ["encode", "--model", str(model), "--passages", str(passages),
            "--out", str(tmp_path / "emb"), "--batch-size", "2"]  # fmt: skip
    code = main(argv)
    out, err = capsys.readouterr()
    assert "[y/N]" not in out + err
    if refused:
        assert code == 2
        _one_error_line(err)
    else:
        assert code == 0
    assert not marker.exists()


def test_encode_subprocess_with_stdin_closed(tiny_biencoder_dir, tmp_path):
    """The command line as a user runs it: no terminal to answer a prompt on."""
    model = tmp_path / "model"
    shutil.copytree(tiny_biencoder_dir, model)
    marker = tmp_path / "MARKER"
    _plant(model, marker, config_too=True)
    passages = tmp_path / "p.tsv"
    passages.write_text("id\ttext\ttitle\n1\tthe river runs\tRiver\n")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "dpr_jax.cli", "encode", "--model", str(model),
         "--passages", str(passages), "--out", str(tmp_path / "emb")],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == "" and "[y/N]" not in proc.stderr
    _one_error_line(proc.stderr)
    assert not marker.exists()
