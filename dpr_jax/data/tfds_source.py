"""Open-domain QA questions from TensorFlow Datasets (Karpukhin et al. 2020, sec. 4.1 datasets).

DPR evaluates on Natural Questions (open), TriviaQA, WebQuestions, CuratedTREC and SQuAD; only
the questions and their answer strings are needed for retrieval evaluation (top-k accuracy with
``has_answer``). This module reads them with ``tfds.data_source`` (random access over ArrayRecord
files, no TensorFlow needed) and yields :class:`~dpr_jax.data.formats.Question` objects:

================================  ========================================================
``natural_questions_open``        ``question``; answers ``answer`` (list)
``trivia_qa/<config>``            ``question``; answers ``answer.aliases`` (``answers=``
                                  ``"normalized_aliases"`` for the normalized ones), falling
                                  back to ``[answer.value]``; id ``question_id``. Use a
                                  ``*.nocontext`` config (e.g. ``trivia_qa/rc.nocontext``):
                                  the evidence documents are not needed. The test split has no
                                  answers (empty lists).
``web_questions``                 ``question``; answers ``answers`` (list)
================================  ========================================================

Questions without their own id get ``f"{split}-{index}"``. ``download`` is passed to
``tfds.data_source`` (which then downloads and prepares the dataset into ``data_dir``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dpr_jax.data.formats import Question
from dpr_jax.errors import UserError, optional_import


@dataclasses.dataclass(frozen=True)
class TfdsQaSpec:
    question: str
    answers: tuple[str, ...]  # path of the answers feature inside an example
    id: str | None = None
    fallback_answer: tuple[str, ...] | None = None
    module: str | None = None  # a module to import so that tfds registers the builder


SPECS: dict[str, TfdsQaSpec] = {
    "natural_questions_open": TfdsQaSpec("question", ("answer",)),
    "trivia_qa": TfdsQaSpec(
        "question", ("answer", "aliases"), id="question_id", fallback_answer=("answer", "value")
    ),
    # Registered by the legacy question_answering package, which `import tensorflow_datasets`
    # does not load when TensorFlow is absent.
    "web_questions": TfdsQaSpec(
        "question", ("answers",), module="tensorflow_datasets.question_answering.web_questions"
    ),
}
TRIVIA_ANSWER_FIELDS = ("aliases", "normalized_aliases", "value")
# The splits each dataset publishes (tfds' catalog), checked before tfds is asked.
SPLITS: dict[str, tuple[str, ...]] = {
    "natural_questions_open": ("train", "validation"),
    "trivia_qa": ("train", "validation", "test"),
    "web_questions": ("train", "test"),
}


def _import_tfds():
    return optional_import("tensorflow_datasets", "tfds", "a tfds source")


@contextlib.contextmanager
def _own_tempdir() -> Iterator[None]:
    """Point ``tempfile`` at a directory this call creates and removes.

    A tfds builder whose ``data_dir`` holds no prepared dataset asks GCS for its metadata in a
    fresh ``tempfile.mkdtemp("tfds")`` that tfds never removes (``DatasetInfo.
    initialize_from_bucket``): offline an empty ``/tmp/tmp*tfds`` per call, online the copied
    metadata files. Inside this context such directories land in one scratch directory of ours,
    removed on the way out; nothing outside it is touched.
    """
    saved = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="dpr-jax-tfds-") as scratch:
        tempfile.tempdir = scratch
        try:
            yield
        finally:
            tempfile.tempdir = saved


def _to_str(value: Any) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).decode("utf-8")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalar
        return _to_str(value.item())
    return str(value)


def _to_str_list(value: Any) -> list[str]:
    if isinstance(value, (str, bytes, bytearray)):
        return [_to_str(value)]
    return [_to_str(v) for v in list(value)]


def _get_path(example: Any, path: tuple[str, ...], where: str) -> Any:
    value = example
    for key in path:
        if not isinstance(value, dict) or key not in value:
            raise UserError(f"{where}: example has no feature {'.'.join(path)!r}")
        value = value[key]
    return value


def _spec_for(name: str, answers: str | None) -> TfdsQaSpec:
    base = name.split("/")[0].split(":")[0]
    if base not in SPECS:
        raise UserError(f"unsupported tfds dataset {name!r}; supported: {sorted(SPECS)}")
    spec = SPECS[base]
    if answers is not None:
        if base != "trivia_qa" or answers not in TRIVIA_ANSWER_FIELDS:
            raise UserError(
                f"answers={answers!r}: only trivia_qa has a choice, one of {TRIVIA_ANSWER_FIELDS}"
            )
        spec = dataclasses.replace(spec, answers=("answer", answers))
    return spec


def tfds_questions(
    name: str,
    split: str = "validation",
    data_dir: str | Path | None = None,
    limit: int | None = None,
    answers: str | None = None,
    download: bool = False,
) -> Iterator[Question]:
    """Yield the questions of a tfds QA dataset (see the module docstring for the features)."""
    spec = _spec_for(name, answers)
    tfds = _import_tfds()
    if spec.module:
        import importlib

        importlib.import_module(spec.module)
    with _own_tempdir():
        source = tfds.data_source(
            name,
            split=split,
            data_dir=None if data_dir is None else str(data_dir),
            download=download,
        )
    n = len(source) if limit is None else min(limit, len(source))
    for i in range(n):
        ex = source[i]
        where = f"tfds {name}[{split}] example {i}"
        question = _to_str(_get_path(ex, (spec.question,), where))
        ans = _to_str_list(_get_path(ex, spec.answers, where))
        if not ans and spec.fallback_answer is not None:
            value = _to_str(_get_path(ex, spec.fallback_answer, where))
            ans = [] if value in ("", "<unk>") else [value]
        qid = _to_str(_get_path(ex, (spec.id,), where)) if spec.id else f"{split}-{i}"
        yield Question(question, ans, qid)


def load_tfds_questions(name: str, split: str = "validation", **kwargs) -> list[Question]:
    return list(tfds_questions(name, split, **kwargs))
