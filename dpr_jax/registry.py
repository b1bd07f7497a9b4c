"""One helper for the package's lazy registries: a name -> ``"dpr_jax.module:attribute"`` table
whose targets are imported when first asked for, so that ``import dpr_jax`` loads nothing heavy,
`dpr-jax index` never pays for torch and FAISS / ScaNN load only when used.

The public API (``dpr_jax.__init__``), the index backends (``dpr_jax.index.backends.BACKENDS``) and
the command line's subcommands (``dpr_jax.cli.COMMANDS``) are ``Registry`` tables. The tables are
plain string literals on purpose: ``tests/test_layers.py`` reads every ``Registry({...})`` in the
package and counts its targets as imports of the module that holds it, so an import made through
a registry obeys the same layers as any other.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any


class Registry(Mapping[str, str]):
    """``name -> "module:attribute"``, loaded on :meth:`load`."""

    def __init__(self, entries: Mapping[str, str]):
        for name, target in entries.items():
            if target.count(":") != 1:
                raise ValueError(
                    f"registry entry {name!r}: expected 'module:attribute', got {target!r}"
                )
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> str:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def module(self, name: str) -> str:
        return self._entries[name].partition(":")[0]

    def load(self, name: str) -> Any:
        """The attribute ``name`` stands for (its module imported now)."""
        module, _, attr = self._entries[name].partition(":")
        return getattr(importlib.import_module(module), attr)
