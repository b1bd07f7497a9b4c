"""Tokenization with DPR's input conventions (Karpukhin et al. 2020, sec. 3.1 and 5.1).

- question:  ``[CLS] question [SEP]``
- passage:   ``[CLS] title [SEP] text [SEP]`` with **all-zero token_type_ids**. This is what the
  original DPR does (``BertTensorizer`` + ``segments = zeros_like(ids)``). Hugging Face's pair
  encoding would give the text segment type 1; the towers here always feed zeros, so checkpoints
  converted from the original DPR behave as they were trained.
- reader:    ``[CLS] question [SEP] title [SEP] text [SEP]`` (built by the reader's own code).

Length bucketing: with ``bucket=B`` a batch is padded to the next multiple of B above its
longest sequence (capped at ``max_length``) instead of to ``max_length``, so short passages do not
pay for 256 positions while the number of distinct shapes (and jit compilations) stays small.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from dpr_jax.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def _auto_map_file(path: str | Path) -> Path | None:
    """The first of the directory's tokenizer_config.json / config.json with an ``auto_map``
    (custom classes in .py files of the directory), or None."""
    for name in ("tokenizer_config.json", "config.json"):
        p = Path(path) / name
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "auto_map" in data:
            return p
    return None


BERT_TOKENIZERS = ("BertTokenizer", "BertTokenizerFast")


def _named_bert_tokenizer(path: str | Path) -> bool:
    """The directory's tokenizer_config.json names transformers' BERT tokenizer and asks for no
    custom code: the class AutoTokenizer would pick, loadable without AutoTokenizer."""
    try:
        data = json.loads((Path(path) / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("tokenizer_class") in BERT_TOKENIZERS
        and _auto_map_file(path) is None  # no auto_map in tokenizer_config.json or config.json
    )


def padded_length(longest: int, max_length: int, bucket: int | None) -> int:
    if not bucket:
        return max_length
    return min(max_length, max(bucket, int(math.ceil(longest / bucket)) * bucket))


class DPRTokenizer:
    """Wraps a Hugging Face (fast) BERT tokenizer; returns numpy int32 (ids, mask)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        try:
            if _named_bert_tokenizer(path):
                # AutoTokenizer's choice here, without its model-config imports (they import
                # torch: ~2 s of every command that tokenizes; tests/test_tokenize.py)
                from transformers import BertTokenizerFast as Bert

                self.tok = Bert.from_pretrained(self.path)
            else:
                from transformers import AutoTokenizer

                # never code from the directory: an `auto_map` naming a .py file there is
                # ignored when a built-in class fits, refused otherwise; False (not None) also
                # means transformers never asks "Do you wish to run the custom code? [y/N]"
                self.tok = AutoTokenizer.from_pretrained(self.path, trust_remote_code=False)
        except (OSError, ValueError) as e:
            remote = _auto_map_file(path)
            if remote is not None:
                raise UserError(
                    f"{remote}: 'auto_map' asks to run Python code from {path}, and dpr-jax never "
                    "runs code from a model or tokenizer directory; remove 'auto_map' or use a "
                    "standard (BERT) tokenizer"
                ) from None
            raise UserError(f"{path}: cannot load a tokenizer from here ({e})") from None
        if not type(self.tok).__module__.startswith("transformers."):  # defence in depth
            raise UserError(
                f"{path}: the tokenizer class {type(self.tok).__qualname__} is not one of "
                "transformers' own; dpr-jax never runs code from a model or tokenizer directory"
            )
        # long passages are tokenized whole and then cut into windows (the reader) or truncated
        # by us: transformers' "longer than the maximum sequence length" warning is noise here
        self.tok.deprecation_warnings["sequence-length-is-longer-than-the-specified-maximum"] = True

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    def save(self, out_dir: str | Path) -> None:
        self.tok.save_pretrained(str(out_dir))

    def _pad(self, seqs: list[list[int]], max_length: int, bucket: int | None):
        t = padded_length(max(len(s) for s in seqs), max_length, bucket)
        ids = np.full((len(seqs), t), self.tok.pad_token_id, np.int32)
        mask = np.zeros((len(seqs), t), np.int32)
        for i, s in enumerate(seqs):
            s = s[:t]
            ids[i, : len(s)] = s
            mask[i, : len(s)] = 1
        return ids, mask

    def questions(self, questions: list[str], max_length: int = 64, bucket: int | None = None):
        """(B,) questions -> ids, mask: (B, T) int32."""
        enc = self.tok(list(questions), truncation=True, max_length=max_length)
        return self._pad(enc["input_ids"], max_length, bucket)

    def passages(
        self,
        titles: list[str | None],
        texts: list[str],
        max_length: int = 256,
        bucket: int | None = None,
    ):
        """``title [SEP] text`` (or just text when there is no title) -> ids, mask (B, T)."""
        seqs: list[list[int]] = [None] * len(texts)  # type: ignore[list-item]
        with_title = [i for i, t in enumerate(titles) if t]
        without = [i for i, t in enumerate(titles) if not t]
        if with_title:
            enc = self.tok(
                [titles[i] for i in with_title],
                [texts[i] for i in with_title],
                truncation="longest_first",
                max_length=max_length,
            )
            for i, s in zip(with_title, enc["input_ids"]):
                seqs[i] = s
        if without:
            enc = self.tok([texts[i] for i in without], truncation=True, max_length=max_length)
            for i, s in zip(without, enc["input_ids"]):
                seqs[i] = s
        return self._pad(seqs, max_length, bucket)
