"""The environment the command line sets before jax is imported."""

from __future__ import annotations

import sys

import pytest

import dpr_jax.cli as cli


@pytest.fixture
def fresh(monkeypatch):
    """As in a new `dpr-jax` process: jax not imported yet, JAX_PLATFORMS unset."""
    monkeypatch.delitem(sys.modules, "jax", raising=False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    return monkeypatch


def _host(mp, accel=(), vfio=False, have=("libtpu",)):
    mp.setattr(cli.glob, "glob", lambda pattern: list(accel))
    mp.setattr(cli.os.path, "exists", lambda p: vfio if p == "/dev/vfio" else False)
    mp.setattr(cli.importlib.util, "find_spec", lambda m: object() if m in have else None)


def test_cpu_host_with_libtpu_runs_jax_on_the_cpu(fresh):
    _host(fresh)
    cli.cpu_host_with_libtpu()
    assert cli.os.environ["JAX_PLATFORMS"] == "cpu"


@pytest.mark.parametrize(
    "host",
    [
        {"accel": ["/dev/accel0"]},  # TPU v4 / v5e VM
        {"vfio": True},  # TPU v5p / v6e VM
        {"have": ("libtpu", "jax_plugins")},  # a GPU plugin is installed
        {"have": ()},  # no libtpu: nothing to probe
    ],
)
def test_accelerator_hosts_are_left_alone(fresh, host):
    _host(fresh, **host)
    cli.cpu_host_with_libtpu()
    assert "JAX_PLATFORMS" not in cli.os.environ


def test_an_explicit_choice_is_kept(fresh):
    _host(fresh)
    fresh.setenv("JAX_PLATFORMS", "tpu")
    cli.cpu_host_with_libtpu()
    assert cli.os.environ["JAX_PLATFORMS"] == "tpu"
