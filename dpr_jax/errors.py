"""The exceptions that mean "the user gave something wrong", as opposed to a bug in dpr-jax.

Library code raises :class:`UserError` (or one of its subclasses, or a ``FileNotFoundError`` /
``PermissionError`` for a path) with a message that starts with the file it concerns and says
what to do: ``"<file>, line N: <what is wrong>; <what to do>"``. The command line
(:mod:`dpr_jax.cli.errors`) prints such errors as one line and exits 2; anything else is a bug and
keeps its traceback (exit 1).
"""

from __future__ import annotations

import importlib


class UserError(ValueError):
    """A user mistake: missing, empty or malformed input, a bad option, artifacts that do not
    belong together. The message names the file (and line) and what to do."""


class UsageError(UserError):
    """A bad command-line option or value."""


class ArgumentTypeError(UserError, TypeError):
    """An API argument of the wrong type (one string where a list of strings is expected, None
    where a string is): a :class:`UserError` that is also a ``TypeError``."""


class ProvenanceError(UserError):
    """An artifact was made from another model or corpus than the one it is used with (the
    message names both)."""


class MissingDependency(UserError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, after the work was put in order; the message says what was kept (the command
    line prints it on its one line)."""


def optional_import(module: str, extra: str, what: str):
    """``importlib.import_module(module)``, or :class:`MissingDependency` saying
    ``"<what> needs <module>: pip install 'dpr-jax[<extra>]'"``. Heavy optional dependencies
    (torch, faiss, scann, tensorflow-datasets, bm25s, array-record) are imported through it, when
    first used."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(
            f"{what} needs {module.split('.')[0]}: pip install 'dpr-jax[{extra}]' ({e})"
        ) from None


def where(path: object, line: int | None = None) -> str:
    """``"<path>"`` or ``"<path>, line N"``: the prefix of a user-error message."""
    return f"{path}, line {line}" if line is not None else f"{path}"
