"""`dpr-jax plan`: the command line over :mod:`dpr_jax.plan`."""

from __future__ import annotations

from dpr_jax.plan import cli_main

__all__ = ["cli_main"]
