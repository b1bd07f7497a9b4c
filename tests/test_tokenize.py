"""DPRTokenizer loads a directory whose tokenizer_config.json names transformers' BERT tokenizer
directly, without AutoTokenizer (whose model-config imports bring torch in: ~2 s of every
command's start): the same class as AutoTokenizer's and the same encodings, and a process that
only tokenizes never imports torch."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dpr_jax.data.tokenize import DPRTokenizer

TEXTS = [
    "Who founded the University of Notre Dame?",
    "Héllo WORLD, naïve café, 東京 and ﬁ ligatures",
    "a" * 300 + " supercalifragilisticexpialidocious [SEP] [MASK] [unused3]",
    "",
]


def _dirs(minilm_dir, tiny_biencoder_dir, tmp_path):
    fast = tmp_path / "fast"  # the class's other name, as older transformers saved it
    shutil.copytree(minilm_dir, fast)
    cfg = json.loads((fast / "tokenizer_config.json").read_text())
    (fast / "tokenizer_config.json").write_text(
        json.dumps({**cfg, "tokenizer_class": "BertTokenizerFast"})
    )
    return {"minilm": minilm_dir, "saved model": tiny_biencoder_dir, "Fast": fast}


def test_a_named_bert_tokenizer_is_autotokenizers_class_and_encodes_the_same(
    minilm_dir, tiny_biencoder_dir, tmp_path
):
    from transformers import AutoTokenizer

    for name, d in _dirs(minilm_dir, tiny_biencoder_dir, tmp_path).items():
        ours, auto = DPRTokenizer(d), AutoTokenizer.from_pretrained(str(d))
        assert type(ours.tok) is type(auto), name
        for t in TEXTS:
            assert ours.tok(t)["input_ids"] == auto(t)["input_ids"], (name, t)
        assert ours.tok.all_special_ids == auto.all_special_ids and len(ours.tok) == len(auto)
        ids, mask = ours.questions(TEXTS, max_length=16)
        want = [auto(t, truncation=True, max_length=16)["input_ids"] for t in TEXTS]
        for row, m, w in zip(ids, mask, want, strict=True):  # [CLS] ... [SEP], then zeros
            assert row[: len(w)].tolist() == w and not row[len(w) :].any()
            assert m.tolist() == [1] * len(w) + [0] * (16 - len(w))
        assert ids.dtype == mask.dtype == np.int32 and ids.shape == (len(TEXTS), 16)


@pytest.mark.parametrize("kind", ["named", "named Fast", "unnamed"])
def test_tokenizing_imports_torch_only_without_a_named_class(minilm_dir, tmp_path, kind):
    """The direct path is the one taken (no torch) for either name; a directory that names no
    class still goes through AutoTokenizer (which brings torch in, where it is installed)."""
    from transformers import AutoTokenizer

    d = tmp_path / "tok"
    shutil.copytree(minilm_dir, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    if kind == "unnamed":  # AutoTokenizer decides from config.json, as before
        pytest.importorskip("torch")
        cfg.pop("tokenizer_class")
    elif kind == "named Fast":
        cfg["tokenizer_class"] = "BertTokenizerFast"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    code = (
        "import sys; from dpr_jax.data.tokenize import DPRTokenizer; "
        f"t = DPRTokenizer({str(d)!r}); t.questions(['who?']); "
        "print(type(t.tok).__name__, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    want = type(AutoTokenizer.from_pretrained(str(minilm_dir))).__name__
    assert out.stdout.split() == [want, str(kind == "unnamed")]
