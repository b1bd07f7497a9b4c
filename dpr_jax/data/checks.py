"""Checks of the arguments retrievers share, one copy: the Python API refuses a mistake with the
message the command line prints (a :class:`~dpr_jax.errors.UserError`).

A leaf of the data layer (imports only :mod:`dpr_jax.errors`), so that every retriever (BM25 in
:mod:`dpr_jax.data.bm25`, dense and hybrid in :mod:`dpr_jax.search`) can use it.
"""

from __future__ import annotations

from dpr_jax.errors import ArgumentTypeError, UserError


def question_texts(questions, what: str = "questions") -> list[str]:
    """``questions`` as a list of question strings, or :class:`UserError`: one string (which
    would be searched character by character), a non-string item (None, a number, a
    :class:`~dpr_jax.data.formats.Question`: give ``q.question``) or an empty string, named by
    its position. The one check of every retriever's ``search`` (dense, BM25, hybrid)."""
    if isinstance(questions, (str, bytes)):
        raise ArgumentTypeError(
            f"{what}: expected a list of question strings, got one string; "
            "wrap it in a list: search([question], k)"
        )
    try:
        texts = list(questions)
    except TypeError:
        raise ArgumentTypeError(
            f"{what}: expected a list of question strings, got {type(questions).__name__}"
        ) from None
    for i, q in enumerate(texts):
        if not isinstance(q, str):
            raise ArgumentTypeError(
                f"{what}[{i}]: expected a question string, got {type(q).__name__} ({q!r:.40})"
            )
        if not q.strip():
            raise UserError(f"{what}[{i}]: an empty question")
    return texts
