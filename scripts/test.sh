#!/usr/bin/env bash
# The test command: installs what it needs, lints, then runs unit, integration (real Redis) and
# end-to-end tests. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
.venv/bin/ruff check .
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
