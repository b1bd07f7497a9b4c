"""One way to name a set of evaluation questions: a file or a tensorflow-datasets split.

DPR evaluates retrieval on the questions (and answer strings) of NQ-open, TriviaQA and
WebQuestions (Karpukhin et al. 2020, sec. 4.1). Every command that reads questions
(``retrieve --questions``, ``ask --questions``, ``encode --questions``) and the Python API take
one *questions spec*, read by :func:`read_questions`:

- ``tfds:<name>/<split>``: a tensorflow-datasets split through ``tfds.data_source``
  (:mod:`dpr_jax.data.tfds_source`, DPR's answer conventions), e.g.
  ``tfds:natural_questions_open/validation``, ``tfds:trivia_qa/rc.nocontext/validation``,
  ``tfds:web_questions/test``; split slices (``validation[:100]``) and unions
  (``train+validation``) work as in tfds. The data is read from tfds' data directory
  (``TFDS_DATA_DIR``, default ``~/tensorflow_datasets``), prepared in the ``array_record``
  format.
- anything else: a file, read by :func:`dpr_jax.data.formats.read_qas` (DPR qas TSV/CSV,
  NQ-open JSONL, SQuAD JSON).

A spec that cannot be read (tensorflow-datasets missing, an unknown dataset, config or split, a
dataset not prepared) raises :class:`~dpr_jax.errors.UserError` naming the spec.
"""

from __future__ import annotations

import re
from pathlib import Path

from dpr_jax.data.formats import Question, read_qas
from dpr_jax.data.squad import parse_squad, squad_questions
from dpr_jax.data.textio import load_json, plain_name
from dpr_jax.data.tfds_source import SPLITS, load_tfds_questions
from dpr_jax.errors import UserError

TFDS_PREFIX = "tfds:"


def is_tfds_spec(spec: object) -> bool:
    return isinstance(spec, str) and spec.startswith(TFDS_PREFIX)


def parse_tfds_spec(spec: str) -> tuple[str, str]:
    """``"tfds:trivia_qa/rc.nocontext/validation"`` -> ``("trivia_qa/rc.nocontext", "validation")``;
    the dataset, its config and the split's names are checked."""
    name, _, split = spec[len(TFDS_PREFIX) :].rpartition("/")
    if not name or not split:
        raise UserError(
            f"{spec}: expected tfds:<name>/<split>, e.g. tfds:natural_questions_open/validation"
        )
    base = name.split("/")[0].split(":")[0]
    if base not in SPLITS:
        raise UserError(
            f"{spec}: unknown tfds dataset {base!r}; supported: {', '.join(sorted(SPLITS))}"
        )
    if base == "trivia_qa" and "/" not in name:
        raise UserError(
            f"{spec}: trivia_qa needs a config, e.g. tfds:trivia_qa/rc.nocontext/{split}"
        )
    for part in split.split("+"):
        split_name = re.sub(r"\[.*\]$", "", part.strip())
        if split_name not in SPLITS[base]:
            raise UserError(
                f"{spec}: unknown split {split_name!r} of {base}; it has {', '.join(SPLITS[base])}"
            )
    return name, split


def _first_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _read_tfds(spec: str, data_dir, limit: int | None) -> list[Question]:
    name, split = parse_tfds_spec(spec)
    try:
        return load_tfds_questions(name, split, data_dir=data_dir, limit=limit)
    except UserError as e:  # tensorflow-datasets not installed: the message names the extra
        raise UserError(f"{spec}: {e}") from None
    except (NotImplementedError, AssertionError, FileNotFoundError, KeyError) as e:
        where = data_dir or "TFDS_DATA_DIR (default ~/tensorflow_datasets)"
        raise UserError(
            f"{spec}: {name} is not prepared for random access in {where} ({_first_line(e)}); "
            f"prepare it with `tfds build {name} --file_format=array_record`"
        ) from None
    except ValueError as e:  # tfds: unknown dataset or config
        config = re.search(r"BuilderConfig \S+ not found", str(e))
        raise UserError(f"{spec}: {config.group(0) if config else _first_line(e)}") from None


def read_questions(
    spec: str | Path, *, data_dir: str | Path | None = None, limit: int | None = None
) -> list[Question]:
    """The questions named by ``spec``: ``tfds:<name>/<split>`` or a qas/JSONL/SQuAD file.

    ``data_dir`` is tfds' data directory (tfds specs only); ``limit`` keeps the first questions.
    """
    if is_tfds_spec(spec):
        return _read_tfds(str(spec), data_dir, limit)
    questions = _read_file(Path(spec))
    return questions if limit is None else questions[:limit]


def _read_file(path: Path) -> list[Question]:
    """A qas TSV/CSV or NQ-open JSONL (:func:`dpr_jax.data.formats.read_qas`), or SQuAD JSON
    (every question of every paragraph)."""
    if plain_name(path).endswith(".json"):
        data = load_json(path)
        if isinstance(data, dict) and "data" in data:
            return squad_questions(parse_squad(data, path))
    return read_qas(path)


def describe(spec: str | Path) -> str:
    """How an artifact's config records the questions: the tfds spec, or the file's absolute
    path."""
    return str(spec) if is_tfds_spec(spec) else str(Path(spec).absolute())
