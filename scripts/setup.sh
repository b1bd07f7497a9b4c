#!/usr/bin/env bash
# Create .venv and install dpr-jax with every extra (idempotent; fast when already installed).
# torch is pinned to the CPU wheel 2.13.0 and installed first, so nothing pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# pip, quiet (a harmless warning dropped); a failure is remembered
pip_q() {
    local out
    out=$(.venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2>&1) || pip_failed=1
    [[ -z $out ]] || grep -v '^WARNING: Location' <<<"$out" || true
}
# what the last complete installation was made from: the same files again skip pip (~20 s of
# resolving); the import check below runs every time
STAMP=.venv/.dpr-jax-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
pip_failed=0
if [[ ! -f $STAMP || $(<"$STAMP") != "$want" ]]; then
    rm -f "$STAMP"
    pip_q --upgrade pip
    pip_q "torch==2.13.0"
    pip_q -e '.[test]'
fi
.venv/bin/python -c "import dpr_jax, jax, flax, optax, orbax.checkpoint, torch, scann, faiss, bm25s" \
  || { echo "setup.sh: installation incomplete" >&2; exit 1; }
((pip_failed)) || echo "$want" >"$STAMP" # a failed pip call is tried again next time
