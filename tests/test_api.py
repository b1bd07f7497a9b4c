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
