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
install() {
    rm -f "$STAMP"
    pip_q --upgrade pip
    pip_q "torch==2.13.0"
    pip_q -e '.[test]'
}
imports_ok() {
    .venv/bin/python -c "import dpr_jax, jax, flax, optax, orbax.checkpoint, torch, scann, faiss, bm25s"
}
# what the last complete installation was made from (.venv/.dpr-jax-setup): the same files again
# skip pip (~20 s of resolving) while the imports work; remove it to force a reinstall
STAMP=.venv/.dpr-jax-setup
want=$(.venv/bin/python -c "import hashlib, sys; print(hashlib.sha256(b''.join(open(f, 'rb').read() for f in sys.argv[1:])).hexdigest())" pyproject.toml scripts/setup.sh)
pip_failed=0
if [[ -f $STAMP && $(<"$STAMP") == "$want" ]] && imports_ok; then
    exit 0
fi
install
imports_ok || { echo "setup.sh: installation incomplete" >&2; exit 1; }
((pip_failed)) || echo "$want" >"$STAMP" # a failed pip call is tried again next time
