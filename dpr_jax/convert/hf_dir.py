"""Hugging Face directories: reading one (local, or a hub id downloaded with huggingface_hub) into
numpy (:func:`read_hf` -> :class:`HFCheckpoint`), writing one (:func:`write_hf_dir`), and the
checks on a conversion's destination."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from dpr_jax.convert.tables import (
    ARCHITECTURES,
    BERT_PREFIX,
    TOWER,
    check_arch,
    hf_state_dict_to_flax,
    normalize_hf_state_dict,
)
from dpr_jax.errors import UserError, optional_import
from dpr_jax.io import check_output, read_json_object
from dpr_jax.models.bert import BertConfig
from dpr_jax.models.kind import without_pooler

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
    "added_tokens.json",
)


@dataclasses.dataclass
class HFCheckpoint:
    """A Hugging Face checkpoint read into numpy: where from, what it is, its weights."""

    path: Path
    source: str  # what the user named (directory or hub id)
    arch: str  # one of ARCHITECTURES
    bert: BertConfig
    projection_dim: int
    state_dict: dict[str, np.ndarray]  # normalised (see normalize_hf_state_dict)
    weights_file: Path  # model.safetensors, its index or pytorch_model.bin (named in errors)
    dropped: list[str]  # keys normalize_hf_state_dict dropped
    has_tokenizer: bool

    @property
    def has_pooler(self) -> bool:
        return "pooler.dense.weight" in self.state_dict

    def bert_body(self) -> dict:
        """The BERT's parameters without its pooler: a BertModel's, a DPR encoder's tower's or a
        DPRReader's encoder's (what a reader or a [CLS] tower starts from)."""
        if self.arch == "BertModel":
            return self.flax_params(add_pooling_layer=False)
        if self.arch == "DPRReader":
            return self.flax_params()["encoder"]["bert_model"]
        return without_pooler(self.flax_params()[TOWER[self.arch]]["bert_model"])

    def flax_params(self, add_pooling_layer: bool | None = None) -> dict:
        """Flax parameters; ``add_pooling_layer=False`` leaves a BertModel's pooler out."""
        sd = self.state_dict
        if add_pooling_layer is False:
            sd = {k: v for k, v in sd.items() if not k.startswith("pooler.")}
        return hf_state_dict_to_flax(
            sd, self.arch, self.bert, self.projection_dim, add_pooling_layer,
            where=str(self.weights_file),
        )  # fmt: skip


def _resolve_source(src: str | Path) -> Path:
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{path}: expected a directory with config.json and the weights")
        if (path / "dpr_jax_model.json").exists() and not (path / "config.json").exists():
            raise UserError(
                f"{path}: a dpr-jax model directory, not a Hugging Face one; it is ready to use "
                "as it is (--to-hf exports it)"
            )
        return path
    s = str(src)
    if s.startswith((".", "/", "~")) or s.count("/") > 1:
        raise FileNotFoundError(f"{path}: no such directory (and not a hub id like 'org/name')")
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "*.safetensors", "*.safetensors.index.json", *TOKENIZER_FILES]
    local = Path(snapshot_download(s, allow_patterns=patterns))
    if not list(local.glob("*.safetensors")):
        local = Path(snapshot_download(s, allow_patterns=[*patterns, "pytorch_model.bin"]))
    return local


