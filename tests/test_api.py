"""The public API at the package top resolves every name, lazily."""

import subprocess
import sys

import dpr_jax


def test_every_public_name_resolves_to_its_module_attribute():
    import importlib

    for name, target in dpr_jax._API.items():
        module, attr = target.split(":")
        assert getattr(dpr_jax, name) is getattr(importlib.import_module(module), attr), name


def test_import_is_light():
    code = ("import sys, dpr_jax; heavy = [m for m in ('jax', 'torch', 'faiss', 'scann', "
            "'flax', 'transformers') if m in sys.modules]; print(heavy)")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_reader_predictor_given_a_path_points_to_from_dir(tmp_path):
    """The reader's constructor takes parameters; a model directory given to it is named, with
    the method that reads one, instead of a missing-arguments TypeError."""
    import pytest

    for path in ("runs/reader/model", tmp_path):
        with pytest.raises(
            ValueError, match=r"a model directory is read by ReaderPredictor\.from_dir"
        ):
            dpr_jax.ReaderPredictor(path)
    with pytest.raises(ValueError, match=r"all three are needed"):
        dpr_jax.ReaderPredictor({"params": {}})
