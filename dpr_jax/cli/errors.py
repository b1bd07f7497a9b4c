"""The command line's one error contract.

- A user error (:class:`dpr_jax.errors.UserError`, which every check of dpr-jax raises, or a
  missing / unreadable file) prints one line
  ``dpr-jax <command>: <file>[, line N]: <what is wrong and what to do>`` on stderr, exit 2.
- A warning of dpr-jax's own (a partial corpus, a skipped line, an older model directory) prints
  one line ``dpr-jax <command>: warning: <message>`` on stderr and the command goes on; warnings
  of other libraries keep Python's form.
- Ctrl-C prints one line (commands that save on interruption say what they saved first), exit 130.
- Anything else is a bug in dpr-jax, a ``ValueError`` from inside the library included: the
  traceback is kept, exit 1.

``--debug`` (any position) or ``DPR_JAX_DEBUG=1`` shows the traceback of user errors too.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

from dpr_jax.errors import UsageError, UserError

_PACKAGE_DIR = Path(__file__).resolve().parents[1]
# OSErrors that are the user's: a path that is missing, of the wrong kind, or not theirs to touch.
_USER_OS_ERRORS = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)


# Commands that write their output once, at the end, atomically: Ctrl-C leaves nothing behind.
WRITES_AT_END = {"retrieve", "ask", "read", "evaluate", "plan", "plot"}


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors follow the contract (one line, exit 2) instead of
    printing the usage block."""

    def error(self, message: str):  # noqa: D401 (argparse's signature)
        raise UsageError(f"{message} (see `{self.prog} --help`)")


def command_parser(module: str, description: str) -> Parser:
    """The parser of the command implemented by ``module`` (``dpr_jax.cli.train_reader`` is
    ``dpr-jax train-reader``), described by the first paragraph of ``description`` (the module
    docstring: "`dpr-jax NAME`: what it does ...")."""
    prog = "dpr-jax " + module.rsplit(".", 1)[-1].replace("_", "-")
    first = " ".join(description.strip().split("\n\n")[0].split())
    first = first.removeprefix(f"`{prog}`: ")
    return Parser(prog=prog, description=first[:1].upper() + first[1:])


def is_user_error(exc: BaseException) -> bool:
    """A :class:`~dpr_jax.errors.UserError` (every check of dpr-jax raises one) or a path that
    is missing, of the wrong kind, or not the user's to touch. Any other exception, a
    ``ValueError`` included, is a bug and keeps its traceback."""
    return isinstance(exc, (UserError, *_USER_OS_ERRORS))


def one_line(exc: BaseException) -> str:
    """The message of a user error on one line (an OSError as ``<file>: <reason>``)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror.lower()}"
    else:
        text = str(exc) or type(exc).__name__
        if isinstance(exc, KeyError):  # str(KeyError('x')) is "'x'"
            text = str(exc.args[0]) if exc.args else text
    return " ".join(text.split())


def debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``(debug, argv without --debug)``."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) != len(argv) or os.environ.get("DPR_JAX_DEBUG", "") not in ("", "0"), rest


def _one_line_warning(name: str, shown: Callable) -> Callable:
    """``warnings.showwarning`` that prints dpr-jax's own warnings (raised from a module of the
    package) as one line naming the command; other warnings go to ``shown``."""

    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, UserWarning) and Path(filename).resolve().is_relative_to(
            _PACKAGE_DIR
        ):
            text = " ".join(str(message).split())
            print(f"dpr-jax {name}: warning: {text}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)

    return show


def run_command(name: str, cli_main: Callable[[list[str]], int | None], argv: list[str]) -> int:
    """Run one subcommand under the contract; returns its exit code."""
    debug, argv = debug_requested(argv)
    try:
        with warnings.catch_warnings():
            if not debug:
                warnings.showwarning = _one_line_warning(name, warnings.showwarning)
            return int(cli_main(argv) or 0)
    except KeyboardInterrupt as e:  # commands that keep work say what (Interrupted's message)
        kept = f"; {e}" if str(e) else ("; nothing was written" if name in WRITES_AT_END else "")
        print(f"dpr-jax {name}: interrupted{kept}", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        if debug:
            traceback.print_exc()
        print(f"dpr-jax {name}: {one_line(e)}", file=sys.stderr)
        return 2


def run_script(name: str, script_main: Callable[..., int | None], *args) -> int:
    """A script's entry (``scripts/bench_*.py`` and the like) under the same contract: a user
    error is one line ``<name>: <message>`` on stderr, exit 2 (``DPR_JAX_DEBUG=1`` shows its
    traceback too); Ctrl-C one line, exit 130; anything else keeps its traceback."""
    try:
        return int(script_main(*args) or 0)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not is_user_error(e):
            raise
        if debug_requested([])[0]:
            traceback.print_exc()
        print(f"{name}: {one_line(e)}", file=sys.stderr)
        return 2
