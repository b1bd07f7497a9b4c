"""The one cache of compiled functions, reused by later runs in the same process (tests,
sweeps, notebooks): a new ``jax.jit`` closure is traced and compiled again even for an identical
program, so builders of jitted functions go through :func:`memo` with a key naming everything
the program depends on."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, TypeVar

T = TypeVar("T")
MAX_ENTRIES = 32
_COMPILED: dict[Any, Any] = {}


def memo(key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` once per ``key`` (the cache is emptied when it holds :data:`MAX_ENTRIES`)."""
    if key not in _COMPILED:
        if len(_COMPILED) >= MAX_ENTRIES:
            _COMPILED.clear()
        _COMPILED[key] = build()
    return _COMPILED[key]
