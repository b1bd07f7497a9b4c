#!/usr/bin/env bash
# Create .venv and install dpr-jax with every extra (idempotent; fast when already installed).
# torch is pinned to the CPU wheel 2.13.0 and installed first, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]' 2>&1 | grep -v '^WARNING: Location' || true
.venv/bin/python -c "import dpr_jax, jax, flax, optax, orbax.checkpoint, torch, scann, faiss, bm25s" \
  || { echo "setup.sh: installation incomplete" >&2; exit 1; }