def _load_weights(path: Path) -> tuple[dict[str, np.ndarray], Path]:
    """-> (state dict, the file it came from)."""

    single, index = path / "model.safetensors", path / "model.safetensors.index.json"
    if single.is_file():
        try:
            return load_file(single), single
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise UserError(f"{single}: cannot read ({type(e).__name__}: {e})") from e
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UserError(f"{index}: not a safetensors index (field 'weight_map': {e})") from None
        sd: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            sd.update(load_file(path / shard))
        return sd, index
    binary = path / "pytorch_model.bin"
    if binary.is_file():
        torch = optional_import("torch", "torch", f"{binary}: reading pytorch_model.bin")
        sd = torch.load(binary, map_location="cpu", weights_only=True)
        sd = {
            k: (v.float() if v.is_floating_point() else v).numpy()
            for k, v in sd.items()
            if isinstance(v, torch.Tensor)
        }
        return sd, binary
    raise FileNotFoundError(
        f"{path}: no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )


def _detect_arch(config: dict, keys: list[str], config_path: Path) -> str:
    archs = config.get("architectures") or []
    model_type = config.get("model_type")
    for a in archs:
        if a in ARCHITECTURES:
            return a
    if model_type == "bert" or any(a.startswith("Bert") for a in archs):
        return "BertModel"
    if model_type == "dpr":
        for arch, (pre, _) in BERT_PREFIX.items():
            if pre and any(k.startswith(pre) for k in keys):
                return arch
        raise UserError(
            f"{config_path}: model_type 'dpr' but neither the field 'architectures' ({archs}) nor "
            "the weight names say which DPR model this is"
        )
    raise UserError(
        f"{config_path}: field 'model_type' is {model_type!r} and 'architectures' {archs}: not a "
        f"BERT or DPR checkpoint (supported: {ARCHITECTURES} and BertFor* models)"
    )


def read_hf(src: str | Path) -> HFCheckpoint:
    """Read a Hugging Face BERT / DPR checkpoint (local directory or hub id) into numpy."""
    path = _resolve_source(src)
    config_path = path / "config.json"
    config = read_json_object(config_path, error=UserError, missing="config file not found")
    try:
        bert = BertConfig.from_dict(config)
    except (TypeError, ValueError) as e:
        raise UserError(f"{config_path}: bad BERT config ({e})") from None
    raw, weights_file = _load_weights(path)
    arch = _detect_arch(config, list(raw), config_path)
    projection_dim = int(config.get("projection_dim") or 0)
    if arch == "DPRReader" and projection_dim:
        raise UserError(
            f"{config_path}: field 'projection_dim' is {projection_dim}; a DPRReader with an "
            "encode_proj is not supported (its span heads read the BERT output)"
        )
    if arch == "BertModel":
        projection_dim = 0
    sd, dropped = normalize_hf_state_dict(raw, arch)
    has_tok = any((path / f).is_file() for f in TOKENIZER_FILES)
    return HFCheckpoint(
        path, str(src), arch, bert, projection_dim, sd, weights_file, dropped, has_tok
    )


def hf_config_dict(arch: str, bert: BertConfig, projection_dim: int = 0) -> dict[str, Any]:
    """config.json for ``arch`` (``DPRConfig`` = BERT fields + projection_dim)."""
    check_arch(arch)
    d = bert.to_hf_dict(architectures=[arch])
    if arch != "BertModel":
        d["model_type"] = "dpr"
        d["projection_dim"] = int(projection_dim)
    return d


def write_hf_dir(
    out: Path, arch: str, bert: BertConfig, state_dict: Mapping[str, np.ndarray],
    projection_dim: int = 0, tokenizer_from: Path | None = None,
) -> None:  # fmt: skip
    """config.json + model.safetensors (+ tokenizer files) into ``out`` (new or empty)."""

    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config_dict(arch, bert, projection_dim)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state_dict.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer_from / name).is_file():
                shutil.copy2(tokenizer_from / name, out / name)


def prepare_out(out: Path, overwrite: bool) -> Path:
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out}: exists and is not empty (pass --overwrite to replace it)")
    return out


def check_out(out: str | Path, kind: str, *inputs: str | Path | None) -> None:
    """Refuse ``--out`` equal to, above or inside a local input, or holding anything but a
    ``kind`` (:func:`dpr_jax.io.check_output`), before anything is read or deleted."""

    check_output(out, kind, [i for i in inputs if i is not None and Path(i).exists()])
